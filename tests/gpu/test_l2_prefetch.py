"""KILN_L2_PREFETCH on a GPU (templates/l2_prefetch.cuh.j2): a decode GEMV that asks L2 to prefetch its weight before
griddepcontrol.wait gives the same bits as without (a prefetch is a hint): each family (bf16 plain, with the gated
and the rotary epilogues; the fp8 "mma" one; the INT4 warp one, plain and gated), launched as a programmatic
dependent, with the whole weight prefetched and with a budget that covers part of each slice; and a random
Llama's decode logits (bf16, fp8, int4 weights; CUDA graphs; 1, 2 and 4 sequences) with the switch at half the
L2 (after short kernels only, and after every kernel) and at 2 MiB, against it off; the same with the prefetch
ahead on a second stream (KILN_L2_PREFETCH_AHEAD, codegen/l2_ahead.py), Mamba-2 too. CPU checks (the plan, the
machine code): tests/test_l2_prefetch.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import gemv_fp8 as F8  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.codegen.quant_kernels import Packed, QGemvSpec, pack  # noqa: E402
from kiln.codegen.specs import ActSpec, RopeCacheSpec  # noqa: E402
from kiln.dsl.quant import QuantDesc, quantize_weight  # noqa: E402
from kiln.runtime import cuda_backend, cuda_quant  # noqa: E402
from kiln.runtime.model import random_model  # noqa: E402

from tests.configs import FAMILY_CONFIGS as FAMILIES  # noqa: E402
from tests.gpu.test_cuda_backend import LLAMA  # noqa: E402
from tests.gpu.test_gemv_prologue import _decode_logits  # noqa: E402
from tests.gpu.test_quant_kernels import _cuda_twin, _int4  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
MIB = 1 << 20
BUDGETS = [64 * MIB, MIB]  # the whole weight; part of every slice


def _same(run, spec, budget):
    """run(spec) twice, without and with the prefetch; NaN-poisoned outputs compared bit for bit."""
    want = run(spec)
    got = run(dataclasses.replace(spec, l2_prefetch=budget))
    torch.cuda.synchronize()
    assert not got.isnan().any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("kind", ["plain", "gated", "rope"])
def test_bf16_gemv_with_the_prefetch_equals_without(kind, T, budget):
    dt, k = torch.bfloat16, 4096
    x = torch.randn(T, k, device="cuda").to(dt)
    if kind == "plain":
        w = (torch.randn(4096, k, device="cuda") / k**0.5).to(dt)
        spec = G.spec_for(4096, k, "bf16", False, "o")

        def run(s):
            out = torch.full((T, s.n), float("nan"), device="cuda", dtype=dt)
            G.gemv(s, x, w, out, pdl=True)
            return out
    elif kind == "gated":
        w = (torch.randn(28672, k, device="cuda") / k**0.5).to(dt)
        spec = G.spec_for(28672, k, "bf16", False, "gate+up", epilogue=ActSpec("silu", True, 14336),
                          halves=(0, 14336))

        def run(s):
            out = torch.full((T, s.n), float("nan"), device="cuda", dtype=dt)
            G.gemv(s, x, w, out, pdl=True)
            return out
    else:
        rope = RopeCacheSpec(32, 8, 128, 128, 16, dtype="bf16")
        w = (torch.randn(6144, k, device="cuda") / k**0.5).to(dt)
        spec = G.spec_for(6144, k, "bf16", False, "qkv", epilogue=rope, halves=(0, 4096, 5120))
        positions = torch.arange(7, 7 + T, device="cuda")
        slots = torch.arange(T, dtype=torch.int32, device="cuda") * 16 + 7

        def run(s):
            kc = torch.zeros(T, 8, 16, 128, device="cuda", dtype=dt)
            vc = torch.zeros_like(kc)
            q = torch.full((T, 4096), float("nan"), device="cuda", dtype=dt)
            G.gemv_rope(s, x, w, q, positions, slots, kc, vc, pdl=True)
            return torch.cat([q.flatten(), kc.flatten(), vc.flatten()])
    _same(run, spec, budget)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("gated", [False, True])
def test_fp8_gemv_with_the_prefetch_equals_without(gated, budget):
    rows, k = (28672, 4096) if gated else (4096, 4096)
    w = quantize_weight(torch.randn(rows, k, device="cuda") / k**0.5, QuantDesc("fp8", "per_tensor", act="fp8_tensor"))
    x = (torch.randn(1, k, device="cuda") * 2).to(torch.bfloat16)
    epi = dict(epilogue=ActSpec("silu", True, 14336), halves=(0, 14336)) if gated else {}
    spec = F8.spec_for(rows, k, "bf16", False, decode="mma", **epi)

    def run(s):
        out = torch.full((1, s.n), float("nan"), device="cuda", dtype=torch.bfloat16)
        F8.gemv_fp8(s, x, w.q, w.scale.reshape(()), out, pdl=True)
        return out
    _same(run, spec, budget)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("n, k, gated", [(4096, 4096, False), (4096, 14336, False), (28672, 4096, True)])
def test_int4_warp_gemv_with_the_prefetch_equals_without(n, k, gated, budget):
    p = pack(_int4(n, k))
    if gated:
        p = p.paired(0, n // 2)
    act = ActSpec("silu", True, n // 2, dtype="bf16")
    for T in (1, 3, 8):
        x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16)

        def run(q: Packed):
            return q.gated(x, None, act) if gated else q.linear(x, None)
        want = run(p)
        pp = dataclasses.replace(p, l2_prefetch=budget)
        assert pp.spec(torch.bfloat16, 8, False).l2_prefetch == budget  # the warp variant, prefetching
        got = run(pp)
        torch.cuda.synchronize()
        assert torch.equal(got, want), T


def _prefetching():
    """The loaded GEMV kernels that prefetch."""
    return [s for (s, _) in list(_loaded) if isinstance(s, (G.GemvSpec, F8.Fp8GemvSpec, QGemvSpec)) and s.l2_prefetch]


@pytest.mark.parametrize("quantization", ["none", "fp8", "int4-wo"])
def test_decode_logits_with_the_prefetch_equal_without(quantization, monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)  # every decode step of <= 4 sequences, not only 1
    monkeypatch.setattr(cuda_quant, "FP8_GEMV", "pdl")
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization=quantization)
    outs = {}
    for setting, after in [("0", "small"), ("1", "small"), ("1", "all"), ("2", "small")]:
        monkeypatch.setattr(cuda_backend, "L2_PREFETCH", setting)
        monkeypatch.setattr(cuda_backend, "L2_PREFETCH_AFTER", after)
        cuda = _cuda_twin(ref)
        plan = cuda.model._l2
        assert bool(plan) == (setting != "0")
        if quantization == "int4-wo":  # the packed weights carry their step's budget
            assert all(p.l2_prefetch == plan.get(n, 0) for n, p in _indexed_packs(cuda))
        outs[(setting, after)] = _decode_logits(cuda, "llama", "bf16")
    assert _prefetching(), "no prefetching GEMV ran"
    for key, got in outs.items():
        for a, b in zip(outs[("0", "small")], got):
            assert torch.equal(a, b), key


def _indexed_packs(model):
    """(GEMM step index, its packed INT4 weight) of a cuda model."""
    for n, (g, _) in model.model._gemm.items():
        if isinstance(g, cuda_quant.QGemm) and g.packed is not None:
            yield n, g.packed


@pytest.mark.parametrize("name, quantization", [("llama", "none"), ("llama", "fp8"), ("llama", "int4-wo"),
                                                ("mamba2", "none")])
def test_decode_logits_with_the_prefetch_ahead_equal_without(name, quantization, monkeypatch):
    """KILN_L2_PREFETCH_AHEAD (codegen/l2_ahead.py): the prefetch kernels forked onto a second stream, captured in
    the decode graphs with it and joined at the step's end; the same logits, bit for bit, with the budget at half
    the L2 and at 2 MiB (a share of each slice), and with the GEMVs' own prefetch on too."""
    from kiln.codegen.l2_ahead import L2AheadSpec

    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    ref = random_model(name, LLAMA if name == "llama" else FAMILIES[name], dtype="bf16", device="cuda", seed=0,
                       quantization=quantization)
    outs = {}
    for ahead, own in [("0", "0"), ("1", "0"), ("2", "0"), ("1", "1")]:
        monkeypatch.setattr(cuda_backend, "L2_AHEAD", ahead)
        monkeypatch.setattr(cuda_backend, "L2_PREFETCH", own)
        cuda = _cuda_twin(ref)
        assert bool(cuda.model._ahead) == (ahead != "0")
        outs[(ahead, own)] = _decode_logits(cuda, name, "bf16")
    assert any(isinstance(s, L2AheadSpec) for (s, _) in list(_loaded)), "no prefetch ahead ran"
    for key, got in outs.items():
        for a, b in zip(outs[("0", "0")], got):
            assert torch.equal(a, b), key
