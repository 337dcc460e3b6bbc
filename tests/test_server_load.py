"""The server under load over 127.0.0.1 (200 concurrent streams through the official `openai`
client, each equal to offline generation), `kiln bench serve` against it, and `kiln serve` itself
on the embedded model (slow)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import httpx
import openai
import pytest
from kiln.cli import main as kiln_main
from kiln.runtime.bench_serve import run_benchmark
from kiln.runtime.sampling_params import SamplingParams

from tests.server_harness import TINY, KilnServe, metric, offline_llm, running, served, tokenizer, wait_idle

WORDS = "the cat sat on a mat while seven tired engineers wrote careful tests about streaming servers".split()


def make_requests(count: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        fields = dict(max_tokens=rng.randint(1, 24))
        # a third sample with a seed (top-p is left to test_server: its sort dominates on 2 cores)
        fields.update(temperature=0.9, seed=i) if i % 3 == 1 else fields.update(temperature=0.0)
        reqs.append((i % 2 == 0, text, fields))  # every other one is a chat
    return reqs


async def stream_one(c: openai.AsyncOpenAI, chat: bool, text: str, fields: dict):
    """One streaming request; checks the stream's shape and returns (text, token ids, finish reason)."""
    extra = {"return_token_ids": True}
    if chat:
        s = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                            stream=True, extra_body=extra, **fields)
    else:
        s = await c.completions.create(model="tiny", prompt=text, stream=True, extra_body=extra, **fields)
    out, ids, finish, seen_ids, role = "", [], None, set(), None
    async for chunk in s:
        seen_ids.add(chunk.id)
        assert chunk.object == ("chat.completion.chunk" if chat else "text_completion")
        assert len(chunk.choices) == 1 and chunk.choices[0].index == 0
        assert finish is None, "chunk after the finish chunk"
        ch = chunk.choices[0]
        if chat:
            role = role or ch.delta.role
            out += ch.delta.content or ""
        else:
            out += ch.text
        ids += ch.model_extra.get("token_ids", [])
        finish = ch.finish_reason
    assert len(seen_ids) == 1 and finish in ("stop", "length") and (role == "assistant" or not chat)
    return out, ids, finish


def test_200_concurrent_streams_equal_offline():
    reqs = make_requests(200)
    tok = tokenizer()
    llm = offline_llm(max_num_seqs=64)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               if chat else t for chat, t, _ in reqs]  # as LLM.chat builds them
    want = llm.generate(prompts, [SamplingParams(**f) for _, _, f in reqs])

    with running([served(max_num_seqs=64, max_waiting=256)]) as url:
        async def main():
            # Bounds against a hang only (this takes seconds): far above what a slow machine needs.
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as c:
                return await asyncio.wait_for(asyncio.gather(*(stream_one(c, *r) for r in reqs)), 900)

        t0 = time.monotonic()
        got = asyncio.run(main())
        elapsed = time.monotonic() - t0
        for (chat, text, fields), w, (out, ids, finish) in zip(reqs, want, got):
            o = w.outputs[0]
            assert (out, ids, finish) == (o.text, o.token_ids, o.finish_reason), (chat, text, fields)
        wait_idle(url)
        assert metric(url, 'kiln_requests_finished_total{finish_reason="length",model="tiny"}') + \
            metric(url, 'kiln_requests_finished_total{finish_reason="stop",model="tiny"}') == 200
        generated = sum(len(w.outputs[0].token_ids) for w in want)
        assert metric(url, 'kiln_generation_tokens_total{model="tiny"}') == generated
    print(f"200 streams in {elapsed:.1f} s")


def test_bench_serve(tmp_path, capsys):
    with running([served(max_num_seqs=16)]) as url:
        before = metric(url, 'kiln_generation_tokens_total{model="tiny"}')
        reports = run_benchmark(url, [20.0, math.inf], num_requests=12, input_len=8, output_len=6)
        for r in reports:
            assert (r.completed, r.failed) == (12, 0)
            for d in (r.ttft_ms, r.tpot_ms, r.e2e_ms):
                assert 0 < d["p50"] <= d["p90"] <= d["p99"]
            assert r.e2e_ms["p50"] >= r.ttft_ms["p50"] and r.output_throughput > 0 and r.mean_prompt_tokens >= 8
        # Every request generated exactly output_len tokens (ignore_eos), as the server counts them.
        assert metric(url, 'kiln_generation_tokens_total{model="tiny"}') - before == 2 * 12 * 6
        out = tmp_path / "bench.json"
        rc = kiln_main(["bench", "serve", "--url", url, "--rates", "inf", "--num-requests", "4", "--input-len", "4",
                        "--output-len", "3", "--json", str(out)])
        assert rc == 0
        assert "TTFT ms p50/p90/p99" in capsys.readouterr().out
        (report,) = json.loads(out.read_text())
        assert report["completed"] == 4 and report["rate"] == math.inf
    assert kiln_main(["bench", "serve", "--url", "http://10.0.0.1:8000", "--rates", "1"]) == 2  # loopback only


def test_kiln_serve_cli_random_weights_and_bench(tmp_path, capsys):
    """`kiln serve --random-weights CONFIG` + `kiln bench serve` against it, both through the CLI."""
    config = tmp_path / "tiny-test.json"
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **TINY}))
    with KilnServe("--random-weights", str(config), "--max-num-seqs", "4", "--api-key", "k", "--enforce-eager") as url:
        models = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer k"}, timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["tiny-test"] and models["data"][0]["max_model_len"] == 512
        assert kiln_main(["bench", "serve", "--url", url, "--api-key", "k", "--rates", "50,inf", "--num-requests",
                          "6", "--input-len", "5", "--output-len", "4"]) == 0
        rows = capsys.readouterr().out.splitlines()
        assert rows[0].split()[0] == "rate" and [r.split()[:3] for r in rows[1:]] == [["50", "6", "0"],
                                                                                        ["inf", "6", "0"]]
        assert kiln_main(["bench", "serve", "--url", url, "--rates", "inf", "--num-requests", "2"]) == 2  # no key


@pytest.mark.slow
def test_kiln_serve_cli_on_the_embedded_model():
    from kiln import LLM

    with KilnServe("--max-num-seqs", "2", "--max-model-len", "256", "--model", "smol=" + _default()) as url:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)
        want = LLM(max_num_seqs=2, max_model_len=256).chat(messages, SamplingParams(max_tokens=8, temperature=0.0))
        assert r.choices[0].message.content == want[0].outputs[0].text


def _default() -> str:
    from kiln.runtime.gguf_file import default_model_path
    return str(default_model_path())
