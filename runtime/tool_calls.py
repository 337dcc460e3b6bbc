"""Tool (function) calling for /v1/chat/completions: the tools checked and rendered, the model's
tool-call syntax parsed back into OpenAI `tool_calls`, streamed and not.

The syntax is the chat template's own convention, recognised from the template text:
- "hermes" (templates with `<tool_call>` tags, and the fallback):
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  any number, after optional text;
- "llama3_json" (`<|python_tag|>`/ipython templates): the reply is one JSON object
  `{"name": ..., "parameters": {...}}` (or several separated by `;`);
- "tool_calls_tag" (`[TOOL_CALLS]` templates): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
A template that never mentions tools (SmolLM2) gets the tools in a Hermes-style system message.

`tool_choice` "required" or a named function is forced by constrained decoding, as vLLM does: the
output is constrained to a JSON schema built from the tools' parameters (named: the arguments
object itself; required: `[{"name": ..., "parameters": {...}}, ...]`) and parsed as such, whatever
the template's syntax.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

HERMES, LLAMA3_JSON, TOOL_CALLS_TAG = "hermes", "llama3_json", "tool_calls_tag"
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`; `param` names the field (tools[0].function.name, ...)."""

    def __init__(self, message: str, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


def template_format(chat_template: str | None) -> tuple[str, bool]:
    """(the tool-call syntax of a chat template, whether the template renders `tools` itself)."""
    t = chat_template or ""
    renders = "tools" in t
    if "[TOOL_CALLS]" in t:
        return TOOL_CALLS_TAG, renders
    if "<tool_call>" in t:
        return HERMES, renders
    if "<|python_tag|>" in t or "ipython" in t:
        return LLAMA3_JSON, renders
    return HERMES, renders


def check_tools(tools: list[dict], tool_choice, compile_schema=None) -> dict[str, dict]:
    """{name: parameters schema} of the request's tools; ToolError naming the field when one is bad.
    `compile_schema(schema)` raises ValueError for a schema the grammar engine cannot use."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool["function"]
        name = fn["name"]
        if not _NAME.match(name):
            raise ToolError(f"must be 1-64 letters, digits, '_' or '-', got {name!r}", f"tools[{i}].function.name")
        if name in out:
            raise ToolError(f"duplicate function name {name!r}", f"tools[{i}].function.name")
        params = fn.get("parameters")
        params = {"type": "object", "properties": {}} if params is None else params
        if params.get("type", "object") != "object":
            raise ToolError(f"must be a JSON schema of type 'object', got type {params.get('type')!r}",
                            f"tools[{i}].function.parameters")
        if compile_schema is not None:
            try:
                compile_schema(params)
            except ValueError as e:
                raise ToolError(f"not a usable JSON schema: {e}", f"tools[{i}].function.parameters") from None
        out[name] = params
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in out:
            raise ToolError(f"function {name!r} is not one of the tools {sorted(out)}", "tool_choice")
    elif tool_choice in ("required",) and not out:
        raise ToolError("'required' needs at least one tool", "tool_choice")
    return out


def forced_schema(schemas: dict[str, dict], tool_choice, parallel: bool = True) -> dict | None:
    """The JSON schema that forces a call for tool_choice "required" or a named function
    (`parallel` False: exactly one call)."""
    if isinstance(tool_choice, dict):
        return schemas[tool_choice["function"]["name"]]
    if tool_choice == "required":
        return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": [
            {"type": "object", "properties": {"name": {"const": name}, "parameters": params},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, params in schemas.items()]}}
    return None


def tools_system_prompt(tools: list[dict]) -> str:
    """Hermes-style instructions for a template that does not render tools itself."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def _call(obj, names) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse(text: str, fmt: str, names) -> tuple[str | None, list[ToolCall]]:
    """(content, tool calls) of a whole reply; no calls -> (text, [])."""
    if fmt == HERMES:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = [_call(_loads(body), names) for body in _HERMES_CALL.findall(text, start)]
        if not calls or None in calls:
            return text, []
        return (text[:start].strip() or None), calls
    body = text.strip()
    if fmt == TOOL_CALLS_TAG:
        body = body.removeprefix("[TOOL_CALLS]").strip()
        items = _loads(body)
        items = [items] if isinstance(items, dict) else items
    else:
        body = body.removeprefix("<|python_tag|>").strip()
        items = _loads(body)
        if items is None:
            items = [_loads(part) for part in body.split(";")]
        items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        return text, []
    calls = [_call(item, names) for item in items]
    return (None, calls) if None not in calls else (text, [])


def parse_forced(text: str, tool_choice, names) -> list[ToolCall]:
    """The calls of a reply constrained by `forced_schema` (empty when it did not complete)."""
    value = _loads(text)
    if isinstance(tool_choice, dict):
        return [ToolCall(tool_choice["function"]["name"], json.dumps(value, ensure_ascii=False))] \
            if isinstance(value, dict) else []
    if not isinstance(value, list):
        return []
    calls = [_call(item, names) for item in value]
    return [] if None in calls else calls


# Text a reply may start with when it is a tool call in these formats (held back while streaming).
_LEADS = {LLAMA3_JSON: ("{", "<|python_tag|>"), TOOL_CALLS_TAG: ("[", "[TOOL_CALLS]")}


@dataclass
class ToolPlan:
    """What one chat request does with tools: parse the reply in `fmt`, or (forced) as JSON."""

    fmt: str
    names: frozenset
    tool_choice: object  # "auto" | "required" | {"type": "function", "function": {"name": ...}}

    @property
    def named(self) -> str | None:
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    def result(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.tool_choice == "auto":
            return parse(text, self.fmt, self.names)
        calls = parse_forced(text, self.tool_choice, self.names)
        return (None, calls) if calls else (text, [])

    def finish_reason(self, calls: list[ToolCall], reason: str | None) -> str | None:
        if calls and reason == "stop":
            return "stop" if self.named else "tool_calls"  # vLLM's convention for a named function
        return reason

    def streamer(self) -> "ToolStreamer":
        return ToolStreamer(self)


class ToolStreamer:
    """One choice's stream: which content may go out now, and the calls at the end.

    Content is sent as it comes until the reply may be turning into a tool call (hermes: the
    text from a `<tool_call>` on, or a tail that could begin one; llama3_json/tool_calls_tag: a reply that
    starts like a call); that part is held and parsed when the choice finishes. A named function
    streams its arguments as they are generated."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.sent = 0  # characters of the text already sent as content
        self.call_started = False
        self.args_sent = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content delta, tool_call deltas) to send now for the cumulative `text`."""
        plan = self.plan
        if plan.named:
            deltas = []
            if not self.call_started:
                self.call_started = True
                self.call = ToolCall(plan.named, "")
                deltas.append({"index": 0, "id": self.call.id, "type": "function",
                               "function": {"name": plan.named, "arguments": ""}})
            if len(text) > self.args_sent:
                deltas.append({"index": 0, "function": {"arguments": text[self.args_sent:]}})
                self.args_sent = len(text)
            return "", deltas
        if plan.tool_choice == "required":
            return "", []
        safe = self._safe_end(text)
        out = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, []

    def _safe_end(self, text: str) -> int:
        if self.plan.fmt == HERMES:
            at = text.find("<tool_call>")
            if at >= 0:
                return at
            marker = "<tool_call>"
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    return len(text) - k
            return len(text)
        lead = text.lstrip()
        if any(lead.startswith(p) or p.startswith(lead) for p in _LEADS[self.plan.fmt]):
            return 0 if self.sent == 0 else len(text)  # held from the start, or already plain text
        return len(text)

    def finish(self, text: str) -> tuple[str, list[dict], list[ToolCall]]:
        """At the end: (content still to send, tool_call deltas, the calls)."""
        if self.plan.named:
            content, deltas = self.feed(text)
            calls = parse_forced(text, self.plan.tool_choice, self.plan.names)
            return content, deltas, calls
        content, calls = self.plan.result(text)
        if not calls:
            rest = text[self.sent:]
            self.sent = len(text)
            return rest, [], []
        deltas = [c.openai(i) for i, c in enumerate(calls)]
        return "", deltas, calls
