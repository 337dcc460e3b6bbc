"""KILN_L2_PREFETCH on the CPU (templates/l2_prefetch.cuh.j2): the decode GEMVs (bf16, the fp8 "mma" one, the INT4
warp one) that ask L2 to prefetch their weight before griddepcontrol.wait. Checked here: each warp's share of the
budget (`l2_prefetch_bytes`), which GEMM steps of a program prefetch (`l2_prefetch_plan`: after a kernel that does
not stream weights of its own), the switch's values, the specs' validation, and the machine code: every family
compiles for sm_90a with its bulk prefetches (UBLKPF) before its wait and no more spills than without, and
without the switch there is no prefetch at all. That the bits stay the same and the speed: tests/gpu/test_l2_prefetch.py
and `.ci/device_check.sh l2pf`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kiln.codegen import fuse as F
from kiln.codegen import gemv as G
from kiln.codegen import gemv_fp8 as F8
from kiln.codegen import l2_ahead
from kiln.codegen.fuse import Exec
from kiln.codegen.kernels import KernelArgError
from kiln.codegen.quant_kernels import QGemvSpec, choose_warp
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, KernelSpecError, RopeCacheSpec
from kiln.dsl import check, load_spec
from kiln.runtime.cuda_backend import l2_ahead_plan, l2_prefetch_budget, l2_prefetch_plan

from tests.configs import FAMILY_CONFIGS
from tests.test_pdl_order import NVDISASM, _before_wait_problems, _entries

MIB = 1 << 20


def test_each_slice_gets_the_same_share_of_the_budget():
    # the whole weight within the budget: every slice whole
    assert G.l2_prefetch_bytes(24 * MIB, 8 * MIB, 8192) == 8192
    # twice the budget: half of each slice, in whole 16-byte units
    assert G.l2_prefetch_bytes(24 * MIB, 48 * MIB, 8192) == 4096
    assert G.l2_prefetch_bytes(24 * MIB, 33554432, 8192) == 6144  # the 8B model's bf16 o: 3/4 of each row
    assert G.l2_prefetch_bytes(1000, 10**9, 8192) == 0  # a share under 16 bytes: nothing
    assert G.l2_prefetch_bytes(0, 8 * MIB, 8192) == 0
    for budget, weight, piece in [(24 * MIB, 117440512, 8192), (7 * MIB + 3, 12582912, 4000)]:
        b = G.l2_prefetch_bytes(budget, weight, piece)
        assert b % 16 == 0 and b <= piece and b * weight <= budget * piece


def test_the_switch_values():
    assert l2_prefetch_budget("0", 50 * MIB) == 0
    assert l2_prefetch_budget("1", 50 * MIB) == 25 * MIB  # half the L2
    assert l2_prefetch_budget("24", 50 * MIB) == 24 * MIB
    for bad in ("yes", "-3", "1.5", ""):
        with pytest.raises(KernelSpecError, match="KILN_L2_PREFETCH="):
            l2_prefetch_budget(bad, 50 * MIB)
    with pytest.raises(KernelSpecError, match="KILN_L2_PREFETCH_AFTER="):
        l2_prefetch_plan([], MIB, "before")


def _ops(family: str):
    return F.fuse(check(load_spec(family), FAMILY_CONFIGS[family]), torch.bfloat16, 16)


@pytest.mark.parametrize("family", ["llama", "mamba2"])
def test_the_gemvs_after_a_kernel_that_streams_no_weight_prefetch(family):
    ops = _ops(family)
    gemms = [n for n, op in enumerate(ops) if op.kind is Exec.GEMM]
    plan = l2_prefetch_plan(ops, 3 * MIB)
    assert set(plan.values()) == {3 * MIB}
    for n in gemms:
        before = Exec.NORM if "prologue" in ops[n].extra else ops[n - 1].kind
        assert (n in plan) == (before not in (Exec.GEMM, Exec.MOE)), (n, ops[n].kind, before)
    if family == "llama":  # per layer: qkv (after its norm), o (after attention), gate+up (after the norm); not down
        layers = FAMILY_CONFIGS["llama"]["num_hidden_layers"]
        down = [n for n in gemms if ops[n - 1].kind is Exec.GEMM and "prologue" not in ops[n].extra]
        assert len(down) == layers and not set(down) & set(plan)
        assert len(plan) == len(gemms) - layers
    else:  # a state-space layer's GEMMs all follow a norm or the conv + scan step
        assert set(plan) == set(gemms)
    assert set(l2_prefetch_plan(ops, 3 * MIB, "all")) == set(gemms)
    assert l2_prefetch_plan(ops, 0) == {}


def _specs(budget: int):
    """The GEMV families at the 8B model's decode shapes, with `budget` bytes of L2 prefetch."""
    pf = dict(l2_prefetch=budget)
    yield G.spec_for(4096, 4096, "bf16", False, "o", 132, **pf)
    yield G.spec_for(28672, 4096, "bf16", False, "gate+up", 132, epilogue=ActSpec("silu", True, 14336),
                     halves=(0, 14336), **pf)
    yield G.spec_for(6144, 4096, "bf16", False, "qkv", 132, epilogue=RopeCacheSpec(32, 8, 128, 128, 16, dtype="bf16"),
                     halves=(0, 4096, 5120), **pf)
    yield G.spec_for(1000, 512, "fp32", True, "fp32", 132, **pf)
    yield F8.spec_for(4096, 4096, "bf16", False, decode="mma", **pf)
    yield F8.spec_for(28672, 4096, "bf16", False, decode="mma", epilogue=ActSpec("silu", True, 14336),
                      halves=(0, 14336), **pf)
    for n, k in ((4096, 4096), (4096, 14336), (28672, 4096)):
        tpw, ks = choose_warp(n, k, 128)
        yield QGemvSpec("int4", "post", n, k, 128, variant="warp", tpw=tpw, ksplit=ks, **pf)
    tpw, ks = choose_warp(28672, 4096, 128)
    yield QGemvSpec("int4", "post", 28672, 4096, 128, variant="warp", tpw=tpw, ksplit=ks, pairs=14336, gate_row=0,
                    up_row=14336, epilogue=ActSpec("silu", True, 14336).key(), **pf)


def _spills(ins: list[str]) -> int:
    return sum(1 for s in ins if s.split()[0].lstrip("@!P0123456789 ").startswith(("STL", "LDL")))


SASS = pytest.mark.skipif(NVDISASM is None, reason="nvdisasm (pip install nvidia-cuda-nvdisasm)")


@SASS
@pytest.mark.parametrize("i", range(len(list(_specs(0)))))
def test_the_prefetches_come_before_the_wait(i, tmp_path):
    off = list(_specs(0))[i]
    on = list(_specs(24 * MIB))[i]
    src_on, src_off = render(on), render(off)
    assert "cp.async.bulk.prefetch.L2.global" in src_on.source and "l2_prefetch(" in src_on.source
    assert "l2_prefetch" not in src_off.source.replace("l2_prefetch=0", "")  # off: no trace but the spec's constant
    with_pf = _entries(src_on.source, src_on.name, src_on.origin, tmp_path)
    without = _entries(src_off.source, src_off.name, src_off.origin, tmp_path)
    assert len(with_pf) == len(without)
    for (name, ins), twin in zip(with_pf.items(), without.values()):  # the same entries, in the same order
        if not any("ACQBULK" in s for s in ins):
            continue  # an entry that is not a programmatic dependent (the packed weights' dequantization)
        wait = next(j for j, s in enumerate(ins) if "ACQBULK" in s)
        pf = [j for j, s in enumerate(ins) if "UBLKPF" in s]
        assert pf and max(pf) < wait, (name, pf, wait)
        assert not _before_wait_problems(ins), name
        assert _spills(ins) <= _spills(twin), name
    for ins in without.values():
        assert not any("UBLKPF" in s for s in ins)


def test_specs_that_cannot_prefetch_are_refused():
    with pytest.raises(KernelSpecError, match="l2_prefetch"):
        G.spec_for(64, 128, "bf16", False, l2_prefetch=-1)
    with pytest.raises(KernelSpecError, match="l2_prefetch"):
        dataclasses.replace(F8.spec_for(64, 128, "bf16", False, decode="int"), l2_prefetch=MIB)
    assert F8.spec_for(64, 128, "bf16", False, decode="int", l2_prefetch=MIB).l2_prefetch == 0  # not the mma decode
    with pytest.raises(KernelSpecError, match="l2_prefetch"):
        QGemvSpec("int4", "post", 4096, 4096, 128, variant="loop", l2_prefetch=MIB)


# ---- the prefetch ahead, on a second stream (codegen/l2_ahead.py, KILN_L2_PREFETCH_AHEAD)

def _covered(segments, base: int) -> list[tuple[int, int]]:
    """The byte ranges [start, end) the segments cover, relative to `base`, merged and sorted."""
    spans = sorted((b - base + i * s, b - base + i * s + n) for b, s, c, n in segments for i in range(c))
    out = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _weights():
    """(label, [(base, row_slices)], streamed bytes, [(base, that tensor's bytes)]) at three layouts, bases made up."""
    from kiln.codegen.quant_kernels import pack
    from kiln.dsl.quant import QuantDesc, quantize_weight

    sl = G.l2_slices(6144, 4096, "bf16")
    yield "bf16 qkv", [(1 << 32, sl)], 6144 * 4096 * 2, [(1 << 32, 6144 * 4096 * 2)]
    sl = G.l2_slices(1000, 520, "bf16")  # K slices of unequal length (the last one shorter)
    yield "bf16 odd", [(1 << 32, sl)], 1000 * 520 * 2, [(1 << 32, 1000 * 520 * 2)]
    sl = F8.l2_slices(4096, 14336)
    yield "fp8 down", [(1 << 32, sl)], 4096 * 14336, [(1 << 32, 4096 * 14336)]
    p = pack(quantize_weight(torch.randn(512, 1024) * 0.05, QuantDesc("int4", "per_group", 128, zero_points=True)))
    (wq, wsl), (rec, rsl) = p.l2_ranges(torch.bfloat16)
    nbytes = wq.numel() + rec.numel() * rec.element_size()
    yield "int4", [(1 << 32, wsl), (1 << 40, rsl)], nbytes, [(1 << 32, wq.numel()),
                                                              (1 << 40, rec.numel() * rec.element_size())]


@pytest.mark.parametrize("w", list(_weights()), ids=lambda w: w[0])
def test_a_whole_prefetch_covers_the_weight_once(w):
    _, ranges, total, tensors = w
    assert sum(c * n for _, sl in ranges for _, _, c, n in sl) == total  # no byte twice
    segments = l2_ahead.fit([(ranges, total)], total)
    for base, size in tensors:
        mine = [s for s in segments if base <= s[0] < base + size]
        assert _covered(mine, base) == [(0, size)]
    # a third of the budget: the same third of every range, the first bytes of each, whole 16-byte units
    part = l2_ahead.fit([(ranges, total)], total // 3)
    kept = [s for s in segments if s[3] * (total // 3) // total >= 16]  # a share under 16 bytes: left out
    assert [p[:3] for p in part] == [s[:3] for s in kept]
    assert all(p[3] % 16 == 0 and s[3] // 3 - 16 <= p[3] <= s[3] // 3 for p, s in zip(part, kept))
    assert sum(c * n for _, _, c, n in part) <= total // 3


def test_the_budget_goes_to_the_gemvs_in_order():
    a = ([(1 << 32, [(0, 1024, 100, 1024)])], 100 * 1024)
    b = ([(1 << 33, [(0, 2048, 100, 2048)])], 100 * 2048)
    both = l2_ahead.fit([a, b], 100 * 1024 + 50 * 2048)
    assert both == [(1 << 32, 1024, 100, 1024), (1 << 33, 2048, 100, 1024)]  # a whole, then half of each of b's
    assert l2_ahead.fit([a, b], 100 * 1024) == [(1 << 32, 1024, 100, 1024)]
    assert l2_ahead.fit([a, b], 0) == []
    with pytest.raises(KernelArgError):  # a range not in 16-byte units
        l2_ahead.table([(1 << 32, 1000, 2, 1000)], "cpu")
    t = l2_ahead.table(both, "cpu")
    assert t.dtype == torch.int64 and t.shape == (2, 4)


@pytest.mark.parametrize("family", ["llama", "mamba2"])
def test_a_prefetch_is_forked_after_each_gemv_that_a_stretch_follows(family):
    ops = _ops(family)
    plan = l2_ahead_plan(ops)
    gemms = [n for n, op in enumerate(ops) if op.kind is Exec.GEMM]
    for m, targets in plan.items():
        assert ops[m].kind is Exec.GEMM
        n = targets[0]
        assert n == min(g for g in gemms if g > m) and targets == gemms[gemms.index(n):gemms.index(n) + 2]
        assert n > m + 1 or "prologue" in ops[n].extra  # a stretch runs between
    if family == "llama":  # after qkv: o, gate+up; after o: gate+up, down; after down: the next qkv, o
        layers = FAMILY_CONFIGS["llama"]["num_hidden_layers"]
        assert len(plan) == 3 * layers  # (after the last down: the LM head, its norm between)
        kinds = {m: ops[m + 1].kind for m in plan}
        assert sum(k is Exec.ATTENTION for k in kinds.values()) == layers
    else:  # after in_proj: out_proj, the next in_proj; after out_proj: the next in_proj and out_proj
        assert set(plan) == set(gemms[:-1])


@SASS
def test_the_prefetch_kernel_compiles_with_its_bulk_prefetch(tmp_path):
    src = render(l2_ahead.L2AheadSpec(origin="test"))
    entries = _entries(src.source, src.name, src.origin, tmp_path)
    (ins,) = entries.values()
    assert any("UBLKPF" in s for s in ins)
    assert not any(s.split()[0].startswith(("STG", "ST.", "ATOM", "RED")) for s in ins)  # it writes nothing
