"""Batched multi-LoRA on the GPU (templates/lora_sgmv.cu.j2): the spec, its rendering and the
launch wrappers. runtime/lora.py (`CudaLora`) builds the stacked A/B per GEMM and the per-step
row grouping; the reference semantics are runtime/lora.py's `LoraStep.apply`.

`LoraSpec` is one GEMM's LoRA shape: k input features, `out` output columns (all siblings of a
fused GEMM), `sr` = siblings x `rank` shrink columns, `rank` padded to a multiple of 16, and
`kernel`, the variant: "tiled" (the default: rows of one adapter in 16-row tiles, the shrink on
tensor cores split over K into fp32 partials, the expand summing them; programmatic dependent
launch) or "split" (the first version: memset, shrink with fp32 atomics, expand), kept for A/B runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from .kernels import KernelArgError, _check, _torch_dtype
from .launch import get_kernel, i32, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _dtype, _fail, _positive, _Spec

RANK_TILE = 16  # ranks per shrink block (the template's RT)
ROW_TILE = 16  # "tiled": rows of one adapter per block (the MMA's M)
KERNELS = ("tiled", "split")
MAX_SR = 512  # "tiled": the expand keeps 16 rows x sr fp32 sums in shared memory (32 KB)
SPLIT_STEP = 256  # "tiled": K splits are whole multiples of the shrink block's 8 warps x 32 columns
EXPAND_COLS = 256  # "tiled": output columns per expand block (the template's OT)


@dataclass(frozen=True)
class LoraSpec(_Spec):
    k: int  # input features
    out: int  # output columns of the GEMM (the fused siblings' together)
    sr: int  # shrink columns: siblings x rank
    rank: int  # padded rank per sibling
    dtype: str = "bf16"
    origin: str = ""
    kernel: str = "tiled"  # "tiled" | "split" (see the module docstring)

    def __post_init__(self):
        _positive(self, "k", "out", "sr", "rank")
        _dtype(self)
        if self.kernel not in KERNELS:
            _fail(self, "kernel", f"must be one of {list(KERNELS)}, got {self.kernel!r}")
        if self.rank % RANK_TILE or self.sr % self.rank:
            _fail(self, "rank", f"{self.rank} must be a multiple of {RANK_TILE} dividing sr={self.sr}")
        if self.k % self.vec:
            _fail(self, "k", f"{self.k} is not a whole number of 16-byte vectors")
        if self.kernel == "tiled" and self.sr > MAX_SR:
            _fail(self, "sr", f"{self.sr} > {MAX_SR}: the tiled kernel's shared memory holds 16 rows x sr sums "
                  "(use kernel='split')")

    @property
    def vec(self) -> int:
        return 16 // RUN_DTYPES[self.dtype].itemsize


def _render(s: LoraSpec) -> KernelSource:
    kch = 32 * s.vec
    tiled = s.kernel == "tiled"
    name = _name(f"lora_{'tiled' if tiled else 'sgmv'}_k{s.k}_o{s.out}_sr{s.sr}_r{s.rank}", s)
    params = dict(k=s.k, out=s.out, sr=s.sr, rank=s.rank, vec=s.vec, kch=kch, kernel=s.kernel,
                  mma=s.dtype in ("bf16", "fp16"), mma_type="bf16" if s.dtype == "bf16" else "f16")
    if tiled:
        meta = dict(rtiles=s.sr // RANK_TILE, otiles=math.ceil(s.out / EXPAND_COLS))
        entries = [name + "_tshrink", name + "_texpand"]
    else:
        meta = dict(kch=kch, kchunks=math.ceil(s.k / kch), rtiles=s.sr // RANK_TILE, otiles=math.ceil(s.out / 128))
        entries = [name + "_shrink", name + "_expand"]
    return _emit("lora_sgmv.cu.j2", name, s, params, entries, meta)


_RENDERERS[LoraSpec] = _render


def tile_slots(T: int, n: int) -> int:
    """The most 16-row tiles T rows over n adapters can make (sum of ceil(rows_a / 16)): the tiled
    kernels' grid, fixed by T alone so that a captured graph fits any grouping of its rows."""
    return (T + (ROW_TILE - 1) * min(n, T)) // ROW_TILE


def tiled_splits(spec: LoraSpec, T: int, n: int, num_sms: int) -> tuple[int, int]:
    """(columns per K split, splits) of the tiled shrink: enough blocks for about two per SM."""
    blocks = tile_slots(T, n) * (spec.sr // RANK_TILE)
    kc = max(SPLIT_STEP, math.ceil(spec.k * blocks / (2 * num_sms) / SPLIT_STEP) * SPLIT_STEP)
    kc = min(kc, math.ceil(spec.k / SPLIT_STEP) * SPLIT_STEP)
    return kc, math.ceil(spec.k / kc)


def scratch_rows(spec: LoraSpec, T: int, n: int, device) -> int:
    """Rows of the fp32 [rows, sr] scratch `lora_sgmv` needs: T (split), splits x T (tiled)."""
    if spec.kernel == "split":
        return T
    return tiled_splits(spec, T, n, get_kernel(spec, device).num_sms)[1] * T


def lora_scratch(spec: LoraSpec, T: int, n: int, device) -> torch.Tensor:
    return torch.empty(scratch_rows(spec, T, n, device), spec.sr, dtype=torch.float32, device=device)


def lora_sgmv(spec: LoraSpec, x, A, B, sib, y, v, perm, seg):
    """y [T, out] += per row (x A_a^T) B_a^T for the rows of each adapter a's segment of `perm`
    (int32, rows grouped by adapter; seg int32 [N + 1] offsets). v: fp32 [rows, sr] scratch of at
    least `scratch_rows` rows (None: allocated here). No host synchronisation: capturable in a CUDA
    graph."""
    dt, dev = _torch_dtype(spec), x.device
    _check("x", x, dt, device=dev, rows_aligned=True, contiguous=False)
    T = x.shape[0]
    n = A.shape[0]
    _check("A", A, dt, (n, spec.sr, spec.k), dev)
    _check("B", B, dt, (n, spec.out, spec.rank), dev)
    _check("sib", sib, torch.int32, (spec.out,), dev)
    _check("y", y, dt, device=dev, rows_aligned=False, contiguous=False, aligned=False)
    if y.dim() != 2 or y.shape != (T, spec.out) or y.stride(1) != 1:
        raise KernelArgError(f"y: shape {tuple(y.shape)} (unit column stride), expected ({T}, {spec.out})")
    _check("perm", perm, torch.int32, device=dev)
    _check("seg", seg, torch.int32, (n + 1,), dev, aligned=False)
    if T == 0 or n == 0:
        return
    need = scratch_rows(spec, T, n, dev)
    if v is None:
        v = torch.empty(need, spec.sr, dtype=torch.float32, device=dev)
    _check("v", v, torch.float32, device=dev)
    if v.dim() != 2 or v.shape[1] != spec.sr or v.shape[0] < need:
        raise KernelArgError(f"v: shape {tuple(v.shape)}, expected at least ({need}, {spec.sr})")
    kern = get_kernel(spec, dev)
    meta = kern.source.meta
    if spec.kernel == "tiled":
        slots = tile_slots(T, n)
        kc, splits = tiled_splits(spec, T, n, kern.num_sms)
        kern.launch_dependent(kern.source.entries[0], (slots, meta["rtiles"], splits), (256,),
                              [ptr(x), i64(x.stride(0)), ptr(A), ptr(v), ptr(perm), ptr(seg), i32(n), i32(T),
                               i32(kc)])
        kern.launch_dependent(kern.source.entries[1], (slots, meta["otiles"], 1), (128,),
                              [ptr(v), ptr(B), ptr(sib), ptr(y), i64(y.stride(0)), ptr(perm), ptr(seg), i32(n),
                               i32(T), i32(splits)])
        return
    v.zero_()
    kern.launch(kern.source.entries[0], (n, meta["kchunks"], meta["rtiles"]), (256,),
                [ptr(x), i64(x.stride(0)), ptr(A), ptr(v), ptr(perm), ptr(seg)])
    kern.launch(kern.source.entries[1], (n, meta["otiles"]), (128,),
                [ptr(v), ptr(B), ptr(sib), ptr(y), i64(y.stride(0)), ptr(perm), ptr(seg)])
