"""Programmatic dependent launch, checked in the machine code (CPU: NVRTC compiles sm_90a, nvdisasm reads it).

A kernel launched as a programmatic dependent (LoadedKernel.launch_dependent) may start while the kernel
before it still runs; only its `griddepcontrol.wait` (ACQBULK in SASS) waits for that kernel's writes. So
before the wait it may read weights and nothing else, and write nothing. The CUDA source says so, but ptxas
schedules: a load of x through a `const __restrict__` pointer is compiled to the non-coherent path, which
ptxas treats as invariant, and in the 3- and 4-row GEMV entries it moved x's first loads above the wait. On
the H200 those entries then read x before the norm before them had written it (tests/gpu/test_gemv_prologue.py's
bf16 Mamba-2 case under load, with KILN_PDL_TRIGGER=1; benchmarks/2026-12-03-04.md, session 11). The templates now read
the kernel before's outputs through pdl_dep.cuh.j2's `ld_dep` (coherent loads, kept after the wait).

What is checked in every entry of every programmatic-dependent kernel, at several shapes and dtypes:
- it waits (an ACQBULK);
- before the first ACQBULK: no store or atomic, no 16-byte asynchronous copy (x's), no coherent load (the
  `ld_dep` loads of x, partials), and every 8- or 16-byte load is a weight-stream load (L1::no_allocate).
4-byte non-coherent loads stay allowed before the wait: the packed INT4/INT8 weights' records and the LoRA
row-group tables are read there on purpose; a 4-byte load of the kernel before's output goes through ld_dep.
"""

from __future__ import annotations

import itertools
import re
import subprocess

import pytest
from kiln.codegen import gemv as G
from kiln.codegen import gemv_fp8 as F
from kiln.codegen import render as render_mod
from kiln.codegen.lora_kernels import LoraSpec
from kiln.codegen.quant_kernels import ActQuantSpec, QGemvSpec, choose_persist, choose_splits, choose_warp
from kiln.codegen.render import render
from kiln.codegen.specs import ActSpec, DecodeAttnSpec, KernelSpecError, NormSpec

from tests.sass import nvdisasm

nvrtc = pytest.importorskip("kiln.codegen.nvrtc")


NVDISASM = nvdisasm()
pytestmark = pytest.mark.skipif(NVDISASM is None, reason="nvdisasm (pip install nvidia-cuda-nvdisasm)")
INSTR = re.compile(r"/\*[0-9a-f]{4}\*/\s*(.*?)\s*;")


def _entries(source: str, name: str, origin: str, tmp_path) -> dict[str, list[str]]:
    """Each entry's SASS instructions, in order, of `source` compiled for sm_90a."""
    try:
        cubin = nvrtc.compile_source(source, name, "sm_90a", origin=origin).data
    except nvrtc.NvrtcError as e:  # no NVRTC library on this machine
        pytest.skip(f"NVRTC: {e}")
    path = tmp_path / f"{name}.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([NVDISASM, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    out = {}
    for block in re.split(r"\n\s*\.text\.", text)[1:]:
        out[block.split(":", 1)[0].split()[0]] = [m.group(1) for m in INSTR.finditer(block)]
    return out


def _width(ins: str) -> int:
    m = re.search(r"\.(64|128)\b", ins)
    return int(m.group(1)) // 8 if m else 4


def _before_wait_problems(instrs: list[str], cache_copies: bool = False) -> list[str]:
    """cache_copies: 16-byte asynchronous copies are the KV cache's earlier tokens (render.EARLY_KV's decode
    attention), allowed."""
    wait = next(i for i, s in enumerate(instrs) if "ACQBULK" in s)
    bad = []
    for ins in instrs[:wait]:
        op = re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]
        if op.startswith(("STG", "ST.", "ATOM", "RED")):
            bad.append(f"a write before the wait: {ins}")
        elif op.startswith("LDGSTS"):  # cp.async: 4 bytes are the packed weights' records, 16 x's rows
            if _width(op) == 16 and not cache_copies:
                bad.append(f"a 16-byte asynchronous copy before the wait: {ins}")
        elif op.startswith("LDGDEPBAR"):  # cp.async.commit_group: no memory access of its own
            continue
        elif op.startswith("LDG"):
            if ".CONSTANT" not in op:
                bad.append(f"a coherent load (ld_dep's) before the wait: {ins}")
            elif _width(op) > 4 and ".NA" not in op:
                bad.append(f"a vector load that is not the weight stream before the wait: {ins}")
    return bad


def _gemv_specs():
    for dt, (n, k) in itertools.product(["bf16", "fp16", "fp32"], [(296, 64), (33, 1000), (6144, 4096), (64, 128)]):
        yield G.spec_for(n, k, dt, n == 33, "pdl-order", 132)
    for name, (n, pro) in {
        "rmsnorm": (296, NormSpec("rms", 64, 1e-5, has_residual=False)),
        "rmsnorm_res": (6144, NormSpec("rms", 4096, 1e-5, has_residual=True)),
        "gated_norm": (64, NormSpec("rms", 128, 1e-5, has_residual=False, gate="silu", group=64,
                                    per_group_weight=False)),
        "swiglu": (4096, ActSpec("silu", True, 14336)),
    }.items():
        yield G.spec_for(n, pro.hidden if isinstance(pro, NormSpec) else pro.features, "bf16", False, name, 132,
                         prologue=pro)
    # the epilogues: the gated activation (gate+up), the rotary + KV write (qkv; positions and slots read after
    # the wait, the cache written after it)
    from kiln.codegen.specs import RopeCacheSpec
    yield G.spec_for(28672, 4096, "bf16", False, "swiglu-epilogue", 132, epilogue=ActSpec("silu", True, 14336),
                     halves=(0, 14336))
    for fp8 in (False, True):
        rope = RopeCacheSpec(32, 8, 128, 128, 16, kv_fp8=fp8)
        yield G.spec_for(6144, 4096, "bf16", fp8, "rope-epilogue", 132, epilogue=rope, halves=(0, 4096, 5120))
        yield F.spec_for(6144, 4096, "bf16", False, decode="mma", epilogue=rope, halves=(0, 4096, 5120))
    # a residual RMSNorm before, an epilogue after: the norm's inputs read after the wait, like x
    res = NormSpec("rms", 4096, 1e-5, has_residual=True)
    yield G.spec_for(28672, 4096, "bf16", False, "norm-swiglu", 132, prologue=res,
                     epilogue=ActSpec("silu", True, 14336), halves=(0, 14336))
    for post in (False, True):  # post: the 1 / rms on the sums (GemvSpec.post_norm)
        yield G.spec_for(6144, 4096, "bf16", False, "norm-rope", 132, prologue=res,
                         epilogue=RopeCacheSpec(32, 8, 128, 128, 16), halves=(0, 4096, 5120), post_norm=post)
    yield G.spec_for(64, 4096, "bf16", True, "norm-post-ksplit", 132, prologue=res, post_norm=True)


def _other_specs():
    for n, k, static, per_channel in [(6144, 4096, False, False), (64, 128, True, True), (33, 1024, False, True)]:
        yield F.spec_for(n, k, "bf16", False, per_channel=per_channel, static=static)
        yield F.spec_for(n, k, "bf16", n == 33, per_channel=per_channel, static=static, decode="mma")
    for fmt, mode in itertools.product(["int4", "int8"], ["post", "pre"]):
        n, k, g = 4096, 4096, 128
        yield QGemvSpec(fmt, mode, n, k, g, splits=choose_splits(fmt, n, k, 8, 132))
        tpb, splits = choose_persist(fmt, n, k, 8, 132)
        yield QGemvSpec(fmt, mode, n, k, g, variant="persist", splits=splits, tpb=tpb)
    tpw, ks = choose_warp(4096, 4096, 128)
    yield QGemvSpec("int4", "post", 4096, 4096, 128, variant="warp", tpw=tpw, ksplit=ks)
    for dt in ("bf16", "fp32"):
        yield LoraSpec(4096, 6144, 48, 16, dtype=dt)
    yield ActQuantSpec("tensor", 4096)  # its second launch is a dependent of its first
    # Mamba-2's fused conv + scan (KILN_SSM_PDL): its states, conv weights and the step's metadata before the wait
    from kiln.codegen.ssm_kernels import SsmConvScanSpec
    for dt in ("bf16", "fp32"):
        yield SsmConvScanSpec(80, 64, 128, act="silu", dtype=dt)
    yield SsmConvScanSpec(6, 5, 12, groups=3, kernel=3, has_bias=False, a_per_state=True, has_d=False)


def _chain_specs():
    """KILN_PDL_CHAIN's dependents (runtime/cuda_backend.PDL_CHAIN): they wait at their entry (the tensor-core
    decode attention after its first cache copies: render.EARLY_KV)."""
    from kiln.codegen.specs import ACT_VARIANTS, ROPE_VARIANTS, DecodeAttnSpec, RopeCacheSpec

    yield NormSpec("rms", 4096, 1e-5, has_residual=True)
    yield NormSpec("rms", 5120, 1e-5, has_residual=False, gate="silu", group=5120, per_group_weight=True)
    for v in ACT_VARIANTS:
        yield ActSpec("silu", True, 14336, variant=v)
    for v in ROPE_VARIANTS:
        yield RopeCacheSpec(32, 8, 128, 128, 16, variant=v)
    yield RopeCacheSpec(32, 8, 128, 128, 16, kv_fp8=True)
    yield RopeCacheSpec(32, 8, 128, 128, 16, kv_fp8=True, kv_rotated=True)  # fp8-rotated: its write and turn back
    for fp8 in (False, True):
        yield DecodeAttnSpec(32, 8, 128, 16, 128**-0.5, kv_fp8=fp8)
    yield DecodeAttnSpec(32, 8, 128, 16, 128**-0.5, tuned=False)
    yield DecodeAttnSpec(32, 8, 128, 16, 128**-0.5, dtype="fp32")  # templates/decode_attn.cu.j2


SPECS = list(_gemv_specs()) + list(_other_specs()) + list(_chain_specs())


@pytest.mark.parametrize("spec", SPECS, ids=[f"{type(s).__name__}-{i}" for i, s in enumerate(SPECS)])
def test_dependent_kernels_read_only_weights_before_the_wait(spec, tmp_path):
    src = render(spec)
    entries = _entries(src.source, src.name, src.origin, tmp_path)
    waiting = {name: ins for name, ins in entries.items() if any("ACQBULK" in s for s in ins)}
    # plain launches: the activation quantization's amax pass, the packed weights' dequantization for cuBLAS
    dependent = [e for e in render(spec).entries if not e.endswith(("_amax", "_dequant"))]
    assert sorted(waiting) == sorted(dependent), "every programmatic-dependent entry waits"
    copies = isinstance(spec, DecodeAttnSpec) and render_mod.EARLY_KV == "1"  # the cached K/V, on purpose
    problems = {name: _before_wait_problems(ins, cache_copies=copies) for name, ins in waiting.items()}
    assert not any(problems.values()), problems


def test_the_check_sees_a_load_of_x_moved_above_the_wait(tmp_path):
    """The rule catches the bug it is for: the 4-row GEMV entry as it was (x through a plain load of a
    const __restrict__ pointer) has x loads above its wait."""
    spec = G.spec_for(296, 64, "bf16", False, "pdl-order-old", 132)
    src = render(spec)
    old = src.source.replace("ld_dep(reinterpret_cast<const uint4*>(x + t * x_stride + col))",
                             "*reinterpret_cast<const uint4*>(x + t * x_stride + col)")
    assert old != src.source
    entries = _entries(old, src.name + "_old", src.origin, tmp_path)
    problems = _before_wait_problems(next(ins for name, ins in entries.items() if name.endswith("_t4")))
    assert any("not the weight stream" in p for p in problems), problems


@pytest.mark.parametrize("dep_load", render_mod.DEP_LOADS)
def test_every_dependent_load_form_stays_after_the_wait(dep_load, monkeypatch, tmp_path):
    """KILN_DEP_LOAD's forms (the A/B of `.ci/device_check.sh depload`), on the kernels whose loads of the
    kernel before's output ptxas moved or could move: the 3- and 4-row GEMV, a prologue, the LoRA expand."""
    monkeypatch.setattr(render_mod, "DEP_LOAD", dep_load)
    for spec in (G.spec_for(296, 64, "bf16", False, "dep", 132), G.spec_for(33, 1000, "fp32", True, "dep", 132),
                 G.spec_for(64, 128, "bf16", False, "dep", 132, prologue=NormSpec(
                     "rms", 128, 1e-5, has_residual=False, gate="silu", group=64, per_group_weight=False)),
                 LoraSpec(4096, 6144, 48, 16)):
        src = render.__wrapped__(spec)  # past render's cache: the switch is read at each rendering
        assert f"({dep_load}: render.DEP_LOAD)" in src.source
        for name, ins in _entries(src.source, src.name, src.origin, tmp_path).items():
            if any("ACQBULK" in s for s in ins):
                assert not _before_wait_problems(ins), (dep_load, name)


def test_a_bad_dependent_load_form_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(render_mod, "DEP_LOAD", "nc")
    with pytest.raises(KernelSpecError, match="KILN_DEP_LOAD='nc'"):
        render.__wrapped__(G.spec_for(64, 64, "bf16", False, "dep", 132))


EARLY_KV_SPECS = [DecodeAttnSpec(32, 8, 128, 16, 128**-0.5, kv_fp8=fp8, origin="early-kv") for fp8 in (False, True)] + [
    DecodeAttnSpec(32, 8, 128, 16, 128**-0.5, tuned=False, origin="early-kv"),
    DecodeAttnSpec(8, 2, 64, 16, 0.125, window=37, softcap=30.0, kv_fp8=True, dtype="fp16", origin="early-kv"),
    DecodeAttnSpec(16, 8, 256, 7, 256**-0.5, alibi_max=8.0, origin="early-kv")]


@pytest.mark.parametrize("spec", EARLY_KV_SPECS, ids=["bf16", "fp8", "untuned", "fp8-window-softcap", "d256-alibi"])
def test_the_early_kv_decode_kernel_copies_the_cache_before_the_wait_and_nothing_else(spec, monkeypatch, tmp_path):
    """render.EARLY_KV (KILN_DECODE_EARLY_KV=1): the tensor-core decode attention's first K/V copies come before
    its wait (the point of it), and nothing else the kernel before writes: q and the new token's row are read by
    ld_dep after it, and nothing is written before it. Off, the wait is the kernel's first instruction of note."""
    for early in ("0", "1"):
        monkeypatch.setattr(render_mod, "EARLY_KV", early)
        src = render.__wrapped__(spec)  # past render's cache: the switch is read at each rendering
        (ins,) = _entries(src.source, src.name, src.origin, tmp_path).values()
        assert [s for s in ins if "ACQBULK" in s], "it waits"
        assert not _before_wait_problems(ins, cache_copies=early == "1")
        wait = next(i for i, s in enumerate(ins) if "ACQBULK" in s)
        copies = [s for s in ins[:wait] if "LDGSTS" in s and _width(s.split()[0]) == 16]
        assert bool(copies) == (early == "1"), f"EARLY_KV={early}: {len(copies)} cache copies before the wait"


@pytest.mark.parametrize("dt", ["bf16", "fp32"])
def test_the_ssm_conv_scan_reads_the_gemms_output_after_the_wait_and_its_states_before(dt, tmp_path):
    """KILN_SSM_PDL: Mamba-2's fused conv + scan, a programmatic dependent of in_proj, reads xbc and dt (in_proj's
    output) through ld_dep, coherent, after its griddepcontrol.wait; before it, the state rows and conv windows (its
    own previous launch's) and the weights, all through the non-coherent path, and no write. The generic check above
    allows 4-byte non-coherent loads before the wait; this one asserts the kernel's own split: at least a load of
    the state rows before (fp32: 4 bytes) and the 16- or 32-bit coherent loads of xbc and dt after."""
    from kiln.codegen.ssm_kernels import SsmConvScanSpec
    spec = SsmConvScanSpec(80, 64, 128, act="silu", dtype=dt, origin="t ssm pdl")
    ks = render(spec)
    (instrs,) = _entries(ks.source, ks.name, ks.origin, tmp_path).values()
    wait = next(i for i, s in enumerate(instrs) if "ACQBULK" in s)
    loads = [(i, re.sub(r"^@!?U?P\w+\s+", "", s).split()[0]) for i, s in enumerate(instrs)
             if re.sub(r"^@!?U?P\w+\s+", "", s).startswith("LDG")]
    before = [op for i, op in loads if i < wait]
    after_coherent = [op for i, op in loads if i > wait and ".CONSTANT" not in op]
    assert before and all(".CONSTANT" in op for op in before), before
    assert any(_width(op) == 4 and not re.search(r"\.[US](8|16)\b", op) for op in before)  # the fp32 state rows
    assert len(after_coherent) >= 2, after_coherent  # xbc's and dt's (ld_dep)
    assert not _before_wait_problems(instrs)
