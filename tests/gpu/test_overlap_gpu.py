"""Overlap on the cuda backend (runtime/engine.py, EngineConfig.overlap): step N + 1 is launched
(CUDA-graph replays, decode and mixed, and eager steps) before step N's tokens are read back,
its continuing rows fed on the device. Greedy outputs (fp32) equal overlap off and the reference
backend; seeded sampling and logprobs equal overlap off; the steady decode path makes no
synchronising CUDA call besides the wait for the step it reads."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.sampling_params import SamplingParams

from tests.gpu.test_cuda_backend import LLAMA, pair


def arrivals(count=24, seed=0, **params):
    rng = random.Random(seed)
    return [(rng.randrange(0, 2 * count), [rng.randrange(1000) for _ in range(rng.randint(1, 60))],
             SamplingParams(**{"temperature": 0.0, "max_tokens": rng.randint(1, 40), "ignore_eos": True, **params}))
            for _ in range(count)]


def drive(model, overlap: bool, work, abort_at=None, **cfg):
    # num_pages given: an engine left to size its cache takes 90% of the GPU's free memory, which the
    # test processes running beside it (pytest-xdist) then lack
    engine = LLMEngine(model, None, EngineConfig(**{"page_size": 16, "num_pages": 256, "max_num_seqs": 8,
                                                    "max_tokens_per_step": 256, "overlap": overlap, **cfg}))
    assert engine.overlap == overlap
    pending, ids, final, call = sorted(work, key=lambda a: a[0]), [], {}, 0
    abort_at = dict(abort_at or {})
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= call:
            ids.append(engine.add_request(pending[0][1], pending.pop(0)[2]))
        for out in engine.step() if engine.has_unfinished() else []:
            if out.finished:
                final[out.request_id] = out
            i = ids.index(out.request_id)
            if i in abort_at and not out.finished and len(out.outputs[0].token_ids) >= abort_at[i]:
                engine.abort(out.request_id)
                del abort_at[i]
        call += 1
    engine.pool.check()
    assert engine.pool.num_used == 0
    outs = [[(list(c.token_ids), c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [sorted((t, round(lp.logprob, 3)) for t, lp in e.items())
                                               for e in c.logprobs]) for c in final[i].outputs] for i in ids]
    return outs, engine


@pytest.fixture(scope="module")
def models():
    return pair("llama", LLAMA, "fp32")


def test_greedy_overlap_equals_off_and_reference(models):
    ref, cuda = models
    work = arrivals()
    expected, _ = drive(ref, False, work)
    off, _ = drive(cuda, False, work)
    on, engine = drive(cuda, True, work)
    assert engine.num_overlapped > 50
    assert off == expected and on == expected
    # the reference backend on the GPU takes pending tokens too
    assert drive(ref, True, work)[0] == expected


def test_prompt_chunks_launched_ahead(models, monkeypatch):
    """A token budget below the prompts' lengths: the steps after a prompt chunk are launched ahead too
    (Scheduler.schedule_ahead continues the chunk on the host while its decode rows take their tokens on
    the device), through mixed graphs and eager steps; greedy outputs equal overlap off and the reference,
    and more steps are launched ahead than with KILN_OVERLAP_CHUNKS=0 (the baseline, as before)."""
    ref, cuda = models
    work = arrivals(seed=3)
    expected, _ = drive(ref, False, work, max_tokens_per_step=24)
    off, _ = drive(cuda, False, work, max_tokens_per_step=24)
    on, engine = drive(cuda, True, work, max_tokens_per_step=24)
    assert off == expected and on == expected
    monkeypatch.setenv("KILN_OVERLAP_CHUNKS", "0")
    base, base_engine = drive(cuda, True, work, max_tokens_per_step=24)
    assert base == expected
    chunks = sum(-(-len(p) // 24) - 1 for _, p, _ in work)  # chunks with more to go after them
    assert engine.num_overlapped > base_engine.num_overlapped + chunks // 2


def test_stop_tokens_abort_and_preemption(models):
    _, cuda = models
    work = arrivals(seed=1)
    plain, _ = drive(cuda, False, work)
    work = [(t, p, SamplingParams(**{**vars(s), "stop_token_ids": [plain[i][0][0][min(3, len(plain[i][0][0]) - 1)]] if i % 3 == 0 else []}))
            for i, (t, p, s) in enumerate(work)]
    for cfg in ({}, {"num_pages": 12}):  # 12 pages: preemption
        off, e_off = drive(cuda, False, work, abort_at={1: 4, 5: 2}, **cfg)
        on, e_on = drive(cuda, True, work, abort_at={1: 4, 5: 2}, **cfg)
        assert on == off and e_on.num_overlapped > 0 and e_on.num_dropped_rows > 0
        if cfg:
            assert e_on.scheduler.num_preemptions > 0


def test_seeded_sampling_and_logprobs(models):
    """Every request from the first call, all ending by length together: each step's batch is the same
    with overlap as without (a GPU's logits depend in their last bits on the batch they are computed in
    (its width picks the GEMM kernel and the graph), so staggered arrivals and endings, whose seats
    overlap frees a step later, could move a sampled token across a boundary: sampling would still be
    right, not bit-equal)."""
    _, cuda = models
    work = [(0, p, SamplingParams(**{**vars(s), "seed": 7 + i, "max_tokens": 24}))
            for i, (_, p, s) in enumerate(arrivals(count=6, seed=2, temperature=0.8, top_p=0.95, logprobs=2))]
    off, _ = drive(cuda, False, work)
    on, engine = drive(cuda, True, work)
    assert on == off and engine.num_overlapped > 0


def test_steady_decode_does_not_synchronise(models):
    """Between launching step N + 1 and reading step N, nothing waits for the GPU: a decode step of
    the overlapped engine makes no synchronising call (the wait on N's copy event is not one)."""
    _, cuda = models
    engine = LLMEngine(cuda, None, EngineConfig(page_size=16, num_pages=64, max_num_seqs=4, overlap=True))
    for _ in range(2):
        engine.add_request(list(range(1, 40)), SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    for _ in range(8):  # prefill, graphs captured
        engine.step()
    before = engine.num_overlapped
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(16):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.num_overlapped - before == 16
    assert not [w for w in caught if "synchroniz" in str(w.message).lower()], [str(w.message) for w in caught]
