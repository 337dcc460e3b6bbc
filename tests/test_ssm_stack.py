"""CPU checks of Mamba-2's layer stack kernel (codegen/ssm_stack.py, templates/ssm_stack.cu.j2): `find_stack` finds
every layer of the mamba2 spec's program (the 2.7B shape and the test family's) and the values the step after the run
reads; it refuses programs of another shape with a reason; the kernel renders, names its spec op and compiles to an
sm_90a cubin; bad specs fail with the field named. On a GPU, tests/gpu/test_ssm_stack.py runs it against the
step-by-step program."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from kiln.dsl import check, load_spec

pytest.importorskip("cuda.bindings")

from kiln.codegen import nvrtc  # noqa: E402
from kiln.codegen.fuse import Exec, fuse, step_reads  # noqa: E402
from kiln.codegen.render import render  # noqa: E402
from kiln.codegen.specs import KernelSpecError  # noqa: E402
from kiln.codegen.ssm_stack import SsmStackSpec, Stack, find_stack  # noqa: E402

from tests.configs import FAMILY_CONFIGS  # noqa: E402
from tests.gpu.test_ssm_stack import SHAPES as GPU_SHAPES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"mamba2-2.7b": json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text()),
           "mamba2": FAMILY_CONFIGS["mamba2"]}


@pytest.fixture(autouse=True)
def _fusion_on(monkeypatch):
    monkeypatch.setenv("KILN_SSM_FUSE", "1")


def _program(name: str, config: dict, dtype=torch.bfloat16):
    plan = check(load_spec(FAMILY_CONFIGS[name]["model_type"] if name in FAMILY_CONFIGS else name), config)
    return plan, fuse(plan, dtype, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_find_stack_takes_every_layer(config, dtype):
    cfg = CONFIGS[config]
    plan, ops = _program("mamba2", cfg, dtype)
    st = find_stack(ops, plan.program.output)
    assert isinstance(st, Stack), st
    layers = cfg["num_hidden_layers"]
    s = st.spec
    assert (s.layers, st.first, st.end) == (layers, 1, 1 + 3 * layers)
    assert ops[0].kind is Exec.EMBED and st.x0 == ops[0].outs[0]
    # what the step after the run reads (the final norm's x + o) is what the kernel leaves
    assert {st.x_last, st.out_last} <= step_reads(ops[st.end])
    assert st.out_last == ops[st.end - 1].extra["gemm"].outs[0]
    d_inner = cfg["expand"] * cfg["hidden_size"]
    assert (s.hidden, s.heads, s.head_dim, s.d_state, s.groups) == \
        (cfg["hidden_size"], cfg["num_heads"], cfg["head_dim"], cfg["state_size"], cfg["n_groups"])
    assert s.in_rows == 2 * d_inner + 2 * cfg["n_groups"] * cfg["state_size"] + cfg["num_heads"]
    assert s.gate_group == d_inner // cfg["n_groups"] and s.dtype == {torch.bfloat16: "bf16"}.get(dtype, "fp32")
    assert "selective_scan" in s.origin


@pytest.mark.parametrize("config", list(CONFIGS) + [f"gpu-test-{k}" for k in GPU_SHAPES])
def test_stack_kernel_compiles_for_sm90a(config):
    """The 2.7B shape's and the test family's kernels, and those of the GPU test's shapes (tests/gpu/test_ssm_stack.py:
    their programs make a stack of every layer too)."""
    cfg = GPU_SHAPES[config.removeprefix("gpu-test-")] if config.startswith("gpu-test-") else CONFIGS[config]
    plan, ops = _program("mamba2", cfg)
    st = find_stack(ops, plan.program.output)
    assert isinstance(st, Stack) and st.spec.layers == cfg["num_hidden_layers"], st
    ks = render(st.spec)
    assert f"// origin: {st.spec.origin}" in ks.source
    assert ks.meta["smem"] <= 227 * 1024 and ks.meta["stages"] >= 2
    assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin).kind == "cubin"


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_stack_kernel_compiles_at_odd_shapes(dtype):
    """No conv bias, D or dt_bias, no softplus, a 3-tap conv, gelu after it, 4 groups of 8 lanes, three gated norm
    groups, in_proj ordered [dt; z; xbc] (z at an offset of 12: not whole fp16 vectors), a deeper ring and no bound on
    copies in flight; L2 prefetches while the ring is full; the probe's clocks, the dump and the writers' fences."""
    s = SsmStackSpec(layers=2, hidden=96, in_rows=256 + 12 + 192, xbc_off=204, dt_off=0, z_off=12, heads=12,
                     head_dim=16, d_state=8, groups=4, kernel=3, gate_group=64, eps=1e-6, gate_eps=1e-5, act="gelu",
                     conv_bias=False, has_d=False, has_dt_bias=False, softplus=False, stage_bytes=4096, inflight=0,
                     pf_ahead=6, pf_cycles=900, probe=True, dump=True, fence=True, dtype=dtype,
                     origin="t.kiln:1 stack")
    ks = render(s)
    assert "// origin: t.kiln:1 stack" in ks.source and "probe_at" in ks.source and "dump[" in ks.source
    assert "(the fence variant)" in ks.source
    assert ("not a whole number of vectors" in ks.source) == (dtype == "fp16")
    assert nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin).kind == "cubin"


def test_find_stack_says_why_not():
    plan, ops = _program("llama", FAMILY_CONFIGS["llama"])
    assert find_stack(ops, plan.program.output).startswith("step ")
    plan, ops = _program("mamba", FAMILY_CONFIGS["mamba"])  # Mamba-1: no gated norm, A per state
    assert isinstance(find_stack(ops, plan.program.output), str)
    # a later step reading a value inside the run: the run is refused, naming it
    plan, ops = _program("mamba2", CONFIGS["mamba2"])
    st = find_stack(ops, plan.program.output)
    inner = ops[st.first + 1].outs[0]  # layer 0's y
    last = ops[-1]
    ops[-1] = dataclasses.replace(last, ins=(*last.ins, inner))
    why = find_stack(ops, plan.program.output)
    assert isinstance(why, str) and str(inner) in why


BASE = dict(layers=1, hidden=64, in_rows=128 + 32 + 8 + 128, xbc_off=0, dt_off=160, z_off=168, heads=8, head_dim=16,
            d_state=8, groups=2, kernel=4, gate_group=64, eps=1e-5, gate_eps=1e-5, origin="t.kiln:2 stack")


@pytest.mark.parametrize("change,field", [
    (dict(groups=3), "groups"),
    (dict(kernel=1), "kernel"),
    (dict(act="tanh"), "act"),
    (dict(hidden=60), "hidden"),
    (dict(d_state=6, in_rows=128 + 24 + 8 + 128, dt_off=152, z_off=160), "d_state"),
    (dict(gate_group=48), "gate_group"),
    (dict(head_dim=64, in_rows=1064, dt_off=544, z_off=552, gate_group=8), "gate_group"),  # 16 groups at most
    (dict(in_rows=300), "in_rows"),
    (dict(dt_off=168, z_off=160), "xbc_off"),
    (dict(stage_bytes=100), "stage_bytes"),
    (dict(stage_bytes=200 * 1024), "stage_bytes"),
    (dict(inflight=-1), "inflight"),
    (dict(pf_ahead=-2), "pf_ahead"),
    (dict(dtype="fp8"), "dtype"),
])
def test_bad_stack_specs_name_the_field(change, field):
    with pytest.raises(KernelSpecError, match=rf"SsmStackSpec\.{field}:"):
        SsmStackSpec(**{**BASE, **change})


def test_stack_switches_are_checked(monkeypatch):
    from kiln.runtime import cuda_ssm
    monkeypatch.setenv("KILN_SSM_STACK", "yes")
    with pytest.raises(KernelSpecError, match="KILN_SSM_STACK='yes'"):
        cuda_ssm.stack_enabled()
    spec = SsmStackSpec(**BASE)
    monkeypatch.setenv("KILN_SSM_STACK_RING", "8:2")
    assert (cuda_ssm.stack_ring(spec).stage_bytes, cuda_ssm.stack_ring(spec).inflight) == (8192, 2)
    monkeypatch.setenv("KILN_SSM_STACK_RING", "8:1:6:900")
    assert (cuda_ssm.stack_ring(spec).pf_ahead, cuda_ssm.stack_ring(spec).pf_cycles) == (6, 900)
    monkeypatch.setenv("KILN_SSM_STACK_RING", "20")
    with pytest.raises(KernelSpecError, match="KILN_SSM_STACK_RING='20'"):
        cuda_ssm.stack_ring(spec)
    monkeypatch.setenv("KILN_SSM_STACK_RING", "0:1")  # no stage: the spec names the field
    with pytest.raises(KernelSpecError, match=r"SsmStackSpec\.stage_bytes:"):
        cuda_ssm.stack_ring(spec)
