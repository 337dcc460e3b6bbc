"""Issue #18: the gated norm `norm(y * act(z), w, group=g)` (Mamba-2's gated RMSNorm) is one generated
kernel on the `cuda` backend: codegen/fuse.py's gated_norm pattern folds the activation and the mul
into the norm kernel's prologue (templates/norm.cu.j2), and a norm per group of features is a kernel
too. Here, on the CPU: what the fusion takes (and what it must leave alone), the kernels it gives
compile for sm_90a and name their spec op, and bad specs are refused with the field named. The
kernels against the op references, and whole models against the reference backend, run in
tests/gpu/test_gated_norm.py and tests/gpu/test_ssm_kernels.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kiln.codegen.fuse import PATTERNS, Exec, unfused
from kiln.codegen.fuse import fuse as fuse_steps
from kiln.codegen.render import render
from kiln.codegen.specs import KernelSpecError, NormSpec
from kiln.dsl import check, load_spec, parse_spec
from kiln.dsl.ops import OpKind

from tests.configs import FAMILY_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {  # mamba2-2.7b: d_inner 5120 in one group; the test config: two groups of 64
    "mamba2-2.7b": json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text()),
    "mamba2-test": FAMILY_CONFIGS["mamba2"],
}


def fuse(plan, dtype, page_size):
    """The steps with the GEMV prologues (fuse.py's gemv_prologue) split back out: these tests look at
    the norm and act steps themselves."""
    return unfused(fuse_steps(plan, dtype, page_size))


def _gated(ops):
    return [op for op in ops if op.kind is Exec.NORM and op.spec.gate]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_gated_norm_is_one_kernel_per_layer(config, dtype):
    cfg = CONFIGS[config]
    plan = check(load_spec("mamba2"), cfg)
    ops = fuse(plan, dtype, 16)
    gated = _gated(ops)
    d_inner, groups = cfg["expand"] * cfg["hidden_size"], cfg["n_groups"]
    assert len(gated) == cfg["num_hidden_layers"]
    for op in gated:
        assert [i.kind for i in op.instrs] == [OpKind.SILU, OpKind.MUL, OpKind.RMSNORM]
        silu, mul, norm = op.instrs
        # reads y (the scan's output) and z (in_proj's z slice), writes the norm's output
        assert op.ins == (mul.inputs[0], silu.inputs[0]) and op.outs == norm.outputs
        s = op.spec
        assert (s.kind, s.hidden, s.group, s.per_group_weight, s.gate, s.has_residual) == \
            ("rms", d_inner, d_inner // groups, True, "silu", False)
    # nothing of the gate is left as a torch step (no mul, no silu): only split's views stay torch
    left = {i.kind for op in ops if op.kind is Exec.TORCH for i in op.instrs}
    assert left <= {OpKind.SPLIT}, left


def test_mamba2_gated_kernel_compiles_and_names_its_origin():
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    for cfg in CONFIGS.values():
        plan = check(load_spec("mamba2"), cfg)
        for dtype in (torch.float32, torch.bfloat16):
            spec = _gated(fuse(plan, dtype, 16))[0].spec
            ks = render(spec)
            assert ks.origin.startswith("mamba2.kiln:") and "rmsnorm(y * silu(linear(h, w_z, b_z))" in ks.origin
            assert f"// origin: {ks.origin}" in ks.source and "act(to_float(g.v[e]))" in ks.source
            img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
            assert img.kind == "cubin" and img.data[:4] == b"\x7fELF"


SPEC = """\
spec gates
param vocab: int = 64
param hidden: int = 32
param head_dim: int = 8
weights {
  embed: [vocab, hidden] <- "embed.weight"
  wz: [hidden, hidden] <- "wz.weight"
  wy: [hidden, hidden] <- "wy.weight"
  n1: [hidden // head_dim, head_dim] <- "n1.weight"
  b1: [hidden // head_dim, head_dim] <- "b1.weight"
  n2: [head_dim] <- "n2.weight"
  n3: [hidden] <- "n3.weight"
  n4: [hidden] <- "n4.weight"
}
forward(tokens) {
  x = embedding(tokens, embed)
  a = layernorm(gelu(linear(x, wz)) * linear(x, wy), n1, b1, group=head_dim)
  b = rmsnorm(a * act(linear(a, wz), fn="gelu_new"), n2, group=head_dim, offset=1.0)
  p = b * relu2(linear(b, wz))
  c = rmsnorm(p, n3)
  q = c * silu(linear(c, wz))
  d = rmsnorm(q, n4) + q
  return linear(d, embed)
}
"""


def test_gated_norm_pattern_is_generic_and_keeps_other_uses(tmp_path):
    """act(z) * y and y * act(z); any kernel activation (gelu, act(fn="gelu_new") = gelu_tanh); a
    layernorm with a bias row per group and an rmsnorm with one shared row. Not taken: relu2 (no
    kernel activation: its norm stays a plain kernel) and a product something else also reads."""
    path = tmp_path / "gates.kiln"
    path.write_text(SPEC)
    plan = check(parse_spec(SPEC, str(path)))
    ops = fuse(plan, torch.bfloat16, 16)
    gated = _gated(ops)
    assert [(op.spec.kind, op.spec.gate, op.spec.group, op.spec.per_group_weight, op.spec.has_bias)
            for op in gated] == [("layer", "gelu", 8, True, True), ("rms", "gelu_tanh", 8, False, False)]
    assert [i.kind for i in gated[0].instrs] == [OpKind.GELU, OpKind.MUL, OpKind.LAYERNORM]
    assert [i.kind for i in gated[1].instrs] == [OpKind.ACT, OpKind.MUL, OpKind.RMSNORM]
    assert gated[1].spec.weight_offset == 1.0
    # y is the mul's other operand, z the activation's input
    for op in gated:
        act, mul, _ = op.instrs
        y = next(v for v in mul.inputs if v != act.out)
        assert op.ins == (y, act.inputs[0])
    plain = [op for op in ops if op.kind is Exec.NORM and not op.spec.gate]
    assert len(plain) == 2 and all(len(op.instrs) == 1 for op in plain)  # rmsnorm(p), rmsnorm(q): not fused
    muls = [op for op in ops if op.instrs[-1].kind is OpKind.MUL]
    assert len(muls) == 2  # b * relu2(..) (a torch mul), c * silu(..) (gated_act's kernel or torch)
    assert "gated_norm" in [p.name for p in PATTERNS]


def test_gated_kernels_compile(tmp_path):
    nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
    path = tmp_path / "gates.kiln"
    path.write_text(SPEC)
    plan = check(parse_spec(SPEC, str(path)))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for op in fuse(plan, dtype, 16):
            if op.kind is Exec.NORM:
                ks = render(op.spec)
                assert ks.origin.startswith("gates.kiln:")
                assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin).kind == "cubin"


@pytest.mark.parametrize("make, field", [
    (lambda: NormSpec("rms", 5120, 1e-5, has_residual=False, gate="swish"), "gate"),
    (lambda: NormSpec("rms", 5120, 1e-5, has_residual=True, gate="silu"), "gate"),
    (lambda: NormSpec("rms", 5120, 1e-5, group=768), "group"),
    (lambda: NormSpec("rms", 5120, 1e-5, group=-640), "group"),
    (lambda: NormSpec("rms", 5120, 1e-5, per_group_weight=True), "per_group_weight"),
])
def test_bad_norm_specs_name_the_field(make, field):
    with pytest.raises(KernelSpecError, match=rf"NormSpec\.{field}:"):
        make()
