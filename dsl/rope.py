"""Rotary frequencies for every scaling kind, matching Hugging Face's rope init functions,
and the rotation itself: the meaning of the `rope` op, which every backend uses (the reference
runs it, the CUDA codegen bakes the frequencies or their formula constants into kernels, the
TensorRT network tabulates cos/sin from them).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .bind import RopeScaling


def resolve(scaling: RopeScaling | None, max_pos: int | None,
            original_max_pos: int | None = None) -> RopeScaling | None:
    """The scaling with HF's config-level defaults filled in (as its standardize_rope_params and
    the init functions do): for llama3 / yarn / longrope, a top-level
    original_max_position_embeddings (`original_max_pos`, where a config keeps it outside) wins over the one in
    rope_scaling, else max_position_embeddings; yarn / longrope without a factor use
    max_pos / original, and their attention factor comes from the factor when not given."""
    if scaling is None or scaling.kind not in ("llama3", "yarn", "longrope"):
        return scaling
    original = original_max_pos or scaling.original_max_position_embeddings or max_pos
    if original is None:
        raise ValueError(f"{scaling.kind} rope scaling needs original_max_position_embeddings or max_pos")
    if scaling.kind == "llama3":
        return dataclasses.replace(scaling, original_max_position_embeddings=original)
    factor = scaling.factor
    if factor is None:
        if max_pos is None:
            raise ValueError(f"{scaling.kind} rope scaling without a factor needs max_pos")
        factor = max_pos / original
    af = scaling.attention_factor
    if af is None and scaling.kind == "yarn":
        def get_mscale(scale, mscale=1):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
        if scaling.mscale and scaling.mscale_all_dim:
            af = float(get_mscale(factor, scaling.mscale) / get_mscale(factor, scaling.mscale_all_dim))
        else:
            af = get_mscale(factor)
    elif af is None:  # longrope
        af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dataclasses.replace(scaling, original_max_position_embeddings=original, factor=factor,
                               attention_factor=af)


def attention_factor(scaling: RopeScaling | None, max_pos: int | None = None) -> float:
    """What HF multiplies cos and sin by (`attention_scaling`): 1 but for yarn and longrope."""
    if scaling is None or scaling.kind not in ("yarn", "longrope"):
        return 1.0
    return float(resolve(scaling, max_pos).attention_factor)


def inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None,
             seq_len: int | None = None, max_pos: int | None = None) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies. `seq_len` matters only for dynamic NTK and
    longrope (the long factors once seq_len exceeds the original length, as HF)."""
    scaling = resolve(scaling, max_pos)
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
    if scaling.kind == "yarn":
        return _yarn(rotary_dim, theta, scaling)
    if scaling.kind == "longrope":
        if len(scaling.short_factor) != rotary_dim // 2:
            raise ValueError(f"longrope factors have {len(scaling.short_factor)} entries, "
                             f"rotary_dim / 2 = {rotary_dim // 2}")
        long = seq_len and seq_len > scaling.original_max_position_embeddings
        ext_factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        inv_freq_shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        return 1.0 / (ext_factors * theta ** inv_freq_shape)
    raise ValueError(f"unhandled rope scaling kind {scaling.kind!r}")


def _yarn(dim: int, base: float, scaling: RopeScaling) -> torch.Tensor:
    """HF's _compute_yarn_parameters, op for op (float64 correction range, float32 tensors)."""
    factor = scaling.factor
    beta_fast, beta_slow = scaling.beta_fast or 32, scaling.beta_slow or 1

    def find_correction_dim(num_rotations):
        return (dim * math.log(scaling.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = find_correction_dim(beta_fast), find_correction_dim(beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF: prevent singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


def dynamic_base(rotary_dim: int, theta: float, factor: float, original: int, seq_len: int) -> float:
    """HF's dynamic NTK base for a sequence of seq_len tokens (never below the original length)."""
    n = max(seq_len, original)
    return theta * ((factor * n / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, head_dim: int,
               rotary_dim: int, layout: str, attention_factor: float = 1.0) -> torch.Tensor:
    """x [T, H * head_dim]; positions [T]; freqs [T, rotary_dim // 2] or [rotary_dim // 2];
    cos and sin multiplied by attention_factor in float32 (HF's attention_scaling) before the cast."""
    t = x.shape[0]
    xh = x.view(t, -1, head_dim)  # [T, H, D]
    angles = positions.float()[:, None] * freqs  # [T, R/2] in float32, as HF does
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
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
