"""Normalisations over the features of each token: `rmsnorm`, `layernorm` (in float32).

Both share one shape rule and three variants: the weight is optional (a non-parametric norm),
`offset` scales by `offset + weight` (weights stored as w - 1: "1 + w" RMSNorm, "layernorm1p"),
and `group=g` normalises each run of g features on its own (per head: `group=head_dim`), with
either one weight row `[g]` shared by every group or a weight `[features / g, g]` holding one row
per group (a distinct q/k norm weight per head: `[heads, head_dim]`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attr, Kernel, KernelCall, OpDef, Torch, TrtLowering, act, attr_kwargs, float_weight, need


def _norm_shape(ins, attrs):
    x, w = act(ins[0]), ins[1]
    width = x.shape[1]
    group = getattr(attrs, "group", None) or width  # group=g: each run of g features on its own
    need(isinstance(group, int) and group > 0 and width % group == 0,
         f"group must divide the {width} features, got {getattr(attrs, 'group', None)!r}")
    per_group = (width // group, group) if getattr(attrs, "group", None) else None  # a row per group
    for operand, what in ((w, "weight"), (ins[2] if len(ins) > 2 else None, "bias")):
        if operand is None:
            continue
        need(operand.shape in ((group,), per_group), f"norm {what} must be [{group}], got {operand}"
             + (f" (or [{per_group[0]}, {group}] for a row per group)" if per_group else ""))
        float_weight(operand, f"norm {what}")
    return (x,)


def _grouped(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """[T, D] float32 as [T, D / g, g] (g = group, or D)."""
    return x.float().reshape(x.shape[0], -1, group or x.shape[-1])


def _affine(y: torch.Tensor, w, b, offset: float) -> torch.Tensor:
    """y [T, n, g] * (offset + w) + b; w and b are [g] (every group) or [n, g] (a row per group)."""
    if w is not None:
        y = y * (offset + w.float().reshape(-1, y.shape[-1]))
    elif offset:
        y = y * offset
    if b is not None:
        y = y + b.float().reshape(-1, y.shape[-1])
    return y


def _cuda_norm(kind: str, ins, plan, has_bias: bool):
    if ins.inputs[1] is None:
        return Torch("the norm kernel reads a weight; a norm without one has no kernel yet")
    # group=g: one block per token and group; a [features / g, g] weight holds a row per group
    ranks = {len(plan.weights[a.name].shape) for a in ins.inputs[1:] if a is not None}
    if len(ranks) > 1:
        return Torch("the norm kernel reads weight and bias alike: both [g] or both a row per group")
    per_group = ranks == {2}
    return KernelCall(Kernel.NORM, dict(kind=kind, hidden=plan.types[ins.inputs[0]].shape[1], eps=ins.attrs.eps,
                                        weight_offset=ins.attrs.offset, has_bias=has_bias,
                                        group=ins.attrs.group or 0, per_group_weight=per_group))


def _trt_scale(nn, t, width: int, group: int | None, rank: int):
    """A [D], [g] or [D / g, g] weight as a float32 tensor broadcasting over a [T, D] (rank 2) or
    [T, D / g, g] (rank 3) activation."""
    t = nn.f32(t)
    if rank == 2:
        return nn.shuffle(t, reshape=(1, -1))
    return nn.shuffle(t, reshape=(1, -1, group))


def _trt_affine(nn, y, w, b, offset: float, width: int, group: int | None, rank: int):
    if w is not None:
        scale = _trt_scale(nn, w, width, group, rank)
        if offset:
            scale = nn.ew(scale, nn.scalar(offset, rank=rank), "SUM")
        y = nn.ew(y, scale, "PROD")
    elif offset:
        y = nn.ew(y, nn.scalar(offset, rank=rank), "PROD")
    if b is not None:
        y = nn.ew(y, _trt_scale(nn, b, width, group, rank), "SUM")
    return y


# ---- rmsnorm

def _rms_reference(ctx, ins, a):
    at = ins.attrs
    x = a[0]
    xf = _grouped(x, at.group)  # [T, features / g, g]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + at.eps)
    return _affine(xf, a[1], None, at.offset).reshape(x.shape).to(x.dtype)


def _rms_cuda(ins, plan, dt):
    return _cuda_norm("rms", ins, plan, False)


def _rms_trt(nn, x, w=None, eps: float = 1e-6, offset: float = 0.0, group: int | None = None):
    xf = nn.f32(x)  # [T, D] float32
    width = x.shape[1]
    if group:  # each run of `group` features on its own: [T, D / group, group]
        xf = nn.shuffle(xf, reshape=(-1, width // group, group))
    axis = len(xf.shape) - 1
    ms = nn.reduce(nn.ew(xf, xf, "PROD"), "AVG", axis)  # [T, 1] or [T, D / group, 1]
    inv = nn.unary(nn.unary(nn.ew(ms, nn.scalar(eps, rank=axis + 1), "SUM"), "SQRT"), "RECIP")
    y = _trt_affine(nn, nn.ew(xf, inv, "PROD"), w, None, offset, width, group, axis + 1)
    return nn.run_dtype(nn.shuffle(y, reshape=(-1, width)) if group else y)


RMSNORM = OpDef(
    "rmsnorm", ("x", "weight?"),
    {"eps": Attr("float", 1e-6), "offset": Attr("float", 0.0), "group": Attr("int?", None)},
    _norm_shape,
    "x / rms(x) * (offset + weight), computed in float32; no weight: x / rms(x) (times offset if "
    "set); with group=g, over each run of g features (per head: group=head_dim), the weight [g] "
    "shared by the groups or [features / g, g], a row per group",
    reference=_rms_reference,
    cuda=_rms_cuda,
    trt=TrtLowering(_rms_trt, attr_kwargs("eps", "offset", "group")),
)


# ---- layernorm

def _ln_reference(ctx, ins, a):
    at = ins.attrs
    x, w, b = a[0], a[1], a[2]
    if not at.group and (w is not None or not at.offset):  # torch's own layer norm, as frameworks call it
        wf = None if w is None else (at.offset + w.float() if at.offset else w.float())
        return F.layer_norm(x.float(), x.shape[-1:], wf, None if b is None else b.float(), at.eps).to(x.dtype)
    xf = _grouped(x, at.group)
    y = F.layer_norm(xf, xf.shape[-1:], None, None, at.eps)
    return _affine(y, w, b, at.offset).reshape(x.shape).to(x.dtype)


def _ln_cuda(ins, plan, dt):
    return _cuda_norm("layer", ins, plan, ins.inputs[2] is not None)


def _ln_trt(nn, x, w=None, b=None, eps: float = 1e-5, offset: float = 0.0, group: int | None = None):
    xf = nn.f32(x)
    width = x.shape[1]
    if not group:  # TensorRT's normalization layer over the features, scale = offset + w
        scale = _trt_affine(nn, nn.const(torch.ones(1, width)), w, None, offset, width, None, 2)
        bias = nn.row(nn.f32(b)) if b is not None else nn.const(torch.zeros(1, width))
        layer = nn.net.add_normalization_v2(xf, scale, bias, 1 << 1)
        layer.epsilon = eps
        return nn.run_dtype(layer.get_output(0))
    # per group: mean and variance over the last axis of [T, D / g, g]
    xf = nn.shuffle(xf, reshape=(-1, width // group, group))
    d = nn.ew(xf, nn.reduce(xf, "AVG", 2), "SUB")
    var = nn.reduce(nn.ew(d, d, "PROD"), "AVG", 2)
    inv = nn.unary(nn.unary(nn.ew(var, nn.scalar(eps, rank=3), "SUM"), "SQRT"), "RECIP")
    y = _trt_affine(nn, nn.ew(d, inv, "PROD"), w, b, offset, width, group, 3)
    return nn.run_dtype(nn.shuffle(y, reshape=(-1, width)))


LAYERNORM = OpDef(
    "layernorm", ("x", "weight?", "bias?"),
    {"eps": Attr("float", 1e-5), "offset": Attr("float", 0.0), "group": Attr("int?", None)}, _norm_shape,
    "(x - mean) / std * (offset + weight) + bias, computed in float32; weight and bias optional "
    "(none: a non-parametric norm); group=g as for rmsnorm (weight and bias [g] or [features / g, g])",
    reference=_ln_reference,
    cuda=_ln_cuda,
    trt=TrtLowering(_ln_trt, attr_kwargs("eps", "offset", "group")),
)

DEFS = (RMSNORM, LAYERNORM)
