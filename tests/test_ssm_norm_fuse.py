"""KILN_SSM_NORM_FUSE on the CPU (runtime/cuda_ssm.py norm_fusions, codegen/ssm_kernels.py SsmConvScanSpec.norm,
templates/ssm_conv_scan.cu.j2): which steps fuse (every Mamba-2 layer's conv + scan with the gated norm of the
GEMM step after it, nothing in a model without one), the norms the kernel refuses, and the kernel with the norm
compiling for sm_90a at the 2.7B shape and others without spills. Results on a GPU: tests/gpu/test_ssm_norm_fuse.py."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest
import torch
from kiln.codegen import fuse as F
from kiln.codegen import nvrtc
from kiln.codegen.fuse import Exec
from kiln.codegen.render import render
from kiln.codegen.specs import KernelSpecError, NormSpec
from kiln.codegen.ssm_kernels import SsmConvScanSpec, norm_refusal
from kiln.dsl import check, load_spec
from kiln.runtime.cuda_ssm import norm_fusions

from tests.configs import FAMILY_CONFIGS
from tests.test_pdl_order import NVDISASM


def _ops(family: str):
    return F.fuse(check(load_spec(family), FAMILY_CONFIGS[family]), torch.bfloat16, 16)


def test_every_mamba2_layer_fuses_its_gated_norm():
    ops = _ops("mamba2")
    fused = norm_fusions(ops)
    ssm = [n for n, op in enumerate(ops) if op.kind is Exec.SSM]
    assert len(ssm) == FAMILY_CONFIGS["mamba2"]["num_hidden_layers"]
    assert {id(ops[n]) for n in ssm} == set(fused)
    for n in ssm:
        pro = fused[id(ops[n])]
        assert pro is ops[n + 1].extra["prologue"] and pro.ins[0] == ops[n].outs[0] and pro.spec.gate == "silu"
    assert norm_fusions(_ops("llama")) == {}


def _norm(rows=5120, groups=1, **kw):
    base = dict(has_residual=False, gate="silu", group=rows // groups, per_group_weight=True, dtype="bf16")
    return NormSpec("rms", rows, 1e-5, **{**base, **kw})


def test_the_norms_it_cannot_fuse_are_refused():
    assert norm_refusal(_norm(), 5120, 1, "bf16") == ""
    assert norm_refusal(_norm(128, 2), 128, 2, "bf16") == ""
    assert "gated rms" in norm_refusal(_norm(gate=""), 5120, 1, "bf16")
    assert "gated rms" in norm_refusal(dataclasses.replace(_norm(), kind="layer"), 5120, 1, "bf16")
    assert "groups" in norm_refusal(_norm(128, 2), 128, 1, "bf16")  # its groups are not the scan's
    assert "dtype" in norm_refusal(_norm(), 5120, 1, "fp16")
    assert "NormSpec" in norm_refusal("rms", 5120, 1, "bf16")
    with pytest.raises(KernelSpecError, match="norm"):
        SsmConvScanSpec(80, 64, 128, 1, 4, True, "silu", dtype="bf16", norm=_norm(128, 2))


CASES = [((80, 64, 128, 1), "bf16"), ((80, 64, 128, 1), "fp16"), ((8, 16, 32, 2), "fp32"), ((6, 32, 64, 3), "bf16")]


@pytest.mark.parametrize("shape, dtype", CASES)
def test_the_kernel_with_the_norm_compiles_without_spills(shape, dtype, tmp_path):
    heads, hd, ds, groups = shape
    rows = heads * hd
    plain = SsmConvScanSpec(heads, hd, ds, groups, 4, True, "silu", dtype=dtype)
    spec = dataclasses.replace(plain, norm=_norm(rows, groups, dtype=dtype).key(), origin="scan -> norm")
    src = render(spec)
    assert "gate_fn::act" in src.source and "norm_counters" in src.source and "scan -> norm" in src.source
    assert "norm_counters" not in render(plain).source
    try:
        cubin = nvrtc.compile_source(src.source, src.name, "sm_90a").data
    except nvrtc.NvrtcError as e:
        pytest.skip(f"NVRTC: {e}")
    if NVDISASM is None:
        return
    path = tmp_path / "k.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([NVDISASM, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\b(STL|LDL)\b", text), "spills"
