"""Batched multi-LoRA on the GPU (templates/lora_sgmv.cu.j2): the spec, its rendering and the
launch wrappers. runtime/lora.py (`CudaLora`) builds the stacked A/B per GEMM and the per-step
row grouping; the reference semantics are runtime/lora.py's `LoraStep.apply`.

`LoraSpec` is one GEMM's LoRA shape: k input features, `out` output columns (all siblings of a
fused GEMM), `sr` = siblings x `rank` shrink columns, `rank` padded to a multiple of 16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from .kernels import KernelArgError, _check, _torch_dtype
from .launch import get_kernel, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _dtype, _fail, _positive, _Spec

RANK_TILE = 16  # ranks per shrink block (the template's RT)


@dataclass(frozen=True)
class LoraSpec(_Spec):
    k: int  # input features
    out: int  # output columns of the GEMM (the fused siblings' together)
    sr: int  # shrink columns: siblings x rank
    rank: int  # padded rank per sibling
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "k", "out", "sr", "rank")
        _dtype(self)
        if self.rank % RANK_TILE or self.sr % self.rank:
            _fail(self, "rank", f"{self.rank} must be a multiple of {RANK_TILE} dividing sr={self.sr}")
        if self.k % self.vec:
            _fail(self, "k", f"{self.k} is not a whole number of 16-byte vectors")

    @property
    def vec(self) -> int:
        return 16 // RUN_DTYPES[self.dtype].itemsize


def _render(s: LoraSpec) -> KernelSource:
    kch = 32 * s.vec
    name = _name(f"lora_sgmv_k{s.k}_o{s.out}_sr{s.sr}_r{s.rank}", s)
    params = dict(k=s.k, out=s.out, sr=s.sr, rank=s.rank, vec=s.vec, kch=kch)
    meta = dict(kch=kch, kchunks=math.ceil(s.k / kch), rtiles=s.sr // RANK_TILE, otiles=math.ceil(s.out / 128))
    return _emit("lora_sgmv.cu.j2", name, s, params, [name + "_shrink", name + "_expand"], meta)


_RENDERERS[LoraSpec] = _render


def lora_sgmv(spec: LoraSpec, x, A, B, sib, y, v, perm, seg):
    """y [T, out] += per row (x A_a^T) B_a^T for the rows of each adapter a's segment of `perm`
    (int32, rows grouped by adapter; seg int32 [N + 1] offsets); v fp32 [T, sr] scratch (zeroed
    here). No host synchronisation: capturable in a CUDA graph."""
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
    _check("v", v, torch.float32, device=dev)
    if v.dim() != 2 or v.shape[1] != spec.sr or v.shape[0] < T:
        raise KernelArgError(f"v: shape {tuple(v.shape)}, expected at least ({T}, {spec.sr})")
    _check("perm", perm, torch.int32, device=dev)
    _check("seg", seg, torch.int32, (n + 1,), dev, aligned=False)
    if T == 0 or n == 0:
        return
    kern = get_kernel(spec, dev)
    meta = kern.source.meta
    v.zero_()
    kern.launch(kern.source.entries[0], (n, meta["kchunks"], meta["rtiles"]), (256,),
                [ptr(x), i64(x.stride(0)), ptr(A), ptr(v), ptr(perm), ptr(seg)])
    kern.launch(kern.source.entries[1], (n, meta["otiles"]), (128,),
                [ptr(v), ptr(B), ptr(sib), ptr(y), i64(y.stride(0)), ptr(perm), ptr(seg)])
