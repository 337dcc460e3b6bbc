"""Normalisations over the features of each token: `rmsnorm`, `layernorm` (in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attr, Kernel, KernelCall, OpDef, Torch, TrtLowering, act, attr_kwargs, float_weight, need


def _norm_shape(ins, attrs):
    x, w = act(ins[0]), ins[1]
    group = getattr(attrs, "group", None) or x.shape[1]  # rmsnorm(group=g): each run of g features on its own
    need(group > 0 and x.shape[1] % group == 0,
         f"group must divide the {x.shape[1]} features, got {getattr(attrs, 'group', None)!r}")
    need(w is not None and w.shape == (group,), f"norm weight must be [{group}], got {w}")
    float_weight(w, "norm weight")
    if len(ins) > 2 and ins[2] is not None:
        need(ins[2].shape == (x.shape[1],), f"norm bias must be [{x.shape[1]}], got {ins[2]}")
        float_weight(ins[2], "norm bias")
    return (x,)


# ---- rmsnorm

def _rms_reference(ctx, ins, a):
    at = ins.attrs
    x, w = a[0], a[1]
    g = at.group or x.shape[-1]
    xf = x.float().reshape(x.shape[0], -1, g)  # [T, features / g, g]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + at.eps)
    return (xf * (at.offset + w.float())).reshape(x.shape).to(x.dtype)


def _rms_cuda(ins, plan, dt):
    if ins.attrs.group:
        return Torch("a norm per group of features (per head) has no kernel yet")
    return KernelCall(Kernel.NORM, dict(kind="rms", hidden=plan.types[ins.inputs[0]].shape[1], eps=ins.attrs.eps,
                                        weight_offset=ins.attrs.offset, has_bias=False))


def _rms_trt(nn, x, w, eps: float, offset: float = 0.0, group: int | None = None):
    xf = nn.f32(x)  # [T, D] float32
    width = x.shape[1]
    if group:  # each run of `group` features on its own: [T, D / group, group]
        xf = nn.shuffle(xf, reshape=(-1, width // group, group))
    axis = len(xf.shape) - 1
    ms = nn.reduce(nn.ew(xf, xf, "PROD"), "AVG", axis)  # [T, 1] or [T, D / group, 1]
    inv = nn.unary(nn.unary(nn.ew(ms, nn.scalar(eps, rank=axis + 1), "SUM"), "SQRT"), "RECIP")
    scale = nn.shuffle(nn.f32(w), reshape=(1,) * axis + (-1,))
    if offset:
        scale = nn.ew(scale, nn.scalar(offset, rank=axis + 1), "SUM")
    y = nn.ew(nn.ew(xf, inv, "PROD"), scale, "PROD")
    return nn.run_dtype(nn.shuffle(y, reshape=(-1, width)) if group else y)


RMSNORM = OpDef(
    "rmsnorm", ("x", "weight"),
    {"eps": Attr("float", 1e-6), "offset": Attr("float", 0.0), "group": Attr("int?", None)},
    _norm_shape,
    "x / rms(x) * (offset + weight), computed in float32; with group=g, over each run of g "
    "features (per head: group=head_dim, weight [g])",
    reference=_rms_reference,
    cuda=_rms_cuda,
    trt=TrtLowering(_rms_trt, attr_kwargs("eps", "offset", "group")),
)


# ---- layernorm

def _ln_reference(ctx, ins, a):
    x = a[0]
    b = a[2].float() if a[2] is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], a[1].float(), b, ins.attrs.eps).to(x.dtype)


def _ln_cuda(ins, plan, dt):
    return KernelCall(Kernel.NORM, dict(kind="layer", hidden=plan.types[ins.inputs[0]].shape[1], eps=ins.attrs.eps,
                                        weight_offset=0.0, has_bias=ins.inputs[2] is not None))


def _ln_trt(nn, x, w, b=None, eps: float = 1e-5):
    xf = nn.f32(x)
    scale = nn.row(nn.f32(w))
    bias = nn.row(nn.f32(b)) if b is not None else nn.const(torch.zeros(1, x.shape[1]))
    layer = nn.net.add_normalization_v2(xf, scale, bias, 1 << 1)
    layer.epsilon = eps
    return nn.run_dtype(layer.get_output(0))


LAYERNORM = OpDef(
    "layernorm", ("x", "weight", "bias?"), {"eps": Attr("float", 1e-5)}, _norm_shape,
    "(x - mean) / std * weight + bias, computed in float32",
    reference=_ln_reference,
    cuda=_ln_cuda,
    trt=TrtLowering(_ln_trt, attr_kwargs("eps")),
)

DEFS = (RMSNORM, LAYERNORM)
