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
from kiln.codegen.fuse import Exec
from kiln.codegen.quant_kernels import QGemvSpec, choose_warp
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, KernelSpecError, RopeCacheSpec
from kiln.dsl import check, load_spec
from kiln.runtime.cuda_backend import l2_prefetch_budget, l2_prefetch_plan

from tests.configs import FAMILY_CONFIGS
from tests.test_pdl_order import _before_wait_problems, _entries

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
    yield G.spec_for(6144, 4096, "bf16", False, "qkv", 132, epilogue=RopeCacheSpec(32, 8, 128, 128, 16),
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
