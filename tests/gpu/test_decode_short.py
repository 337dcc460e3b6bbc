"""KILN_DECODE_SHORT: decode steps of many short sequences on an fp8 cache through the decode kernel's short-context
shape (two warps a block, four stages, four blocks an SM), eagerly and as their buckets' second graphs, give the
default shape's logits; steps past the bounds keep the default graphs (runtime/cuda_backend.py)."""

from __future__ import annotations

import pytest
import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

from tests.gpu.test_cuda_backend import LLAMA

PER_SEQ = 8  # pages a sequence owns (16-token pages: contexts to 128)


def _decode(B: int, ctx: int, seed: int = 0) -> StepBatch:
    """B one-token rows at context ctx (their new token's K/V written at position ctx)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [SeqSlice(b, 1, ctx, tuple(range(b * PER_SEQ, (b + 1) * PER_SEQ))) for b in range(B)]
    return StepBatch(torch.randint(0, LLAMA["vocab_size"], (B,), generator=g), seqs)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_short_shape_equals_the_default_eager_and_graphed(monkeypatch, dtype, tol):
    monkeypatch.setenv("KILN_DECODE_SHORT", "8:64")  # before the model: its decode scratch holds the short shape's
    m = random_model("models/llama.kiln", dict(LLAMA), dtype=dtype, device="cuda", backend="cuda", seed=0,
                     kv_cache_dtype="fp8")
    B = 12
    kv = KVStore(m.plan.sites, B * PER_SEQ, 16, m.dtype, "cuda")
    torch.manual_seed(0)
    for pages in kv.k + kv.v:  # a context of random fp8 values (every position below ctx is read)
        pages.copy_((torch.randn(pages.shape, device="cuda") * 2).to(pages.dtype))
    short, long_ = _decode(B, 40), _decode(B, 100, seed=1)  # the longest context 41 <= 64; 101 > 64
    m.model.use_graphs = False
    with torch.no_grad():
        monkeypatch.setenv("KILN_DECODE_SHORT", "0")
        want_short, want_long = m.model.forward(short, kv).clone(), m.model.forward(long_, kv).clone()
        monkeypatch.setenv("KILN_DECODE_SHORT", "8:64")
        eager = m.model.forward(short, kv).clone()
        m.model.use_graphs = True
        graphed = m.model.forward(short, kv).clone()
        graphed_long = m.model.forward(long_, kv).clone()
        torch.cuda.synchronize()
    assert list(m.model._short_graphs) == [16] and list(m.model._graphs) == [16]  # (bucket 16 holds 12 rows)
    for got, want in ((eager, want_short), (graphed, want_short), (graphed_long, want_long)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_capture_ahead_makes_the_short_graphs_of_the_buckets_within_bounds(monkeypatch):
    monkeypatch.setenv("KILN_DECODE_SHORT", "8:64")
    m = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", backend="cuda", seed=0,
                     kv_cache_dtype="fp8")
    kv = KVStore(m.plan.sites, 64, 16, m.dtype, "cuda")
    made = m.model.capture_decode_graphs(kv, 20)
    assert sorted(m.model._short_graphs) == [8, 16, 32] and made == len(m.model._graphs) + 3
    m.model.drop_graphs()
    assert not m.model._short_graphs
