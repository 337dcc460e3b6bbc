"""Rotary frequencies for every scaling kind, matching Hugging Face's rope init functions,
and the rotation itself: the meaning of the `rope` op, which every backend uses (the reference
runs it, the CUDA codegen bakes the frequencies or their formula constants into kernels, the
TensorRT network tabulates cos/sin from them).
"""

from __future__ import annotations

import math

import torch

from .bind import RopeScaling


def inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None,
             seq_len: int | None = None, max_pos: int | None = None) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies. `seq_len` matters only for dynamic NTK."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    if scaling is None:
        return 1.0 / (theta ** exponents)
    if scaling.kind == "linear":
        return 1.0 / (theta ** exponents) / scaling.factor
    if scaling.kind == "dynamic":
        original = scaling.original_max_position_embeddings or max_pos
        if original is None:
            raise ValueError("dynamic rope scaling needs max_pos (max_position_embeddings)")
        return 1.0 / (dynamic_base(rotary_dim, theta, scaling.factor, original, seq_len or 0) ** exponents)
    if scaling.kind == "llama3":
        freq = 1.0 / (theta ** exponents)
        old = scaling.original_max_position_embeddings
        low_wavelen = old / scaling.low_freq_factor
        high_wavelen = old / scaling.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / scaling.factor, freq)
        smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unhandled rope scaling kind {scaling.kind!r}")


def dynamic_base(rotary_dim: int, theta: float, factor: float, original: int, seq_len: int) -> float:
    """HF's dynamic NTK base for a sequence of seq_len tokens (never below the original length)."""
    n = max(seq_len, original)
    return theta * ((factor * n / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, head_dim: int,
               rotary_dim: int, layout: str) -> torch.Tensor:
    """x [T, H * head_dim]; positions [T]; freqs [T, rotary_dim // 2] or [rotary_dim // 2]."""
    t = x.shape[0]
    xh = x.view(t, -1, head_dim)  # [T, H, D]
    angles = positions.float()[:, None] * freqs  # [T, R/2] in float32, as HF does
    cos, sin = angles.cos().to(x.dtype)[:, None, :], angles.sin().to(x.dtype)[:, None, :]
    rot, rest = xh[..., :rotary_dim], xh[..., rotary_dim:]
    if layout == "half":
        a, b = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        out = rot * cos2 + torch.cat([-b, a], -1) * sin2
    elif layout == "interleaved":
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        raise ValueError(f"unhandled rope layout {layout!r}")
    return torch.cat([out, rest], -1).reshape(t, -1)
