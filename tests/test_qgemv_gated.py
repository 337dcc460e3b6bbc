"""Issue #13, CPU checks of the int4 gate+up GEMV with the gated activation in its epilogue (session 16,
opt-in: KILN_INT4_GEMV_EPILOGUE=1): the paired layout (codegen/quant_kernels.py Packed.paired: W's two halves
packed 8 rows at a time so that a lane's C-fragment rows g and g + 8 are one (gate, up) pair) holds W's own
values at W's own rows through the kernels' row map (`w_row` in templates/gemv_wq.cu.j2, emulated here lane by
lane), the epilogue spec renders and compiles for sm_90a and sm_80, bad specs are refused naming the field, and
QGemm pairs its weight only where it can and the switch is on. Results on a GPU:
tests/gpu/test_quant_kernels.py (test_gemv_gated_*)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen import quant_kernels as Q  # noqa: E402
from kiln.codegen.kernels import KernelArgError  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import ActSpec, KernelSpecError  # noqa: E402
from kiln.dsl.quant import QuantDesc, QWeight, quantize_weight  # noqa: E402
from kiln.runtime import cuda_quant  # noqa: E402

from tests.test_quant_layout import emulate_dequant, emulate_gemv  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)

SPILL_MAX = 32  # as tests/test_qgemv_warp_compile.py: gate+up's one-slice pick spills a few words


def _weight(n, k, group=128, act_order=False):
    w = quantize_weight(torch.randn(n, k) * 0.05, QuantDesc("int4", "per_group", group, zero_points=True))
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k)] = (torch.arange(k) // group).int()
        w = QWeight(QuantDesc("int4", "per_group", group, zero_points=True, act_order=True), w.shape, w.q, w.scale,
                    w.zero, g_idx)
    return w


def w_row(row: int, gate_row: int, up_row: int) -> int:
    """templates/gemv_wq.cu.j2's w_row: a paired weight's packed row -> W's row."""
    p = row % 16
    return (gate_row if p < 8 else up_row) + (row // 16) * 8 + p % 8


@pytest.mark.parametrize("n, k, group", [(32, 128, 128), (96, 512, 128), (48, 192, 64)])
@pytest.mark.parametrize("halves", ["gate-first", "up-first"])
def test_paired_layout_holds_the_weight_at_its_rows(n, k, group, halves):
    torch.manual_seed(0)
    w = _weight(n, k, group)
    g, u = (0, n // 2) if halves == "gate-first" else (n // 2, 0)
    p = Q.pack(w).paired(g, u)
    assert p.pairs == (g, u) and p.perm is None
    packed = emulate_dequant(p)  # the dequantize entry's values at their packed rows
    rows = torch.tensor([w_row(r, g, u) for r in range(n)])
    assert sorted(rows.tolist()) == list(range(n))  # a permutation: every row of W once
    out = torch.empty_like(packed)
    out[rows] = packed
    torch.testing.assert_close(out, w.dequantize(), rtol=0, atol=0)
    # the fragments: row g and g + 8 of every tile are one pair's gate and up sums
    x = torch.randn(3, k)
    y = emulate_gemv(p, x)  # packed row order
    ref = w.linear(x)
    for r in range(n):
        torch.testing.assert_close(y[:, r], ref[:, w_row(r, g, u)], rtol=1e-4, atol=1e-4)


def test_unrepack_inverts_repack():
    for n, k in ((16, 64), (40, 256), (33, 200)):
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
        assert torch.equal(Q.unrepack(Q.repack(q, "int4"), n, k), q)


def test_only_an_int4_post_weight_of_two_tiled_halves_pairs():
    p = Q.pack(_weight(96, 256))
    for g, u in ((0, 40), (8, 48), (0, 0)):
        with pytest.raises(KernelArgError, match="pairs"):
            p.paired(g, u)
    with pytest.raises(KernelArgError, match="act-order"):
        Q.pack(_weight(96, 256, act_order=True)).paired(0, 48)
    with pytest.raises(KernelArgError, match="whole tiles"):
        Q.pack(_weight(40, 256)).paired(0, 20)  # halves of 20 rows: not whole 16-row tiles
    with pytest.raises(KernelArgError, match="pairs"):
        p.paired(0, 48).paired(0, 48)


def _act(features, dtype="bf16", kind="silu", gated=True):
    return ActSpec(kind, gated, features, dtype).key()


def _spec(n, k, dtype="bf16", bias=True, **kw):
    tpw, ksplit = Q.choose_warp(n, k, 128, 132)
    args = dict(tpw=tpw, ksplit=ksplit, pairs=n // 2, gate_row=0, up_row=n // 2, epilogue=_act(n // 2, dtype)) | kw
    return Q.QGemvSpec("int4", "post", n, k, 128, 8, bias, dtype, "models/test.kiln:3 linear(x, w)", "warp", **args)


@pytest.mark.parametrize("n, k", [(28672, 4096), (96, 512), (8192, 2560), (64, 4096)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gated_epilogue_compiles(n, k, dtype):
    ks = render(_spec(n, k, dtype))
    assert "act(gs) * us" in ks.source and "// origin: models/test.kiln:3 linear(x, w)" in ks.source
    assert_compiles(ks)


def assert_compiles(ks) -> None:
    """A warp-variant kernel source: it waits on the kernel before (PDL), and both entries compile for sm_90a and
    sm_80 with at most SPILL_MAX bytes spilled."""
    assert "griddepcontrol.wait" in ks.source
    for arch in ("sm_90a", "sm_80"):
        img = nvrtc.compile_source(ks.source, ks.name, arch, ks.origin, extra_options=("--ptxas-options=-v",))
        spills = [int(b) for b in re.findall(r"(\d+) bytes spill stores", img.log)]
        assert len(spills) == 2 and max(spills) <= SPILL_MAX, img.log


@pytest.mark.parametrize("variant", ["loop", "stream", "persist", "warp"])
def test_every_variant_renders_the_paired_row_map(variant):
    """A paired weight through any variant (more rows, KILN_QGEMV) writes W's row order: the row map in every
    store and the dequantize entry."""
    kw = dict(pairs=48, gate_row=48, up_row=0)
    if variant == "warp":
        kw |= dict(tpw=1, ksplit=2)
    assert_row_map(Q.QGemvSpec("int4", "post", 96, 512, 128, 8, True, "bf16", "t", variant, **kw),
                   "return (p < 8 ? 48 : 0) + (row >> 4) * 8 + (p & 7);")


def assert_row_map(spec, row_map: str) -> None:
    """spec's kernel defines w_row as `row_map`, stores every output and dequantized row through it, and compiles."""
    ks = render(spec)
    assert row_map in ks.source
    stores = re.findall(r"out\[[^\]]*\] = from_float", ks.source)
    assert stores and all("w_row(row)" in s for s in stores), stores
    assert f"w + (size_t)w_row(row) * {spec.k}" in ks.source
    nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)


@pytest.mark.parametrize("bad, field", [
    (dict(pairs=40), "pairs"),  # n = 96 is not 2 x 40
    (dict(pairs=48, gate_row=8, up_row=48), "gate_row"),
    (dict(pairs=0, gate_row=0, up_row=48, epilogue=None), "gate_row"),
    (dict(pairs=0, gate_row=0, up_row=0), "epilogue"),  # an epilogue needs the paired layout
    (dict(epilogue=_act(48, kind="silu", gated=False)), "epilogue"),
    (dict(epilogue=_act(40)), "epilogue"),
    (dict(epilogue=_act(48, dtype="fp16")), "epilogue"),
])
def test_bad_gated_specs_are_refused_naming_the_field(bad, field):
    with pytest.raises(KernelSpecError, match=rf"QGemvSpec\.{field}:"):
        _spec(96, 512, **bad)


def test_the_epilogue_belongs_to_the_warp_variant():
    with pytest.raises(KernelSpecError, match=r"QGemvSpec\.epilogue:"):
        Q.QGemvSpec("int4", "post", 96, 512, 128, 8, False, "bf16", "t", "loop", pairs=48, gate_row=0, up_row=48,
                    epilogue=_act(48))
    with pytest.raises(KernelSpecError, match=r"QGemvSpec\.pairs:"):
        Q.QGemvSpec("int8", "post", 96, 512, 512, 8, False, "bf16", "t", "loop", pairs=48, gate_row=0, up_row=48)


def test_qgemm_pairs_only_where_it_can_and_the_switch_is_on(monkeypatch):
    w = _weight(96, 256)
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_EPILOGUE", "0")
    g = cuda_quant.prepare([w], [(0, 96)])
    assert g.paired((0, 48)) is g  # off: the weight keeps W's row order
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_EPILOGUE", "1")
    paired = g.paired((0, 48), torch.bfloat16)
    assert paired is not g and paired.packed.pairs == (0, 48) and g.packed.pairs is None
    assert torch.bfloat16 in paired.packed._rec  # records built now, before any graph capture
    assert g.paired((0, 40)) is g  # not W's two halves
    ao = cuda_quant.prepare([_weight(96, 256, act_order=True)], [(0, 96)])
    assert ao.paired((0, 48)) is ao  # act-order: its columns are gathered, it keeps its layout
    fp8 = cuda_quant.prepare([quantize_weight(torch.randn(96, 256), QuantDesc("fp8", "per_tensor"))], [(0, 96)])
    assert fp8.paired((0, 48)) is fp8
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_EPILOGUE", "yes")
    with pytest.raises(KernelSpecError, match="KILN_INT4_GEMV_EPILOGUE"):
        g.paired((0, 48))


def test_gated_refuses_what_it_does_not_take():
    p = Q.pack(_weight(96, 256))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not p.gated_takes(x)  # not paired
    pp = p.paired(0, 48)
    assert pp.gated_takes(x)
    assert not pp.gated_takes(torch.randn(9, 256, dtype=torch.bfloat16))  # more rows than the warp variant's
    assert not pp.gated_takes(x.float())  # fp32 runs take the CUDA-core loop
    with pytest.raises(KernelArgError, match="gated_takes"):
        pp.gated(torch.randn(9, 256, dtype=torch.bfloat16), None, ActSpec("silu", True, 48, "bf16"))
