"""The OpenAI request bodies the server accepts, and how they become SamplingParams.

Bodies are validated strictly (a string is not a number, a float is not an integer) and
every error becomes `APIError`: an HTTP status plus OpenAI's error JSON
`{"error": {"message", "type", "param", "code"}}` whose `param` names the offending field.
Unknown fields are ignored, as vLLM does. Extensions with vLLM's names: top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, return_token_ids, and constrained decoding:
guided_json, guided_regex, guided_choice, guided_grammar (or `structured_outputs: {json, regex,
choice, grammar}`), beside OpenAI's `response_format` (json_object, json_schema).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .guided import GuidedDecodingParams, GuidedError
from .sampling_params import SamplingParams

MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False  # token_ids in every choice (and chunk)
    # constrained decoding
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _where(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'; union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_NAMES:
            out += f".{part}" if out else part
    return out


def parse_body(cls: type[_Body], body: bytes):
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return cls.model_validate_json(body, strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"malformed JSON body: {err['msg']}") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        where = _where(err["loc"])
        got = f" (got {err['input']!r:.80})" if err["type"] != "missing" else ""
        raise APIError(400, f"{where}: {err['msg']}{got}", param=where.split(".")[0].split("[")[0] or None) from None


def unsupported(req: _SamplingFields, **defaults) -> None:
    """Fields we accept only at their default value (e.g. echo=False)."""
    for name, default in defaults.items():
        value = getattr(req, name)
        if value is not None and value != default:
            raise APIError(400, f"{name} is not supported by this server (got {value!r})", param=name)


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None,
                    guided: GuidedDecodingParams | None = None) -> SamplingParams:
    """The request's sampling fields as SamplingParams; an invalid value -> 400 naming it."""
    unsupported(req, logit_bias={})
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        name = "top_logprobs" if isinstance(req.logprobs, bool) else "logprobs"
        raise APIError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {logprobs}", param=name)
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:
        raise APIError(400, f"seed must be a 64-bit signed integer, got {req.seed}", param="seed")
    given = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                 repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                 frequency_penalty=req.frequency_penalty)
    try:
        return SamplingParams(
            n=req.n, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, logprobs=logprobs, guided=guided,
            **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=field if field in SamplingParams.__dataclass_fields__ else None) from None


def guided_params(req: _SamplingFields) -> GuidedDecodingParams | None:
    """The request's constraint (response_format, guided_*, structured_outputs), at most one;
    a bad or conflicting one -> 400 naming the field. Grammars are compiled later (server)."""
    found: list[tuple[str, dict]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format.json_schema.schema is required for type 'json_schema'",
                           param="response_format")
        found.append(("response_format", {"json": rf.json_schema.schema_}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if (value := getattr(req, name)) is not None:
            found.append((name, {key: value}))
    if (so := req.structured_outputs) is not None:
        fields = {k: v for k, v in dict(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                        json_object=so.json_object or None).items() if v is not None}
        found.append(("structured_outputs", fields))
    if not found:
        return None
    if len(found) > 1:
        names = [n for n, _ in found]
        raise APIError(400, f"at most one constraint per request, got {names}", param=names[1])
    name, fields = found[0]
    try:
        return GuidedDecodingParams(**fields)
    except GuidedError as e:
        raise APIError(400, f"{name}: {e}", param=name) from None
