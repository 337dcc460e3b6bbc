"""Rotary frequencies for a kernel spec: the one implementation (dsl/rope.py,
the same float32 torch ops as HF transformers' ROPE_INIT_FUNCTIONS), so the table baked into a
kernel holds the very values the reference multiplies positions by. Dynamic NTK depends on the
step's sequence length, so its kernel evaluates the base on the device from `dynamic_exponent`.
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
                       spec.original_max_position or None)


def inv_freq(spec: RopeCacheSpec) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies (dynamic: at the original length)."""
    return _rope.inv_freq(spec.rotary_dim, spec.theta, _scaling(spec), spec.original_max_position,
                          spec.original_max_position)


def dynamic_base(spec: RopeCacheSpec, seq_len: int) -> float:
    """The NTK-scaled base for a step whose longest sequence reaches seq_len tokens."""
    return _rope.dynamic_base(spec.rotary_dim, spec.theta, spec.factor, spec.original_max_position, seq_len)


def dynamic_exponent(spec: RopeCacheSpec) -> float:
    return spec.rotary_dim / (spec.rotary_dim - 2)


def dynamic_inv_freq(spec: RopeCacheSpec, seq_len: int) -> torch.Tensor:
    return _rope.inv_freq(spec.rotary_dim, spec.theta, _scaling(spec), seq_len, spec.original_max_position)
