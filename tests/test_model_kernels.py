"""Every kernel of every spec in models/ renders and compiles with NVRTC to a cubin for sm_80
and sm_90a (on the CPU), and names the spec op it came from."""

from __future__ import annotations

import dataclasses

import pytest
from kiln.dsl import check, load_spec
from kiln.dsl.loader import MODELS_DIR

nvrtc = pytest.importorskip("kiln.codegen.nvrtc", reason="cuda-python / NVRTC not installed")
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.show import kernel_specs  # noqa: E402

SPECS = sorted(p.stem for p in MODELS_DIR.glob("*.kiln"))


@pytest.mark.parametrize("name", SPECS)
def test_every_kernel_of_the_spec_compiles(name):
    spec_ir = load_spec(name)
    plan = check(spec_ir)
    files = tuple(f.rsplit("/", 1)[-1] + ":" for f in spec_ir.files)  # itself, and what it extends
    # Attention whose v heads are narrower than q/k's (latent attention) lowers to Torch: no kernels.
    latent = any(i.kind.value == "attention" and plan.sites[i.site].v_head_dim != i.attrs.head_dim
                 for i in plan.program.instrs)
    specs = kernel_specs(plan, "bf16", 16)
    kinds = {type(s).__name__ for s in specs}
    if latent or not plan.sites:  # latent attention, or none (state-space models): no attention kernels
        assert not {"RopeCacheSpec", "DecodeAttnSpec", "PrefillAttnSpec"} & kinds and "NormSpec" in kinds
    else:
        assert {"RopeCacheSpec", "DecodeAttnSpec", "PrefillAttnSpec"} <= kinds  # every attending spec
    assert specs and kinds <= {"NormSpec", "RopeCacheSpec", "DecodeAttnSpec", "PrefillAttnSpec", "ActSpec", "EmbedSpec",
                               "MapSpec", "MoeRouteSpec", "MoeGemmSpec", "SsmConvSpec", "SsmScanSpec",
                               "SsmConvScanSpec"}
    if plan.state_sites:  # state-space layers: their conv and scan kernels
        assert {"SsmConvSpec", "SsmScanSpec"} <= kinds
    for spec in specs:
        ks = render(spec)
        assert ks.source.startswith(f"// ==== {ks.name}")
        assert ks.origin.startswith(files)  # the spec op it came from: file:line and text
        for arch in ("sm_80", "sm_90a"):
            ka = ks
            if hasattr(spec, "sm") and arch == "sm_80":  # a spec retargeted by its launch wrapper
                ka = render(dataclasses.replace(spec, sm=80))
            img = nvrtc.compile_source(ka.source, ka.name, arch, ka.origin)
            assert img.kind == "cubin" and img.data[:4] == b"\x7fELF"
