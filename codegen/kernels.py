"""Typed wrappers around the generated kernels: check arguments, then launch.

Every wrapper takes the kernel's spec first, then torch CUDA tensors; outputs are passed in
(nothing is allocated on a launch path, so a decode step can be captured in a CUDA graph).
Index tensors: token ids and positions int64; slot mappings, block tables, sequence lengths
and cu_seqlens int32. Paged cache: [num_pages, kv_heads, page_size, head_dim], run dtype.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from dataclasses import dataclass

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from . import ssm_kernels as SK
from . import ssm_stack as SST
from .launch import LoadedKernel, get_kernel, i32, i64, ptr
from .render import KernelSource, render  # noqa: F401  (re-exported)
from .specs import (  # noqa: F401  (re-exported)
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


def _torch_dtype(spec) -> torch.dtype:
    return RUN_DTYPES[spec.dtype].torch


class KernelArgError(ValueError):
    """A tensor handed to a kernel wrapper has the wrong shape, dtype, device or layout."""


def _check(name, t, dtype=None, shape=None, device=None, rows_aligned=False, contiguous=True, aligned=True,
           align=16):
    if not isinstance(t, torch.Tensor):
        raise KernelArgError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise KernelArgError(f"{name}: must be on a CUDA device, is on {t.device}")
    if device is not None and t.device != device:
        raise KernelArgError(f"{name}: on {t.device}, other arguments on {device}")
    if dtype is not None and t.dtype != dtype:
        raise KernelArgError(f"{name}: dtype {t.dtype}, expected {dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise KernelArgError(f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}")
    if contiguous and not t.is_contiguous():
        raise KernelArgError(f"{name}: must be contiguous")
    if rows_aligned:  # a [rows, cols] view read with `align`-byte vectors
        if t.dim() != 2 or t.stride(1) != 1:
            raise KernelArgError(f"{name}: must be a 2-D tensor with unit column stride")
        if t.data_ptr() % align or (t.stride(0) * t.element_size()) % align:
            raise KernelArgError(f"{name}: rows must start on {align}-byte boundaries")
    elif aligned and t.data_ptr() % align:
        raise KernelArgError(f"{name}: data must be {align}-byte aligned")
    return t


def _rows(name, t, dtype, cols, device, align=16):
    _check(name, t, dtype, device=device, rows_aligned=True, contiguous=False, align=align)
    if t.shape[1] != cols:
        raise KernelArgError(f"{name}: {t.shape[1]} columns, expected {cols}")
    return t


def _kernel(spec, device) -> LoadedKernel:
    return get_kernel(spec, device)


def norm(spec: NormSpec, x, weight, out, residual=None, residual_out=None, bias=None, gate=None, pdl: bool = False,
         amax=None, valid_rows=None, out_scale=None):
    """out = norm(x [+ residual]) * (weight + offset) [+ bias]; residual_out = x + residual.
    Gated (spec.gate): out = norm(x * gate_act(gate)) * (weight + offset) [+ bias]. pdl: a programmatic
    dependent launch (LoadedKernel.launch_dependent). The norm, activation and rotary + KV write kernels
    wait for the kernel before at their entry, before any read or write (tests/test_pdl_order.py checks
    their machine code), so only their scheduling overlaps its drain; the tensor-core decode attention
    copies its first cached K/V tiles before its wait (render.EARLY_KV).

    x, residual, out, residual_out: [T, hidden]; residual_out may be residual (in place); gate
    [T, hidden], row-strided views work. With spec.group, each run of group features is normalised
    on its own; weight and bias [group], or [hidden / group, group] (spec.per_group_weight).
    spec.amax: also each row's max |out| into amax (fp32 [T]; 0 for rows at or past valid_rows, int32 [1] on
    the device, where given): the partials `quant_kernels.act_quant_fp8_folded` takes.
    spec.fp8_out: out is float8_e4m3fn [T, hidden], the values / out_scale (fp32, one element, on the device).
    """
    dt, h = _torch_dtype(spec), spec.hidden
    _check("x", x, dt)
    dev, T = x.device, x.shape[0]
    _check("x", x, dt, (T, h))
    wshape = (h // spec.width, spec.width) if spec.per_group_weight else (spec.width,)
    _check("weight", weight, dt, wshape, dev)
    _check("out", out, torch.float8_e4m3fn if spec.fp8_out else dt, (T, h), dev)
    args = [ptr(x)]
    if spec.has_residual:
        if residual is None or residual_out is None:
            raise KernelArgError("residual, residual_out: required by a fused residual norm")
        _check("residual", residual, dt, (T, h), dev)
        _check("residual_out", residual_out, dt, (T, h), dev)
        args += [ptr(residual), ptr(residual_out)]
    k = _kernel(spec, dev)
    if spec.gate:
        if gate is None:
            raise KernelArgError(f"gate: required by a norm gated by {spec.gate}")
        _check("gate", gate, dt, device=dev, contiguous=False, aligned=False)
        if gate.dim() != 2 or gate.shape[0] != T or gate.shape[1] != h or gate.stride(1) != 1:
            raise KernelArgError(f"gate: must be [{T}, {h}] with unit column stride, got shape "
                                 f"{tuple(gate.shape)} stride {tuple(gate.stride())}")
        # Rows not on the kernel's access width (a slice of an unaligned fused row): read elementwise.
        align = k.source.meta["vec"] * gate.element_size()
        gate_vec = int(gate.data_ptr() % align == 0 and (gate.stride(0) * gate.element_size()) % align == 0)
        args.append(ptr(gate))
    args.append(ptr(weight))
    if spec.has_bias:
        if bias is None:
            raise KernelArgError("bias: required by this layer norm")
        args.append(ptr(_check("bias", bias, dt, wshape, dev)))
    args.append(ptr(out))
    args += _out_scale_args(spec, out_scale, dev)
    args += _amax_args(spec, amax, valid_rows, T, dev)
    if spec.gate:
        args += [i64(gate.stride(0)), i32(gate_vec)]
    args.append(i32(T))
    k.launcher(pdl)(k.source.entries[0], (T * k.source.meta["groups"],), (k.source.meta["threads"],), args)


def amax_parts(spec: NormSpec | ActSpec, T: int) -> int:
    """How many partial maxima a launch of `spec` (NormSpec / ActSpec with amax) over T rows writes: one a row
    (norm), one a block (activation: T x the row's segments)."""
    if isinstance(spec, NormSpec):
        return T
    return T * render(spec).meta["chunks"]


def _out_scale_args(spec, out_scale, dev) -> list:
    """The out_scale kernel argument of a norm or activation spec with `fp8_out` (none without)."""
    if not spec.fp8_out:
        if out_scale is not None:
            raise KernelArgError("out_scale: this kernel's spec has no fp8 output (spec.fp8_out)")
        return []
    if out_scale is None:
        raise KernelArgError("out_scale: required by a spec with an fp8 output")
    _check("out_scale", out_scale, torch.float32, device=dev, aligned=False)
    if out_scale.numel() != 1:
        raise KernelArgError(f"out_scale: one value (a per-tensor scale), got shape {tuple(out_scale.shape)}")
    return [ptr(out_scale)]


def _amax_args(spec, amax, valid_rows, T: int, dev) -> list:
    """The amax / valid_rows kernel arguments of a norm or activation spec with `amax` (none without)."""
    if not spec.amax:
        if amax is not None:
            raise KernelArgError("amax: this kernel's spec has no amax output (spec.amax)")
        return []
    if amax is None:
        raise KernelArgError("amax: required by a spec with amax")
    _check("amax", amax, torch.float32, (amax_parts(spec, T),), dev, aligned=False)
    if valid_rows is not None:
        _check("valid_rows", valid_rows, torch.int32, (1,), dev, aligned=False)
    return [ptr(amax), ptr(valid_rows)]


def slot_mapping(block_tables, seq_ids, positions, page_size: int):
    """[T] int32 cache slots (page * page_size + offset) of tokens at `positions` of `seq_ids`."""
    pages = block_tables[seq_ids.long(), (positions // page_size).long()]
    return (pages * page_size + positions % page_size).to(torch.int32)


def _sm_of(device) -> int:
    """The device's compute capability, major * 10 + minor (cached per device)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    sm = _SM.get(index)
    if sm is None:
        major, minor = torch.cuda.get_device_capability(index)
        sm = _SM[index] = major * 10 + minor
    return sm


def rope_write_kv(spec: RopeCacheSpec, q, k, v, positions, slot_mapping, k_cache, v_cache, seq_len=None,
                  k_scale: float = 1.0, v_scale: float = 1.0, pdl: bool = False, rotated=None):
    """Rotate q in place; rotate k and write it, and v, into the paged cache (spec.kv_fp8: float8_e4m3fn
    pages holding K / k_scale and V / v_scale, rounded to nearest even and clamped to +-448).

    q [T, heads*head_dim], k and v [T, kv_heads*head_dim] (row-strided views of a fused QKV
    output work); positions [T] int64; slot_mapping [T] int32 (negative: skip the token);
    seq_len [1] int32, the step's max position + 1, only for dynamic scaling. pdl: as norm's.
    spec.kv_rotated (fp8-rotated, runtime/kv_store.py): q, k and v also turned by each head's Hadamard matrix, k
    less its sequence's shift; rotated = (shift [pages, kv_heads, head_dim] run dtype, k_mean [kv_heads, head_dim]
    fp32, cu_seqlens [n + 1] int32, block_tables [n, width] int32), the KV store's and the step's metadata.
    """
    dt, d = _torch_dtype(spec), spec.head_dim
    dev = q.device
    _rows("q", q, dt, spec.heads * d, dev)
    T = q.shape[0]
    _rows("k", k, dt, spec.kv_heads * d, dev)
    _rows("v", v, dt, spec.kv_heads * d, dev)
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != T:
            raise KernelArgError(f"{name}: {t.shape[0]} rows, q has {T}")
    _check("positions", positions, torch.int64, (T,), dev, aligned=False)
    _check("slot_mapping", slot_mapping, torch.int32, (T,), dev, aligned=False)
    _check_cache(spec, k_cache, v_cache, dt, dev)
    args = [ptr(q), ptr(k), ptr(v), ptr(positions), ptr(slot_mapping), ptr(k_cache), ptr(v_cache)]
    if spec.kv_rotated:
        args += _rotated_args(spec, rotated, k_cache, dt, dev)
    if spec.variant == "bulk" and _sm_of(dev) < 90:  # bulk copies are Hopper's: the default kernel before it
        spec = dataclasses.replace(spec, variant="token")
    kern = _kernel(spec, dev)
    if kern.source.meta["dynamic"]:
        if seq_len is None:
            raise KernelArgError("seq_len: dynamic rotary scaling needs the step's length ([1] int32)")
        args.append(ptr(_check("seq_len", seq_len, torch.int32, (1,), dev, aligned=False)))
    args += _scales(spec, k_scale, v_scale)
    args += [i64(q.stride(0)), i64(k.stride(0)), i64(v.stride(0)), i32(T)]
    meta = kern.source.meta
    if meta["variant"] == "bulk":  # persistent: the blocks the GPU holds at once, at most a token each
        resident = kern.num_sms * kern.blocks_per_sm(kern.source.entries[0], meta["threads"], meta["smem"])
        kern.launcher(pdl)(kern.source.entries[0], (max(1, min(T, resident)),), (meta["threads"],), args,
                       meta["smem"])
        return
    grid = (T, meta["grid_y"]) if meta["variant"] == "rotated" else (T,)  # rotated: a warp per head row
    kern.launcher(pdl)(kern.source.entries[0], grid, (meta["threads"],), args)


def _rotated_args(spec: RopeCacheSpec, rotated, k_cache, dt, dev) -> list:
    """fp8-rotated's arguments: the shifts, the key mean and the step's sequences (rope_write_kv)."""
    if rotated is None or len(rotated) != 4:
        raise KernelArgError("rotated: an fp8-rotated cache needs (shift, k_mean, cu_seqlens, block_tables)")
    shift, k_mean, cu_seqlens, block_tables = rotated
    d = spec.head_dim
    _check("shift", shift, dt, (k_cache.shape[0], spec.kv_heads, d), dev)
    _check("k_mean", k_mean, torch.float32, (spec.kv_heads, d), dev)
    _check("block_tables", block_tables, torch.int32, device=dev)
    if block_tables.dim() != 2 or block_tables.shape[0] < 1:
        raise KernelArgError(f"block_tables: shape {tuple(block_tables.shape)}, expected [sequences >= 1, width]")
    n = block_tables.shape[0]
    _check("cu_seqlens", cu_seqlens, torch.int32, (n + 1,), dev, aligned=False)
    return [ptr(shift), ptr(k_mean), ptr(cu_seqlens), ptr(block_tables), i32(n), i32(block_tables.stride(0))]


def unrotate_heads(spec: RopeCacheSpec, out, pdl: bool = False):
    """fp8-rotated (spec.kv_rotated): an attention's output [T, heads * head_dim] over a rotated cache comes out
    turned by each head's Hadamard matrix; turn each head back in place (H H = I)."""
    if not spec.kv_rotated:
        raise KernelArgError("unrotate_heads: the spec's cache is not fp8-rotated")
    dt = _torch_dtype(spec)
    _rows("out", out, dt, spec.heads * spec.head_dim, out.device)
    kern = _kernel(spec, out.device)
    meta = kern.source.meta
    kern.launcher(pdl)(kern.source.entries[1], (out.shape[0], meta["unrotate_grid_y"]), (meta["threads"],),
                       [ptr(out), i64(out.stride(0)), i32(out.shape[0])])


def _scales(spec, k_scale, v_scale) -> list:
    """The fp8 cache's scale arguments (none for a run-dtype cache)."""
    if not spec.kv_fp8:
        return []
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            raise KernelArgError(f"{name}: the fp8 cache's scale must be a finite float > 0, got {x!r}")
    return [(float(k_scale), ctypes.c_float), (float(v_scale), ctypes.c_float)]


def _check_cache(spec, k_cache, v_cache, dt, dev):
    if spec.kv_fp8:
        dt = torch.float8_e4m3fn
    _check("k_cache", k_cache, dt, device=dev)
    shape = (k_cache.shape[0], spec.kv_heads, spec.page_size, spec.head_dim)
    _check("k_cache", k_cache, dt, shape, dev)
    _check("v_cache", v_cache, dt, shape, dev)


@dataclass
class DecodeScratch:
    """Split-K partials for paged decode attention, allocated once up front."""

    partial_out: torch.Tensor  # [max_seqs, heads, max_splits, head_dim] float32
    partial_ml: torch.Tensor  # [max_seqs, heads, max_splits, 2] float32
    max_splits: int
    # [max_seqs, kv_heads * head chunks] int32: split blocks with tokens done per (seq, chunk); the
    # kernel's last such block merges and resets it, so it is zero between launches
    counters: torch.Tensor


def decode_scratch(spec: DecodeAttnSpec, max_seqs: int, max_context: int, device, min_partition=128):
    max_splits = max(1, math.ceil(max_context / min_partition))
    shape = (max_seqs, spec.heads, max_splits)
    return DecodeScratch(
        torch.empty(*shape, spec.head_dim, dtype=torch.float32, device=device),
        torch.empty(*shape, 2, dtype=torch.float32, device=device),
        max_splits,
        torch.zeros(max_seqs, spec.kv_heads * render(spec).meta["chunks"], dtype=torch.int32, device=device),
    )


DECODE_BLOCK_OVERHEAD = 64  # a block's fixed cost (launch, first loads, merge), in tokens of work


def decode_partition(spec: DecodeAttnSpec, num_seqs: int, max_context: int, resident: int, max_splits: int):
    """Tokens per split (whole tiles), minimizing the modeled time: waves of `resident` blocks
    (as many as the GPU holds at once), each as long as its partition plus a fixed overhead."""
    meta = render(spec).meta
    tile = meta["tile"]
    base = max(1, num_seqs * spec.kv_heads * meta["chunks"])
    tiles = max(1, math.ceil(max_context / tile))
    best = None
    for want in range(1, min(tiles, max_splits) + 1):
        part = math.ceil(tiles / want) * tile
        splits = math.ceil(max_context / part)
        cost = math.ceil(base * splits / resident) * (part + DECODE_BLOCK_OVERHEAD)
        if best is None or cost < best[0]:
            best = (cost, part)
    return best[1]


def paged_decode_attention(
    spec: DecodeAttnSpec, q, k_cache, v_cache, block_tables, context_lens, out, scratch: DecodeScratch,
    max_context: int, partition: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0, pdl: bool = False,
):
    """One new token per sequence: out[b] = attention(q[b], its cached K/V).

    q, out [B, heads*head_dim]; block_tables [B, max_pages] int32; context_lens [B] int32
    (the new token's K/V already in the cache); max_context: a host bound on context_lens
    (a fixed capacity when capturing a graph); partition: tokens per split (default: modeled); pdl: as
    norm's.
    """
    dt, d = _torch_dtype(spec), spec.head_dim
    dev = q.device
    _rows("q", q, dt, spec.heads * d, dev)
    B = q.shape[0]
    _rows("out", out, dt, spec.heads * d, dev)
    _check_cache(spec, k_cache, v_cache, dt, dev)
    _check("block_tables", block_tables, torch.int32, device=dev, aligned=False)
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise KernelArgError(f"block_tables: shape {tuple(block_tables.shape)}, expected [{B}, max_pages]")
    if block_tables.shape[1] * spec.page_size < max_context:
        raise KernelArgError(f"block_tables: {block_tables.shape[1]} pages cannot hold max_context={max_context}")
    _check("context_lens", context_lens, torch.int32, (B,), dev, aligned=False)
    if out.shape[0] != B or scratch.partial_out.shape[0] < B or scratch.partial_out.shape[1] != spec.heads:
        raise KernelArgError("out / scratch: sized for a different batch or head count")
    kern = _kernel(spec, dev)
    meta = kern.source.meta
    if tuple(scratch.counters.shape[1:]) != (spec.kv_heads * meta["chunks"],) or scratch.counters.shape[0] < B:
        raise KernelArgError("scratch.counters: sized for a different batch or spec (use decode_scratch(spec, ...))")
    n_hc = spec.kv_heads * meta["chunks"]
    # render.DECODE_DYN_PART: the splits a (sequence, head chunk) should fill where the launch picks the
    # partition; 0 where the caller gives one (the kernel takes it as it is)
    dyn = [i32(kern.num_sms // (B * n_hc) if partition is None else 0)] if meta.get("dyn_part") else []
    if partition is None:
        resident = kern.num_sms * kern.blocks_per_sm(kern.source.entries[0], meta["threads"], meta["smem"])
        partition = decode_partition(spec, B, max_context, resident, scratch.max_splits)
    elif partition % meta["tile"] or math.ceil(max_context / partition) > scratch.max_splits:
        raise KernelArgError(f"partition: {partition} must be a multiple of {meta['tile']} giving at most "
                             f"{scratch.max_splits} splits of max_context={max_context}")
    splits = math.ceil(max_context / partition)
    # One launch, its grid sized from max_context: on the device, the blocks of splits without tokens of
    # a sequence leave at once, the last split block with tokens of each (seq, head chunk) merges the
    # splits into out, and the only one, where a sequence's tokens lie in one split, writes out itself.
    kern.launcher(pdl)(
        kern.source.entries[0], (n_hc, B, splits) if meta["splits_last"] else (splits, n_hc, B), (meta["threads"],),
        [ptr(q), ptr(k_cache), ptr(v_cache), ptr(block_tables), ptr(context_lens),
         ptr(scratch.partial_out), ptr(scratch.partial_ml), ptr(scratch.counters), ptr(out),
         i64(q.stride(0)), i64(out.stride(0)), i32(block_tables.shape[1]), i32(partition),
         i32(scratch.max_splits), *_scales(spec, k_scale, v_scale), *dyn],
        smem=meta["smem"],
    )


_SM: dict = {}


def prefill_for_device(spec: PrefillAttnSpec, device) -> PrefillAttnSpec:
    """The spec retargeted to the device's compute capability (spec.sm), which picks the kernel
    variant: on a Hopper GPU the wgmma kernel where it applies (render.prefill_variant)."""
    sm = _sm_of(device)
    return spec if spec.sm == sm else dataclasses.replace(spec, sm=sm)


PREFILL_SPLIT_FILL = 0.5  # split the KV of a prefill grid holding fewer blocks than this share of the SMs


# Split-KV prefill: a grid too small for the GPU (a short query after a long cached prefix) splits
# its KV. On the H200, 32 queries after 2,032 cached tokens (8B-model heads): 45.1 us unsplit, 27.5 /
# 16.9 / 12.6 us at 2 / 4 / 8 splits; after 16,000: 313 us unsplit, 52 us at 8 (torch SDPA: 187).
# Capped at 8, the count measured best; a split of a short context may be empty (~3 us more at 64 keys).
# Off (the launch keeps prefill grids whole unless a caller forces splits) since session 24: on an H100 the bf16
# split form was 0.46 off for 128 queries after 129 cached tokens at 8B-model heads (32 / 8 of 128; 3 splits;
# deterministic, the sequence alone too; tests/gpu/test_kernels.py::test_prefill_hopper_split_kv_many_q_tiles),
# where the plain kernel matched. Cause found on the CPU: a split past a row's position masks all its keys, and the
# online softmax's rescale factor, contracted by ptxas into an fma, came out inf there, so the merge wrote those
# rows as zeros (templates/prefill_attn_sm90.cu.j2, tests/test_softmax_rescale_sass.py; a float model of it gives
# 0.4565 at head dim 128, 0 at 64, as measured). Fixed in the template; on again since session 26, when the split
# tests passed with the fix on an H100 (bf16 and fp8 pages, forced 3-way splits against the reference and the
# whole grid: 284 prefill / prefix / split tests) and `kiln bench prefix` (8B shape, a cached 2,000-token system
# prompt) went 9.37 / 9.32 -> 8.99 / 8.13 ms TTFT, alternating.
PREFILL_AUTO_SPLIT = True
PREFILL_MAX_SPLITS = 8  # each split re-loads its Q tile and writes an fp32 partial: a cost per split


def prefill_splits(meta: dict, grid_blocks: int, kv_bound: int, num_sms: int) -> int:
    """KV splits for a prefill grid of `grid_blocks` (q tiles x head chunks x sequences) whose
    contexts hold at most kv_bound tokens: 1 (the plain kernel) where the kernel has no split form
    or the grid already fills the GPU; else enough splits to bring the grid near one block per SM,
    never more than the bound's KV tiles (a split of a shorter context may be empty: neutral)."""
    if not meta.get("split_kv") or grid_blocks >= PREFILL_SPLIT_FILL * num_sms:
        return 1
    tiles = max(1, math.ceil(kv_bound / meta["bn"]))
    return max(1, min(tiles, num_sms // max(1, grid_blocks), PREFILL_MAX_SPLITS))


def prefill_attention(
    spec: PrefillAttnSpec, q, k_cache, v_cache, block_tables, cu_seqlens, kv_lens, out, max_q_len: int,
    k_scale: float = 1.0, v_scale: float = 1.0, max_context: int | None = None, splits: int | None = None,
    linear: bool = False,
):
    """Packed variable-length prefill: the queries of sequence s are rows cu_seqlens[s]:cu_seqlens[s+1]
    of q and out ([T, heads*head_dim]); query i of s sits at position kv_lens[s] - q_len_s + i, and
    the K/V of all kv_lens[s] tokens are in the cache. max_q_len: a host bound on the q lengths;
    max_context: one on kv_lens (default: what the block tables hold), which sizes the KV splits;
    splits: force a split count (1: the plain kernel; default: prefill_splits). linear: the Hopper kernel
    unsplit on a grid of the q tiles that have queries, T / tile + S of them at most, not max_q_len's tiles
    for each sequence (a CUDA graph's bucket, whose max_q_len is its token count; the template says more);
    other kernels ignore it."""
    dt, d = _torch_dtype(spec), spec.head_dim
    dev = q.device
    _rows("q", q, dt, spec.heads * d, dev)
    _rows("out", out, dt, spec.heads * d, dev)
    if out.shape[0] != q.shape[0]:
        raise KernelArgError(f"out: {out.shape[0]} rows, q has {q.shape[0]}")
    _check_cache(spec, k_cache, v_cache, dt, dev)
    _check("block_tables", block_tables, torch.int32, device=dev, aligned=False)
    S = block_tables.shape[0]
    _check("cu_seqlens", cu_seqlens, torch.int32, (S + 1,), dev, aligned=False)
    _check("kv_lens", kv_lens, torch.int32, (S,), dev, aligned=False)
    kern = _kernel(prefill_for_device(spec, dev), dev)
    meta = kern.source.meta
    grid = (math.ceil(max_q_len / meta["bm_tok"]), spec.kv_heads * meta["chunks"], S)
    if splits is None:
        bound = max_context if max_context is not None else block_tables.shape[1] * spec.page_size
        splits = prefill_splits(meta, grid[0] * grid[1] * grid[2], bound, kern.num_sms) if PREFILL_AUTO_SPLIT else 1
    elif not isinstance(splits, int) or isinstance(splits, bool) or splits < 1:
        raise KernelArgError(f"splits: must be an int >= 1, got {splits!r}")
    elif splits > 1 and not meta.get("split_kv"):
        raise KernelArgError(f"splits: {splits} needs the Hopper (sm90) prefill kernel; "
                             f"{kern.source.name} has no split-KV form")
    if splits == 1 or 0 in grid:
        linear_seqs = []  # the sm90 kernel's linear_seqs argument: 0 for its 3-D grid
        if meta["variant"] == "sm90" and not meta.get("ws"):  # (the warp-specialised form has neither)
            if linear and 0 not in grid:
                grid = (math.ceil(q.shape[0] / meta["bm_tok"]) + S, grid[1], 1)
            linear_seqs = [i32(S if linear else 0)]
        kern.launch(
            kern.source.entries[0], grid, (meta["threads"],),
            [ptr(q), ptr(k_cache), ptr(v_cache), ptr(block_tables), ptr(cu_seqlens), ptr(kv_lens),
             ptr(out), i64(q.stride(0)), i64(out.stride(0)), i32(block_tables.shape[1]), *linear_seqs,
             *_scales(spec, k_scale, v_scale)],
            smem=meta["smem"],
        )
        return
    # Split-KV: partials of every (seq, head chunk, q tile, split) block, then a merge into out. The
    # scratch comes from torch's caching allocator (a CUDA graph capture draws it from its own pool).
    rows, blocks = meta["part_rows"], grid[0] * grid[1] * grid[2] * splits
    scratch = torch.empty(blocks * rows * (d + 2), dtype=torch.float32, device=dev)
    part_o, part_ml = scratch[: blocks * rows * d], scratch[blocks * rows * d:]
    kern.launch(
        kern.source.entries[1], (grid[0] * splits, grid[1], grid[2]), (meta["threads"],),
        [ptr(q), ptr(k_cache), ptr(v_cache), ptr(block_tables), ptr(cu_seqlens), ptr(kv_lens),
         ptr(part_o), ptr(part_ml), i64(q.stride(0)), i32(block_tables.shape[1]), i32(splits),
         *_scales(spec, k_scale, v_scale)],
        smem=meta["smem"],
    )
    kern.launch(
        kern.source.entries[2], (grid[0] * meta["merge_groups"], grid[1], grid[2]), (meta["merge_threads"],),
        [ptr(part_o), ptr(part_ml), ptr(cu_seqlens), ptr(out), i64(out.stride(0)), i32(splits)],
    )


def activation(spec: ActSpec, out, x=None, gate=None, up=None, pdl: bool = False, amax=None, valid_rows=None,
               out_scale=None):
    """Plain: out = act(x). Gated: out = act(gate) * up, from x = [gate | up] ([T, 2F]) or from
    two [T, F] tensors. out [T, F] contiguous. pdl: as norm's. spec.amax: also each block's max |out| into
    amax (fp32 [amax_parts(spec, T)]), as norm's. spec.fp8_out: out is float8_e4m3fn, as norm's."""
    dt, F = _torch_dtype(spec), spec.features
    ref = x if x is not None else gate
    if ref is None:
        raise KernelArgError("x or gate: an input is required")
    dev = ref.device
    if spec.variant == "bulk" and _sm_of(dev) < 90:  # bulk copies are Hopper's: the default kernel before it
        spec = dataclasses.replace(spec, variant="flat")
    kern = _kernel(spec, dev)
    meta = kern.source.meta
    align = meta["vec"] * ref.element_size()  # the kernel's access width
    odt, oalign = (torch.float8_e4m3fn, meta["vec"]) if spec.fp8_out else (dt, align)
    _check("out", out, odt, device=dev, align=oalign)
    T = out.shape[0]
    _check("out", out, odt, (T, F), dev, align=oalign)
    if spec.gated:
        if x is not None:
            _rows("x", x, dt, 2 * F, dev, align)
            g_ptr, u_ptr, gs, us = x.data_ptr(), x.data_ptr() + F * x.element_size(), x.stride(0), x.stride(0)
            rows = x.shape[0]
        else:
            if up is None:
                raise KernelArgError("up: required with gate")
            _rows("gate", gate, dt, F, dev, align)
            _rows("up", up, dt, F, dev, align)
            g_ptr, u_ptr, gs, us, rows = gate.data_ptr(), up.data_ptr(), gate.stride(0), up.stride(0), gate.shape[0]
        args = [(g_ptr, ctypes.c_void_p), (u_ptr, ctypes.c_void_p), ptr(out), *_out_scale_args(spec, out_scale, dev),
                *_amax_args(spec, amax, valid_rows, T, dev), i64(gs), i64(us), i32(T)]
    else:
        _rows("x", x, dt, F, dev, align)
        rows = x.shape[0]
        args = [ptr(x), ptr(out), *_out_scale_args(spec, out_scale, dev), *_amax_args(spec, amax, valid_rows, T, dev),
                i64(x.stride(0)), i32(T)]
    if rows != T:
        raise KernelArgError(f"input: {rows} rows, out has {T}")
    variant = meta["variant"]
    run = kern.launcher(pdl)
    if variant in ("rows", "rows_stream"):  # every row segment its own block
        run(kern.source.entries[0], (max(1, T * meta["chunks"]),), (meta["threads"],), args)
        return
    if variant == "bulk":  # persistent: the blocks the GPU holds at once (shared memory decides), at most a tile each
        resident = kern.num_sms * kern.blocks_per_sm(kern.source.entries[0], meta["threads"], meta["smem"])
        blocks = max(1, min(T * meta["chunks"], resident))
        run(kern.source.entries[0], (blocks,), (meta["threads"],), args, meta["smem"])
        return
    needed = math.ceil(T * F // meta["vec"] / meta["threads"])
    if meta["unroll"] > 1:  # one wave: exactly the blocks the GPU holds at once (registers decide)
        resident = kern.num_sms * kern.blocks_per_sm(kern.source.entries[0], meta["threads"])
        blocks = min(math.ceil(needed / meta["unroll"]), resident)
    else:
        blocks = min(needed, kern.num_sms * 8)
    run(kern.source.entries[0], (blocks,), (meta["threads"],), args)


def embed(spec: EmbedSpec, tokens, table, out):
    """out[t] = table[tokens[t]]. tokens: [T] int64."""
    dt, h = _torch_dtype(spec), spec.hidden
    dev = tokens.device
    _check("tokens", tokens, torch.int64, device=dev, aligned=False)
    T = tokens.shape[0]
    _check("table", table, dt, (spec.vocab, h), dev)
    _check("out", out, dt, (T, h), dev)
    kern = _kernel(spec, dev)
    kern.launch(kern.source.entries[0], (T,), (kern.source.meta["threads"],),
                [ptr(tokens), ptr(table), ptr(out), i32(T)])


def map_elementwise(spec: MapSpec, x, out=None):
    """out = f(x) elementwise (f: the spec's body); in place when out is None."""
    dt = _torch_dtype(spec)
    _check("x", x, dt)
    out = x if out is None else _check("out", out, dt, tuple(x.shape), x.device)
    kern = _kernel(spec, x.device)
    n = x.numel()
    blocks = max(1, min(math.ceil(n / kern.source.meta["vec"] / 256), kern.num_sms * 8))
    kern.launch(kern.source.entries[0], (blocks,), (256,), [ptr(x), ptr(out), i64(n)])


# ---- mixture of experts


def moe_max_tiles(rows: int, experts: int, block_m: int) -> int:
    """A bound on the grouped GEMMs' row tiles for `rows` sorted rows over `experts` experts, known
    without the routing: sum_e ceil(c_e / block_m) <= rows // block_m + (experts with a row)."""
    return rows // block_m + min(experts, rows)


def moe_route(spec: MoeRouteSpec, chosen, sorted_token, slot_row, offsets, tile_offsets):
    """Sort the token copies by expert. chosen [T, top_k] int64 (the router's picks); out:
    sorted_token [R] and slot_row [T, top_k] (R = T * top_k), offsets and tile_offsets [experts + 1],
    all int32."""
    dev = chosen.device
    _check("chosen", chosen, torch.int64, device=dev, aligned=False)
    if chosen.dim() != 2 or chosen.shape[1] != spec.top_k:
        raise KernelArgError(f"chosen: shape {tuple(chosen.shape)}, expected [T, {spec.top_k}]")
    T = chosen.shape[0]
    R = T * spec.top_k
    _check("sorted_token", sorted_token, torch.int32, (R,), dev, aligned=False)
    _check("slot_row", slot_row, torch.int32, (T, spec.top_k), dev, aligned=False)
    _check("offsets", offsets, torch.int32, (spec.experts + 1,), dev, aligned=False)
    _check("tile_offsets", tile_offsets, torch.int32, (spec.experts + 1,), dev, aligned=False)
    kern = _kernel(spec, dev)
    kern.launch(kern.source.entries[0], (1,), (kern.source.meta["align_threads"],),
                [ptr(chosen), ptr(sorted_token), ptr(slot_row), ptr(offsets), ptr(tile_offsets), i32(R)])


def moe_combine(spec: MoeRouteSpec, y, slot_row, weights, out):
    """out[t] = sum_j weights[t, j] * y[slot_row[t, j]]. y [R, hidden] (row-strided), weights
    [T, top_k] float32, out [T, hidden]."""
    dt, h = _torch_dtype(spec), spec.hidden
    dev = y.device
    kern = _kernel(spec, dev)
    meta = kern.source.meta
    _rows("y", y, dt, h, dev, align=meta["vec"] * y.element_size())
    T = out.shape[0]
    _check("out", out, dt, (T, h), dev)
    _check("slot_row", slot_row, torch.int32, (T, spec.top_k), dev, aligned=False)
    _check("weights", weights, torch.float32, (T, spec.top_k), dev, aligned=False)
    if y.shape[0] != T * spec.top_k:
        raise KernelArgError(f"y: {y.shape[0]} rows, expected T * top_k = {T * spec.top_k}")
    kern.launch(kern.source.entries[1], (T,), (meta["combine_threads"],),
                [ptr(y), ptr(slot_row), ptr(weights), ptr(out), i64(y.stride(0))])


def moe_gemm(spec: MoeGemmSpec, a, weight, out, sorted_token, offsets, tile_offsets, bias=None):
    """Grouped GEMM: out[r] = a_r @ weight[e]^T (+ bias[e]) for each sorted row r of each expert e.
    a: [T, k] token rows read through sorted_token (spec.gather), or [R, k] sorted rows; row-strided
    views work. weight [experts, n, k], bias [experts, n]; out [R, n] (row-strided); the routing
    tensors from moe_route (R = sorted_token's length)."""
    dt = _torch_dtype(spec)
    dev = a.device
    kern = _kernel(spec, dev)
    meta = kern.source.meta
    align = 16 if meta["async_copy"] else a.element_size()
    _rows("a", a, dt, spec.k, dev, align=align)
    R = sorted_token.shape[0]
    _check("sorted_token", sorted_token, torch.int32, (R,), dev, aligned=False)
    if not spec.gather and a.shape[0] != R:
        raise KernelArgError(f"a: {a.shape[0]} rows, expected the {R} sorted rows")
    _check("weight", weight, dt, (spec.experts, spec.n, spec.k), dev)
    if spec.has_bias:
        _check("bias", bias, dt, (spec.experts, spec.n), dev, aligned=False)
    _rows("out", out, dt, spec.n, dev, align=out.element_size())
    if out.shape[0] != R:
        raise KernelArgError(f"out: {out.shape[0]} rows, expected {R}")
    _check("offsets", offsets, torch.int32, (spec.experts + 1,), dev, aligned=False)
    _check("tile_offsets", tile_offsets, torch.int32, (spec.experts + 1,), dev, aligned=False)
    grid = (moe_max_tiles(R, spec.experts, meta["bm"]), math.ceil(spec.n / meta["bn"]))
    kern.launch(kern.source.entries[0], grid, (meta["threads"],),
                [ptr(a), ptr(sorted_token), ptr(weight), ptr(bias if spec.has_bias else None), ptr(offsets),
                 ptr(tile_offsets), ptr(out), i64(a.stride(0)), i64(out.stride(0))], smem=meta["smem"])


# ---- state-space ops (specs and rendering: codegen/ssm_kernels.py)


def _ssm_step_meta(slots, cu_seqlens, kv_lens, num_seqs: int, dev):
    """The step's per-sequence tensors (at least num_seqs entries; cu_seqlens num_seqs + 1), all int32."""
    if num_seqs < 1:
        raise KernelArgError(f"num_seqs: must be >= 1, got {num_seqs}")
    for name, t, n in (("slots", slots, num_seqs), ("cu_seqlens", cu_seqlens, num_seqs + 1),
                       ("kv_lens", kv_lens, num_seqs)):
        _check(name, t, torch.int32, device=dev, aligned=False)
        if t.dim() != 1 or t.shape[0] < n:
            raise KernelArgError(f"{name}: shape {tuple(t.shape)}, expected at least [{n}]")
    return [ptr(slots), ptr(cu_seqlens), ptr(kv_lens)]


def ssm_conv(spec: SK.SsmConvSpec, x, weight, bias, state, slots, cu_seqlens, kv_lens, out, num_seqs: int,
             max_len: int):
    """out = act(causal_conv1d(x)) for the rows cu_seqlens[s]:cu_seqlens[s + 1] of each sequence s, its
    history from state[slots[s]] ([num_slots, channels, kernel - 1], run dtype) when it has context;
    the slot then holds its last kernel - 1 inputs. x [T, channels] (row-strided), weight [channels,
    kernel], bias [channels], out [T, channels]; max_len: a host bound on the sequences' lengths."""
    dt, C, K = _torch_dtype(spec), spec.channels, spec.kernel
    dev = x.device
    _rows("x", x, dt, C, dev, align=x.element_size())
    T = x.shape[0]
    _check("weight", weight, dt, (C, K), dev, aligned=False)  # read element by element
    if spec.has_bias:
        _check("bias", bias, dt, (C,), dev, aligned=False)
    _check("state", state, dt, device=dev)
    if state.dim() != 3 or tuple(state.shape[1:]) != (C, K - 1):
        raise KernelArgError(f"state: shape {tuple(state.shape)}, expected [slots, {C}, {K - 1}]")
    _check("out", out, dt, (T, C), dev)
    meta = _ssm_step_meta(slots, cu_seqlens, kv_lens, num_seqs, dev)
    kern = get_kernel(spec, dev)
    grid = (math.ceil(C / SK.CONV_THREADS), num_seqs, max(1, math.ceil(max_len / SK.CONV_TOKENS)))
    kern.launch(kern.source.entries[0], grid, (SK.CONV_THREADS,),
                [ptr(x), i64(x.stride(0)), ptr(weight), ptr(bias if spec.has_bias else None), ptr(state), *meta,
                 ptr(out)])


def ssm_scan(spec: SK.SsmScanSpec, x, dt_in, a_log, b, c, d, dt_bias, state, slots, cu_seqlens, kv_lens, out,
             num_seqs: int):
    """out = selective_scan(x, dt, A_log, B, C, D, dt_bias) over each sequence's rows (as ssm_conv's),
    starting from state[slots[s]] ([num_slots, heads, head_dim, d_state] fp32) when it has context, which
    then holds the state after its last token. x [T, heads * head_dim], dt [T, heads], b and c
    [T, groups * d_state] (all row-strided); a_log [heads] or [heads, d_state]; d, dt_bias [heads];
    out [T, heads * head_dim]."""
    rd, s = _torch_dtype(spec), spec
    dev = x.device
    HP, GN = s.heads * s.head_dim, s.groups * s.d_state
    _rows("x", x, rd, HP, dev, align=x.element_size())
    T = x.shape[0]
    for name, t, cols in (("dt", dt_in, s.heads), ("b", b, GN), ("c", c, GN)):
        _rows(name, t, rd, cols, dev, align=t.element_size())
        if t.shape[0] != T:
            raise KernelArgError(f"{name}: {t.shape[0]} rows, x has {T}")
    _check_scan_args(s, a_log, d, dt_bias, state, rd, dev)
    _check("out", out, rd, (T, HP), dev)
    meta = _ssm_step_meta(slots, cu_seqlens, kv_lens, num_seqs, dev)
    kern = get_kernel(spec, dev)
    km = kern.source.meta
    kern.launch(kern.source.entries[0], (km["blocks"], num_seqs), (km["threads"],),
                [ptr(x), i64(x.stride(0)), ptr(dt_in), i64(dt_in.stride(0)), ptr(a_log), ptr(b), i64(b.stride(0)),
                 ptr(c), i64(c.stride(0)), ptr(d if s.has_d else None), ptr(dt_bias if s.has_dt_bias else None),
                 ptr(state), *meta, ptr(out)])


def _check_scan_args(s, a_log, d, dt_bias, state, rd, dev) -> None:
    """The scan's parameters and state, as ssm_scan and ssm_conv_scan take them."""
    _check("a_log", a_log, rd, (s.heads, s.d_state) if s.a_per_state else (s.heads,), dev, aligned=False)
    if s.has_d:
        _check("d", d, rd, (s.heads,), dev, aligned=False)
    if s.has_dt_bias:
        _check("dt_bias", dt_bias, rd, (s.heads,), dev, aligned=False)
    _check("state", state, torch.float32, device=dev)
    if state.dim() != 4 or tuple(state.shape[1:]) != (s.heads, s.head_dim, s.d_state):
        raise KernelArgError(f"state: shape {tuple(state.shape)}, expected [slots, {s.heads}, {s.head_dim}, "
                             f"{s.d_state}]")


def ssm_conv_scan(spec: SK.SsmConvScanSpec, xbc, conv_w, conv_b, conv_state, dt_in, a_log, d, dt_bias, state, slots,
                  cu_seqlens, kv_lens, counters, out, num_seqs: int, pdl: bool = False):
    """A decode step of out = selective_scan(split(act(causal_conv1d(xbc)))) in one kernel: one new token
    per sequence (a sequence of another length is left alone: run ssm_conv then ssm_scan for such a step);
    conv_state [num_slots, channels, kernel - 1] (run dtype) and state [num_slots, heads, head_dim,
    d_state] (fp32) read and written as ssm_conv's and ssm_scan's. xbc [T, channels], dt [T, heads]
    (row-strided); counters: int32, at least num_seqs * groups entries, all zero (and left so). pdl: a
    programmatic dependent launch of the kernel that writes xbc and dt (its states and weights read before
    its griddepcontrol.wait; norm's `pdl` says the rest)."""
    rd, s = _torch_dtype(spec), spec
    dev = xbc.device
    C, K, HP = s.channels, s.kernel, s.heads * s.head_dim
    _rows("xbc", xbc, rd, C, dev, align=xbc.element_size())
    T = xbc.shape[0]
    _rows("dt", dt_in, rd, s.heads, dev, align=dt_in.element_size())
    if dt_in.shape[0] != T:
        raise KernelArgError(f"dt: {dt_in.shape[0]} rows, xbc has {T}")
    _check("conv_w", conv_w, rd, (C, K), dev, aligned=False)
    if s.has_bias:
        _check("conv_b", conv_b, rd, (C,), dev, aligned=False)
    _check("conv_state", conv_state, rd, device=dev)
    if conv_state.dim() != 3 or tuple(conv_state.shape[1:]) != (C, K - 1):
        raise KernelArgError(f"conv_state: shape {tuple(conv_state.shape)}, expected [slots, {C}, {K - 1}]")
    _check_scan_args(s, a_log, d, dt_bias, state, rd, dev)
    _check("counters", counters, torch.int32, device=dev, aligned=False)
    if counters.dim() != 1 or counters.shape[0] < num_seqs * s.groups:
        raise KernelArgError(f"counters: shape {tuple(counters.shape)}, expected at least [{num_seqs * s.groups}]")
    _check("out", out, rd, (T, HP), dev)
    meta = _ssm_step_meta(slots, cu_seqlens, kv_lens, num_seqs, dev)
    kern = get_kernel(spec, dev)
    km = kern.source.meta
    kern.launcher(pdl)(kern.source.entries[0], (km["blocks"], num_seqs), (km["threads"],),
                [ptr(xbc), i64(xbc.stride(0)), ptr(conv_w), ptr(conv_b if s.has_bias else None), ptr(conv_state),
                 ptr(dt_in), i64(dt_in.stride(0)), ptr(a_log), ptr(d if s.has_d else None),
                 ptr(dt_bias if s.has_dt_bias else None), ptr(state), *meta, ptr(counters), ptr(out)])


def ssm_stack(spec: SST.SsmStackSpec, table, x0, zx, yv, out_last, x_last, bar, slots, kv_lens, clocks=None,
              dump=None):
    """spec.layers Mamba-2 layers at one token in one cooperative launch of a block an SM (templates/ssm_stack.cu.j2):
    table [layers, len(POINTERS)] int64, each layer's weights and state slots (codegen/ssm_stack.py POINTERS); x0
    [1, hidden] layer 0's input; zx [in_rows], yv [heads * head_dim] scratch; out_last and x_last [1, hidden]: the last
    layer's out_proj output and input; bar [1] int32, zero before the first launch (left so); slots and kv_lens [1]
    int32 (the sequence's state slot, its context + 1); clocks: with spec.probe, [SMs, layers, len(PROBE_POINTS)] int64,
    each block's clock at each probe point (codegen/ssm_stack.py); dump: with spec.dump, [layers, spec.dump_row] (run
    dtype), each layer's in_proj output, y and out_proj output."""
    dt, dev, s = _torch_dtype(spec), x0.device, spec
    _check("table", table, torch.int64, (s.layers, len(SST.POINTERS)), dev)
    _check("x0", x0, dt, (1, s.hidden), dev)
    _check("zx", zx, dt, (s.in_rows,), dev)
    _check("yv", yv, dt, (s.d_inner,), dev)
    _check("out_last", out_last, dt, (1, s.hidden), dev)
    _check("x_last", x_last, dt, (1, s.hidden), dev)
    _check("bar", bar, torch.int32, (1,), dev, aligned=False)
    for name, t in (("slots", slots), ("kv_lens", kv_lens)):
        _check(name, t, torch.int32, device=dev, aligned=False)
        if t.dim() != 1 or t.shape[0] < 1:
            raise KernelArgError(f"{name}: shape {tuple(t.shape)}, expected at least [1]")
    kern = get_kernel(spec, dev)
    sms = kern.num_sms
    if s.heads > sms:
        raise KernelArgError(f"spec: {s.heads} heads, a block each, but the device has {sms} SMs")
    if s.probe:
        _check("clocks", clocks, torch.int64, (sms, s.layers, len(SST.PROBE_POINTS)), dev)
    if s.dump:
        _check("dump", dump, dt, (s.layers, s.dump_row), dev)
    km = kern.source.meta
    kern.launch_cooperative(kern.source.entries[0], (sms,), (km["threads"],),
                            [ptr(table), ptr(x0), ptr(zx), ptr(yv), ptr(out_last), ptr(x_last), ptr(bar), ptr(slots),
                             ptr(kv_lens), ptr(clocks if s.probe else None), ptr(dump if s.dump else None)],
                            smem=km["smem"])
