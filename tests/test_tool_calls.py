"""Tool calling in /v1/chat/completions, driven by the official `openai` client: for each tool-call
syntax we parse (Hermes/Qwen `<tool_call>`, Llama 3.x JSON, Mistral `[TOOL_CALLS]`) a server whose
chat template has that convention renders the tools into the prompt and returns the model's call as
OpenAI `tool_calls`, streamed and not; `required` and named functions are forced by constrained
decoding; bad `tools` get a 400 naming the field and the server stays up.

The served model is the harness's tiny random-weight model: what it says in `auto` mode is steered
with a guided_choice of the family's exact syntax (a random model would never write a call), so
the parse is of real engine output while nothing depends on what a trained model would say."""

from __future__ import annotations

import copy
import json

import jsonschema
import openai
import pytest
from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.server import ServedModel
from kiln.runtime.tool_calls import HERMES, LLAMA3_JSON, TOOL_CALLS_TAG, parse, template_format

from tests.server_harness import MAX_MODEL_LEN, health, running, tiny_model, tokenizer, wait_idle

# Condensed chat templates with each family's tool conventions (the real ones are longer; these
# keep exactly the parts that concern tools).
QWEN_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA_TEMPLATE = """{%- if tools %}<|start_header_id|>user<|end_header_id|>

Given the following functions, please respond with a JSON for a function call with its proper arguments.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.

{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}<|eot_id|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_TEMPLATE = """{%- set ns = namespace(last_user=0) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
{%- if message.role == 'user' %}{% if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST] {{ message.content }}[/INST]
{%- elif message.role == 'assistant' and message.tool_calls %}[TOOL_CALLS] [{% for tc in message.tool_calls %}{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}{% if not loop.last %}, {% endif %}{% endfor %}]</s>
{%- elif message.role == 'tool' %}[TOOL_RESULTS] {"content": {{ message.content | tojson }}}[/TOOL_RESULTS]
{%- else %}{{ message.content }}</s>{% endif %}{%- endfor %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris for 2 days?"}]

# What each family's model writes for a call (steered with guided_choice in `auto` mode).
CALLS = {
    "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'],
    "llama": ['{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'],
    "mistral": ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]'],
}
WANT = {"qwen": [("get_weather", {"city": "Paris", "days": 2})],
        "llama": [("get_weather", {"city": "Paris", "days": 2})],
        "mistral": [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]}
TEMPLATES = {"qwen": QWEN_TEMPLATE, "llama": LLAMA_TEMPLATE, "mistral": MISTRAL_TEMPLATE, "smol": None}


def _served(name: str) -> ServedModel:
    tok = copy.copy(tokenizer())
    if TEMPLATES[name] is not None:
        tok.chat_template = TEMPLATES[name]
    engine = LLMEngine(tiny_model(1), tok, EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8))
    return ServedModel(name, AsyncLLMEngine(engine), tok, MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def url():
    with running([_served(n) for n in TEMPLATES]) as u:
        yield u


def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def stream_message(chunks):
    """(content, [(name, arguments dict)], finish_reason, tool-call ids) from a chat stream."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = tc.id or entry["id"]
                if tc.function is not None:
                    entry["name"] += tc.function.name or ""
                    entry["arguments"] += tc.function.arguments or ""
            if c.finish_reason:
                assert finish is None
                finish = c.finish_reason
    ordered = [calls[i] for i in sorted(calls)]
    assert all(e["id"] for e in ordered)
    return content or None, [(e["name"], json.loads(e["arguments"])) for e in ordered], finish


def message_calls(msg):
    assert all(tc.type == "function" and tc.id for tc in msg.tool_calls or [])
    return [(tc.function.name, json.loads(tc.function.arguments)) for tc in msg.tool_calls or []]


def test_template_formats():
    assert template_format(QWEN_TEMPLATE) == (HERMES, True)
    assert template_format(LLAMA_TEMPLATE) == (LLAMA3_JSON, True)
    assert template_format(MISTRAL_TEMPLATE) == (TOOL_CALLS_TAG, True)
    assert template_format(tokenizer().chat_template) == (HERMES, False)  # SmolLM2: tools go in a system message


@pytest.mark.parametrize("family", ["qwen", "llama", "mistral"])
def test_tools_rendered_by_the_template(family):
    tok = copy.copy(tokenizer())
    tok.chat_template = TEMPLATES[family]
    history = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tok.apply_chat_template(history, tools=TOOLS)
    assert '"get_weather"' in text and '"get_time"' in text and "sunny" in text
    assert '"city": "Rome"' in text


@pytest.mark.parametrize("text, fmt, want", [
    ('Let me check.<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>', HERMES,
     ("Let me check.", [("get_time", {"zone": "UTC"})])),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n<tool_call>{"name": "get_weather", '
     '"arguments": {"city": "Rome", "days": 3}}</tool_call>', HERMES,
     (None, [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome", "days": 3})])),
    ('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', LLAMA3_JSON, (None, [("get_time", {"zone": "CET"})])),
    ('{"name": "get_time", "parameters": {"zone": "CET"}}; {"name": "get_time", "parameters": {"zone": "UTC"}}',
     LLAMA3_JSON, (None, [("get_time", {"zone": "CET"}), ("get_time", {"zone": "UTC"})])),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}]', TOOL_CALLS_TAG, (None, [("get_time", {"zone": "UTC"})])),
    ('It is sunny.', HERMES, ("It is sunny.", [])),
    ('{"name": "unknown_fn", "parameters": {}}', LLAMA3_JSON, ('{"name": "unknown_fn", "parameters": {}}', [])),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": ', HERMES,
     ('<tool_call>{"name": "get_time", "arguments": {"zone": ', [])),  # cut short: left as text
])
def test_parse(text, fmt, want):
    content, calls = parse(text, fmt, {"get_time", "get_weather"})
    assert (content, [(c.name, json.loads(c.arguments)) for c in calls]) == want


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("family", ["qwen", "llama", "mistral"])
def test_auto_tool_calls_per_template(url, family, stream):
    r = client(url).chat.completions.create(model=family, messages=ASK, tools=TOOLS, max_tokens=80, stream=stream,
                                            extra_body={"guided_choice": CALLS[family]})
    if stream:
        content, calls, finish = stream_message(r)
    else:
        msg = r.choices[0].message
        content, calls, finish = msg.content, message_calls(msg), r.choices[0].finish_reason
    assert (content, calls, finish) == (None, WANT[family], "tool_calls")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_plain_reply_has_no_tool_calls(url, stream):
    r = client(url).chat.completions.create(model="qwen", messages=ASK, tools=TOOLS, max_tokens=20, stream=stream,
                                            extra_body={"guided_choice": ["It is sunny <in> Paris."]})
    if stream:
        content, calls, finish = stream_message(r)
    else:
        content, calls, finish = r.choices[0].message.content, message_calls(r.choices[0].message), \
            r.choices[0].finish_reason
    assert (content, calls, finish) == ("It is sunny <in> Paris.", [], "stop")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("family", ["smol", "qwen", "mistral"])
def test_required_and_named_are_forced(url, family, stream):
    c = client(url)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for choice in ["required", {"type": "function", "function": {"name": "get_time"}}]:
        r = c.chat.completions.create(model=family, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=60,
                                      temperature=0.8, seed=11, stream=stream, parallel_tool_calls=False)
        if stream:
            content, calls, finish = stream_message(r)
        else:
            msg = r.choices[0].message
            content, calls, finish = msg.content, message_calls(msg), r.choices[0].finish_reason
        assert content is None and calls, (choice, content)
        for name, args in calls:
            jsonschema.validate(args, schemas[name])
        if choice == "required":
            assert finish == "tool_calls"
        else:
            assert [n for n, _ in calls] == ["get_time"] and finish == "stop"


def test_tool_choice_none_and_history(url):
    c = client(url)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = c.chat.completions.create(model="qwen", messages=history, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tools, tool_choice, param", [
    ([{"type": "function", "function": {"description": "no name"}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "get weather!"}}], None, "tools[0].function.name"),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None,
     "tools[0].function.parameters"),
    ([WEATHER, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}}}],
     None, "tools[1].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": "not an object"}}], None,
     "tools[0].function.parameters"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    (None, "required", "tool_choice"),
])
def test_bad_tools_get_400_naming_the_field(url, tools, tool_choice, param):
    body = {"model": "qwen", "messages": ASK, "max_tokens": 4}
    if tools is not None:
        body["tools"] = tools
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(**body)
    err = e.value.body
    assert err["param"].split(".")[0].split("[")[0] == param.split(".")[0].split("[")[0]
    assert param in err["message"], err
    assert health(url)["status"] == "ok"
    wait_idle(url, model="qwen")
