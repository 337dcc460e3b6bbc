"""The OpenAI-compatible server, driven by the official `openai` client over 127.0.0.1: it returns
what the offline LLM returns for the same seed (completions and chat, streaming and not), and
bad input, unknown models, missing keys, full queues, timeouts and client disconnects get the
right answer while the server stays up and every KV page comes back."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from kiln.runtime.async_engine import QueueFull
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server import ServerConfig

from tests.server_harness import (
    StepGate,
    health,
    metric,
    offline_llm,
    running,
    served,
    tokenizer,
    until_health,
    wait_idle,
)

PROMPTS = ["Hello there", "The capital of France is", "def f(x):\n    return", "1 2 3 4 5"]
# (OpenAI request fields, the same as SamplingParams)
CASES = [
    (dict(max_tokens=12, temperature=0.0), dict(max_tokens=12, temperature=0.0)),
    (dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=7), dict(max_tokens=10, temperature=0.8, top_p=0.9, seed=7)),
    (dict(max_tokens=6, temperature=1.0, n=2, seed=3, extra_body={"top_k": 50, "min_p": 0.01}),
     dict(max_tokens=6, temperature=1.0, n=2, seed=3, top_k=50, min_p=0.01)),
    (dict(max_tokens=8, temperature=0.7, seed=1, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2),
     dict(max_tokens=8, temperature=0.7, seed=1, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2)),
]
MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."},
             {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": [{"type": "text", "text": "Again"}]}]]


@pytest.fixture(scope="module")
def llm():
    return offline_llm()


@pytest.fixture(scope="module")
def gate():
    return StepGate()  # open; a test that must hold the engine closes it for a while


@pytest.fixture(scope="module")
def url(gate):
    with running([served(max_num_seqs=16, gate=gate)]) as u:
        yield u


def client(url, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def aclient(url, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=60, **kw)


def offline(llm, prompt, params: dict):
    return llm.generate(prompt, SamplingParams(**params))[0]


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def collect_stream(chunks, n: int):
    """Per choice: text, token ids, finish reason; checks each choice finishes exactly once, last."""
    text, ids, finish = [""] * n, [[] for _ in range(n)], [None] * n
    ids_seen = set()
    for chunk in chunks:
        ids_seen.add(chunk.id)
        for c in chunk.choices:
            assert finish[c.index] is None, "a chunk after the finish chunk"
            text[c.index] += (c.delta.content or "") if hasattr(c, "delta") else c.text
            ids[c.index] += token_ids(c) if "token_ids" in (c.model_extra or {}) else []
            finish[c.index] = c.finish_reason
    assert len(ids_seen) == 1 and all(finish)
    return text, ids, finish


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_completions_equal_offline(url, llm, case, stream):
    api, params = CASES[case]
    api = dict(api)
    api["extra_body"] = {**api.get("extra_body", {}), "return_token_ids": True}
    c = client(url)
    for prompt in PROMPTS[case % 2::2]:
        want = offline(llm, prompt, params)
        r = c.completions.create(model="tiny", prompt=prompt, stream=stream, **api)
        if stream:
            text, ids, finish = collect_stream(r, len(want.outputs))
        else:
            choices = sorted(r.choices, key=lambda ch: ch.index)
            text, ids, finish = [ch.text for ch in choices], [token_ids(ch) for ch in choices], \
                [ch.finish_reason for ch in choices]
            assert r.usage.prompt_tokens == len(want.prompt_token_ids)
            assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)
            if params.get("logprobs"):
                lp = choices[0].logprobs
                assert lp.token_logprobs == [e[t] for t, e in zip(want.outputs[0].token_ids, want.outputs[0].logprobs)]
                assert all(len(top) == 2 for top in lp.top_logprobs)
        assert ids == [o.token_ids for o in want.outputs]
        assert text == [o.text for o in want.outputs]
        assert finish == [o.finish_reason for o in want.outputs]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline(url, llm, stream):
    c = client(url)
    for messages in MESSAGES:
        params = dict(max_tokens=10, temperature=0.9, seed=5)
        flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
                for m in messages]  # the server joins text parts; the template wants a string
        want = llm.chat(flat, SamplingParams(**params))[0].outputs[0]
        r = c.chat.completions.create(model="tiny", messages=messages, stream=stream,
                                      extra_body={"return_token_ids": True}, **params)
        if stream:
            (text,), (ids,), _ = collect_stream(r, 1)
        else:
            text, ids = r.choices[0].message.content, token_ids(r.choices[0])
            assert r.choices[0].message.role == "assistant"
        assert (text, ids) == (want.text, want.token_ids)


def test_stop_strings_and_token_prompts(url, llm):
    c = client(url)
    full = offline(llm, PROMPTS[1], dict(max_tokens=12, temperature=0.0))
    stop = full.outputs[0].text[6:10]  # a piece of what it will say
    want = offline(llm, PROMPTS[1], dict(max_tokens=12, temperature=0.0, stop=[stop]))
    assert want.outputs[0].finish_reason == "stop"
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop)
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == "stop"
    ids = tokenizer().encode(PROMPTS[0])
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == offline(llm, ids, dict(max_tokens=5, temperature=0.0)).outputs[0].text


def test_stream_wire_format(url):
    """Raw SSE: `data: {json}` events separated by blank lines, one id, `data: [DONE]` last."""
    body = {"model": "tiny", "messages": MESSAGES[0], "max_tokens": 5, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({ch["id"] for ch in chunks}) == 1 and {ch["object"] for ch in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_models_health_metrics(url):
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = health(url)
    assert h["status"] == "ok" and h["models"]["tiny"]["kv_pages_total"] > 0
    client(url).completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in ("kiln_time_to_first_token_seconds_count", "kiln_time_per_output_token_seconds_count",
                 "kiln_e2e_request_latency_seconds_count", "kiln_prompt_tokens_total", "kiln_generation_tokens_total",
                 "kiln_num_requests_running", "kiln_num_requests_waiting", "kiln_kv_cache_pages_used"):
        assert f'{name}{{model="tiny"}}' in text, name
    assert metric(url, 'kiln_time_to_first_token_seconds_count{model="tiny"}') >= 1
    assert metric(url, 'kiln_http_requests_total{endpoint="/v1/completions",status="200"}') >= 1


BAD = [  # (endpoint, body, status, param, words in the message)
    ("completions", b"{not json", 400, None, "malformed JSON"),
    ("completions", b"[1, 2]", 400, None, "JSON object"),
    ("completions", {"model": "tiny"}, 400, "prompt", "required"),
    ("completions", {"model": "tiny", "prompt": 12}, 400, "prompt", "string"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "context length"),
    ("completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ("completions", {"model": "tiny", "prompt": "x", "top_p": 2.0}, 400, "top_p", "(0, 1]"),
    ("completions", {"model": "tiny", "prompt": "x", "n": 0}, 400, "n", ">= 1"),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, 400, "logprobs", "[0, 20]"),
    ("completions", {"model": "tiny", "prompt": "x", "stop": 5}, 400, "stop", "string"),
    ("completions", {"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "boolean"),
    ("completions", {"model": "tiny", "prompt": [49152]}, 400, "prompt", "vocabulary"),
    ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"model": "tiny", "prompt": "word " * 2000}, 400, "prompt", "maximum context length"),
    ("completions", {"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ("completions", {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "at least one"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400, "messages", "role"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "messages", "string"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 2000}]}, 400,
     "messages", "maximum context length"),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES[0], "max_completion_tokens": 0}, 400,
     "max_completion_tokens", ">= 1"),
    ("completions", {"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed", "64-bit"),
    ("completions", {"model": "tiny", "prompt": "x", "n": 10**6}, 400, "n", "<="),
    ("chat/completions", {"model": "tiny", "messages": MESSAGES[0], "logprobs": True, "top_logprobs": 30}, 400,
     "top_logprobs", "[0, 20]"),
    ("completions", b"{" + b" " * (2 << 20) + b"}", 413, "body", "exceeds"),
    ("completions", [b"{" + b" " * (1 << 19)] * 5, 413, "body", "exceeds"),  # chunked: no content-length
]


async def chunks(parts):
    for p in parts:
        yield p


def test_bad_input_gets_4xx_naming_the_problem(url, gate, llm):
    """Each bad request gets its 4xx with an OpenAI error body naming the field, answered while the
    engine is held; a good request admitted before them (it cannot run until they are all answered)
    then completes with the offline output."""
    wait_idle(url)

    async def main():
        async with aclient(url) as c:
            with gate.held():
                good = asyncio.ensure_future(c.completions.create(
                    model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=False,
                    extra_body={"return_token_ids": True}))
                await until_health(url, lambda m: m["in_flight"] == 1, "the good request was never admitted")
                async with httpx.AsyncClient(timeout=30) as h:
                    for endpoint, body, status, param, words in BAD:
                        kw = {"json": body} if isinstance(body, dict) else {"content": body}
                        if isinstance(body, list):
                            kw = {"content": chunks(body)}
                        r = await h.post(f"{url}/v1/{endpoint}", headers={"content-type": "application/json"},
                                         **kw)
                        assert r.status_code == status, (str(body)[:200], r.text)
                        err = r.json()["error"]
                        assert set(err) == {"message", "type", "param", "code"}
                        assert err["param"] == param and words in err["message"], (str(body)[:200], err)
                assert not good.done()
            return await good

    r = asyncio.run(main())
    want = offline(llm, PROMPTS[0], dict(max_tokens=40, temperature=0.0)).outputs[0].token_ids
    assert token_ids(r.choices[0]) == want
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).chat.completions.create(model="tiny", messages=MESSAGES[0], max_tokens=-1)
    assert httpx.get(f"{url}/v1/nothing", timeout=10).json()["error"]["code"] == "404"
    assert health(url)["status"] == "ok"
    wait_idle(url)


def test_api_key():
    with running([served()], ServerConfig(api_key="sekret")) as url:
        for key in ("wrong", "sekret2"):
            with pytest.raises(openai.AuthenticationError):
                client(url, api_key=key).completions.create(model="tiny", prompt="x", max_tokens=2)
        for headers in ({}, {"authorization": "sekret"}, {"authorization": "Basic sekret"}):
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert client(url, api_key="sekret").completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_several_models():
    a, b = offline_llm(seed=1), offline_llm(seed=2)
    with running([served("a", seed=1), served("b", seed=2)]) as url:
        c = client(url)
        assert sorted(m.id for m in c.models.list().data) == ["a", "b"]
        got = {name: c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
               for name in ("a", "b")}
        assert got["a"] == offline(a, PROMPTS[1], dict(max_tokens=8, temperature=0.0)).outputs[0].text
        assert got["b"] == offline(b, PROMPTS[1], dict(max_tokens=8, temperature=0.0)).outputs[0].text
        assert got["a"] != got["b"]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=10)  # which model?
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_queue_full_gets_429_and_the_rest_complete(llm):
    """2 seats + 2 waiting slots: 4 requests are in flight and the next ones are refused at once
    (429); the 4 then complete with the offline outputs. The engine takes no step until the
    refusals are done, so none of the 4 can have finished and freed its slot before."""
    gate = StepGate(0)
    with running([served(max_num_seqs=2, max_waiting=2, gate=gate)]) as url:
        async def main():
            async with aclient(url) as c:
                kw = dict(model="tiny", max_tokens=60, temperature=0, stream=True,
                          extra_body={"ignore_eos": True, "return_token_ids": True})
                # A stream's headers come once the request is admitted, before any token.
                streams = [await c.completions.create(prompt=p, **kw) for p in PROMPTS]
                refused = 0
                for p in PROMPTS[:3]:
                    with pytest.raises(openai.RateLimitError):
                        await c.completions.create(prompt=p, **kw)
                    refused += 1
                gate.open()
                outs = []
                for s in streams:
                    ids = []
                    async for chunk in s:
                        ids += token_ids(chunk.choices[0]) if chunk.choices else []
                    outs.append(ids)
                return refused, outs

        refused, outs = asyncio.run(main())
        assert refused == 3
        want = llm.generate(PROMPTS, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
        assert outs == [w.outputs[0].token_ids for w in want]
        assert metric(url, 'kiln_http_requests_total{endpoint="/v1/completions",status="429"}') == 3
        assert client(url).completions.create(model="tiny", prompt="x", max_tokens=2).choices
        wait_idle(url)


def test_disconnects_free_every_page(llm):
    """50 streaming clients leave mid-stream and 10 more leave while waiting for a whole response:
    every request ends as an abort (none reaches max_tokens), every KV page comes back, and the
    server still answers. Until the server has seen all 60 clients leave, the engine may take
    `steps` steps only: fewer than max_tokens, so no request can finish first."""
    steps = 100  # the streams' first 2 tokens need 3 (one may hold only some of the 50, then 2 tokens)
    gate = StepGate(0)
    with running([served(max_num_seqs=64, gate=gate)]) as url:
        async def main():
            async with aclient(url) as c:
                kw = dict(model="tiny", max_tokens=460, temperature=0.8, seed=1, stream=True,
                          extra_body={"ignore_eos": True})
                # Headers come once a request is admitted: then all 50 are queued for the engine.
                streams = await asyncio.wait_for(asyncio.gather(*(
                    c.completions.create(prompt=f"{PROMPTS[i % 4]} {i}", **kw) for i in range(50))), 60)
                gate.allow(steps)

                async def two_chunks(s):
                    for _ in range(2):
                        await anext(aiter(s))

                await asyncio.wait_for(asyncio.gather(*(two_chunks(s) for s in streams)), 60)
                busy = health(url)["models"]["tiny"]
                async with httpx.AsyncClient(timeout=60) as h:
                    # Leave only once the server holds all 10 (a client that leaves before the server
                    # has read its request leaves nothing to abort).
                    posts = [asyncio.ensure_future(h.post(f"{url}/v1/completions", json={
                        "model": "tiny", "prompt": "x", "max_tokens": 460, "ignore_eos": True})) for _ in range(10)]
                    await until_health(url, lambda m: m["in_flight"] == 60, "the 10 requests were never admitted")
                    for t in posts:
                        t.cancel()  # closes its connection: the client is gone mid-request
                    done = await asyncio.gather(*posts, return_exceptions=True)
                    assert all(isinstance(x, asyncio.CancelledError) for x in done)
                for s in streams:
                    await s.close()
                # The server has closed (aborted) all 60 before the engine may step on.
                await until_health(url, lambda m: m["in_flight"] == 0, "the server did not see every client leave")
                gate.open()
                return busy

        busy = asyncio.run(main())
        assert busy["kv_pages_used"] > 0 and busy["running"] == 50
        stats = wait_idle(url)
        assert stats["kv_pages_used"] == 0
        finished = {r: metric(url, f'kiln_requests_finished_total{{finish_reason="{r}",model="tiny"}}')
                    for r in ("abort", "length")}
        assert finished == {"abort": 60, "length": 0}, f"finished by reason: {finished}"
        assert metric(url, 'kiln_kv_cache_pages_used{model="tiny"}') == 0
        r = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == offline(llm, PROMPTS[0], dict(max_tokens=6, temperature=0.0)).outputs[0].text


def test_request_timeout():
    """A request still running at its deadline gets 504 (whole response) or a timeout error event
    (stream), is aborted and its pages come back; the engine goes on. The engine takes no step
    until both deadlines have passed, so neither request can finish first. (No request is made
    after them: one must finish within 0.3 s, which a slow machine may not do.)"""
    gate = StepGate(0)
    with running([served(gate=gate)], ServerConfig(request_timeout=0.3)) as url:
        c = client(url)
        kw = dict(model="tiny", prompt="x", max_tokens=480, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(**kw)
        assert e.value.status_code == 504
        with pytest.raises(openai.APIError, match="timed out"):
            for _ in c.completions.create(stream=True, **kw):
                pass
        gate.open()
        wait_idle(url)  # the engine stepped on and dropped both
        assert health(url)["models"]["tiny"]["alive"]
        assert metric(url, 'kiln_requests_finished_total{finish_reason="abort",model="tiny"}') == 2
        assert metric(url, 'kiln_http_requests_total{endpoint="/v1/completions",status="504"}') == 1


def test_async_engine_directly(llm):
    """Without HTTP: outputs equal the offline engine's; admission is bounded; abort frees pages."""
    async def main():
        ae = served(max_num_seqs=1, max_waiting=1).engine
        ae.start()
        try:
            params = SamplingParams(max_tokens=5, temperature=0.0)
            ids = tokenizer().encode(PROMPTS[2])
            outs = [o async for o in ae.generate(ids, params)]
            long = ae.add_request(ids, SamplingParams(max_tokens=300, ignore_eos=True))
            waiting = ae.add_request(ids, params)
            with pytest.raises(QueueFull):
                ae.add_request(ids, params)
            await anext(long)
            long.close()
            last = [o async for o in waiting][-1]
            # The engine publishes its stats before it hands the step's outputs to the event loop.
            return outs, last, ae.stats
        finally:
            await ae.shutdown()
            assert not ae.alive

    outs, last, stats = asyncio.run(main())
    want = offline(llm, tokenizer().encode(PROMPTS[2]), dict(max_tokens=5, temperature=0.0)).outputs[0]
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == want.token_ids
    assert "".join(o.outputs[0].delta for o in outs) == want.text
    assert last.outputs[0].token_ids == want.token_ids
    assert stats.kv_pages_used == 0 and stats.running == 0


def test_engine_failure_is_reported_not_hung():
    """A step that raises (a backend fault) ends every open request with 503 / an error event."""
    model = served()
    engine = model.engine.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device fault")
        return real_step()

    engine.step = failing_step  # fault injection on this engine instance only
    with running([model]) as url:
        c = client(url)
        with pytest.raises(openai.APIError, match="device fault"):
            for _ in c.completions.create(model="tiny", prompt="x", max_tokens=50, stream=True):
                pass
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny", prompt="x", max_tokens=5)
        assert e.value.status_code == 503
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["models"]["tiny"]["alive"] is False
