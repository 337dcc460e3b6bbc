"""The large mixed graphs captured ahead (runtime/cuda_backend.py large_warm_keys, what `LLMEngine.capture_graphs`
captures at start-up) against the steps a throughput run takes: the scheduler run on CPU over TensorRT-LLM's
shapes, each step's bucket computed as the cuda backend's forward computes it. A step whose bucket was not
captured ahead is captured in the middle of the run (~0.4 s on an H100: session 27's 128/128 at max batch 512
spent a third of its 7 s on six such captures)."""

from __future__ import annotations

from collections import Counter

import pytest
from kiln.runtime import cuda_backend as cb
from kiln.runtime.engine import EngineConfig
from kiln.runtime.kv_cache import BlockPool
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Request, Scheduler


def _large_steps(prompt: int, output: int, requests: int, max_batch: int, budget: int, scratch: int) -> Counter:
    """How many of the run's mixed steps take each large mixed bucket (the steps a small mixed graph or no graph
    runs are left out), pages enough for every seat's whole sequence (no preemption), on a model whose decode
    scratch holds `scratch` rows (its max_batch: the engine's seats, or more where it was reserved larger)."""
    pages = max_batch * -(-(prompt + output) // 16)
    sched = Scheduler(BlockPool(pages, 16), max_batch, budget)
    for i in range(requests):
        sched.add(Request(str(i), [1] * prompt, SamplingParams(max_tokens=output, ignore_eos=True)))
    steps: Counter = Counter()
    while sched.has_work():
        step = sched.schedule()
        batch = step.batch
        rows = len(batch.sample_rows())
        if not all(s.length == 1 for s in batch.seqs) and cb._mixed_key(len(batch.seqs), batch.num_tokens, rows) is None:
            key = cb.large_mixed_key(batch, rows, scratch)
            if key is not None:
                steps[key] += 1
        sched.update(step, [0] * len(step.sampled_requests))
        sched.take_finished()
    return steps


@pytest.mark.parametrize("prompt,output,max_batch,budget,scratch", [
    (128, 128, 256, 2048, 256), (128, 128, 512, 4096, 512), (1000, 200, 256, 2048, 256), (2048, 64, 256, 2048, 256),
    (128, 256, 512, 4096, 512),
    # seats fewer than the model's scratch, and not a bucket: every seat's decode rows take bucket 256, not 200
    # (session 30's GPU test caught the warm keys' bucket of 20 seats on a larger model)
    (128, 128, 200, 2048, 512)])
def test_graphs_captured_ahead_cover_a_throughput_runs_mixed_steps(prompt, output, max_batch, budget, scratch):
    steps = _large_steps(prompt, output, 3 * max_batch, max_batch, budget, scratch)
    ahead = cb.large_warm_keys(max_batch, budget, prompt, scratch)  # as CudaModel.capture_decode_graphs asks
    assert len(set(ahead)) == len(ahead) and len(ahead) <= 32
    missed = {k: n for k, n in steps.items() if k not in ahead}
    # The run's last steps (its remaining prompts, fewer than a full step) may take a bucket of their own, once
    assert len(missed) <= 2 and sum(missed.values()) <= 2, f"{missed} of {sum(steps.values())} steps: {sorted(steps)}"
    assert sum(steps.values()) >= 10  # (the run has mixed steps to cover)


def test_warm_keys_largest_first_and_within_the_batch():
    keys = cb.large_warm_keys(20, 100, 20)
    assert keys == sorted(keys, key=lambda k: (k[1], k[2], k[0]), reverse=True)
    assert all(d <= 20 and rows == d + p for p, _, rows, d in keys)
    assert cb.large_warm_keys(20, 0) == [] and EngineConfig().max_tokens_per_step > 0
