"""Rotary frequencies for a kernel spec: the one implementation (dsl/rope.py,
the same float32 torch ops as HF transformers' ROPE_INIT_FUNCTIONS), so the table baked into a
kernel holds the very values the reference multiplies positions by. Dynamic NTK depends on the
step's sequence length, so its kernel evaluates the base on the device from `dynamic_exponent`.
YaRN's table is static (its attention factor is the spec's `attention_factor`); longrope bakes
two tables, `inv_freq` (short factors) and `long_inv_freq`, and its kernel picks one by the
step's sequence length against `original_max_position`.
"""

from __future__ import annotations

import torch
from kiln.dsl import rope as _rope
from kiln.dsl.bind import RopeScaling

from .specs import RopeCacheSpec


def _scaling(spec: RopeCacheSpec) -> RopeScaling | None:
    if spec.scaling == "none":
        return None
    return RopeScaling(spec.scaling, spec.factor, spec.low_freq_factor, spec.high_freq_factor,
                       spec.original_max_position or None, beta_fast=spec.beta_fast, beta_slow=spec.beta_slow,
                       attention_factor=spec.attention_factor, truncate=spec.truncate,
                       short_factor=spec.short_factor or None, long_factor=spec.long_factor or None)


def inv_freq(spec: RopeCacheSpec) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies (dynamic: at the original length; longrope:
    the short factors', for sequences up to the original length)."""
    return _rope.inv_freq(spec.rotary_dim, spec.theta, _scaling(spec), spec.original_max_position,
                          spec.original_max_position)


def dynamic_base(spec: RopeCacheSpec, seq_len: int) -> float:
    """The NTK-scaled base for a step whose longest sequence reaches seq_len tokens."""
    return _rope.dynamic_base(spec.rotary_dim, spec.theta, spec.factor, spec.original_max_position, seq_len)


def dynamic_exponent(spec: RopeCacheSpec) -> float:
    return spec.rotary_dim / (spec.rotary_dim - 2)


def dynamic_inv_freq(spec: RopeCacheSpec, seq_len: int) -> torch.Tensor:
    return _rope.inv_freq(spec.rotary_dim, spec.theta, _scaling(spec), seq_len, spec.original_max_position)


def long_inv_freq(spec: RopeCacheSpec) -> torch.Tensor:
    """longrope: the long factors' frequencies, for a step whose longest sequence passes the original length."""
    return _rope.inv_freq(spec.rotary_dim, spec.theta, _scaling(spec), spec.original_max_position + 1,
                          spec.original_max_position)


def step_inv_freq(spec: RopeCacheSpec, seq_len: int) -> torch.Tensor:
    """The frequencies the kernel uses for a step whose longest sequence has seq_len tokens."""
    if spec.scaling == "dynamic":
        return dynamic_inv_freq(spec, seq_len)
    if spec.scaling == "longrope" and seq_len > spec.original_max_position:
        return long_inv_freq(spec)
    return inv_freq(spec)
