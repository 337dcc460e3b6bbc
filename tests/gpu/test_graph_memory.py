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
    m.model.capture_decode_graphs(kv, 1)  # (the warm-up and capture streams' cuBLAS workspaces, made once)
    m.model.drop_graphs()
    gc.collect()  # (this and an earlier call's graphs and their pools)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    assert m.model.capture_decode_graphs(kv, 256) == 12  # buckets 1..256
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # (blocks the warm-ups cached: not the graphs')
    return torch.cuda.memory_reserved() - before


def test_decode_graphs_share_a_pool(monkeypatch):
    # Each graph's pool holds its capture's peak: private pools hold the sum over the buckets, the shared one
    # about the largest bucket's and every graph's output. And no capture keeps memory of its own beyond that:
    # session 28 found each holding a 32 MiB cuBLAS workspace (one for each new warm-up stream), 378 MiB in all
    # here, shared pool or not, where the twelve graphs' values take a few MiB (in the allocator's segments of
    # 2 and 20 MiB: the bound leaves room for a few).
    private = _decode_graph_bytes(monkeypatch, "private")
    shared = _decode_graph_bytes(monkeypatch, "shared")
    assert shared < 0.6 * private, f"{shared / 2**20:.1f} MiB shared vs {private / 2**20:.1f} MiB private"
    assert shared < 160 * 2**20, f"{shared / 2**20:.1f} MiB"


def test_graph_pool_setting_checked(monkeypatch):
    monkeypatch.setenv("KILN_GRAPH_POOL", "both")
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda", seed=0)
    kv = KVStore(m.plan.sites, 8, 16, m.dtype, "cuda")
    with pytest.raises(ValueError, match="KILN_GRAPH_POOL"):
        m.model.capture_decode_graphs(kv, 1)
    assert cuda_backend.GRAPH_POOL == "shared"


def test_mixed_graphs_write_one_output_buffer(monkeypatch):
    # Their logits are views of one buffer (CudaModel.mixed_out), not memory each graph keeps; a step's logits
    # survive the next mixed step's replay (fp32: forward returns a copy), and equal an eager step's.
    monkeypatch.setattr(cuda_backend, "MIXED_GRAPHS_LARGE", "1")
    monkeypatch.setattr(cuda_backend, "MIXED_TOKENS", (16,))
    monkeypatch.setattr(cuda_backend, "LARGE_TOKENS", (64, 128, 256))
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="fp32", device="cuda", backend="cuda", seed=0)
    kv = KVStore(m.plan.sites, 48, 16, m.dtype, "cuda")
    assert m.model.capture_decode_graphs(kv, 20, tokens=100, prompt_len=20) > len(m.model._graphs)
    ptrs = {g.logits.untyped_storage().data_ptr() for g in m.model._mixed.values()}
    assert ptrs == {m.model._mixed_out.untyped_storage().data_ptr()}

    def step(prompts: int, n: int) -> StepBatch:  # every seat taken (20): decode rows beside `prompts` prompts of n
        d = 20 - prompts
        seqs = [SeqSlice(i, 1, 5, (i,)) for i in range(d)]
        seqs += [SeqSlice(d + n * j, n, 0, tuple(range(20 + 3 * j, 23 + 3 * j))) for j in range(prompts)]
        return StepBatch(torch.randint(0, LLAMA["vocab_size"], (d + prompts * n,)), seqs)
    a, b = step(5, 20), step(1, 40)  # buckets (8, 128, 24, 16) and (2, 64, 22, 20): both captured ahead
    assert [cuda_backend.large_mixed_key(s, len(s.seqs), 20) for s in (a, b)] == [(8, 128, 24, 16), (2, 64, 22, 20)]
    with torch.no_grad():
        got_a = m.model.forward(a, kv)
        got_b = m.model.forward(b, kv)
        assert m.model.step_counts["mixed_graph"] == 2 and not m.model.step_counts["mixed_capture"]
        m.model.use_graphs = m.model.mixed_graphs = False
        want_a, want_b = m.model.forward(a, kv), m.model.forward(b, kv)
    assert torch.allclose(got_a, want_a, rtol=1e-4, atol=1e-4) and torch.allclose(got_b, want_b, rtol=1e-4, atol=1e-4)


def test_a_max_batch_past_the_largest_bucket_captures_every_bucket():
    # (TensorRT-LLM's default max batch is 2,048.) Batches up to 1,024 replay graphs, so all are captured ahead;
    # before session 27 none were (no bucket holds 2,048).
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda", seed=0)
    kv = KVStore(m.plan.sites, 8, 16, m.dtype, "cuda")
    m.model.reserve(2048, 64)
    assert m.model.capture_decode_graphs(kv, 2048) == len(cuda_backend.GRAPH_BUCKETS)
    assert sorted(m.model._graphs) == list(cuda_backend.GRAPH_BUCKETS)
