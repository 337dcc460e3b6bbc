"""Issue #13, CPU checks of the int4 qkv GEMV with the rotary + paged KV write in its epilogue (session 18, opt-in:
KILN_INT4_GEMV_ROPE=1): the layout in rotary pairs (codegen/quant_kernels.py Packed.rope_paired: tile t's rows 0-7 the
first rows of pairs 8 t + (0..7), rows 8-15 their second rows, codegen/gemv.py rope_pair_rows) holds W's own values at
W's own rows through the kernels' row map (`w_row`, from gemv_rope_epi.cuh.j2's pair_row, emulated here in Python),
each pair is two dims of one head (rotary partners where they rotate), the epilogue spec renders and compiles for
sm_90a and sm_80 in every variant, bad specs are refused naming the field, and QGemm pairs its weight only where it
can and the switch is on. Results on a GPU: tests/gpu/test_quant_kernels.py (test_int4_rope_*)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import quant_kernels as Q  # noqa: E402
from kiln.codegen.gemv import rope_epilogue_spec, rope_pair_rows, rope_pairs  # noqa: E402
from kiln.codegen.kernels import KernelArgError  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError, RopeCacheSpec  # noqa: E402
from kiln.dsl.quant import QuantDesc, quantize_weight  # noqa: E402
from kiln.runtime import cuda_quant  # noqa: E402

from tests.test_qgemv_gated import _weight, assert_compiles, assert_row_map  # noqa: E402
from tests.test_quant_layout import emulate_dequant  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_kernel_cache")  # compile for real: ptxas's log (tests/conftest.py)

LLAMA3 = rope_epilogue_spec(RopeCacheSpec(32, 8, 128, 128, 16, theta=500000.0, scaling="llama3", factor=8.0,
                                          original_max_position=8192))
SMALL = rope_epilogue_spec(RopeCacheSpec(4, 2, 16, 16, 16))  # W: 64 q rows, 32 k, 32 v = 128 rows, 64 pairs
# full rotation (half layout), partial rotation, interleaved partial rotation, none
SMALLS = [SMALL, dataclasses.replace(SMALL, rotary_dim=8), dataclasses.replace(SMALL, rotary_dim=8, layout="interleaved"),
          dataclasses.replace(SMALL, rotary_dim=0)]


def _rows(rope, order="qkv"):
    hd = rope.head_dim
    qn, kn = rope.heads * hd, rope.kv_heads * hd
    return {"qkv": (0, qn, qn + kn), "kvq": (2 * kn, 0, kn)}[order]


def w_row(row: int, pairs: torch.Tensor) -> int:
    """templates/gemv_wq.cu.j2's w_row for the rotary layout: packed row -> W's row."""
    return int(pairs[(row // 16) * 8 + row % 8, int(row % 16 >= 8)])


@pytest.mark.parametrize("rope", SMALLS, ids=["half", "half-partial", "interleaved-partial", "none"])
@pytest.mark.parametrize("order", ["qkv", "kvq"])
def test_rope_pairs_are_two_dims_of_one_head(rope, order):
    qkv = _rows(rope, order)
    pr = rope_pair_rows(rope, qkv)
    n, hd, rot = 2 * rope_pairs(rope), rope.head_dim, rope.rotary_dim
    assert pr.shape == (n // 2, 2) and sorted(pr.flatten().tolist()) == list(range(n))  # every row of W once
    starts = sorted(qkv)
    for j, (a, b) in enumerate(pr.tolist()):
        head_a = max(s for s in starts if s <= a), (a - max(s for s in starts if s <= a)) // hd
        head_b = max(s for s in starts if s <= b), (b - max(s for s in starts if s <= b)) // hd
        assert head_a == head_b, j  # one head of q, k or v
        da, db = (a - head_a[0]) % hd, (b - head_b[0]) % hd
        h, p = j // (hd // 2), j % (hd // 2)
        rotates = h < rope.heads + rope.kv_heads and p < rot // 2
        if rotates and rope.layout == "half":
            assert (da, db) == (p, p + rot // 2)  # the rotary partners
        else:
            assert (da, db) == (2 * p, 2 * p + 1)


@pytest.mark.parametrize("rope", SMALLS[:2], ids=["half", "half-partial"])
@pytest.mark.parametrize("order", ["qkv", "kvq"])
def test_rope_layout_holds_the_weight_at_its_rows(rope, order):
    torch.manual_seed(0)
    qkv = _rows(rope, order)
    n = 2 * rope_pairs(rope)
    w = _weight(n, 128)
    p = Q.pack(w).rope_paired(rope, qkv)
    assert p.rope == rope and p.qkv_rows == qkv and p.pairs is None and p.perm is None
    packed = emulate_dequant(p)  # the dequantize entry's values at their packed rows
    pr = rope_pair_rows(rope, qkv)
    rows = torch.tensor([w_row(r, pr) for r in range(n)])
    out = torch.empty_like(packed)
    out[rows] = packed
    torch.testing.assert_close(out, w.dequantize(), rtol=0, atol=0)


def test_only_an_int4_post_weight_of_exactly_the_qkv_rows_rope_pairs():
    qkv = _rows(SMALL)
    with pytest.raises(KernelArgError, match="rotary pairs"):
        Q.pack(_weight(144, 128)).rope_paired(SMALL, qkv)  # 16 rows more than q's, k's and v's
    with pytest.raises(KernelArgError, match="rotary pairs"):
        Q.pack(_weight(128, 128)).rope_paired(SMALL, (0, 64, 80))  # k and v overlap
    with pytest.raises(KernelArgError, match="rotary pairs"):
        Q.pack(_weight(128, 256, act_order=True)).rope_paired(SMALL, qkv)
    with pytest.raises(KernelArgError, match="rotary pairs"):
        Q.pack(_weight(128, 128)).paired(0, 64).rope_paired(SMALL, qkv)
    with pytest.raises(KernelArgError, match="pairs"):
        Q.pack(_weight(128, 128)).rope_paired(SMALL, qkv).paired(0, 64)


def _spec(rope=LLAMA3, dtype="bf16", bias=True, variant="warp", **kw):
    n = 2 * rope_pairs(rope)
    rope = dataclasses.replace(rope, dtype=dtype)
    args = dict(rope=rope, qkv_rows=_rows(rope), rope_epi=variant == "warp")
    if variant == "warp":
        args |= dict(zip(("tpw", "ksplit"), Q.choose_warp(n, 4096, 128, 132)))
    args |= kw
    tokens = 8 if variant == "warp" else 16
    splits = Q.choose_splits("int4", n, 4096, tokens, 132) if variant == "stream" else 1
    return Q.QGemvSpec("int4", "post", n, 4096, 128, tokens, bias, dtype, "models/test.kiln:3 linear(x, w)", variant,
                       splits, **args)


@pytest.mark.parametrize("dtype, kv_fp8", [("bf16", False), ("fp16", False), ("bf16", True)])
@pytest.mark.parametrize("rope", [LLAMA3, dataclasses.replace(LLAMA3, rotary_dim=64, layout="interleaved")],
                         ids=["llama3-8b", "interleaved-partial"])
def test_rope_epilogue_compiles(dtype, kv_fp8, rope):
    ks = render(_spec(dataclasses.replace(rope, kv_fp8=kv_fp8), dtype))
    assert "rope_store(rope_args, out, t, f, a, b);" in ks.source and "// origin: models/test.kiln:3" in ks.source
    assert_compiles(ks)


@pytest.mark.parametrize("variant", ["loop", "stream", "warp"])
def test_every_variant_renders_the_rope_row_map(variant):
    """The layout in rotary pairs through any variant (more rows: the loop / stream kernels; the warp variant
    without its epilogue) writes W's row order: the row map in every store and the dequantize entry."""
    kw = dict(rope_epi=False) if variant == "warp" else {}
    assert_row_map(_spec(variant=variant, **kw), "return pair_row((row >> 4) * 8 + (row & 7), (row & 8) != 0);")


@pytest.mark.parametrize("bad, field", [
    (dict(qkv_rows=(0, 4096, 4608)), "qkv_rows"),  # k and v overlap
    (dict(qkv_rows=(0, 4096)), "qkv_rows"),
    (dict(rope=dataclasses.replace(LLAMA3, heads=16)), "n"),  # W's rows are not q's, k's and v's
    (dict(pairs=3072, gate_row=0, up_row=3072), "rope"),
    (dict(rope=None), "qkv_rows"),  # qkv_rows without a rotary layout
    (dict(rope=dataclasses.replace(LLAMA3, scaling="dynamic")), "rope_epi"),  # frequencies picked per step
    (dict(rope=dataclasses.replace(LLAMA3, dtype="fp16")), "rope_epi"),  # not the GEMV's dtype
])
def test_bad_rope_specs_are_refused_naming_the_field(bad, field):
    base = _spec()
    with pytest.raises(KernelSpecError, match=rf"QGemvSpec\.{field}:"):
        dataclasses.replace(base, **bad)


def test_the_rope_epilogue_belongs_to_the_warp_variant():
    with pytest.raises(KernelSpecError, match=r"QGemvSpec\.rope_epi:"):
        _spec(variant="loop", rope_epi=True)


def test_qgemm_rope_pairs_only_where_it_can_and_the_switch_is_on(monkeypatch):
    rope, qkv = dataclasses.replace(SMALL, origin="models/test.kiln:9 rope(q)"), _rows(SMALL)
    w = _weight(128, 256)
    g = cuda_quant.prepare([w], [(0, 128)])
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_ROPE", "0")
    assert g.rope_paired(rope, qkv) is g  # off: the weight keeps W's row order
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_ROPE", "1")
    paired = g.rope_paired(rope, qkv, torch.bfloat16)
    assert paired is not g and paired.packed.rope == rope_epilogue_spec(rope) and g.packed.rope is None
    assert torch.bfloat16 in paired.packed._rec  # records built now, before any graph capture
    assert g.rope_paired(rope, (0, 64, 80)) is g  # k and v overlap
    ao = cuda_quant.prepare([_weight(128, 256, act_order=True)], [(0, 128)])
    assert ao.rope_paired(rope, qkv) is ao  # act-order: its columns are gathered, it keeps its layout
    fp8 = cuda_quant.prepare([quantize_weight(torch.randn(128, 256), QuantDesc("fp8", "per_tensor"))], [(0, 128)])
    assert fp8.rope_paired(rope, qkv) is fp8
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert g.gemv_rope(x, None, rope, qkv, "t", ()) is None  # not paired: the GEMM, then the rotary kernel
    monkeypatch.setattr(cuda_quant, "INT4_GEMV_ROPE", "yes")
    with pytest.raises(KernelSpecError, match="KILN_INT4_GEMV_ROPE"):
        g.rope_paired(rope, qkv)


def test_rope_gemv_refuses_what_it_does_not_take():
    p = Q.pack(_weight(128, 256))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not p.rope_takes(x)  # not paired
    pp = p.rope_paired(SMALL, _rows(SMALL))
    assert pp.rope_takes(x)
    assert not pp.rope_takes(torch.randn(9, 256, dtype=torch.bfloat16))  # more rows than the warp variant's
    assert not pp.rope_takes(x.float())  # fp32 runs take the CUDA-core loop
    with pytest.raises(KernelArgError, match="rope_takes"):
        pp.rope_gemv(torch.randn(9, 256, dtype=torch.bfloat16), None, ())
