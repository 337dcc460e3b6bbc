"""Constrained decoding (runtime/guided.py) with the real SmolLM2 (the embedded `default` model):
200 requests with generated JSON schemas (nested objects, arrays, enums, bounded numbers) run in
one batch through the engine, and every output parses and validates against its schema; regex,
choice and grammar constraints hold; constrained and free requests share a batch (the free one
gets exactly the tokens it gets alone); bad grammars are refused with an error naming them."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch
from kiln.llm import LLM
from kiln.runtime.guided import GuidedDecodingParams, GuidedError, apply_token_bitmask
from kiln.runtime.sampling_params import SamplingParams

NUM_SCHEMAS = 200
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "star"]


def _value_schema(rng: random.Random, depth: int) -> dict:
    kinds = ["enum", "integer", "number", "boolean", "string"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 4))}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 100)}
    if kind == "number":
        lo = rng.randint(-10, 10)
        # multipleOf bounds the digits (a free float can run past any budget); binary fractions
        # validate exactly in jsonschema
        return {"type": "number", "minimum": lo, "maximum": lo + rng.randint(1, 20),
                "multipleOf": rng.choice([0.25, 0.5])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 6), "pattern": "^[a-z]+$"}
    if kind == "array":
        return {"type": "array", "items": _value_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 2)}
    return _object_schema(rng, depth + 1)


def _object_schema(rng: random.Random, depth: int) -> dict:
    keys = rng.sample("abcdefgh", rng.randint(1, 3 if depth == 0 else 2))
    return {"type": "object", "properties": {k: _value_schema(rng, depth) for k in keys},
            "required": keys, "additionalProperties": False}


def schemas(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_object_schema(rng, 0) for _ in range(n)]


@pytest.fixture(scope="module")
def llm():
    return LLM("default", max_num_seqs=NUM_SCHEMAS, max_tokens_per_step=4096, max_model_len=256)


def test_schema_kinds_are_covered():
    text = json.dumps(schemas(NUM_SCHEMAS))
    for what in ('"enum"', '"integer"', '"number"', '"minimum"', '"array"', '"boolean"', '"pattern"'):
        assert what in text
    assert any(isinstance(v, dict) and v.get("type") == "object"
               for s in schemas(NUM_SCHEMAS) for v in s["properties"].values())  # nested objects


def test_200_schemas_all_validate(llm):
    all_schemas = schemas(NUM_SCHEMAS)
    params = [SamplingParams(max_tokens=64, temperature=0.0 if i % 2 else 0.8, seed=i,
                             guided=GuidedDecodingParams(json=s)) for i, s in enumerate(all_schemas)]
    outs = llm.generate(["JSON:"] * NUM_SCHEMAS, params)
    for s, out in zip(all_schemas, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (s, c.text)  # the grammar completed, not the budget
        jsonschema.validate(json.loads(c.text), s)


def test_regex_choice_grammar(llm):
    outs = llm.generate(["The code is", "Answer yes or no:", "A list:", "Value:"], [
        SamplingParams(max_tokens=20, temperature=0.9, seed=3, guided={"regex": r"[0-9]{3}-[a-z]{2}"}),
        SamplingParams(max_tokens=20, temperature=0.9, seed=4, guided={"choice": ["yes", "no", "maybe"]}),
        SamplingParams(max_tokens=40, temperature=0.9, seed=5,
                       guided={"grammar": 'root ::= "[" item ("," item)? "]"\nitem ::= [a-c]'}),
        SamplingParams(max_tokens=40, temperature=0.0, guided={"json_object": True}),
    ])
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[0].outputs[0].text)
    assert outs[1].outputs[0].text in ("yes", "no", "maybe")
    assert re.fullmatch(r"\[[a-c](,[a-c])?\]", outs[2].outputs[0].text)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[:3])
    if outs[3].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(outs[3].outputs[0].text), dict)
    else:  # any object may be longer than the budget: its prefix is still JSON-shaped
        assert outs[3].outputs[0].text.startswith("{")


def test_lark_grammar(llm):
    out = llm.generate("Say:", SamplingParams(max_tokens=20, temperature=0.5, seed=1,
                                              guided={"grammar": 'start: "ab" NUM\nNUM: /[0-9]{2}/'}))[0]
    assert re.fullmatch(r"ab[0-9]{2}", out.outputs[0].text) and out.outputs[0].finish_reason == "stop"


def test_free_and_constrained_share_a_batch(llm):
    free = SamplingParams(max_tokens=12, temperature=0.0)
    alone = llm.generate("Hello, my name is", free)[0].outputs[0].token_ids
    outs = llm.generate(["Hello, my name is", "Pick:", "Hello, my name is"],
                        [free, SamplingParams(max_tokens=10, temperature=0.0, guided={"choice": ["x1", "y2"]}),
                         SamplingParams(max_tokens=3, temperature=0.0, n=2, seed=9, guided={"regex": "[0-9]+"})])
    assert outs[0].outputs[0].token_ids == alone
    assert outs[1].outputs[0].text in ("x1", "y2")
    assert all(re.fullmatch("[0-9]+", c.text) for c in outs[2].outputs)


def test_bitmask_applies_to_its_rows_only():
    logits = torch.zeros(3, 70)
    bits = torch.zeros(1, 3, dtype=torch.int32)
    bits[0, 0] = 1 << 5
    bits[0, 2] = 1 << 1  # token 65
    apply_token_bitmask(logits, torch.tensor([1]), bits)
    allowed = torch.isfinite(logits)
    assert allowed[0].all() and allowed[2].all()
    assert allowed[1].nonzero().flatten().tolist() == [5, 65]


@pytest.mark.parametrize("guided, words", [
    ({"json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided json"),
    ({"json": "{not json"}, "guided json"),
    ({"regex": "a(b"}, "guided regex"),
    ({"grammar": "root ::= undefined_rule"}, "guided grammar"),
    ({"choice": []}, "choice"),
    ({"json": {"type": "object"}, "regex": "a"}, "exactly one"),
    ({"jsn": {}}, "unknown field"),
])
def test_bad_grammars_are_refused(llm, guided, words):
    with pytest.raises(GuidedError, match=words):
        llm.generate("x", SamplingParams(max_tokens=4, guided=guided))
    assert not llm.engine.has_unfinished()


# -- through the server, with the official openai client (the harness's tiny random model: the
# constraint alone makes its output valid) --------------------------------------------------------

@pytest.fixture(scope="module")
def url():
    from tests.server_harness import running, served

    with running([served(max_num_seqs=8)]) as u:
        yield u


def _client(url):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_response_format(url, stream):
    c = _client(url)
    for i, schema in enumerate(schemas(4, seed=7)):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Give JSON"}],
                                      response_format=fmt, max_tokens=120, temperature=0.9, seed=i, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        else:
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert finish == ["stop"], text
        jsonschema.validate(json.loads(text), schema)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Give JSON"}],
                                  response_format={"type": "json_object"}, max_tokens=40, temperature=0.0)
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": r"[a-c]{2}[0-9]"}, lambda t: re.fullmatch(r"[a-c]{2}[0-9]", t)),
    ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch(r"x[0-9]{1,2}", t)),
    ({"guided_json": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3}},
     lambda t: 1 <= len(json.loads(t)) <= 3),
    ({"structured_outputs": {"choice": ["on", "off"]}}, lambda t: t in ("on", "off")),
])
def test_extra_body_guided_fields(url, extra, check):
    for stream in (False, True):
        r = _client(url).completions.create(model="tiny", prompt="Out:", max_tokens=30, temperature=1.0, seed=2,
                                            stream=stream, extra_body=extra)
        text = "".join(ch.choices[0].text for ch in r if ch.choices) if stream else r.choices[0].text
        assert check(text), (extra, text)


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 1}}, "required": ["n"]}}}},
     "response_format", "Unsatisfiable"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "grammar"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one"),
])
def test_bad_constraints_get_400(url, body, param, words):
    import httpx

    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def test_token_mask_kernel_renders_and_compiles():
    """The GPU form of apply_token_bitmask (codegen/sampling_kernels.py) renders with its origin and
    the vocabulary it is specialised on, and NVRTC compiles it (its results: tests/gpu/test_guided_gpu.py)."""
    pytest.importorskip("cuda.bindings")
    from kiln.codegen import nvrtc
    from kiln.codegen.render import render
    from kiln.codegen.sampling_kernels import TokenMaskSpec
    from kiln.codegen.specs import KernelSpecError

    ks = render(TokenMaskSpec(49157, origin="guided decoding: the allowed-token mask"))
    assert "origin: guided decoding" in ks.source and "1537" in ks.source  # ceil(49157 / 32) words a row
    assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
    with pytest.raises(KernelSpecError, match="TokenMaskSpec.vocab"):
        TokenMaskSpec(0)
