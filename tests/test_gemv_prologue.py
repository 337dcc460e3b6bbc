"""Issue #12 item 2 / #18 on the CPU: the decode GEMV with the step before it fused into its prologue
(codegen/fuse.py's gemv_prologue, codegen/gemv.py's GemvSpec.prologue, templates/gemv.cu.j2). Which steps
of the llama and mamba2 programs get a prologue, that nothing else about the program changes, that a norm
whose output is read elsewhere stays its own step; every prologue variant renders, names both spec ops
and NVRTC-compiles for bf16 / fp16 / fp32 (at the models' bf16 decode shapes without spills at one row);
specs the prologue cannot compute are refused with the field named. Results on a GPU:
tests/gpu/test_gemv_prologue.py."""

from __future__ import annotations

import re

import pytest
import torch
from kiln.codegen import fuse as F
from kiln.codegen import gemv as G
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, KernelSpecError, NormSpec, RopeCacheSpec
from kiln.dsl import check, load_spec, parse_spec
from kiln.dsl.ops import OpKind

from tests.configs import FAMILY_CONFIGS


@pytest.fixture(autouse=True)
def _no_epilogues(monkeypatch):
    """The prologue pattern alone: with gemv_epilogue the SwiGLU is the gate+up GEMV's epilogue instead, and a
    GEMM step with an epilogue takes no prologue (tests/test_gemv_epilogue.py)."""
    monkeypatch.setattr(F, "PATTERNS", tuple(p for p in F.PATTERNS if p.name != "gemv_epilogue"))


def _without_prologues(plan, dtype, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(F, "PATTERNS", tuple(p for p in F.PATTERNS if p.name != "gemv_prologue"))
        return F.fuse(plan, dtype, 16)


def _same(a: F.KOp, b: F.KOp) -> bool:
    return (a.kind, a.ins, a.outs, a.instrs, a.spec, a.collectives) == (b.kind, b.ins, b.outs, b.instrs, b.spec,
                                                                           b.collectives)


@pytest.mark.parametrize("name", ["llama", "mamba2"])
def test_prologues_join_only_norm_and_act_steps_into_the_gemm_after(name, monkeypatch):
    plan = check(load_spec(name), FAMILY_CONFIGS[name])
    before = _without_prologues(plan, torch.bfloat16, monkeypatch)
    after = F.fuse(plan, torch.bfloat16, 16)
    # split back, the program is the one the other patterns make, step for step
    split = F.unfused(after)
    assert len(split) == len(before) and all(_same(a, b) for a, b in zip(split, before))
    layers = FAMILY_CONFIGS[name]["num_hidden_layers"]
    joined = [op for op in after if "prologue" in op.extra]
    kinds = [[i.kind for i in op.extra["prologue"].instrs] for op in joined]
    if name == "llama":
        # per layer: attn norm -> qkv, residual norm -> gate+up, SwiGLU -> down; the final norm -> lm_head
        # (the first layer's attn norm has no residual add: it reads the embedding)
        per_layer = [[OpKind.ADD, OpKind.RMSNORM], [OpKind.ADD, OpKind.RMSNORM], [OpKind.ACT, OpKind.MUL]]
        assert kinds == [[OpKind.RMSNORM]] + per_layer[1:] + per_layer * (layers - 1) + [[OpKind.ADD, OpKind.RMSNORM]]
    else:
        # per layer: residual norm -> in_proj, the gated norm -> out_proj; the final norm -> lm_head
        per_layer = [[OpKind.ADD, OpKind.RMSNORM], [OpKind.SILU, OpKind.MUL, OpKind.RMSNORM]]
        assert kinds == [[OpKind.RMSNORM]] + per_layer[1:] + per_layer * (layers - 1) + [[OpKind.ADD, OpKind.RMSNORM]]
    for op in joined:
        pro, gemm = op.extra["prologue"], op.extra["gemm"]
        assert op.kind is F.Exec.GEMM and op.ins == pro.ins and op.instrs == pro.instrs + gemm.instrs
        assert op.outs == gemm.outs + pro.outs[1:]  # the residual sum r stays an output
        assert gemm.ins == (pro.outs[0],)
        # x is read by the GEMM's linears only
        assert all(pro.outs[0] not in i.inputs for o in after for i in o.instrs if i not in gemm.instrs)


SPEC = """spec p
param d: int = 64
weights { embed: [16, d] <- "e"
          n1: [d] <- "n1"
          n2: [d] <- "n2"
          n3: [d] <- "n3"
          w1: [d, d] <- "w1"
          w2: [d, d] <- "w2"
          b2: [d] <- "b2"
          w3: [d, d] <- "w3"
          w4: [d, d] <- "w4" }
forward(tokens) {
  x = embedding(tokens, embed)
  h = rmsnorm(x, n1, eps=1e-5)
  g = rmsnorm(linear(h, w1), n2, eps=1e-5)
  c = linear(g, w2, b2) + linear(g, w3)
  f = rmsnorm(c, n3, eps=1e-5)
  return linear(f, w4) + h
}
"""


def test_only_a_norm_read_by_one_gemm_step_alone_is_joined(tmp_path):
    """h is read by a GEMM and the final add, g by two GEMM steps (one with a bias, one without: not
    siblings): both stay steps of their own. f feeds one GEMM only: joined."""
    path = tmp_path / "p.kiln"
    path.write_text(SPEC)
    plan = check(parse_spec(SPEC, str(path)))
    ops = F.fuse(plan, torch.float32, 16)
    joined = [op for op in ops if "prologue" in op.extra]
    assert {op.outs[0].id for op in ops if op.kind is F.Exec.NORM} == {"h", "g"}
    assert [op.extra["prologue"].outs[0].id for op in joined] == ["f"]  # (with the residual add c: r = c)
    assert [i.inputs[1].name for i in joined[0].instrs if i.kind is OpKind.LINEAR] == ["w4"]


DTYPES = ["bf16", "fp16", "fp32"]


def _prologues(dt):
    return {
        "rmsnorm": (128256, NormSpec("rms", 4096, 1e-5, has_residual=False, dtype=dt)),
        "rmsnorm_res": (6144, NormSpec("rms", 4096, 1e-5, has_residual=True, dtype=dt)),
        "rmsnorm_res_mamba2": (10576, NormSpec("rms", 2560, 1e-5, has_residual=True, dtype=dt)),
        "gated_norm": (2560, NormSpec("rms", 5120, 1e-5, has_residual=False, gate="silu", group=5120, dtype=dt)),
        "gated_norm_groups": (64, NormSpec("rms", 128, 1e-5, has_residual=False, gate="gelu_tanh", group=64,
                                           weight_offset=1.0, dtype=dt)),
        "gated_norm_group_rows": (100, NormSpec("rms", 256, 1e-6, has_residual=False, gate="silu", group=64,
                                                per_group_weight=True, dtype=dt)),
        "swiglu": (4096, ActSpec("silu", True, 14336, dtype=dt)),
        "geglu_odd": (100, ActSpec("gelu", True, 200, dtype=dt)),
    }


@pytest.mark.parametrize("variant", list(_prologues("bf16")))
@pytest.mark.parametrize("dtype", DTYPES)
def test_prologue_variants_compile(variant, dtype, fresh_kernel_cache):
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    n, pro = _prologues(dtype)[variant]
    k = pro.hidden if isinstance(pro, NormSpec) else pro.features
    origin = "models/t.kiln:4 rmsnorm(x, w) -> models/t.kiln:5 linear(h, wq)"
    ks = render(G.spec_for(n, k, dtype, variant == "geglu_odd", origin, prologue=pro))
    assert f"// origin: {origin}" in ks.source
    check_gemv_entries_compile(nvrtc, ks, dtype)


def check_gemv_entries_compile(nvrtc, ks, dtype: str, max_spill: int = 0) -> None:
    """A GEMV kernel's entries, one per row count, NVRTC-compile for sm_90a; the bf16 one-row entry (the
    decode path) without spills (at most max_spill bytes). Also used by tests/test_gemv_epilogue.py."""
    assert ks.entries == tuple(f"{ks.name}_t{t}" for t in range(1, G.GEMV_MAX_T + 1))
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    # ptxas reports each entry ("Compiling entry function '<name>'"), then its spills
    spills = dict(re.findall(r"Compiling entry function '\w+_t(\d+)'.*?(\d+) bytes spill stores", img.log, re.S))
    assert len(spills) == G.GEMV_MAX_T, img.log
    if dtype == "bf16":  # the decode path: one row, no spills
        assert int(spills["1"]) <= max_spill, img.log


# bf16 (the decode path) in every form; fp16 and fp32 in the residual ones (what the template spells per dtype)
PRO_EPI = [(e, "bf16", r, p) for e in ("swiglu", "rope", None) for r in (True, False) for p in (False, True)] + \
    [(e, dt, True, p) for e in ("swiglu", "rope") for dt in ("fp16", "fp32") for p in (False, True)]


@pytest.mark.parametrize("epilogue, dtype, residual, post", PRO_EPI)
def test_norm_prologue_with_an_epilogue_compiles(epilogue, dtype, residual, post, fresh_kernel_cache):
    """An RMSNorm before a GEMV with an epilogue (the MLP norm before gate+up's SwiGLU, the attention norm before
    qkv's rotary + KV write): one kernel that reads the norm's inputs, not x, names the three spec ops, keeps the
    epilogue's output and arguments, and builds for sm_90a (bf16's one-row entry without spills; post-scaled with
    the residual and the rotary, 8 bytes: the 128-register cap). Post-scaled (post_norm): no first pass for the
    1 / rms, which multiplies the sums instead; and the same without an epilogue (the final norm, Mamba-2's)."""
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    pro = NormSpec("rms", 4096, 1e-5, has_residual=residual, dtype=dtype)
    origin = "models/t.kiln:4 rmsnorm(x, w) -> models/t.kiln:5 linear(h, wg) -> models/t.kiln:6 silu(g) * u"
    if epilogue == "swiglu":
        epi, halves, n = ActSpec("silu", True, 14336, dtype=dtype), (0, 14336), 28672
    elif epilogue == "rope":
        epi, halves, n = RopeCacheSpec(32, 8, 128, 128, 16, theta=5e5, dtype=dtype), (0, 4096, 5120), 6144
    else:
        epi, halves, n = None, (0, 0), 10576
    spec = G.spec_for(n, 4096, dtype, False, origin, prologue=pro, epilogue=epi, halves=halves, post_norm=post)
    assert spec.prologue == pro.key() and (spec.epilogue is None) == (epilogue is None) and spec.weight_rows == n
    ks = render(spec)
    assert f"// origin: {origin}" in ks.source and "pro_in(" in ks.source
    assert ("rope_store(ra, out" in ks.source) == (epilogue == "rope")
    assert ("out[(long long)t * 14336 + j] = from_float<scalar_t>(act(g) * u)" in ks.source) == (epilogue == "swiglu")
    assert ("rmsnorm_res" if residual else "rmsnorm_") in ks.name and ("_post_" in ks.name) == post
    # post-scaled: no pass over h before the sums (block_sum), the 1 / rms on them; else the pass, no sq
    assert ("block_sum<" in ks.source, "total *= rsqrtf(" in ks.source) == (not post, post)
    check_gemv_entries_compile(nvrtc, ks, dtype, max_spill=8 if post and residual and epilogue == "rope" else 0)


def test_post_norm_needs_a_whole_row_rmsnorm():
    """post_norm: only an RMSNorm prologue without a gate or groups (one 1 / rms a row) is post-scaled."""
    for pro in (None, NormSpec("rms", 128, 1e-5, has_residual=False, gate="silu", group=64),
                NormSpec("rms", 128, 1e-5, has_residual=False, group=64), ActSpec("silu", True, 128)):
        with pytest.raises(KernelSpecError, match=r"GemvSpec\.post_norm:.*without a gate or groups"):
            G.GemvSpec(64, 128, prologue=pro, post_norm=True)
    assert G.GemvSpec(64, 128, prologue=NormSpec("rms", 128, 1e-5, has_residual=True), post_norm=True).post_norm


def test_without_a_prologue_the_kernel_is_the_plain_gemv():
    plain = render(G.spec_for(6144, 4096, "bf16", False, "o")).source
    assert "pro_in" not in plain and "griddepcontrol.wait" in plain


@pytest.mark.parametrize("pro, why", [
    (NormSpec("layer", 64, 1e-5, has_residual=False), "only an RMSNorm"),
    (NormSpec("rms", 128, 1e-5, has_residual=False), "hidden=128 is not k=64"),
    (NormSpec("rms", 64, 1e-5, has_residual=False, dtype="fp16"), "dtype fp16"),
    (NormSpec("rms", 64, 1e-5, has_residual=False, group=4), "group 4"),
    (ActSpec("silu", False, 64), "only a gated activation"),
])
def test_prologues_it_cannot_compute_are_refused(pro, why):
    with pytest.raises(KernelSpecError, match=rf"GemvSpec\.prologue:.*{why}"):
        G.GemvSpec(64, 64, prologue=pro)
