"""Rotary inverse frequencies, computed the way HF transformers' ROPE_INIT_FUNCTIONS do.

Same float32 torch ops in the same order, so the table baked into a kernel holds the very
float32 values HF multiplies positions by. Dynamic NTK depends on the step's sequence length,
so its kernel evaluates the formula on the device; `dynamic_inv_freq` is that formula on the
host, for tests and the reference.
"""

from __future__ import annotations

import math

import torch

from .specs import RopeCacheSpec


def _default(theta: float, dim: int) -> torch.Tensor:
    # [dim / 2] float32
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def inv_freq(spec: RopeCacheSpec) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies for a static scaling."""
    dim = spec.rotary_dim
    if spec.scaling == "dynamic":
        return dynamic_inv_freq(spec, spec.original_max_position)
    freq = _default(spec.theta, dim)
    if spec.scaling == "linear":
        freq /= spec.factor
    elif spec.scaling == "smooth":
        old_len = spec.original_max_position
        low_wavelen = old_len / spec.low_freq_factor
        high_wavelen = old_len / spec.high_freq_factor
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > low_wavelen, freq / spec.factor, freq)
        smooth = (old_len / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        freq = torch.where(medium, smoothed, scaled)
    return freq


def dynamic_base(spec: RopeCacheSpec, seq_len: int) -> float:
    """The NTK-scaled base for a step whose longest sequence reaches seq_len tokens."""
    dim = spec.rotary_dim
    seq_len = max(seq_len, spec.original_max_position)
    ratio = spec.factor * seq_len / spec.original_max_position - (spec.factor - 1)
    return spec.theta * ratio ** (dim / (dim - 2))


def dynamic_exponent(spec: RopeCacheSpec) -> float:
    return spec.rotary_dim / (spec.rotary_dim - 2)


def dynamic_inv_freq(spec: RopeCacheSpec, seq_len: int) -> torch.Tensor:
    return _default(dynamic_base(spec, seq_len), spec.rotary_dim)
