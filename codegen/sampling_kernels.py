"""Sampler kernels (templates/token_mask.cu.j2): the spec, its rendering and the launch wrapper.

`token_mask` applies guided decoding's allowed-token bitmasks (runtime/guided.py: llguidance writes
[M, ceil(V/32)] int32 words, bit t % 32 of word t // 32 set = token t allowed) to the sampler's fp32
logits in one launch. The semantics are runtime/guided.py's `apply_token_bitmask` (torch ops, the
reference, used on the CPU): on a GPU those ops are seven launches and a [M, V] intermediate each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .kernels import KernelArgError, _check
from .launch import get_kernel, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _positive, _Spec

MASK_THREADS = 256


@dataclass(frozen=True)
class TokenMaskSpec(_Spec):
    """Masking fp32 logits over a vocabulary of `vocab` entries with ceil(vocab / 32)-word bitmasks."""

    vocab: int
    dtype: str = "fp32"  # the sampler's logits (fixed: the kernel reads no other type)
    origin: str = ""

    def __post_init__(self):
        _positive(self, "vocab")

    @property
    def words(self) -> int:
        return (self.vocab + 31) // 32


def _render(s: TokenMaskSpec) -> KernelSource:
    name = _name(f"token_mask_v{s.vocab}", s)
    return _emit("token_mask.cu.j2", name, s, dict(vocab=s.vocab, words=s.words, threads=MASK_THREADS), [name],
                 dict(threads=MASK_THREADS))


_RENDERERS[TokenMaskSpec] = _render


def token_mask(spec: TokenMaskSpec, logits, rows, bitmask) -> None:
    """logits[rows[m], t] = -inf where bit t of bitmask[m] is clear, in place. logits [N, vocab] fp32
    (rows contiguous), rows [M] int64, bitmask [M, ceil(vocab / 32)] int32, all on one CUDA device."""
    dev = logits.device
    if logits.dim() != 2 or logits.shape[1] != spec.vocab:
        raise KernelArgError(f"logits: shape {tuple(logits.shape)}, expected [N, {spec.vocab}]")
    _check("logits", logits, torch.float32, device=dev, aligned=False, contiguous=False)
    if logits.stride(1) != 1:
        raise KernelArgError("logits: each row must be contiguous")
    _check("rows", rows, torch.int64, device=dev, aligned=False)
    M = rows.shape[0]
    _check("bitmask", bitmask, torch.int32, (M, spec.words), dev, aligned=False)
    kern = get_kernel(spec, dev)
    kern.launch(kern.source.entries[0], (math.ceil(spec.vocab / MASK_THREADS), M), (MASK_THREADS,),
                [ptr(logits), ptr(rows), ptr(bitmask), i64(logits.stride(0))])
