"""CPU checks of the state-space kernels (codegen/ssm_kernels.py): the specs the fusion pass makes for
the mamba, mamba2 and jamba specs (and the Mamba-2 2.7B benchmark shape) render, name their spec op
and compile to sm_90a cubins with NVRTC; bad specs fail with the field named. Mamba-2's conv -> split
-> scan is claimed as one step (fuse.py's ssm_conv_scan) whose fused decode kernel compiles too, and
only where the split's parts feed the scan alone. The kernels against
the op references run on a GPU: tests/gpu/test_ssm_kernels.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kiln.dsl import check, load_spec
from kiln.dsl.ops import OpKind

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.fuse import Exec, fuse  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402
from kiln.codegen.ssm_kernels import SsmConvScanSpec, SsmConvSpec, SsmScanSpec  # noqa: E402
from kiln.dsl.loader import parse_spec  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent



@pytest.fixture(autouse=True)
def _fusion_on(monkeypatch):
    """The fused conv + scan step (codegen/fuse.py ssm_fuse_enabled, the default): on for these tests whatever the
    environment says (a test that sets KILN_SSM_FUSE itself overrides it)."""
    monkeypatch.setenv("KILN_SSM_FUSE", "1")

def _ssm_specs(name: str, config: dict, dtype: torch.dtype) -> list:
    """Every SSM kernel spec of the plan: a fused conv_scan step's own, then its two fallbacks'."""
    plan = check(load_spec(name), config)
    return [s for op in fuse(plan, dtype, 16) if op.kind is Exec.SSM
            for s in (op.spec, op.extra.get("conv"), op.extra.get("scan")) if s is not None]


def _cases():
    out = []
    for name in ("mamba", "mamba-bias", "mamba2", "jamba"):
        spec = FAMILY_CONFIGS[name]["model_type"]
        for dt in (torch.bfloat16, torch.float32):
            out += [(name, s) for s in dict.fromkeys(_ssm_specs(spec, FAMILY_CONFIGS[name], dt))]
    big = json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text())
    out += [("mamba2-2.7b", s) for s in dict.fromkeys(_ssm_specs("mamba2", big, torch.bfloat16))]
    out += [("fp16", SsmScanSpec(24, 1, 12, dtype="fp16", a_per_state=True, origin="t.kiln:1 scan")),  # 4 lanes
            ("fp16", SsmConvSpec(100, 2, False, "gelu", dtype="fp16", origin="t.kiln:2 conv"))]
    # the fused decode kernel at odd shapes: lanes < 32 and a block of whole warps past its rows, groups > 1,
    # no bias / D / dt_bias / softplus, A per state, a 3-tap conv, several row loops per lane group
    for dt in ("fp16", "fp32", "bf16"):
        out += [("fused", SsmConvScanSpec(6, 5, 12, groups=3, kernel=3, has_bias=False, a_per_state=True, has_d=False,
                                          has_dt_bias=False, softplus=False, dtype=dt, origin="t.kiln:3 fused")),
                ("fused", SsmConvScanSpec(24, 32, 64, groups=3, act="gelu", block_rows=64, dtype=dt,
                                          origin="t.kiln:4 fused"))]
    return out


CASES = _cases()


@pytest.mark.parametrize("spec", [s for _, s in CASES], ids=[f"{n}-{type(s).__name__}-{s.dtype}" for n, s in CASES])
def test_ssm_kernels_compile_for_sm90a(spec):
    ks = render(spec)
    assert f"// origin: {spec.origin}" in ks.source  # named after the spec op it came from
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
    assert img.kind == "cubin" and img.data


@pytest.mark.parametrize("fused", ["1", "0"])
def test_every_family_gets_a_conv_and_a_scan_kernel_per_mamba_layer(fused, monkeypatch):
    """Mamba-1 and Jamba (the conv's output feeds the x_proj linears too): a conv step and a scan step
    per layer. Mamba-2: one conv_scan step per layer (conv, act, split, scan) keeping both kernels' specs
    for prefill; KILN_SSM_FUSE=0: the two steps and the split as before."""
    monkeypatch.setenv("KILN_SSM_FUSE", fused)
    for name in ("mamba", "mamba2", "jamba"):
        plan = check(load_spec(name), FAMILY_CONFIGS[name])
        ops = [op for op in fuse(plan, torch.bfloat16, 16) if op.kind is Exec.SSM]
        layers = len(plan.state_sites) // 2
        if name == "mamba2" and fused == "1":
            assert [op.extra["op"] for op in ops] == ["conv_scan"] * layers
            for op in ops:
                assert [i.kind for i in op.instrs] == [OpKind.CAUSAL_CONV1D, OpKind.ACT, OpKind.SPLIT,
                                                       OpKind.SELECTIVE_SCAN]
                assert isinstance(op.spec, SsmConvScanSpec) and op.spec.act == "silu"
                assert SsmConvScanSpec.of(op.extra["conv"], op.extra["scan"], op.spec.origin) == op.spec
                assert op.outs == op.instrs[-1].outputs
            continue
        kinds = [type(op.spec) for op in ops]
        assert kinds.count(SsmConvSpec) == kinds.count(SsmScanSpec) == layers
        conv = next(op.spec for op in ops if isinstance(op.spec, SsmConvSpec))
        assert conv.act == "silu"  # the act(...) around the conv runs in its kernel


def test_mamba2_27b_shape():
    big = json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text())
    fused, conv, scan = _ssm_specs("mamba2", big, torch.bfloat16)[:3]
    assert (conv.channels, conv.kernel) == (5120 + 2 * 128, 4)
    assert (scan.heads, scan.head_dim, scan.d_state, scan.groups, scan.a_per_state) == (80, 64, 128, 1, False)
    assert fused.channels == conv.channels and fused.rows_per_block == 32 and fused.threads == 256
    assert render(fused).meta["blocks"] == 160  # 80 x 64 rows, 32 a block


TINY = """spec s
weights {{ embed: [32, 16] <- "e"
          conv_w: [16, 4] <- "cw"
          w_dt: [2, 16] <- "wdt"
          a_log: [2] <- "a"
          d_skip: [2] <- "d"
          dt_bias: [2] <- "dtb"
          w_y: [32, 8] <- "wy"{extra} }}
forward(tokens) {{
  x = embedding(tokens, embed)
  xs, b, c = split(silu(causal_conv1d(x, conv_w)), sizes=[8, 4, 4])
  y = selective_scan(xs, linear(x, w_dt), a_log, b, c, d_skip, dt_bias)
  return {ret}
}}
"""


def test_conv_scan_fuses_only_when_the_split_feeds_the_scan_alone():
    plan = check(parse_spec(TINY.format(extra="", ret="linear(y, w_y)")), {})
    ssm = [op for op in fuse(plan, torch.float32, 16) if op.kind is Exec.SSM]
    assert [op.extra["op"] for op in ssm] == ["conv_scan"]
    assert (ssm[0].spec.has_bias, ssm[0].spec.heads, ssm[0].spec.head_dim, ssm[0].spec.d_state) == (False, 2, 4, 4)
    ks = render(ssm[0].spec)
    assert "causal_conv1d" in ks.source and "selective_scan" in ks.source  # origin: both spec ops
    assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin).kind == "cubin"
    # C read again after the scan: the split stays, the conv and the scan run as their own steps
    plan = check(parse_spec(TINY.format(extra='\n          w_c: [32, 4] <- "wc"',
                                        ret="linear(y, w_y) + linear(c, w_c)")), {})
    ops = fuse(plan, torch.float32, 16)
    assert [op.extra["op"] for op in ops if op.kind is Exec.SSM] == ["conv", "scan"]
    assert OpKind.SPLIT in [op.instrs[0].kind for op in ops if op.kind is Exec.TORCH]


@pytest.mark.parametrize("make,field", [
    (lambda: SsmConvSpec(64, 1), "kernel"),
    (lambda: SsmConvSpec(64, 4, act="tanh"), "act"),
    (lambda: SsmConvSpec(0, 4), "channels"),
    (lambda: SsmScanSpec(6, 4, 8, groups=4), "groups"),
    (lambda: SsmScanSpec(6, 4, 8, dtype="int8"), "dtype"),
    (lambda: SsmConvScanSpec(6, 4, 8, groups=4), "groups"),
    (lambda: SsmConvScanSpec(6, 4, 8, kernel=1), "kernel"),
    (lambda: SsmConvScanSpec(6, 4, 8, act="tanh"), "act"),
    (lambda: SsmConvScanSpec(6, 4, 8, block_rows=0), "block_rows"),
])
def test_bad_specs_name_the_field(make, field):
    with pytest.raises(KernelSpecError, match=rf"\.{field}:"):
        make()
