"""Speculative decoding on the cuda backend (fp32): greedy outputs with n-gram and draft-model
speculation equal the outputs without it, in one batch with plain requests; and the batch-1
speculative decode of `kiln bench latency --speculative` runs and keeps the tokens."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from kiln.runtime.bench import speculative_decode
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model import make_backend, random_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import truncated_copy

from tests.configs import FAMILY_CONFIGS

CFG = dict(FAMILY_CONFIGS["llama"], num_hidden_layers=4)


@pytest.fixture(scope="module")
def models():
    # fp32: the verification (a k + 1 token query) and plain decode (1 token) run different kernels,
    # whose bf16 rounding could flip a near-tie argmax.
    ref = random_model("llama", CFG, dtype="fp32", device="cuda", seed=1)
    target = replace(ref, model=make_backend(ref.plan, dict(ref.model.weights), "cuda", "cuda"))
    return target, truncated_copy(ref, "llama", CFG, 2, backend="cuda")


def _run(target, method=None, draft=None):
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 256) for _ in range(rng.randint(2, 8))] * 3, rng.randint(4, 40)) for _ in range(12)]
    engine = LLMEngine(target, None, EngineConfig(page_size=16, num_pages=256, max_num_seqs=16, speculative=method),
                       draft=draft)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), speculate=i % 3 != 0)
           for i, (p, n) in enumerate(reqs)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.pool.num_free == engine.pool.num_pages
    return [done[i] for i in ids], engine.spec_stats


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_speculation_equals_plain_on_cuda(models, method):
    target, draft = models
    plain, _ = _run(target)
    got, stats = _run(target, method, draft if method == "draft" else None)
    assert stats.verifications > 0
    assert got == plain


@pytest.mark.parametrize("forced", [False, True])
def test_bench_speculative_decode_runs(forced):
    r = speculative_decode("llama", CFG, "draft", 4, 2, 32, backend="cuda", device="cuda", prompt_len=64,
                           dtype="fp32", forced=forced)
    assert r["spec_same_tokens"]
    if forced:  # the zeroed layers leave the target equal to its draft: every proposal accepted
        assert r["spec_acceptance_length"] >= 4.5
