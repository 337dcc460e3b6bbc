"""L2 prefetch ahead of a decode GEMV, on a second stream (KILN_L2_PREFETCH_AHEAD; runtime/cuda_backend.py decides
where): while the main stream runs a stretch of short, latency-bound kernels (decode attention, a state-space
step, a norm), DRAM idles; a prefetch kernel forked off after the GEMV before the stretch asks L2 for the weights
of the GEMVs after it, so that they read L2 instead of DRAM. The GEMVs' own prefetch (templates/l2_prefetch.cuh.j2)
covers only the kernel just before each of them; this one covers the whole stretch.

The kernel (templates/l2_ahead.cu.j2) is one for every model: it reads a table of segments, each `count` ranges
of `length` bytes `stride` apart from `base` (codegen/gemv.py `row_slices`: a GEMV's K slices, the part of each
that the budget covers), and issues one bulk L2 prefetch per range. A prefetch is a hint, so results are the
same bits with or without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import KernelArgError, _check
from .launch import get_kernel, i32, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _Spec

THREADS = 256
MAX_BLOCKS = 132  # a range per thread, grid-stride: no more blocks than one a SM (the ranges are hints, quick to issue)


@dataclass(frozen=True)
class L2AheadSpec(_Spec):
    """The prefetch kernel: no data of a run dtype (dtype fixed), nothing to specialise on."""

    dtype: str = "fp32"
    origin: str = ""


def _render(s: L2AheadSpec) -> KernelSource:
    name = _name("l2_ahead", s)
    return _emit("l2_ahead.cu.j2", name, s, dict(threads=THREADS), [name], dict(threads=THREADS))


_RENDERERS[L2AheadSpec] = _render


def fit(weights: list[tuple[list[tuple[int, list[tuple[int, int, int, int]]]], int]], budget: int
        ) -> list[tuple[int, int, int, int]]:
    """The segments (base address, stride, count, length) of a prefetch of `weights` in order, `budget` bytes at
    most. weights: per GEMV ([(base address, its row_slices)], its streamed bytes); each GEMV gets all of each
    range, or where the budget left is short, the same share of each (whole 16-byte units: every warp's stream
    is shortened alike, and the GEMV lasts as long as its slowest warp); nothing past the budget."""
    out = []
    left = budget
    for ranges, total in weights:
        if left < 16 or total <= 0:
            break
        for base, slices in ranges:
            for off, stride, count, length in slices:
                take = length if total <= left else length * left // total // 16 * 16
                if take >= 16 and count > 0:
                    out.append((base + off, stride, count, take))
        left -= min(total, left)
    return out


def table(segments: list[tuple[int, int, int, int]], device) -> torch.Tensor:
    """The segments as the kernel reads them: int64 [S, 4] on `device`."""
    if any(b % 16 or s % 16 or n < 1 or n % 16 for b, s, _, n in segments):
        raise KernelArgError("segments: bases, strides and lengths must be whole 16-byte units (bulk prefetch)")
    return torch.tensor(segments or [(0, 0, 0, 0)], dtype=torch.int64).reshape(-1, 4).to(device)


def prefetch(spec: L2AheadSpec, segments: torch.Tensor, ranges: int) -> None:
    """Launch the prefetch of `segments` (`table`'s, `ranges` = the sum of their counts) on the current stream."""
    _check("segments", segments, torch.int64, aligned=False)
    if segments.dim() != 2 or segments.shape[1] != 4:
        raise KernelArgError(f"segments: shape {tuple(segments.shape)}, expected [S, 4]")
    if ranges < 1:
        return
    k = get_kernel(spec, segments.device)
    # at the greatest priority: the next GEMV, launched early behind the stretch's first kernel, takes every
    # register file it finds free (one wave, two blocks a SM) and would hold this grid off until it is done
    k.launch_first(k.source.entries[0], (min(MAX_BLOCKS, math.ceil(ranges / THREADS)),), (THREADS,),
             [ptr(segments), i32(segments.shape[0]), i32(ranges)])
