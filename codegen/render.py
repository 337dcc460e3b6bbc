"""Render a kernel spec to CUDA source: Python derives every number, Jinja lays out the text.

`render(spec)` returns a `KernelSource`: the kernel's name, its full source (one NVRTC compile
unit, headed by `// ==== name`, the origin comment and the constants it was specialized on),
its entry points, and `meta`, the launch constants (threads, shared memory, tile sizes) the
wrapper in kernels.py needs.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from . import rope
from .jinja import env
from .specs import (
    HOPPER_SM,
    ActSpec,
    DecodeAttnSpec,
    EmbedSpec,
    KernelSpecError,
    MapSpec,
    MoeGemmSpec,
    MoeRouteSpec,
    NormSpec,
    PrefillAttnSpec,
    RopeCacheSpec,
)

LOG2E = math.log2(math.e)
SMEM_BUDGET = 110 * 1024  # prefill tiles are shrunk until they fit (two blocks per SM at most sizes)


@dataclass(frozen=True)
class KernelSource:
    name: str
    source: str
    origin: str
    entries: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def f32(x: float) -> str:
    """A C float literal holding float32(x) exactly."""
    v = float(torch.tensor(x, dtype=torch.float32))
    if not math.isfinite(v):
        raise KernelSpecError(f"constant {x!r} is not finite in float32")
    s = f"{v:.9g}"
    return (s if any(c in s for c in ".en") else s + ".0") + "f"


def f64(x: float) -> str:
    s = repr(float(x))
    return s if any(c in s for c in ".en") else s + ".0"


def _vec(itemsize: int, *dims: int) -> int:
    """Widest power-of-2 vector (at most 16 bytes) dividing every dim."""
    v = 16 // itemsize
    while v > 1 and any(d % v for d in dims):
        v //= 2
    return v


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _name(prefix: str, spec) -> str:
    digest = hashlib.sha1(repr(spec.key()).encode()).hexdigest()[:6]
    return f"kiln_{prefix}_{spec.dtype}_{digest}"


# Early programmatic-launch triggers (templates/pdl.cuh.j2), on by default (KILN_PDL_TRIGGER=0: off): a
# griddepcontrol.launch_dependents at the start of the kernels a decode GEMV follows (norms, gated
# activations, decode attention) and of the fp8 activation amax, so that the next kernel, launched as a
# programmatic dependent, starts (its weight loads in flight) while they run. Measured on the H200
# (benchmarks/2026-12-03-04.md, session 11, one call): batch-1 decode of the 8B attention shape 4.515 -> 4.472 ms,
# of the 2.7B state-space shape 3.028 -> 2.926 ms. They were opt-in while a GEMV entry read wrong x with them
# (session 10): ptxas had moved the 3- and 4-row entries' x loads above griddepcontrol.wait (pdl_dep.cuh.j2's
# ld_dep; tests/test_pdl_order.py).
# Read once: a process renders every kernel the same way (the kernel cache is keyed by spec, the NVRTC
# cache by source).
_PDL_TRIGGER_ENV = os.environ.get("KILN_PDL_TRIGGER", "1")
PDL_TRIGGER = _PDL_TRIGGER_ENV == "1"
# How ld_dep (pdl_dep.cuh.j2) loads a programmatic dependent's inputs from the kernel before, every form a
# coherent load that stays after griddepcontrol.wait (tests/test_pdl_order.py checks each): "ca" (the
# default, __ldca: L1-cached, measured in session 11), "cg" (__ldcg: L2 only) and "weak" (a plain
# ld.global) for `.ci/device_check.sh depload`. The non-coherent loads of session 10 were faster on
# the 2.7B state-space shape (2.53 against 2.84 ms) but are the ones ptxas moved above the wait.
DEP_LOADS = ("ca", "cg", "weak")
DEP_LOAD = os.environ.get("KILN_DEP_LOAD", "ca")
# E4M3 (fp8 KV cache) bytes to fp16 by the cvt.rn.f16x2.e4m3x2 instruction on sm_89 and later ("1", the default),
# or by integer ops ("0", any arch): fp8.cuh.j2. The fp8-cache decode kernel's loop takes 418 instead of 567
# instructions a 16-token tile (session 19, its SASS); the same bits by construction (the pairs' unit, a power of
# two, moves into the scales; its GPU test is bit-equality). H200, session 20, the kernel alone: B=256 ctx 1,500
# 260.7 -> 225.6 us, B=64 ctx 4,096 171.5 -> 143.4 us, B=1 ctx 16,384 19.4 -> 16.7 us. Read once, as the two above.
E4M3_CVT = os.environ.get("KILN_E4M3_CVT", "1")
# The tensor-core decode attention kernel's first K/V copies before its griddepcontrol.wait ("1", the default) or
# after it ("0"): templates/decode_attn_mma.cu.j2. Launched as a programmatic dependent of the qkv GEMV that
# writes the new token's K/V (KILN_PDL_CHAIN), its prologue's copies of the cached tokens then overlap that
# kernel; the one row that kernel writes (the new token, ctx - 1) is read again after the wait. Sound because a
# decode row has exactly one token written in its step: every other K/V row was written by a kernel that
# completed before the step's graph began (tests/gpu/test_decode_early_kv.py poisons the new rows each replay).
# H200, session 20, 8B batch-1 step (decode_back_to_back_ms, 0 / 1 alternately, twice): bf16 4.103 / 4.098 ->
# 4.065 / 4.066 ms, fp8+lm-head 2.718 / 2.720 -> 2.696 / 2.699, int4-wo+lm-head 1.719 / 1.723 -> 1.685 / 1.686.
EARLY_KV = os.environ.get("KILN_DECODE_EARLY_KV", "1")
# The decode attention grid's order (templates/decode_attn_grid.cuh.j2): "splits-last" (the default), (kv head x
# head chunk, sequence, split), or "splits-first", (split, kv head x head chunk, sequence). Blocks are dispatched
# in grid order, x fastest; the grid is sized from a capacity (a CUDA graph's max_context), and at batch 1 and a
# context far below it most splits are empty: splits-last dispatches every block with tokens first, the empty
# ones (which leave at once) after them. H200, session 20, 8B batch-1 step at context 1,024 in a 4,096-token
# graph (decode_back_to_back_ms, alternating, twice): bf16 4.068 / 4.070 -> 4.045 / 4.042 ms, int4-wo+lm-head
# 1.687 / 1.688 -> 1.673 / 1.671; its GPU tests (decode kernels, models, engine, speculation) pass in both orders.
DECODE_GRIDS = ("splits-first", "splits-last")
DECODE_GRID = os.environ.get("KILN_DECODE_GRID", "splits-last")
# The tensor-core decode kernel's KV partition from the step's context ("1") instead of the host's one for the
# grid's capacity only ("0", the default). A CUDA graph's grid is sized from its capacity (max_context, 4,096 in
# `bench latency`), and the host's model (kernels.decode_partition) picks the partition for it: at batch 1 that is
# 128 tokens, so at context 1,024 8 splits hold tokens (64 blocks for 132 SMs), where 64-token splits over a
# capacity of 1,024 ran faster (session 13, .ci/decode_partition.py: 5.9 against 7.3 us). With "1" each block
# derives the partition from its sequence's length: the host's, or less where the launch's grid would leave SMs
# idle (the launch passes how many splits a (sequence, head chunk) should fill: SMs / (sequences x head
# chunks)), in whole tiles, never more splits than the grid has. Only where the launch picks the partition
# (partition=None). Written in session 21 without device time: opt-in until its GPU tests pass and it is measured.
DECODE_DYN_PART = os.environ.get("KILN_DECODE_DYN_PART", "0")
# Prefill attention over an fp8 KV cache on Hopper through the wgmma kernel ("1": templates/prefill_attn_sm90.cu.j2
# copies each tile's E4M3 bytes and converts them in shared memory, the default) instead of the mma.sync kernel
# ("0"). Written in session 21 without device time; on since session 24, where its GPU tests passed and, with the two
# switches of session 23 (KILN_FP8_AMAX_FUSE, KILN_MIXED_GRAPHS_LARGE), fp8 2048/128 went from 2,624 to 2,860
# output tok/s on an H100 in one call (BENCHMARKS.md). In session 10's profile of an fp8 mixed step (256 decode
# rows beside a 1,792-token prompt chunk) the mma kernel took 6.88 of 42.99 ms, about 62 TFLOP/s, where the bf16
# cache's wgmma kernel runs at 150-310. On the H200 (session 22) its plain form passed its GPU test and its split-KV
# form did not (0.48-0.73 off past one key tile), so the fp8 form is rendered without the split (_prefill_sm90): its
# launches are always whole.
PREFILL_FP8_SM90 = os.environ.get("KILN_PREFILL_FP8_SM90", "1")


def _emit(template: str, name: str, spec, params: dict, entries, meta: dict) -> KernelSource:
    if _PDL_TRIGGER_ENV not in ("0", "1"):  # a switch read at import; refused where a kernel is first made
        raise KernelSpecError(f"KILN_PDL_TRIGGER={_PDL_TRIGGER_ENV!r}: must be 0 or 1")
    if DEP_LOAD not in DEP_LOADS:
        raise KernelSpecError(f"KILN_DEP_LOAD={DEP_LOAD!r}: must be one of {', '.join(DEP_LOADS)}")
    if E4M3_CVT not in ("0", "1"):
        raise KernelSpecError(f"KILN_E4M3_CVT={E4M3_CVT!r}: must be 0 or 1")
    if EARLY_KV not in ("0", "1"):
        raise KernelSpecError(f"KILN_DECODE_EARLY_KV={EARLY_KV!r}: must be 0 or 1")
    if DECODE_GRID not in DECODE_GRIDS:
        raise KernelSpecError(f"KILN_DECODE_GRID={DECODE_GRID!r}: must be one of {', '.join(DECODE_GRIDS)}")
    if DECODE_DYN_PART not in ("0", "1"):
        raise KernelSpecError(f"KILN_DECODE_DYN_PART={DECODE_DYN_PART!r}: must be 0 or 1")
    if PREFILL_FP8_SM90 not in ("0", "1"):
        raise KernelSpecError(f"KILN_PREFILL_FP8_SM90={PREFILL_FP8_SM90!r}: must be 0 or 1")
    derived = " ".join(f"{k}={v}" for k, v in meta.items())
    ctype = RUN_DTYPES[spec.dtype].ctype
    text = env().get_template(template).render(
        name=name, origin=spec.origin or "?", constants=spec.constants(), derived=derived,
        ctype=ctype, pdl_trigger=PDL_TRIGGER, dep_load=DEP_LOAD, e4m3_cvt=E4M3_CVT == "1", **params,
    )
    text = re.sub(r"\n{3,}", "\n\n", text)
    return KernelSource(name, text, spec.origin or "?", tuple(entries), meta)


NORM_MAX_THREADS = 1024  # a group's accesses all in one round where it fits (one row of 5120 bf16: 640 threads)


def _norm(s: NormSpec) -> KernelSource:
    """One block per token and group (a group: s.width features, the whole row unless s.group).

    A block holds as many threads as the group has 16-byte accesses (up to NORM_MAX_THREADS), so each
    thread issues one load per input and the whole group is in flight at once: at one token (decode) the
    kernel is one DRAM round trip plus a block reduction. 256 threads with a serial loop of 3 accesses
    each took 4.85 us for Mamba-2's gated row of 5120 on the H200 (issue #18)."""
    itemsize = RUN_DTYPES[s.dtype].itemsize
    width, groups = s.width, s.hidden // s.width
    vec = _vec(itemsize, width)
    n_vec = width // vec
    iters = max(1, math.ceil(n_vec / NORM_MAX_THREADS))
    threads = _round_up(math.ceil(n_vec / iters), 32)
    meta = dict(threads=threads, vec=vec, iters=iters, groups=groups)
    kind = f"{s.kind}norm{'_res' if s.has_residual else ''}{f'_{s.gate}' if s.gate else ''}"
    if s.fp8_out and vec % 2:
        raise KernelSpecError(f"{s.origin or 'norm'}: an fp8 output needs an even vector width, {s.hidden} gives {vec}")
    name = _name(f"{kind}_h{s.hidden}{f'_g{width}' if s.group else ''}{'_amax' if s.amax else ''}"
                 f"{'_fp8' if s.fp8_out else ''}", s)
    params = dict(
        title="RMSNorm" if s.kind == "rms" else "LayerNorm", kind=s.kind, hidden=s.hidden,
        width=width, groups=groups, per_group_weight=s.per_group_weight,
        weight_numel=f"{groups} x {width}" if s.per_group_weight else width,
        vec=vec, iters=iters, threads=threads, warps=threads // 32,
        tail=threads * iters != n_vec, eps=f32(s.eps), inv_width=f32(1.0 / width),
        weight_offset=f32(s.weight_offset) if s.weight_offset else "",
        has_bias=s.has_bias, has_residual=s.has_residual, gate=s.gate, amax=s.amax, fp8_out=s.fp8_out,
    )
    return _emit("norm.cu.j2", name, s, params, [name], meta)


ROPE_BULK_STAGES = 4  # "bulk": tokens in shared memory per block (three loading while one computes)
ROPE_BULK_SMEM = 64 * 1024  # "bulk": stages up to this much shared memory (at least two, up to SM90_SMEM_MAX)


def rope_variant(s: RopeCacheSpec) -> str:
    """The variant `_rope` renders: s.variant where it applies (see RopeCacheSpec.variant)."""
    itemsize = RUN_DTYPES[s.dtype].itemsize
    stage = ((s.heads * s.head_dim if s.rotary_dim else 0) + 2 * s.kv_heads * s.head_dim) * itemsize
    if s.variant == "bulk" and (s.kv_fp8 or s.head_dim * itemsize % 16 or 2 * stage + 64 > SM90_SMEM_MAX):
        return "token"
    return s.variant


def rope_math_params(s: RopeCacheSpec) -> dict:
    """rope_math.cuh.j2's parameters (the frequency tables, cos / sin and the pair rotation), shared by
    the rotary + KV write kernel and the qkv GEMV that rotates in its epilogue (codegen/gemv.py)."""
    rot = s.rotary_dim
    params = dict(rot=rot, n_freq=max(1, rot // 2), dynamic=s.scaling == "dynamic",
                  longrope=bool(rot) and s.scaling == "longrope",
                  attention_factor=f32(s.attention_factor) if s.attention_factor != 1.0 else "",
                  inv_freq_rows=[], long_inv_freq_rows=[], theta=f64(s.theta), factor=f64(s.factor),
                  factor_minus_one=f64(s.factor - 1), original_max_position=s.original_max_position,
                  dyn_exponent="")

    def rows(freqs: torch.Tensor) -> list[str]:
        lits = [f32(x) for x in freqs.tolist()]
        return [", ".join(lits[i : i + 4]) + "," for i in range(0, len(lits), 4)]

    if rot and s.scaling == "dynamic":
        params["dyn_exponent"] = f64(rope.dynamic_exponent(s))
    elif rot:
        params["inv_freq_rows"] = rows(rope.inv_freq(s))
        if params["longrope"]:
            params["long_inv_freq_rows"] = rows(rope.long_inv_freq(s))
    return params


def _rope(s: RopeCacheSpec) -> KernelSource:
    if s.kv_rotated:
        return _rope_rotated(s)
    itemsize = RUN_DTYPES[s.dtype].itemsize
    rot, d = s.rotary_dim, s.head_dim
    if not rot:
        vec = _vec(itemsize, d)
    elif s.layout == "half":
        vec = _vec(itemsize, rot // 2, d - rot if d > rot else d, d)
    else:
        vec = _vec(itemsize, rot, d - rot if d > rot else d, d)
        if vec < 2:
            raise KernelSpecError(f"RopeCacheSpec.head_dim: {d} cannot hold interleaved pairs in vectors")
    rot_units = (rot // 2 if s.layout == "half" else rot) // vec
    vec_per_head = d // vec
    q_units, kv_units = s.heads * rot_units, s.kv_heads * vec_per_head
    threads = min(256, max(64, _round_up(max(q_units, kv_units), 32)))
    params = dict(
        heads=s.heads, kv_heads=s.kv_heads, head_dim=d, half=rot // 2, layout=s.layout, vec=vec,
        pairs_per_vec=vec // 2, threads=threads, page_size=s.page_size,
        page_stride=s.kv_heads * s.page_size * d, head_stride=s.page_size * d,
        rot_units=rot_units, rot_span=rot_units * vec, vec_per_head=vec_per_head,
        q_units=q_units, kv_units=kv_units, kv_fp8=s.kv_fp8,
        prefetch=s.prefetch, q_iters=max(1, math.ceil(q_units / threads)),
        kv_iters=max(1, math.ceil(kv_units / threads)),
        **rope_math_params(s),
    )
    # meta "dynamic": the kernel takes the step's seq_len argument (dynamic NTK and longrope)
    meta = dict(threads=threads, vec=vec, dynamic=params["dynamic"] or params["longrope"], variant="token")
    q_elems, kv_elems = (s.heads * d if rot else 0), s.kv_heads * d
    stage_bytes = (q_elems + 2 * kv_elems) * itemsize
    if rope_variant(s) == "bulk":
        stages = max(2, min(ROPE_BULK_STAGES, ROPE_BULK_SMEM // stage_bytes))
        bar_offset = stages * stage_bytes
        params.update(stages=stages, q_elems=q_elems, kv_elems=kv_elems, stage_elems=q_elems + 2 * kv_elems,
                      stage_bytes=stage_bytes, q_bytes=q_elems * itemsize, kv_bytes=kv_elems * itemsize,
                      head_bytes=d * itemsize, bar_offset=bar_offset)
        meta.update(variant="bulk", smem=bar_offset + 8 * stages)
    params["bulk"] = meta["variant"] == "bulk"
    name = _name(f"rope_cache_{s.layout[0]}{rot}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    return _emit("rope_cache.cu.j2", name, s, params, [name], meta)


ROTATED_WARPS = 4  # fp8-rotated's write: head rows (a warp each) per block


def _rope_rotated(s: RopeCacheSpec) -> KernelSource:
    """fp8-rotated's rotary + KV write and its output's turn back (templates/rope_cache_rotated.cu.j2): a warp per
    head row, whose lanes hold head_dim / 32 dims each (one dim each on the first head_dim lanes, under 32), so the
    Hadamard transforms run in registers and shuffles; a block per token and ROTATED_WARPS rows."""
    d = s.head_dim
    lanes = min(32, d)
    per_lane = d // lanes
    if s.rotary_dim and (s.rotary_dim // 2 % per_lane if s.layout == "half" else s.rotary_dim % per_lane
                         or per_lane % 2 and per_lane != 1):
        raise KernelSpecError(f"RopeCacheSpec.rotary_dim: fp8-rotated's lanes hold {per_lane} dims each, which do not "
                              f"split {s.rotary_dim} {s.layout} rotary dims into whole pairs")
    rows = s.heads + 2 * s.kv_heads
    params = dict(heads=s.heads, kv_heads=s.kv_heads, head_dim=d, half=s.rotary_dim // 2, layout=s.layout,
                  lanes=lanes, per_lane=per_lane, vec=min(per_lane, 16 // RUN_DTYPES[s.dtype].itemsize),
                  lane_stages=(per_lane - 1).bit_length(), shuffle_stages=(lanes - 1).bit_length(),
                  warps=ROTATED_WARPS, threads=32 * ROTATED_WARPS,
                  grid_y=-(-rows // ROTATED_WARPS), unrotate_grid_y=-(-s.heads // ROTATED_WARPS),
                  page_size=s.page_size, page_stride=s.kv_heads * s.page_size * d, head_stride=s.page_size * d,
                  inv_sqrt_n=f32(1 / math.sqrt(d)), **rope_math_params(s))
    meta = dict(threads=params["threads"], grid_y=params["grid_y"], unrotate_grid_y=params["unrotate_grid_y"],
                dynamic=params["dynamic"] or params["longrope"], variant="rotated")
    name = _name(f"rope_cache_rot_{s.layout[0]}{s.rotary_dim}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    return _emit("rope_cache_rotated.cu.j2", name, s, params, [name, f"{name}_unrotate"], meta)


def _alibi_rows(s) -> list[str]:
    """The ALiBi slope table in log2 units (slope * log2 e), as rows of float literals; [] = none."""
    if not s.alibi_max:
        return []
    from kiln.dsl.ops.attention import alibi_slopes
    lits = [f32(x * LOG2E) for x in alibi_slopes(s.heads, s.alibi_max, s.alibi_scale).double().tolist()]
    return [", ".join(lits[i : i + 4]) + "," for i in range(0, len(lits), 4)]


def _largest_divisor(n: int, cap: int, pow2: bool = False) -> int:
    return max(x for x in range(1, min(n, cap) + 1) if n % x == 0 and (not pow2 or x & (x - 1) == 0))


def _merge_params(s: DecodeAttnSpec, d: int) -> dict:
    """The fused split merge's (decode_attn_merge.cuh.j2): float4s per lane per row, and how many
    splits' rows a lane has in flight at once in the parallel merge (64 registers of them)."""
    dpl = math.ceil(d / 128)
    return dict(merge_dpl=dpl, fast_merge=s.tuned, merge_rows=max(4, 16 // dpl))


DECODE_WARPS = 4  # tensor-core decode: warps per block, each streaming its own 16-token tiles
# Shared memory per tensor-core decode block: two blocks (8 warps) per SM on Hopper and Ampere-class
# parts (228 KB per SM, 1 KB of it reserved per block), which keeps 2 tiles per warp in flight.
DECODE_SMEM_BUDGET = 113 * 1024


def _decode_mma(s: DecodeAttnSpec, group: int) -> KernelSource:
    """Tensor-core variant for 16-bit caches, head_dim % 16 == 0: the GQA group is the 16 rows of
    the MMA tile; each warp runs its own cp.async ring (no block barrier in the loop)."""
    d = s.head_dim
    warps = s.warps or DECODE_WARPS
    threads = warps * 32
    gc = _largest_divisor(group, 16)
    kpad = d + 8  # a 16-byte pad per row: ldmatrix's 8 row addresses fall in distinct banks
    # fp8 K/V rows: bytes, padded by 16 so that the lanes' 16-byte fragment loads hit distinct banks
    citem = 1 if s.kv_fp8 else 2
    kvpad = d + 16 if s.kv_fp8 else kpad
    stage_elems = 2 * 16 * kvpad  # K and V rows of one 16-token tile
    off_kv = _round_up(16 * kpad * 2, 128)
    stages = next((n for n in (8, 7, 6, 5, 4, 3) if off_kv + warps * n * stage_elems * citem <= DECODE_SMEM_BUDGET), 2)
    if not s.kv_fp8:
        stages = min(stages, 4)
    if s.stages:
        stages = s.stages
        if off_kv + warps * stages * stage_elems * citem > 227 * 1024:
            raise KernelSpecError(f"DecodeAttnSpec.stages: {stages} stages of {warps} warps exceed 227 KB "
                                  "of shared memory")
    smem = off_kv + warps * stages * stage_elems * citem
    # The warps' final merge reuses the rings: warps x gc x (d + 2) floats.
    if warps * stages * stage_elems * citem < warps * gc * (d + 2) * 4:
        raise KernelSpecError(f"DecodeAttnSpec.head_dim: {d} leaves too little shared memory for the warp merge")
    chunks16 = d // 8
    words = (4, 2, 1)  # 16-, 8- or 4-byte fragment loads
    params = dict(
        kv_fp8=s.kv_fp8, mma_convert=s.dtype != "fp16", kvpad=kvpad, dq=d // 4, dv_words=d // 32,
        kw_align=next(a for a in words if (d // 16) % a == 0), vw_align=next(a for a in words if (d // 32) % a == 0),
        row_chunks=d * citem // 16, chunk_elems=16 // citem,
        k_fold=f32(s.scale / s.softcap if s.softcap else s.scale * LOG2E),
        heads=s.heads, kv_heads=s.kv_heads, head_dim=d, page_size=s.page_size, group=group, gc=gc, gc_m1=gc - 1,
        chunks=group // gc, threads=threads, warps=warps, kpad=kpad, stages=stages, stages_ahead=stages - 1,
        bytes_ahead=(stages - 1) * stage_elems * 2, wait_n=stages - 2, prologue_stages=list(range(stages - 1)),
        chunks16=chunks16, lane_chunks=16 * d * citem // 16 // 32, q_chunks=16 * chunks16, kv_elems=16 * kvpad,
        stage_elems=stage_elems, ring_elems=stages * stage_elems, off_kv=off_kv,
        page_stride=s.kv_heads * s.page_size * d, head_stride=s.page_size * d, k_steps=d // 16, d_tiles=d // 8,
        q_regs=d <= 128, row_halves=2 if gc > 8 else 1,
        mma_type="bf16" if s.dtype == "bf16" and not s.kv_fp8 else "f16",
        window=s.window, softcap=bool(s.softcap), softcap_log2=f32(s.softcap * LOG2E),
        pre_cap_scale=f32(s.scale / s.softcap) if s.softcap else "", score_scale=f32(s.scale * LOG2E),
        q_scale_doc="scores: softcap * log2 e * tanh(q.k * scale / softcap)" if s.softcap
        else "scores: q.k * scale * log2 e",
        alibi=bool(s.alibi_max), alibi_rows=_alibi_rows(s), **_merge_params(s, d),
        prefetch_pages=s.tuned, min_blocks=s.min_blocks,
        early_kv=EARLY_KV == "1", fresh_regs=-(-2 * (d * citem // 16) // 32), splits_last=DECODE_GRID == "splits-last",
        dyn_part=DECODE_DYN_PART == "1", tile=16 * warps,
    )
    name = _name(f"decode_attn_mma{'_fp8kv' if s.kv_fp8 else ''}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    # tile: the partition granule (one 16-token tile per warp), so every warp gets the same work
    meta = dict(threads=threads, smem=smem, tile=16 * warps, stages=stages, gc=gc, chunks=group // gc, mma=True,
                splits_last=params["splits_last"], dyn_part=params["dyn_part"])
    return _emit("decode_attn_mma.cu.j2", name, s, params, [name], meta)


def _decode(s: DecodeAttnSpec) -> KernelSource:
    itemsize = RUN_DTYPES[s.dtype].itemsize
    d, group = s.head_dim, s.heads // s.kv_heads
    # fp32 keeps full precision on CUDA cores; an fp8 cache's fragments are read as 4-byte words
    if s.dtype != "fp32" and d % 16 == 0 and (not s.kv_fp8 or d % 32 == 0):
        return _decode_mma(s, group)
    tile, threads, warps = 32, 128, 4
    gc = _largest_divisor(group, 8)
    vec = 16 // itemsize
    kpad = d + vec  # a 16-byte pad per row keeps lanes reading different rows off one bank
    stages = 3 if 3 * 2 * tile * kpad * itemsize <= 64 * 1024 else 2
    pvw = 8 // itemsize
    while d // pvw > threads:
        pvw *= 2
    dt = d // pvw
    tg = threads // dt
    gp = _round_up(gc, 4)
    stage_elems = 2 * tile * kpad
    # fp8 cache: the stages are E4M3 bytes (unpadded rows); one run-dtype tile is converted from them
    off_stg = stage_elems * itemsize if s.kv_fp8 else 0
    off_q = off_stg + stages * 2 * tile * d if s.kv_fp8 else stages * stage_elems * itemsize
    row_bytes = d * (1 if s.kv_fp8 else itemsize)
    off_s = off_q + gc * d * 4
    off_p = off_s + gc * tile * 4
    off_alpha = off_p + tile * gp * 4
    off_red = _round_up(off_alpha + gp * 4, 16)
    smem = off_red + tg * gc * d * 4
    qk_rounds = math.ceil(gc * tile / threads)
    log_scale = s.scale * LOG2E
    params = dict(
        heads=s.heads, kv_heads=s.kv_heads, head_dim=d, page_size=s.page_size, group=group, gc=gc,
        chunks=group // gc, tile=tile, tile_m1=tile - 1, threads=threads, warps=warps, vec=vec,
        kpad=kpad, stages=stages, wait_n=stages - 2, ahead=stages - 1,
        prologue_stages=list(range(stages - 1)), chunks16=row_bytes // 16,
        tile_chunks=tile * row_bytes // 16, kv_elems=tile * kpad, stage_elems=stage_elems,
        kv_fp8=s.kv_fp8, off_stg=off_stg, stg_pitch=d if s.kv_fp8 else kpad, chunk_elems=16 if s.kv_fp8 else vec,
        page_stride=s.kv_heads * s.page_size * d, head_stride=s.page_size * d,
        off_q=off_q, off_s=off_s, off_p=off_p, off_alpha=off_alpha, off_red=off_red,
        gp=gp, gpw=math.ceil(gc / warps), pvw=pvw, dt=dt, tg=tg, pv_guard=tg * dt != threads,
        qk_rounds=qk_rounds, qk_guard=qk_rounds * threads != gc * tile, gc_tile=gc * tile, gc_d=gc * d,
        window=s.window, softcap=bool(s.softcap), softcap_log2=f32(s.softcap * LOG2E),
        q_scale=f32(s.scale / s.softcap if s.softcap else log_scale),
        q_scale_doc="scale / softcap (tanh, then softcap * log2 e)" if s.softcap else "scale * log2 e",
        alibi=bool(s.alibi_max), alibi_rows=_alibi_rows(s), **_merge_params(s, d),
        splits_last=DECODE_GRID == "splits-last",
    )
    params["merge_rows"] = min(params["merge_rows"], 8)  # the CUDA-core kernel: fewer registers in the merge
    name = _name(f"decode_attn{'_fp8kv' if s.kv_fp8 else ''}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    meta = dict(threads=threads, smem=smem, tile=tile, stages=stages, gc=gc, chunks=group // gc, mma=False,
                splits_last=params["splits_last"])
    return _emit("decode_attn.cu.j2", name, s, params, [name], meta)


def _prefill_tiles(d: int, itemsize: int, gc: int):
    tx = ty = 16
    vec = 16 // itemsize
    kpad = d + vec
    for m in (64, 32):
        for bn in (64, 32, 16):
            if m % gc:
                continue
            off_kv = _round_up(m * kpad * itemsize, 16)
            off_p = off_kv + 2 * 2 * bn * kpad * itemsize
            smem = off_p + bn * (m + 4) * 4
            if smem <= SMEM_BUDGET:
                return dict(tx=tx, ty=ty, m=m, bn=bn, vec=vec, kpad=kpad, off_kv=off_kv, off_p=off_p, smem=smem)
    raise KernelSpecError(f"PrefillAttnSpec.head_dim: {d} too large for the shared-memory budget")


def _attn_common(s, d: int, gc: int, group: int) -> dict:
    return dict(
        heads=s.heads, kv_heads=s.kv_heads, head_dim=d, page_size=s.page_size, group=group, gc=gc,
        chunks=group // gc, page_stride=s.kv_heads * s.page_size * d, head_stride=s.page_size * d,
        causal=s.causal, window=s.window, window_m1=max(0, s.window - 1), softcap=bool(s.softcap),
        softcap_log2=f32(s.softcap * LOG2E), pre_cap_scale=f32(s.scale / s.softcap) if s.softcap else "",
        score_scale=f32(s.scale * LOG2E), alibi=bool(s.alibi_max), alibi_rows=_alibi_rows(s),
        kv_fp8=s.kv_fp8,
    )


def _prefill_mma(s: PrefillAttnSpec, gc: int, group: int) -> KernelSource:
    """Tensor-core variant: 4 warps x 16 rows, 64-key tiles, fragments in registers."""
    d, bn, kpad = s.head_dim, 64, s.head_dim + 8
    off_kv = 64 * kpad * 2
    smem = off_kv + 2 * 2 * bn * kpad * 2
    params = dict(
        _attn_common(s, d, gc, group), mma_type="bf16" if s.dtype == "bf16" else "f16", bm_tok=64 // gc,
        bn=bn, bn_m1=bn - 1, kpad=kpad, off_kv=off_kv, chunks16=d // 8, q_chunks=64 * d // 8,
        kv_chunks=bn * d // 8, kv_elems=bn * kpad, stage_elems=2 * bn * kpad, d_tiles=d // 8,
        k_steps=d // 16, n_tiles=bn // 8, key_steps=bn // 16, threads=128, kv_chunks8=bn * d // 16,
    )
    name = _name(f"prefill_attn_mma{'_fp8kv' if s.kv_fp8 else ''}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    meta = dict(threads=128, smem=smem, bm_tok=64 // gc, chunks=group // gc, bn=bn, mma=True, variant="mma")
    return _emit("prefill_attn_mma.cu.j2", name, s, params, [name], meta)


def prefill_variant(s: PrefillAttnSpec) -> str:
    """Which prefill template a spec renders to: "sm90" (wgmma, Hopper: 16-bit types, head_dim 64
    or 128, causal or not, sliding window; no softcap or ALiBi yet; an fp8 KV cache with
    KILN_PREFILL_FP8_SM90=1, not in the warp-specialised form), "mma" (mma.sync, any 16-bit
    head_dim up to 128 that is a multiple of 16), else "simt" (fp32, other head dims)."""
    d = s.head_dim
    fp8_ok = not s.kv_fp8 or (PREFILL_FP8_SM90 == "1" and not s.ws)  # else the mma kernel, which converts its tiles
    if s.sm in HOPPER_SM and s.dtype != "fp32" and d in (64, 128) and not s.softcap and not s.alibi_max and fp8_ok:
        return "sm90"
    if s.dtype != "fp32" and d % 16 == 0 and d <= 128:  # fp32 keeps full precision on CUDA cores
        return "mma"
    return "simt"


def _prefill_sm90(s: PrefillAttnSpec, gc: int, group: int) -> KernelSource:
    """Hopper variant: 2 warpgroups x 64 rows, wgmma from 128-byte-swizzled shared memory,
    128-key K/V tiles in 3 stages (224 KB at head_dim 128: one block per SM)."""
    d, bn, rows = s.head_dim, 128, 128
    cb = d // 64  # 64-column (128-byte) blocks per row
    chunks16 = d // 8
    q_bytes, tile_bytes = rows * d * 2, bn * d * 2
    stage_bytes = 2 * tile_bytes
    # An fp8 cache: 2 converted stages and 2 slots of K / V bytes (the bytes are copied a tile ahead), the same
    # 192 KB as 3 stages at either head dim
    nstages = 2 if s.kv_fp8 else 3
    smem = q_bytes + nstages * stage_bytes + (2 * 2 * bn * d if s.kv_fp8 else 0) + 1024  # + 1024-byte alignment slack

    def regs(n: int) -> list[str]:  # "{%0, %1, ..., %n-1}," in rows of 16 operands
        names = [f"%{i}" for i in range(n)]
        text = [" " + ", ".join(names[i:i + 16]) for i in range(0, n, 16)]
        text[0], text[-1] = "{" + text[0][1:], text[-1] + "},"
        return [t + "," for t in text[:-1]] + text[-1:]

    def outs(n: int) -> list[str]:  # the matching "+f" operands of d[n / 4][4], 8 per row
        ops = [f'"+f"(d[{i // 4}][{i % 4}])' for i in range(n)]
        lines = [", ".join(ops[i:i + 8]) for i in range(0, n, 8)]
        return [": " + lines[0] + ","] + ["  " + x + "," for x in lines[1:-1]] + ["  " + lines[-1]]

    s_regs, o_regs = regs(bn // 2), regs(d // 2)
    a0 = d // 2
    params = dict(
        _attn_common(s, d, gc, group), mma_type="bf16" if s.dtype == "bf16" else "f16", bm_tok=rows // gc,
        bm_tok_m1=rows // gc - 1, bn=bn, bn_m1=bn - 1, cb=cb, chunks16=chunks16, q_bytes=q_bytes,
        tile_bytes=tile_bytes, stage_bytes=stage_bytes, q_iters=rows * chunks16 // 256,
        kv_iters=bn * chunks16 // 256, o_iters=64 * chunks16 // 128, s_regs=s_regs, s_outs=outs(bn // 2),
        o_regs=o_regs, o_outs=outs(d // 2), a_regs="{" + ", ".join(f"%{a0 + i}" for i in range(4)) + "}",
        nstages=nstages, kv_iters8=bn * (d // 16) // 256,
    )
    if s.ws:
        return _prefill_sm90_ws(s, params)
    name = _name(f"prefill_attn_sm90{'_fp8kv' if s.kv_fp8 else ''}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    # The merge: a thread per (row, 4 dims), as many rows per block as 256 threads hold
    merge_rows = max(1, 256 // (d // 4))
    # The split-KV form on fp8 pages too. It was 0.48-0.73 off on the H200 (session 22) for causal sequences past one
    # key tile, most likely the masked rows' rescale factor that made the bf16 form 0.46 off at head dim 128
    # (session 24, fixed in the template; tests/test_softmax_rescale_sass.py checks both caches' machine code), its
    # sign here set by the runtime k_scale. Its GPU tests (forced 3-way splits against the reference and the whole
    # grid) passed on an H100 in session 26, when kernels.PREFILL_AUTO_SPLIT came back on.
    params.update(merge_rows=merge_rows, merge_groups=-(-rows // merge_rows), merge_threads=merge_rows * (d // 4))
    # Entries: the kernel; its split-KV form and the merge of its partials (kernels.prefill_attention
    # picks the pair when the grid is too small for the GPU). split_kv: the launch may pick splits.
    meta = dict(threads=256, smem=smem, bm_tok=rows // gc, chunks=group // gc, bn=bn, mma=True, variant="sm90",
                ws=False, split_kv=True, merge_threads=merge_rows * (d // 4), merge_groups=-(-rows // merge_rows),
                part_rows=rows)
    entries = [name, f"{name}_split", f"{name}_merge"]
    return _emit("prefill_attn_sm90.cu.j2", name, s, params, entries, meta)


SM90_SMEM_MAX = 227 * 1024  # a Hopper block's dynamic shared-memory limit
# setmaxnreg split of the 64K registers of an SM among 384 threads (flash-attention 3's for
# cp.async-fed K/V): the producer's address arithmetic fits 40, the consumers hold O, S and P
# (160 registers at head_dim 128) plus the softmax state in 232. 128 * 40 + 256 * 232 = 168 * 384,
# what __launch_bounds__(384, 1) hands out at launch.
WS_PRODUCER_REGS, WS_CONSUMER_REGS = 40, 232


def _prefill_sm90_ws(s: PrefillAttnSpec, params: dict) -> KernelSource:
    """Warp-specialised Hopper variant: a producer warpgroup fills a ring of K/V stages (as many as
    fit, at most 4: 3 at head_dim 128, 4 at 64), two consumer warpgroups compute in ping-pong;
    same grid as the other (q tile, heads, sequence), heaviest q tiles first."""
    d, rows, bn = s.head_dim, 128, params["bn"]
    chunks16, q_bytes, stage_bytes = params["chunks16"], params["q_bytes"], params["stage_bytes"]
    per_stage = stage_bytes + 4 * 8  # + its 4 mbarriers (full / empty, K / V)
    stages = min(4, (SM90_SMEM_MAX - 1024 - q_bytes) // per_stage)
    smem = q_bytes + stages * per_stage + 1024  # + slack to align the base to 1024 bytes
    p = dict(params, stages=stages, row_step=128 // chunks16, q_iters=64 * chunks16 // 128,
             producer_regs=WS_PRODUCER_REGS, consumer_regs=WS_CONSUMER_REGS)
    gc = params["gc"]
    name = _name(f"prefill_attn_sm90ws_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    meta = dict(threads=384, smem=smem, bm_tok=rows // gc, chunks=params["chunks"], bn=bn, mma=True,
                variant="sm90", ws=True, stages=stages)
    return _emit("prefill_attn_sm90_ws.cu.j2", name, s, p, [name], meta)


def _prefill(s: PrefillAttnSpec) -> KernelSource:
    itemsize = RUN_DTYPES[s.dtype].itemsize
    d, group = s.head_dim, s.heads // s.kv_heads
    gc = _largest_divisor(group, 8, pow2=True)
    variant = prefill_variant(s)
    if variant == "sm90":
        return _prefill_sm90(s, gc, group)
    if variant == "mma":
        return _prefill_mma(s, gc, group)
    t = _prefill_tiles(d, itemsize, gc)
    tx, m, bn, vec = t["tx"], t["m"], t["bn"], t["vec"]
    pvv = vec
    while d % (tx * pvv):
        pvv //= 2
    params = dict(
        _attn_common(s, d, gc, group), m=m, bm_tok=m // gc, bn=bn, bn_m1=bn - 1, tx=tx, ty=t["ty"],
        tx_half=tx // 2, threads=tx * t["ty"], rpt=m // t["ty"], kpt=bn // tx, vec=vec, kpad=t["kpad"],
        pvv=pvv, pv_chunks=d // (tx * pvv), ocols=d // tx, mp=m + 4, stages=2, wait_n=0, ahead=1,
        prologue_stages=[0], chunks16=d * itemsize // 16, q_chunks=m * d * itemsize // 16,
        kv_chunks=bn * d * itemsize // 16, kv_elems=bn * t["kpad"], stage_elems=2 * bn * t["kpad"],
        off_kv=t["off_kv"], off_p=t["off_p"], qk_unroll=2, kv_chunks8=bn * d // 16,
    )
    name = _name(f"prefill_attn{'_fp8kv' if s.kv_fp8 else ''}_d{d}_{s.heads}x{s.kv_heads}_p{s.page_size}", s)
    meta = dict(threads=params["threads"], smem=t["smem"], bm_tok=m // gc, chunks=group // gc, bn=bn, mma=False,
                variant="simt")
    return _emit("prefill_attn.cu.j2", name, s, params, [name], meta)


ACT_ROWS_ILP = 4  # "rows": vectors of each input a thread loads before using any (8 x 16 B gated)
ACT_BULK_TILE_BYTES = 8192  # "bulk": at most this much of a row per input and tile (one bulk copy each)
ACT_BULK_STAGES = 4  # "bulk": tiles in shared memory per block (three loading while one computes)


def act_variant(s: ActSpec) -> str:
    """The variant `_act` renders: s.variant where it applies (see ActSpec.variant)."""
    row_bytes = s.features * RUN_DTYPES[s.dtype].itemsize
    if s.variant == "bulk" and row_bytes % 16:
        return "flat"
    if s.variant == "rows_stream" and row_bytes % 16:
        return "rows"
    return s.variant


def _act(s: ActSpec) -> KernelSource:
    itemsize = RUN_DTYPES[s.dtype].itemsize
    vec = _vec(itemsize, s.features)
    vpr = s.features // vec
    variant = act_variant(s)
    threads = 256
    meta = dict(threads=threads, vec=vec, unroll=s.unroll, variant=variant)
    if s.fp8_out and vec % 2:
        raise KernelSpecError(f"{s.origin or 'act'}: an fp8 output needs an even vector width, "
                              f"{s.features} gives {vec}")
    params = dict(kind=s.kind, gated=s.gated, features=s.features, vec=vec, amax=s.amax, fp8_out=s.fp8_out,
                  vec_per_row=vpr, threads=threads, unroll=s.unroll, variant=variant,
                  stream=variant == "rows_stream",
                  min_blocks=2)  # >= 512 threads per SM, 64 KB of loads in flight (IEEE division wants ~95 regs)
    if variant in ("rows", "rows_stream"):
        # A row splits into `chunks` equal segments of up to 256 threads x ilp vectors; threads are cut to
        # what a segment needs (F = 14336 bf16: 2 segments of 224 threads x 4 vectors, none idle). The grid
        # is every segment of every row at once (T x chunks blocks), no loop.
        ilp = min(ACT_ROWS_ILP, math.ceil(vpr / 256))  # short rows: more threads, fewer vectors each
        chunks = math.ceil(vpr / (256 * ilp))
        threads = _round_up(math.ceil(vpr / (chunks * ilp)), 32)
        seg = threads * ilp
        stream = variant == "rows_stream"
        params.update(threads=threads, ilp=ilp, chunks=chunks, seg=seg, tail=chunks * seg != vpr,
                      load="load_stream" if stream else f"load_vec<{vec}>",
                      store="store_stream" if stream else f"store_vec<{vec}>")
        meta.update(threads=threads, chunks=chunks)
    elif variant == "bulk":
        # Tiles: the row cut into `chunks` near-equal runs of whole 16-byte chunks, each <= ACT_BULK_TILE_BYTES.
        chunks = math.ceil(s.features * itemsize / ACT_BULK_TILE_BYTES)
        tile = _round_up(math.ceil(s.features / chunks), vec)
        chunks = math.ceil(s.features / tile)
        inputs = 2 if s.gated else 1
        stage_elems = inputs * tile
        bar_offset = ACT_BULK_STAGES * stage_elems * itemsize
        smem = bar_offset + 8 * ACT_BULK_STAGES
        params.update(chunks=chunks, tile=tile, last=s.features - (chunks - 1) * tile, stages=ACT_BULK_STAGES,
                      stage_elems=stage_elems, bar_offset=bar_offset)
        meta.update(chunks=chunks, smem=smem)
    name = _name(f"{'gated_' if s.gated else ''}{s.kind}_f{s.features}{'_amax' if s.amax else ''}"
                 f"{'_fp8' if s.fp8_out else ''}", s)
    return _emit("act.cu.j2", name, s, params, [name], meta)


def _embed(s: EmbedSpec) -> KernelSource:
    vec = _vec(RUN_DTYPES[s.dtype].itemsize, s.hidden)
    threads = min(256, _round_up(s.hidden // vec, 32))
    params = dict(vocab=s.vocab, hidden=s.hidden, vec=vec, threads=threads, step=threads * vec, offset=s.offset)
    name = _name(f"embed_v{s.vocab}_h{s.hidden}" + (f"_o{s.offset}" if s.offset else ""), s)
    return _emit("embed.cu.j2", name, s, params, [name], dict(threads=threads, vec=vec))


def _map(s: MapSpec) -> KernelSource:
    vec = 16 // RUN_DTYPES[s.dtype].itemsize
    params = dict(body=s.body, vec=vec, threads=256, **{n: f32(v) for n, v in s.consts})
    name = _name(s.body.removesuffix(".cu.j2"), s)
    return _emit("map.cu.j2", name, s, params, [name], dict(threads=256, vec=vec))


def _moe_route(s: MoeRouteSpec) -> KernelSource:
    vec = _vec(RUN_DTYPES[s.dtype].itemsize, s.hidden)
    threads = min(256, _round_up(math.ceil(s.hidden / vec), 32))
    params = dict(experts=s.experts, top_k=s.top_k, hidden=s.hidden, block_m=s.block_m,
                  block_m_minus_1=s.block_m - 1, vec=vec, align_threads=1024, combine_threads=threads,
                  combine_step=threads * vec)
    name = _name(f"moe_route_e{s.experts}_k{s.top_k}_h{s.hidden}", s)
    meta = dict(align_threads=1024, combine_threads=threads, vec=vec)
    return _emit("moe_route.cu.j2", name, s, params, [name + "_align", name + "_combine"], meta)


def _moe_gemm(s: MoeGemmSpec) -> KernelSource:
    """bf16 / fp16: tensor-core tiles (mma.sync), 64 x 128 x 32, 4 warps of 32 x 64, a 3-stage cp.async
    pipeline when K is whole 16-byte chunks. fp32: FMA tiles of 64 x 64 x 16 (full fp32 precision)."""
    itemsize = RUN_DTYPES[s.dtype].itemsize
    bm = s.block_m
    common = dict(experts=s.experts, n=s.n, k=s.k, nk=s.n * s.k, gather=s.gather, has_bias=s.has_bias, bm=bm)
    if s.dtype == "fp32":
        bn, bk, tm, tn = 64, 16, 4, 4
        threads = (bm // tm) * (bn // tn)
        params = dict(common, mma=False, async_copy=False, bn=bn, bk=bk, tm=tm, tn=tn, threads=threads,
                      tx_n=bn // tn, ty_n=bm // tm, a_elems=bm * bk, b_elems=bn * bk, bm_pad=bm + 1, bn_pad=bn + 1)
        meta = dict(threads=threads, smem=0, bm=bm, bn=bn, mma=False, async_copy=False)
    else:
        bn, bk, stages, threads, warps_n = 128, 32, 3, 128, 2
        warps_m = threads // 32 // warps_n
        wm, wn = bm // warps_m, bn // warps_n
        bkp = bk + 8  # a 16-byte pad per row: ldmatrix's 8 rows fall on 8 different bank groups
        cpr = bk // 8  # 16-byte chunks per tile row
        rows_per_pass = threads // cpr
        async_copy = s.k * itemsize % 16 == 0
        params = dict(common, mma=True, async_copy=async_copy, mma_type="bf16" if s.dtype == "bf16" else "f16",
                      bn=bn, bk=bk, stages=stages, ahead=stages - 1, wait_n=stages - 2, threads=threads,
                      warps_n=warps_n, wm=wm, wn=wn, mt=wm // 16, nt=wn // 8, bkp=bkp, cpr=cpr,
                      rows_per_pass=rows_per_pass, pass_stride=rows_per_pass * bkp, a_iters=bm // rows_per_pass,
                      b_iters=bn // rows_per_pass, sa_stage=bm * bkp, sb_stage=bn * bkp, sb_offset=stages * bm * bkp,
                      a_elems=bm * bk, b_elems=bn * bk, k_tiles=math.ceil(s.k / bk))
        smem = stages * (bm + bn) * bkp * itemsize
        meta = dict(threads=threads, smem=smem, bm=bm, bn=bn, mma=True, async_copy=async_copy)
    name = _name(f"moe_gemm_e{s.experts}_n{s.n}_k{s.k}{'_gather' if s.gather else ''}", s)
    return _emit("moe_gemm.cu.j2", name, s, params, [name], meta)


_RENDERERS = {
    NormSpec: _norm, RopeCacheSpec: _rope, DecodeAttnSpec: _decode, PrefillAttnSpec: _prefill,
    ActSpec: _act, EmbedSpec: _embed, MapSpec: _map, MoeRouteSpec: _moe_route, MoeGemmSpec: _moe_gemm,
}


@lru_cache(maxsize=None)
def render(spec) -> KernelSource:
    fn = _RENDERERS.get(type(spec))
    if fn is None:
        raise KernelSpecError(f"no kernel template for {type(spec).__name__}")
    return fn(spec)
