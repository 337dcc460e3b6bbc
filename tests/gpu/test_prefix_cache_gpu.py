"""Prefix caching on the cuda backend: a request's first chunk is a query that starts after a
context of cached pages computed by other requests. Greedy outputs with caching on equal those
with caching off and those of the reference backend (fp32), for requests sharing system prompts
across page boundaries, with and without eviction and preemption."""

from __future__ import annotations

import random

import pytest
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.sampling_params import SamplingParams

from tests.gpu.test_cuda_backend import LLAMA, pair


def requests(count=32, seed=0):
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(n)] for n in (10, 40, 70)]  # page size 16
    return [(systems[i % 3] + [rng.randrange(1000) for _ in range(rng.choice((0, 1, 5, 20)))], rng.randint(1, 16))
            for i in range(count)]


def run(model, caching: bool, num_pages: int):
    engine = LLMEngine(model, None, EngineConfig(page_size=16, num_pages=num_pages, max_num_seqs=16,
                                                 max_tokens_per_step=128, enable_prefix_caching=caching))
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
           for p, n in requests()]
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        engine.pool.check()
    assert engine.pool.num_used == 0
    return [done[i] for i in ids], engine


@pytest.mark.parametrize("num_pages", [256, 12])  # 12 pages: eviction and preemption
def test_cached_greedy_equals_uncached_and_reference(num_pages):
    ref, cuda = pair("llama", LLAMA, "fp32")
    expected, _ = run(ref, False, 256)
    got, engine = run(cuda, True, num_pages)
    assert engine.scheduler.prefix_hit_tokens > 0
    if num_pages == 12:
        assert engine.scheduler.num_preemptions > 0 and engine.pool.num_evictions > 0
    assert got == expected
    assert run(cuda, False, 256)[0] == expected
