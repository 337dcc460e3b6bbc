"""KILN_PDL_CHAIN (runtime/cuda_backend.PDL_CHAIN) on a GPU: the norm, activation, rotary + KV write and
decode attention kernels launched as programmatic dependents (each waits for the kernel before at its entry,
the tensor-core decode attention after copying its first cached K/V tiles;
tests/test_pdl_order.py checks their machine code) compute what their plain launches compute, bit for bit:
whole models' decode (CUDA graph replays, every GEMM one row, bf16 and an fp8 KV cache) and their eager
prompt steps, and greedy tokens through the engine with requests of mixed lengths side by side."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.runtime import cuda_backend  # noqa: E402
from kiln.runtime.batch import SeqSlice, StepBatch  # noqa: E402
from kiln.runtime.engine import EngineConfig  # noqa: E402
from kiln.runtime.kv_store import KVStore  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend, random_model  # noqa: E402
from kiln.runtime.state_cache import StateStore  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA, greedy_through_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")


def _twin(ref):
    return LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)


def _logits(ref, chain: str, monkeypatch) -> list[torch.Tensor]:
    """Two prompts (23 and 9 tokens) in one eager step, then 6 decode steps of both (graph replays), through a
    fresh cuda twin with the chain switch set: every step's logits (fp32 copies)."""
    monkeypatch.setattr(cuda_backend, "PDL_CHAIN", chain)
    model = _twin(ref)
    # fp8 pages where the plan's sites say so; a state slot a sequence for a state-space model
    kv = KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda", state=StateStore(2))
    gen = torch.Generator().manual_seed(1)
    tables = (tuple(range(8)), tuple(range(8, 16)))
    vocab = ref.plan.vocab_size
    out = []
    with torch.no_grad():
        first = StepBatch(torch.randint(0, vocab, (32,), generator=gen),
                          [SeqSlice(0, 23, 0, tables[0], state_slot=0), SeqSlice(23, 9, 0, tables[1], state_slot=1)])
        out.append(model.model.forward(first, kv).float().clone())
        for step in range(6):
            nxt = torch.randint(0, vocab, (2,), generator=gen)
            batch = StepBatch(nxt, [SeqSlice(0, 1, 23 + step, tables[0], state_slot=0),
                                    SeqSlice(1, 1, 9 + step, tables[1], state_slot=1)])
            out.append(model.model.forward(batch, kv).float().clone())
    return out


@pytest.mark.parametrize("chain", ["1", "norm", "attention", "gated"])  # every kind; the norms; attention (+ gated norms)
@pytest.mark.parametrize("dtype,kv_cache_dtype", [("bf16", "auto"), ("fp32", "auto"), ("bf16", "fp8")])
def test_chain_changes_no_logit(dtype, kv_cache_dtype, chain, monkeypatch):
    ref = random_model("llama", LLAMA, dtype=dtype, device="cuda", seed=0, kv_cache_dtype=kv_cache_dtype)
    plain = _logits(ref, "0", monkeypatch)
    chained = _logits(ref, chain, monkeypatch)
    for step, (a, b) in enumerate(zip(plain, chained)):
        assert torch.equal(a, b), f"step {step}: logits differ with the chain on"


@pytest.mark.parametrize("chain", ["auto", "gated", "1"])  # the default (its norms); the gated norms; every kind
def test_chain_changes_no_logit_of_a_state_space_model(chain, monkeypatch):
    """Mamba-2, whose every mixer is a scan: "auto" (the default) launches its norms as programmatic dependents."""
    monkeypatch.setattr(cuda_backend, "PDL_CHAIN", "auto")
    assert cuda_backend._chain("norm", state_space=True) and not cuda_backend._chain("norm")
    ref = random_model("mamba2", FAMILY_CONFIGS["mamba2"], dtype="bf16", device="cuda", seed=0)
    plain = _logits(ref, "0", monkeypatch)
    chained = _logits(ref, chain, monkeypatch)
    for step, (a, b) in enumerate(zip(plain, chained)):
        assert torch.equal(a, b), f"step {step}: logits differ with the chain on"


def test_engine_tokens_with_the_chain_equal_without(monkeypatch):
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0)
    rng = random.Random(0)
    reqs = [([rng.randrange(1000) for _ in range(rng.randint(1, 60))], rng.randint(1, 20)) for _ in range(12)]

    def run(chain):
        monkeypatch.setattr(cuda_backend, "PDL_CHAIN", chain)
        return greedy_through_engine(_twin(ref), reqs, EngineConfig(page_size=16, num_pages=256, max_num_seqs=8,
                                                                    max_tokens_per_step=64))[0]

    assert run("1") == run("0")


def test_a_bad_chain_switch_is_refused_by_name(monkeypatch):
    from kiln.codegen.specs import KernelSpecError

    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0)
    monkeypatch.setattr(cuda_backend, "PDL_CHAIN", "yes")
    with pytest.raises(KernelSpecError, match="KILN_PDL_CHAIN='yes'"):
        _logits(ref, "yes", monkeypatch)
