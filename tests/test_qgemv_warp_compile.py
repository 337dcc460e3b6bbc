"""Issue #13, CPU checks of the warp variant of the INT4 W4A16 GEMV (codegen/quant_kernels.py,
templates/gemv_wq.cu.j2 "warp"): it renders and NVRTC compiles for sm_90a and sm_80 with at most a few
spilled words (SPILL_MAX; none but at gate+up's one-slice pick) at Llama-3-8B's decode shapes and odd ones,
keeps WARP_LOADS weight loads in flight per lane, asks the dependent-launch controls, the chooser keeps the
grid resident in one wave, bad specs are refused naming the field, and KILN_QGEMV=warp (the default) selects
it where it applies (else the loop). Its
results against QWeight.linear: tests/gpu/test_quant_kernels.py (test_gemv_warp_*)."""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen import quant_kernels as Q  # noqa: E402
from kiln.codegen.kernels import KernelArgError  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402
from kiln.dsl.quant import QuantDesc, quantize_weight  # noqa: E402

from tests.sass import nvdisasm  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)

LLAMA3 = [(6144, 4096, 128), (4096, 4096, 128), (28672, 4096, 128), (4096, 14336, 128)]
# N=80 K=2560 (a ragged tile count, K slices not a power of two of chunks), group 64, one group per row
# (2560: whole chunks; 2000: a K tail inside the last chunk), a group of 1024 (records span the batch)
ODD = [(80, 2560, 128), (100, 2560, 64), (33, 2560, 2560), (200, 2000, 2000), (256, 8192, 1024)]
CLEAN = "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
# Since the chunk loop lost its branches (session 16: ptxas now overlaps chunks, 1.08-1.52x faster on the
# H200), the one-slice pick of 64 chunks (gate+up) spills 8-24 bytes under the 2-blocks-per-SM cap: a
# few L1-resident words, in the measured kernel. Others stay clean.
SPILL_MAX = 32


def _spec(n, k, group, dtype="bf16", bias=True, **kw):
    tpw, ksplit = Q.choose_warp(n, k, group, 132)
    args = dict(tpw=tpw, ksplit=ksplit) | kw
    return Q.QGemvSpec("int4", "post", n, k, group, 8, bias, dtype, "models/test.kiln:3 linear(x, w)", "warp",
                       **args)


@pytest.mark.parametrize("n, k, group", LLAMA3 + ODD)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_warp_compiles_with_at_most_a_few_spilled_words(n, k, group, dtype):
    ks = render(_spec(n, k, group, dtype))
    assert ks.meta["variant"] == "warp"
    assert "// origin: models/test.kiln:3 linear(x, w)" in ks.source
    assert "griddepcontrol.wait" in ks.source and "griddepcontrol.launch_dependents" in ks.source
    cps, unroll, nr, span = Q.warp_shape(k, group, ks.meta["tpw"], ks.meta["ksplit"])
    # WARP_LOADS 16-byte loads per lane in flight wherever a K slice has that many chunks; half where that makes
    # the slice whole batches
    full = ks.meta["tpw"] * unroll == Q.WARP_LOADS
    halved = 2 * ks.meta["tpw"] * unroll == Q.WARP_LOADS and cps % unroll == 0 and unroll >= Q.WARP_MIN_UNROLL
    assert full or halved or cps < Q.WARP_LOADS
    for arch in ("sm_90a", "sm_80"):
        img = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin, extra_options=("--ptxas-options=-v",))
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", img.log)]
        assert len(spills) == 2 and max(spills) <= SPILL_MAX, img.log  # the GEMV and the dequantize entry
        assert img.log.count(CLEAN) == 2 or (ks.meta["tpw"], ks.meta["ksplit"], cps) == (1, 1, 64), img.log


@pytest.mark.parametrize("tpw", Q.WARP_TPW)
@pytest.mark.parametrize("ksplit", Q.WARP_KSPLITS)
def test_every_tpw_and_ksplit_compiles(tpw, ksplit):
    """Off the chooser's picks too (ragged tiles, a K tail, one group per row): every (tpw, ksplit)
    builds for sm_90a, spilling at most SPILL_MAX bytes (4 tiles a warp, 2 over 4 or 8 K slices, and since the
    byte-permute dequantization 1 over the whole of K (24 bytes) spill a few words at this shape)."""
    ks = render(_spec(203, 2000, 2000, tpw=tpw, ksplit=ksplit))
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", img.log)]
    assert len(spills) == 2 and max(spills) <= SPILL_MAX, img.log
    assert img.log.count(CLEAN) == 2 or tpw == 4 or (tpw == 2 and ksplit >= 4) or (tpw, ksplit) == (1, 1), img.log


@pytest.mark.parametrize("n, k, group", LLAMA3)
def test_three_blocks_per_sm_compiles(n, k, group):
    """bps=3 (the benchmark's alternative: 80 registers) builds; at most a few words spill (40 bytes at
    gate+up's one slice)."""
    tpw, ksplit = Q.choose_warp(n, k, group, 132, bps=3)
    ks = render(_spec(n, k, group, tpw=tpw, ksplit=ksplit, bps=3))
    assert "__launch_bounds__(256, 3)" in ks.source
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert all(int(b) <= 48 for b in re.findall(r"(\d+) bytes spill stores", img.log)), img.log


@pytest.mark.parametrize("n, k, group", LLAMA3 + ODD)
def test_choice_keeps_every_warp_resident(n, k, group):
    """One wave: the grid's warps fit num_sms x 8 x WARP_MIN_BLOCKS; no K split where N alone fills it."""
    tpw, ksplit = Q.choose_warp(n, k, group, 132)
    blocks = render(_spec(n, k, group)).meta["blocks"]
    assert blocks == math.ceil(math.ceil(n / 16) / (tpw * Q.WARPS // ksplit))
    assert blocks * Q.WARPS <= 132 * Q.WARPS * Q.WARP_MIN_BLOCKS
    if math.ceil(n / 16) >= 132 * Q.WARP_MIN_BLOCKS * Q.WARPS // 2:
        assert ksplit == 1


def test_llama3_picks():
    """gate+up fills the device with a warp per tile; qkv / o / down split K over a block's warps."""
    assert Q.choose_warp(28672, 4096, 128, 132) == (1, 1)
    assert Q.choose_warp(6144, 4096, 128, 132) == (1, 4)
    assert Q.choose_warp(4096, 4096, 128, 132) == (1, 8)
    assert Q.choose_warp(4096, 14336, 128, 132) == (1, 8)
    # the LM head: one wave would take 4 tiles a warp; waves of one tile over half of K are faster (the H200:
    # 85.3 against 100.8 us, .ci/lmhead_probe.py)
    assert Q.choose_warp(128256, 4096, 128, 132) == (1, 2)


@pytest.mark.parametrize("kw, field", [
    (dict(k=2560, group=96), "group"),  # does not divide K
    (dict(k=3072, group=192), "group"),  # whole chunks, but 3 a group: not a power of two
    (dict(k=4000, group=128), "group"),  # K not a multiple of the group
    (dict(fmt="int8", group=4096), "fmt"),
    (dict(mode="pre", group=64), "mode"),
    (dict(tokens=16), "tokens"),
    (dict(tpw=3), "tpw"),
    (dict(ksplit=16), "ksplit"),
    (dict(bps=4), "bps"),
    (dict(splits=2), "splits"),
])
def test_bad_warp_specs_name_the_field(kw, field):
    args = dict(fmt="int4", mode="post", n=64, k=4096, group=128, tokens=8, has_bias=False, dtype="bf16",
                origin="models/x.kiln:1", variant="warp") | kw
    with pytest.raises(KernelSpecError, match=rf"QGemvSpec\.{field}:.*models/x.kiln:1"):
        Q.QGemvSpec(**args)


@pytest.mark.parametrize("kw", [dict(tpw=2), dict(ksplit=2), dict(bps=3)])
@pytest.mark.parametrize("variant", ["loop", "stream", "persist"])
def test_warp_fields_belong_to_the_warp_variant(kw, variant):
    field = next(iter(kw))
    with pytest.raises(KernelSpecError, match=rf"QGemvSpec\.{field}:"):
        Q.QGemvSpec("int4", "post", 64, 4096, 128, variant=variant, **kw)


def _packed(n=96, k=512, group=128):
    return Q.pack(quantize_weight(torch.randn(n, k) * 0.05, QuantDesc("int4", "per_group", group, zero_points=True)))


def test_kiln_qgemv_selects_warp_up_to_its_rows(monkeypatch):
    """KILN_QGEMV=warp (the default): the warp spec at T <= WARP_MAX_T (bucket 8), the loop beyond and for
    fp32; an unknown name is refused naming the variable."""
    p = _packed()
    monkeypatch.delenv("KILN_QGEMV", raising=False)
    assert Q.default_variant() == "warp"
    monkeypatch.setenv("KILN_QGEMV", "warp")
    s = p.spec(torch.bfloat16, 8, False)
    assert (s.variant, s.splits) == ("warp", 1) and (s.tpw, s.ksplit) == Q.choose_warp(96, 512, 128, 132)
    assert p.spec(torch.float16, 8, True).variant == "warp"
    assert p.spec(torch.bfloat16, 16, False).variant == "loop"
    assert not p.spec(torch.float32, 8, False).warp
    p.reserve("cpu", torch.bfloat16)  # no split-K workspace asked
    monkeypatch.setenv("KILN_QGEMV", "warpp")
    with pytest.raises(KernelArgError, match="KILN_QGEMV"):
        Q.default_variant()


def test_warp_falls_back_for_what_it_does_not_read(monkeypatch):
    """int8 and ggml q4_0 ("pre") weights, or a group of 3 chunks, take the loop under KILN_QGEMV=warp."""
    monkeypatch.setenv("KILN_QGEMV", "warp")
    w8 = Q.pack(quantize_weight(torch.randn(64, 256), QuantDesc("int8", "per_channel")))
    assert w8.spec(torch.bfloat16, 8, False).variant == "loop"
    p = _packed(64, 768, 192)
    assert p.group == 192 and p.spec(torch.bfloat16, 8, False).variant == "loop"
    assert _packed(64, 768, 768).spec(torch.bfloat16, 8, False).variant == "warp"  # one group per row



@pytest.mark.skipif(not nvdisasm(), reason="nvdisasm not found (pip nvidia-cuda-nvdisasm; NVDISASM=path)")
@pytest.mark.parametrize("n, k, group", LLAMA3 + ODD[:2])
def test_first_weight_loads_precede_the_dependent_launch_wait(n, k, group, tmp_path):
    """In the SASS, every load of the first batch comes before griddepcontrol.wait (ACQBULK): with the
    wait issued before launch_dependents, ptxas hoisted it above the loads (as it does in templates/
    gemv.cu.j2 today) and the weights waited for the kernel before after all."""
    import subprocess

    src = render(_spec(n, k, group))
    img = nvrtc.compile_source(src.source, src.name, "sm_90a", src.origin)
    (tmp_path / "k.cubin").write_bytes(img.data)
    sass = subprocess.run([nvdisasm(), "-c", str(tmp_path / "k.cubin")], capture_output=True, text=True,
                          check=True).stdout
    ins = [ln for ln in sass[sass.index(f".text.{src.name}:"):].splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    wait = next(i for i, ln in enumerate(ins) if "ACQBULK" in ln)
    first = src.meta["tpw"] * min(src.meta["unroll"], src.meta["cps"])  # a slice's first batch
    assert sum("LDG.E.NA.128" in ln for ln in ins[:wait]) >= first, "\n".join(ins[:wait + 1])
