"""The cuda backend's step memory: an eager step holds a layer's values at a time, not the whole step's (its run
drops each value after its last reader), and the decode graphs share one pool (KILN_GRAPH_POOL). Session 27: a
4,352-token fp8 step of the 8B shape peaked 19.8 GiB above the weights and KV cache; sixteen decode graphs up to 512
rows held 13.8 GiB in private pools."""

from __future__ import annotations

import gc

import pytest
import torch
from kiln.runtime import cuda_backend
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

from tests.gpu.test_cuda_backend import LLAMA

WIDE = dict(LLAMA, hidden_size=512, intermediate_size=2048)


def _peak(layers: int, tokens: int = 2048) -> int:
    """Bytes an eager prefill of `tokens` tokens (four prompts) allocates above what is live before it."""
    m = random_model("models/llama.kiln", dict(WIDE, num_hidden_layers=layers), dtype="bf16", device="cuda",
                     backend="cuda", seed=0)
    m.model.use_graphs = m.model.mixed_graphs = False
    kv = KVStore(m.plan.sites, 4 * tokens // 64 + 4, 16, m.dtype, "cuda")
    n = tokens // 4
    seqs = [SeqSlice(j * n, n, 0, tuple(range(j * n // 16, (j + 1) * n // 16))) for j in range(4)]
    batch = StepBatch(torch.randint(0, WIDE["vocab_size"], (tokens,)), seqs)
    with torch.no_grad():
        m.model.forward(batch, kv)  # (first launches: modules load, cuBLAS picks its algorithms)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        m.model.forward(batch, kv)
        torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_eager_step_memory_does_not_grow_with_depth():
    # Every layer's values kept to the end of the step: 8 layers' peak ~4x 2 layers'. Dropped after their last
    # reader: the same but for the residual stream (a few MiB).
    two, eight = _peak(2), _peak(8)
    assert eight < 1.25 * two, f"peak {eight / 2**20:.1f} MiB at 8 layers vs {two / 2**20:.1f} MiB at 2"


def _decode_graph_bytes(monkeypatch, where: str) -> int:
    monkeypatch.setenv("KILN_GRAPH_POOL", where)
    m = random_model("models/llama.kiln", dict(WIDE), dtype="bf16", device="cuda", backend="cuda", seed=0)
    kv = KVStore(m.plan.sites, 64, 16, m.dtype, "cuda")
    m.model.reserve(256, 512)
    gc.collect()  # (an earlier call's graphs and their pools)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    m.model.capture_decode_graphs(kv, 256)
    torch.cuda.synchronize()
    return torch.cuda.memory_reserved() - before


def test_decode_graphs_share_a_pool(monkeypatch):
    # Each graph's pool holds its capture's peak: private pools hold the sum over the buckets, the shared one
    # about the largest bucket's and every graph's output.
    private = _decode_graph_bytes(monkeypatch, "private")
    shared = _decode_graph_bytes(monkeypatch, "shared")
    assert shared < 0.6 * private, f"{shared / 2**20:.1f} MiB shared vs {private / 2**20:.1f} MiB private"


def test_graph_pool_setting_checked(monkeypatch):
    monkeypatch.setenv("KILN_GRAPH_POOL", "both")
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda", seed=0)
    kv = KVStore(m.plan.sites, 8, 16, m.dtype, "cuda")
    with pytest.raises(ValueError, match="KILN_GRAPH_POOL"):
        m.model.capture_decode_graphs(kv, 1)
    assert cuda_backend.GRAPH_POOL == "shared"
