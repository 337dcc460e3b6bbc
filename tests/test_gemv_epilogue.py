"""Issue #12 item 2 on the CPU: the decode GEMV with the gated activation after it fused into its epilogue
(codegen/fuse.py's gemv_epilogue, codegen/gemv.py's GemvSpec.epilogue, templates/gemv.cu.j2): which steps of
the llama program get one (every layer's gate+up, nothing else), that split back the program is the one
without the pattern, that an act whose inputs are read elsewhere or come from two GEMM steps stays its own
step; the epilogue renders, names both spec ops and NVRTC-compiles for bf16 / fp16 / fp32 (at the 8B
model's gate+up without spills at one row); specs it cannot compute are refused with the field named.
Results on a GPU: tests/gpu/test_gemv_epilogue.py."""

from __future__ import annotations

import re

import pytest
import torch
from kiln.codegen import fuse as F
from kiln.codegen import gemv as G
from kiln.codegen import gemv_fp8 as F8
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, KernelSpecError, NormSpec
from kiln.dsl import check, load_spec, parse_spec
from kiln.dsl.ops import OpKind

from tests.configs import FAMILY_CONFIGS
from tests.test_gemv_prologue import check_gemv_entries_compile


def _same(a: F.KOp, b: F.KOp) -> bool:
    return (a.kind, a.ins, a.outs, a.instrs, a.spec, a.collectives) == (b.kind, b.ins, b.outs, b.instrs, b.spec,
                                                                           b.collectives)


def _without(plan, monkeypatch, *names):
    with monkeypatch.context() as m:
        m.setattr(F, "PATTERNS", tuple(p for p in F.PATTERNS if p.name not in names))
        return F.fuse(plan, torch.bfloat16, 16)


def test_every_layers_gate_up_takes_its_swiglu(monkeypatch):
    plan = check(load_spec("llama"), FAMILY_CONFIGS["llama"])
    after = _without(plan, monkeypatch, "gemv_prologue")
    before = _without(plan, monkeypatch, "gemv_prologue", "gemv_epilogue")
    split = F.unfused(after)
    assert len(split) == len(before) and all(_same(a, b) for a, b in zip(split, before))
    joined = [op for op in after if "epilogue" in op.extra]
    assert len(joined) == FAMILY_CONFIGS["llama"]["num_hidden_layers"]
    for op in joined:
        epi, gemm = op.extra["epilogue"], op.extra["gemm"]
        assert [i.kind for i in epi.instrs] == [OpKind.ACT, OpKind.MUL] and epi.spec.gated and epi.spec.kind == "silu"
        assert [i.kind for i in gemm.instrs] == [OpKind.LINEAR, OpKind.LINEAR]
        assert op.ins == gemm.ins and op.outs == epi.outs and op.instrs == gemm.instrs + epi.instrs
        assert set(epi.ins) == set(gemm.outs)
        # the act step now runs where the GEMM stood: its output is read only after it
        at = after.index(op)
        assert all(epi.outs[0] not in o.ins for o in after[:at])
    # with the prologue pattern too, every epilogue's GEMM also takes the MLP's residual RMSNorm before it, as one
    # step (the norm, the GEMM and the SwiGLU: one launch at a few rows), which splits back into the three
    both = F.fuse(plan, torch.bfloat16, 16)
    fused = [op for op in both if "epilogue" in op.extra]
    assert len(fused) == len(joined) and all("prologue" in op.extra for op in fused)
    for op, e in zip(fused, joined):
        pro = op.extra["prologue"]
        assert _same(op.extra["gemm"], e)  # the epilogue's step, whole
        assert [i.kind for i in pro.instrs] == [OpKind.ADD, OpKind.RMSNORM] and not pro.spec.gate
        assert op.ins == pro.ins and op.outs == e.outs + pro.outs[1:] and op.instrs == pro.instrs + e.instrs
    assert len(F.unfused(both)) == len(before)


SPEC = """spec p
param d: int = 64
weights { embed: [16, d] <- "e"
          wg: [d, d] <- "wg"
          wu: [d, d] <- "wu"
          wg2: [d, d] <- "wg2"
          wu2: [d, d] <- "wu2"
          wo: [d, d] <- "wo" }
forward(tokens) {
  x = embedding(tokens, embed)
  g = linear(x, wg)
  a = silu(g) * linear(x, wu)
  h = linear(a, wo) + g
  b = gelu(linear(h, wg2)) * linear(h, wu2)
  return b
}
"""


def test_only_an_act_of_one_gemm_steps_outputs_read_by_nothing_else_is_joined(tmp_path, monkeypatch):
    """g is read by the act and the residual add: that act stays its own step. b's inputs are the two
    outputs of the GEMM of h and nothing else reads them: joined."""
    path = tmp_path / "p.kiln"
    path.write_text(SPEC)
    plan = check(parse_spec(SPEC, str(path)))
    ops = _without(plan, monkeypatch, "gemv_prologue")
    joined = [op for op in ops if "epilogue" in op.extra]
    assert [op.outs[0].id for op in joined] == ["b"]
    assert joined[0].extra["epilogue"].spec.kind == "gelu"
    assert [op.outs[0].id for op in ops if op.kind is F.Exec.ACT] == ["a"]


DTYPES = ["bf16", "fp16", "fp32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["llama3_gate_up", "odd_bias_up_first"])
def test_epilogue_compiles(shape, dtype, fresh_kernel_cache):
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    n, k, halves, act, bias = {"llama3_gate_up": (14336, 4096, (0, 14336), "silu", False),
                               "odd_bias_up_first": (100, 256, (104, 0), "gelu_tanh", True)}[shape]
    origin = "models/t.kiln:4 linear(x, w_up) -> models/t.kiln:5 silu(g) * u"
    spec = G.spec_for(halves[0] + halves[1] + n - min(halves), k, dtype, bias, origin,
                      epilogue=ActSpec(act, True, n, dtype=dtype), halves=halves)
    ks = render(spec)
    assert f"// origin: {origin}" in ks.source and "act(g) * u" in ks.source
    check_gemv_entries_compile(nvrtc, ks, dtype)
    # its grid covers the pairs: rows / 2 of them a warp
    assert ks.meta["blocks"] * (G.WARPS // spec.ksplit) * (spec.rows // 2) >= n


def test_the_plain_gemv_has_no_epilogue():
    plain = render(G.spec_for(28672, 4096, "bf16", False, "o")).source
    assert "pair0" not in plain and "act(" not in plain


@pytest.mark.parametrize("kw, field, why", [
    (dict(epilogue=ActSpec("silu", False, 64)), "epilogue", "only a gated activation"),
    (dict(epilogue=ActSpec("silu", True, 32)), "epilogue", "features=32 is not the GEMV's n=64"),
    (dict(epilogue=ActSpec("silu", True, 64, dtype="fp16")), "epilogue", "dtype fp16"),
    (dict(epilogue=ActSpec("silu", True, 64), rows=1, up_row=64, w_rows=128), "rows", "at least 2 rows"),
    (dict(epilogue=ActSpec("silu", True, 64), up_row=32, w_rows=128), "up_row", "overlap"),
    (dict(epilogue=ActSpec("silu", True, 64), up_row=64, w_rows=100), "w_rows", "must lie in W's 100"),
    (dict(epilogue=ActSpec("silu", True, 64), up_row=64, w_rows=128,
          prologue=NormSpec("rms", 64, 1e-5, has_residual=False, gate="silu", group=64)), "prologue",
     "only an RMSNorm without a gate"),
    (dict(epilogue=ActSpec("silu", True, 64), up_row=64, w_rows=128, prologue=ActSpec("silu", True, 64)),
     "prologue", "only an RMSNorm without a gate"),
    (dict(up_row=64, w_rows=128), "w_rows", "belong to an epilogue"),
])
def test_epilogues_it_cannot_compute_are_refused(kw, field, why):
    with pytest.raises(KernelSpecError, match=rf"GemvSpec\.{field}:.*{why}"):
        G.GemvSpec(64, 64, **{"rows": 2, **kw})


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_epilogue_compiles(dtype, per_channel, fresh_kernel_cache):
    """The fp8 "mma" GEMV with the epilogue at the 8B model's gate+up: its 16-row tiles are 8 pairs; no spills."""
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    origin = "models/t.kiln:4 linear(x, w_up) -> models/t.kiln:5 silu(g) * u"
    spec = F8.spec_for(28672, 4096, dtype, False, per_channel, False, origin, decode="mma",
                       epilogue=ActSpec("silu", True, 14336, dtype=dtype), halves=(0, 14336))
    plain = F8.spec_for(28672, 4096, dtype, False, per_channel, False, origin, decode="mma")
    ks = render(spec)
    assert f"// origin: {origin}" in ks.source and "act(gu[0]) * gu[1]" in ks.source
    assert ks.meta["blocks"] == render(plain).meta["blocks"]  # the same W rows a warp, half the outputs
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin, extra_options=("--ptxas-options=-v",))
    assert re.findall(r"(\d+) bytes spill stores", img.log) == ["0"], img.log


def test_an_fp8_epilogue_needs_the_mma_kernel():
    with pytest.raises(KernelSpecError, match=r"Fp8GemvSpec\.epilogue:.*decode='mma' only"):
        F8.Fp8GemvSpec(64, 64, epilogue=ActSpec("silu", True, 64), up_row=64, w_rows=128)


def test_quantized_gate_up_steps_take_the_epilogue_too(monkeypatch):
    """The pattern does not look at the weights' format: the backend runs the fused kernel where one takes
    the format (fp8 at one row) and the GEMM then the activation's kernel elsewhere."""
    from kiln.runtime.model import quantize_plan  # runtime: above codegen, imported by this test only

    plan, _ = quantize_plan(check(load_spec("llama"), FAMILY_CONFIGS["llama"]), None, "fp8", "auto")
    ops = _without(plan, monkeypatch, "gemv_prologue")
    assert sum("epilogue" in op.extra for op in ops) == FAMILY_CONFIGS["llama"]["num_hidden_layers"]
