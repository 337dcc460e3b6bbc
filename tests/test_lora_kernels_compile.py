"""The multi-LoRA kernels (codegen/lora_kernels.py, templates/lora_sgmv.cu.j2) build for sm_90a
on the CPU: both variants, every run dtype, Llama-3-8B's GEMM shapes and odd ones, without
local-memory spills; the launch geometry's arithmetic (tile slots, K splits) holds for any
grouping; bad specs and a bad KILN_LORA_KERNEL are refused with the field / variable named."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from kiln.codegen import nvrtc
from kiln.codegen.lora_kernels import (
    MAX_SR,
    ROW_TILE,
    SPLIT_STEP,
    LoraSpec,
    tile_slots,
    tiled_splits,
)
from kiln.codegen.render import render
from kiln.codegen.specs import KernelSpecError

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)


# (k, out, sr, rank): Llama-3-8B's fused qkv, o_proj, fused gate + up, down_proj at rank 16; a
# rank-64 three-sibling GEMM (the largest shared-memory sum tile here); a K that is not a multiple
# of 32 columns and an odd output width.
SHAPES = [(4096, 6144, 48, 16), (4096, 4096, 16, 16), (4096, 28672, 32, 16), (14336, 4096, 16, 16),
          (512, 384, 192, 64), (520, 205, 96, 32)]


@pytest.mark.parametrize("kernel", ["tiled", "split"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("k,out,sr,rank", SHAPES)
def test_lora_kernels_compile_without_spills(kernel, dtype, k, out, sr, rank, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))  # this compile's own: ptxas's log comes with it
    ks = render(LoraSpec(k, out, sr, rank, dtype, origin="models/test.kiln:3 linear(x, wq)", kernel=kernel))
    assert "models/test.kiln:3 linear(x, wq)" in ks.source  # the origin, on every kernel
    suffixes = ("_tshrink", "_texpand") if kernel == "tiled" else ("_shrink", "_expand")
    assert ks.entries == tuple(ks.name + s for s in suffixes)
    tensor_cores = kernel == "tiled" and dtype != "fp32"
    assert ("mma.sync.aligned.m16n8k16" in ks.source) == tensor_cores
    if tensor_cores:
        assert f".f32.{dtype.replace('fp', 'f')}.{dtype.replace('fp', 'f')}.f32" in ks.source
    # The tiled pair: no atomics (K splits summed by the expand), dependent-launch controls.
    assert ("atomicAdd" in ks.source) == (kernel == "split")
    assert ("griddepcontrol.wait" in ks.source) == (kernel == "tiled")
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    for entry in ks.entries:
        assert entry in img.log, img.log
    assert img.log.count("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") == 2, img.log


def test_variants_are_different_kernels():
    a, b = (LoraSpec(4096, 6144, 48, 16, origin="t", kernel=v) for v in ("tiled", "split"))
    assert a.key() != b.key() and render(a).name != render(b).name
    assert LoraSpec(4096, 6144, 48, 16, origin="t").kernel == "tiled"  # the default


@pytest.mark.parametrize("make,field", [
    (lambda: LoraSpec(4096, 4096, 16, 16, kernel="fused"), "kernel"),
    (lambda: LoraSpec(4096, 4096, 2 * MAX_SR, 64), "sr"),  # the tiled expand's shared memory
    (lambda: LoraSpec(4096, 4096, 24, 8), "rank"),
    (lambda: LoraSpec(4100, 4096, 16, 16), "k"),
])
def test_spec_errors_name_the_field(make, field):
    with pytest.raises(KernelSpecError, match=rf"LoraSpec\.{field}:"):
        make()


def test_large_shrink_width_takes_the_split_kernel():
    LoraSpec(4096, 4096, 2 * MAX_SR, 64, kernel="split")  # no shared-memory limit there


@pytest.mark.parametrize("T,n", [(1, 1), (1, 8), (7, 8), (64, 8), (64, 40), (300, 8), (300, 40), (2048, 3)])
def test_tile_slots_cover_every_grouping(T, n):
    """The tiled grid is sized from T and n alone: no grouping of T rows over n adapters makes
    more 16-row tiles than tile_slots, and the worst grouping makes exactly that many."""
    slots = tile_slots(T, n)
    rng = random.Random(T * 1000 + n)
    for _ in range(200):
        counts = [0] * n
        for _ in range(rng.randint(0, T)):
            counts[rng.randrange(n)] += 1
        assert sum(math.ceil(c / ROW_TILE) for c in counts) <= slots
    m = min(n, T)  # the worst: m - 1 adapters with one row each, the rest on one adapter
    worst = [1] * (m - 1) + [T - (m - 1)]
    assert sum(math.ceil(c / ROW_TILE) for c in worst) == slots


@pytest.mark.parametrize("k,sr", [(4096, 48), (4096, 16), (4096, 32), (14336, 16), (520, 96), (8, 16)])
def test_tiled_splits_cover_k(k, sr):
    spec = LoraSpec(k, 4096, sr, 16, origin="t")
    for T, n, sms in itertools.product((1, 64, 300, 8192), (1, 8, 40), (1, 78, 132)):
        kc, splits = tiled_splits(spec, T, n, sms)
        assert kc % SPLIT_STEP == 0 and splits >= 1
        assert (splits - 1) * kc < k <= splits * kc  # every column in exactly one split, none empty


def test_bad_kernel_choice_names_the_variable(monkeypatch):
    from kiln.runtime.lora import lora_kernel_choice

    monkeypatch.setenv("KILN_LORA_KERNEL", "fused")
    with pytest.raises(ValueError, match="KILN_LORA_KERNEL='fused'"):
        lora_kernel_choice()
    monkeypatch.setenv("KILN_LORA_KERNEL", "split")
    assert lora_kernel_choice() == "split"
    monkeypatch.delenv("KILN_LORA_KERNEL")
    assert lora_kernel_choice() == "tiled"
