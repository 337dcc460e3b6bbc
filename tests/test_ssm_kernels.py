"""CPU checks of the state-space kernels (codegen/ssm_kernels.py): the specs the fusion pass makes for
the mamba, mamba2 and jamba specs (and the Mamba-2 2.7B benchmark shape) render, name their spec op
and compile to sm_90a cubins with NVRTC; bad specs fail with the field named. The kernels against
the op references run on a GPU: tests/gpu/test_ssm_kernels.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kiln.dsl import check, load_spec

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.fuse import Exec, fuse  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402
from kiln.codegen.ssm_kernels import SsmConvSpec, SsmScanSpec  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _ssm_specs(name: str, config: dict, dtype: torch.dtype) -> list:
    plan = check(load_spec(name), config)
    return [op.spec for op in fuse(plan, dtype, 16) if op.kind is Exec.SSM]


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
    return out


CASES = _cases()


@pytest.mark.parametrize("spec", [s for _, s in CASES], ids=[f"{n}-{type(s).__name__}-{s.dtype}" for n, s in CASES])
def test_ssm_kernels_compile_for_sm90a(spec):
    ks = render(spec)
    assert f"// origin: {spec.origin}" in ks.source  # named after the spec op it came from
    img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
    assert img.kind == "cubin" and img.data


def test_every_family_gets_a_conv_and_a_scan_kernel_per_mamba_layer():
    for name in ("mamba", "mamba2", "jamba"):
        plan = check(load_spec(name), FAMILY_CONFIGS[name])
        kinds = [type(op.spec) for op in fuse(plan, torch.bfloat16, 16) if op.kind is Exec.SSM]
        assert kinds.count(SsmConvSpec) == kinds.count(SsmScanSpec) == len(plan.state_sites) // 2
        conv = next(op.spec for op in fuse(plan, torch.bfloat16, 16) if isinstance(op.spec, SsmConvSpec))
        assert conv.act == "silu"  # the act(...) around the conv runs in its kernel


def test_mamba2_27b_shape():
    big = json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text())
    conv, scan = _ssm_specs("mamba2", big, torch.bfloat16)[:2]
    assert (conv.channels, conv.kernel) == (5120 + 2 * 128, 4)
    assert (scan.heads, scan.head_dim, scan.d_state, scan.groups, scan.a_per_state) == (80, 64, 128, 1, False)


@pytest.mark.parametrize("make,field", [
    (lambda: SsmConvSpec(64, 1), "kernel"),
    (lambda: SsmConvSpec(64, 4, act="tanh"), "act"),
    (lambda: SsmConvSpec(0, 4), "channels"),
    (lambda: SsmScanSpec(6, 4, 8, groups=4), "groups"),
    (lambda: SsmScanSpec(6, 4, 8, dtype="int8"), "dtype"),
])
def test_bad_specs_name_the_field(make, field):
    with pytest.raises(KernelSpecError, match=rf"\.{field}:"):
        make()
