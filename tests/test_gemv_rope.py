"""Issue #12 item 2 on the CPU: the qkv GEMV with the rotary embedding and the paged KV write in its epilogue
(codegen/fuse.py's gemv_rope, codegen/gemv.py's rotary GemvSpec.epilogue, templates/gemv.cu.j2,
templates/rope_math.cuh.j2): which steps of the llama program are linked (every layer's qkv to its attention,
nothing else, and the program's steps unchanged, a prologue's step keeping the link); a qkv whose output is read elsewhere is not linked; the
pairing of W's rows covers every q, k and v row once with each rotary pair in one warp; the kernel renders,
names both spec ops and NVRTC-compiles (every layout, partial and no rotation, an fp8 cache, a bias; the 8B
model's qkv without spills at one row), and so does the fp8 "mma" GEMV with the same epilogue; specs it cannot
compute are refused with the field named. Results on a GPU: tests/gpu/test_gemv_rope.py."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from kiln.codegen import fuse as F
from kiln.codegen import gemv as G
from kiln.codegen import nvrtc
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, KernelSpecError, RopeCacheSpec
from kiln.dsl import check, load_spec, parse_spec

from tests.configs import FAMILY_CONFIGS
from tests.test_gemv_prologue import check_gemv_entries_compile

LLAMA3 = RopeCacheSpec(32, 8, 128, 128, 16, theta=500000.0, scaling="llama3", factor=8.0,
                       original_max_position=8192, origin="models/llama.kiln:20 attention")


def _fuse(plan, monkeypatch, *without):
    with monkeypatch.context() as m:
        m.setattr(F, "PATTERNS", tuple(p for p in F.PATTERNS if p.name not in without))
        return F.fuse(plan, torch.bfloat16, 16)


def test_every_layers_qkv_is_linked_to_its_attention_and_nothing_else_changes(monkeypatch):
    cfg = FAMILY_CONFIGS["llama"]
    plan = check(load_spec("llama"), cfg)
    linked = _fuse(plan, monkeypatch)
    plain = _fuse(plan, monkeypatch, "gemv_rope")
    assert [(o.kind, o.ins, o.outs, o.instrs) for o in linked] == [(o.kind, o.ins, o.outs, o.instrs) for o in plain]
    gemms = [op for op in linked if "rope" in op.extra]
    assert len(gemms) == cfg["num_hidden_layers"]
    for op in gemms:
        att = op.extra["rope"]
        assert att.kind is F.Exec.ATTENTION and att in linked and linked.index(att) > linked.index(op)
        gemm = op.extra.get("gemm", op)  # a prologue's step adds the residual sum to the GEMM's outputs
        assert set(gemm.outs) == set(att.ins) and len(gemm.outs) == 3 and att.spec[0].rotary_dim > 0
        assert "epilogue" not in op.extra
        if "prologue" in op.extra:  # the attention norm's (gemv_prologue): the GEMM step it wraps keeps the link
            assert op.extra["gemm"].extra["rope"] is att
    assert not any("rope" in op.extra for op in plain)


SPEC = """spec p
param d: int = 64
weights { embed: [16, d] <- "e"
          wq: [d, d] <- "wq"
          wk: [d, d] <- "wk"
          wv: [d, d] <- "wv"
          wo: [d, d] <- "wo" }
forward(tokens) {
  x = embedding(tokens, embed)
  q = linear(x, wq)
  k = linear(x, wk)
  v = linear(x, wv)
  a = attention(rope(q, head_dim=32), rope(k, head_dim=32), v, head_dim=32)
  return linear(a, wo) + V
}
"""


@pytest.mark.parametrize("tail, linked", [("q", False), ("x", True)])
def test_a_qkv_whose_output_is_read_elsewhere_is_not_linked(tmp_path, monkeypatch, tail, linked):
    path = tmp_path / "p.kiln"
    path.write_text(SPEC.replace("+ V", f"+ {tail}"))
    plan = check(parse_spec(path.read_text(), str(path)), {})
    ops = F.fuse(plan, torch.bfloat16, 16)
    assert sum("rope" in op.extra for op in ops) == int(linked)


@pytest.mark.parametrize("rope", [
    LLAMA3,
    dataclasses.replace(LLAMA3, layout="interleaved", rotary_dim=64),
    dataclasses.replace(LLAMA3, rotary_dim=64),
    dataclasses.replace(LLAMA3, rotary_dim=0),
    dataclasses.replace(LLAMA3, heads=4, kv_heads=2, head_dim=64, rotary_dim=64),
], ids=["half", "interleaved-partial", "half-partial", "none", "small"])
def test_the_pairs_cover_every_row_once_each_rotary_pair_in_one_lane(rope):
    """The kernel's pair_row, evaluated here from its rendered text's constants: pairs (j, first) and (j, second)
    name every q, k and v row of W once, and a rotary pair's two rows are its dims (d, d + rot/2) (half) or
    (2p, 2p + 1) (interleaved) of one head."""
    hd, rot = rope.head_dim, rope.rotary_dim
    starts = (0, rope.heads * hd, (rope.heads + rope.kv_heads) * hd)
    spec = G.spec_for(starts[2] + rope.kv_heads * hd, 256, "bf16", False, "t", epilogue=rope, halves=starts)
    assert spec.n == G.rope_pairs(rope) and spec.w_rows == starts[2] + rope.kv_heads * hd

    def dims(p: int, h: int) -> tuple[int, int]:  # the template's pair_dims, spelled from its comment
        if rot and rope.layout == "half" and h < rope.heads + rope.kv_heads and p < rot // 2:
            return p, p + rot // 2
        return 2 * p, 2 * p + 1

    rows = []
    for j in range(spec.n):
        h, p = divmod(j, hd // 2)
        base = (starts[0] + h * hd if h < rope.heads else starts[1] + (h - rope.heads) * hd
                if h < rope.heads + rope.kv_heads else starts[2] + (h - rope.heads - rope.kv_heads) * hd)
        rows += [base + d for d in dims(p, h)]
    assert sorted(rows) == list(range(spec.w_rows))
    src = render(spec).source
    # the rendered pair_dims / pair_row say the same (their constants)
    assert f"h = j / {hd // 2};" in src and f"h < {rope.heads} ? {starts[0]} + h * {hd}" in src
    if rot and rope.layout == "half":
        assert f"db = rotary ? p + {rot // 2} : 2 * p + 1;" in src


def test_the_kernel_names_both_ops_and_shares_the_rotary_math_with_the_rope_kernel():
    spec = G.spec_for(6144, 4096, "bf16", False, "models/llama.kiln:12 qkv -> models/llama.kiln:20 attention",
                      epilogue=LLAMA3, halves=(0, 4096, 5120))
    ks = render(spec)
    assert "qkv -> models/llama.kiln:20 attention" in ks.source and "rope_h128_d128_32x8_p16" in ks.name
    rope_src = render(LLAMA3).source
    # one spelling of the frequency table, cos / sin and the pair rotation, in both kernels
    for fn in ("__device__ const float kInvFreq[64]", "void rope_cos_sin(", "void rope_pair("):
        a, b = ks.source.index(fn), rope_src.index(fn)
        block_a, block_b = ks.source[a:ks.source.index("\n}", a)], rope_src[b:rope_src.index("\n}", b)]
        assert block_a == block_b
    assert ks.meta["blocks"] == render(G.spec_for(6144, 4096, "bf16", False, "o")).meta["blocks"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_it_compiles_without_spills_at_one_row(dtype, fresh_kernel_cache):
    spec = G.spec_for(6144, 4096, dtype, False, "qkv", epilogue=dataclasses.replace(LLAMA3, dtype=dtype),
                      halves=(0, 4096, 5120))
    check_gemv_entries_compile(nvrtc, render(spec), dtype)


@pytest.mark.parametrize("kw", [dict(kv_fp8=True), dict(layout="interleaved", rotary_dim=64), dict(rotary_dim=0),
                                dict(scaling="yarn", factor=4.0, attention_factor=1.25, rotary_dim=64)],
                         ids=["fp8", "interleaved-partial", "none", "yarn"])
def test_variants_compile_with_a_bias_and_gapped_slices(kw):
    rope = dataclasses.replace(LLAMA3, heads=4, kv_heads=2, head_dim=128, **kw)
    spec = G.spec_for(1040, 512, "bf16", True, "qkv", epilogue=rope, halves=(0, 520, 776))  # 8-row gaps
    ks = render(spec)
    assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin).data
    assert ("put_fp8<1>" in ks.source) == bool(kw.get("kv_fp8"))
    assert ("rope_pair(a, b" in ks.source) == bool(rope.rotary_dim)


@pytest.mark.parametrize("kw, field, why", [
    (dict(rope=dataclasses.replace(LLAMA3, scaling="dynamic", factor=2.0)), "epilogue", "picks its frequencies"),
    (dict(rope=dataclasses.replace(LLAMA3, dtype="fp16")), "epilogue", "dtype fp16"),
    (dict(qkv_rows=(0, 4096)), "qkv_rows", r"\(q, k, v\) first rows"),
    (dict(qkv_rows=(0, 4000, 5120)), "qkv_rows", "must lie apart"),
    (dict(qkv_rows=(0, 4096, 5200)), "qkv_rows", "must lie apart"),
    (dict(n=3000), "n", "pairs are 3072"),
    (dict(gate_row=1), "qkv_rows", "not gate_row"),
])
def test_specs_it_cannot_compute_are_refused(kw, field, why):
    args = dict(n=3072, k=4096, rows=4, epilogue=G.rope_epilogue_spec(kw.pop("rope", LLAMA3)), w_rows=6144,
                qkv_rows=(0, 4096, 5120))
    args.update(kw)
    with pytest.raises(KernelSpecError, match=rf"GemvSpec\.{field}:.*{why}"):
        G.GemvSpec(**args)


def test_the_fp8_gemv_and_a_plain_gemv_refuse_rotary_fields():
    with pytest.raises(KernelSpecError, match=r"GemvSpec\.w_rows:.*qkv_rows belong to an epilogue"):
        G.GemvSpec(64, 64, qkv_rows=(0, 1, 2))
    with pytest.raises(KernelSpecError, match=r"GemvSpec\.qkv_rows:.*belongs to a rotary epilogue"):
        G.GemvSpec(64, 64, rows=2, epilogue=ActSpec("silu", True, 64), w_rows=128, up_row=64, qkv_rows=(0, 1, 2))
    from kiln.codegen import gemv_fp8 as F8
    with pytest.raises(KernelSpecError, match="fused after decode='mma' only"):
        F8.Fp8GemvSpec(3072, 4096, epilogue=G.rope_epilogue_spec(LLAMA3), w_rows=6144, qkv_rows=(0, 4096, 5120))


@pytest.mark.parametrize("kw", [{}, dict(kv_fp8=True), dict(layout="interleaved", rotary_dim=64)],
                         ids=["half", "fp8-kv", "interleaved-partial"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_the_fp8_mma_gemv_takes_the_rotary_epilogue(kw, per_channel, fresh_kernel_cache):
    """The fp8 one-row GEMV ("mma"): 8 pairs a 16-row tile, the same epilogue definitions as the bf16 GEMV's
    (templates/gemv_rope_epi.cuh.j2); compiles without spills, its grid the plain kernel's."""
    from kiln.codegen import gemv_fp8 as F8
    rope = dataclasses.replace(LLAMA3, **kw)
    spec = F8.spec_for(6144, 4096, "bf16", False, per_channel, False, "qkv -> attention", decode="mma", epilogue=rope,
                       halves=(0, 4096, 5120))
    ks = render(spec)
    assert "rope_store(ra, out, 0, j, gu[0], gu[1]);" in ks.source and "_rope_" in ks.name
    plain = render(F8.spec_for(6144, 4096, "bf16", False, per_channel, False, "qkv", decode="mma"))
    assert ks.meta["blocks"] == plain.meta["blocks"]
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert re.search(r"\b0 bytes spill stores", img.log) and not re.search(r"\b[1-9]\d* bytes spill stores", img.log)


def test_the_rope_kernels_rotation_is_written_without_contraction():
    """rope_pair rounds each product and sum on its own (__fmul_rn, __fsub_rn, __fadd_rn): the compiler may not
    fuse them into an fma differently in the two kernels that inline it."""
    src = render(LLAMA3).source
    body = src[src.index("void rope_pair("):]
    body = body[:body.index("\n}")]
    assert re.search(r"y1 = __fsub_rn\(__fmul_rn\(x1, c\), __fmul_rn\(x2, s\)\);", body)
    assert re.search(r"y2 = __fadd_rn\(__fmul_rn\(x2, c\), __fmul_rn\(x1, s\)\);", body)


def test_kiln_show_kernels_shows_the_decode_gemvs_with_their_epilogues():
    """`kiln show --kernels` ends with the decode GEMVs the cuda backend runs at one row: llama's qkv with the
    rotary epilogue and its gate+up with the SwiGLU, each naming both spec ops; o, down and the lm_head plain."""
    from kiln.codegen.show import decode_gemv_specs, show_kernels
    plan = check(load_spec("llama"), FAMILY_CONFIGS["llama"])
    specs = decode_gemv_specs(plan)
    kinds = [type(s.epilogue).__name__ if s.epilogue is not None else "" for s in specs]
    assert kinds == ["RopeCacheSpec", "", "ActSpec", "", ""]  # qkv, o, gate+up, down, lm_head
    assert " -> " in specs[0].origin and "attention" in specs[0].origin and " -> " in specs[2].origin
    out = show_kernels(plan)
    for s in specs:
        assert f"// ==== {render(s).name}" in out


def test_kiln_show_kernels_without_cuda_python_says_the_gemvs_are_left_out(monkeypatch):
    import sys

    import kiln.codegen
    from kiln.codegen.show import show_kernels
    for name in [m for m in sys.modules if m.startswith(("kiln.codegen.gemv", "kiln.codegen.kernels",
                                                          "kiln.codegen.launch", "cuda"))]:
        monkeypatch.delitem(sys.modules, name)
    for attr in ("gemv", "gemv_fp8", "kernels", "launch"):
        monkeypatch.delattr(kiln.codegen, attr, raising=False)
    monkeypatch.setitem(sys.modules, "cuda", None)  # import cuda...: ImportError, as without the `cuda` extra
    out = show_kernels(check(load_spec("llama"), FAMILY_CONFIGS["llama"]))
    assert "// ==== kiln_rope_cache" in out and "kiln_gemv" not in out
    assert "the decode GEMVs are left out" in out and "kiln[cuda]" in out
