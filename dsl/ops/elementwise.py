"""Ops on each element (or each row) of an activation: the activations, `act`, `softcap`,
`scale`, the arithmetic that `+ - *` become, and `split`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .base import (
    Attr,
    Kernel,
    KernelCall,
    OpDef,
    ShapeError,
    T,
    Torch,
    TrtLowering,
    TType,
    act,
    attr_kwargs,
    need,
    same,
    torch_only,
)

# ---- activations: Kiln's names, their meaning, and Hugging Face's names for them (hidden_act)

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
    "relu2": lambda x: torch.square(F.relu(x)),  # squared ReLU
}
ACTIVATIONS = tuple(ACTIVATION_FNS)
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu",
    "sigmoid": "sigmoid", "tanh": "tanh", "relu2": "relu2",
}
KERNEL_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")  # what templates/act.cu.j2 spells
MAP_ACTIVATIONS = {"relu2": "map_relu2.cu.j2"}  # activations generated as elementwise map kernels
_TRT_ACTIVATIONS = {"gelu": "GELU_ERF", "gelu_tanh": "GELU_TANH", "relu": "RELU", "sigmoid": "SIGMOID",
                    "tanh": "TANH"}


def activation_of(ins) -> str | None:
    """The Kiln activation an instruction applies (`silu(x)` or `act(x, fn="swish")`), else None."""
    if ins is None:
        return None
    if ins.kind.value == "act":
        return HF_ACTIVATIONS[ins.attrs.fn]
    return ins.kind.value if ins.kind.value in ACTIVATION_FNS else None


def _act_cuda(ins, plan, dt):
    kind = activation_of(ins)
    if kind in MAP_ACTIVATIONS:
        return KernelCall(Kernel.MAP, dict(body=MAP_ACTIVATIONS[kind], consts=()))
    if kind not in KERNEL_ACTIVATIONS:
        return Torch(f"{kind} has no kernel yet")
    return KernelCall(Kernel.ACT, dict(kind=kind, gated=False, features=plan.types[ins.outputs[0]].shape[1]))


def _act_trt(nn, x, fn: str):
    if fn == "silu":
        return nn.ew(x, nn.activation(x, "SIGMOID"), "PROD")
    if fn == "relu2":  # relu(x) * relu(x): one rounding of the square, as torch.square
        r = nn.activation(x, "RELU")
        return nn.ew(r, r, "PROD")
    return nn.activation(x, _TRT_ACTIVATIONS[fn])


_ACT_TRT = TrtLowering(_act_trt, lambda ins, lw: [("fn", repr(activation_of(ins)))])


def _activation(name: str) -> OpDef:
    return OpDef(name, ("x",), {}, same, f"{name} activation",
                 reference=lambda ctx, ins, a: ACTIVATION_FNS[name](a[0]), cuda=_act_cuda, trt=_ACT_TRT)


def _check_fn(attrs) -> None:
    if attrs.fn not in HF_ACTIVATIONS:
        raise ShapeError(f"unknown activation '{attrs.fn}' (known: {', '.join(sorted(HF_ACTIVATIONS))})")


ACT = OpDef("act", ("x",), {"fn": Attr("str")}, same, "an activation named by a string (HF names accepted)",
            reference=lambda ctx, ins, a: ACTIVATION_FNS[HF_ACTIVATIONS[ins.attrs.fn]](a[0]),
            cuda=_act_cuda, trt=_ACT_TRT, check_attrs=_check_fn)

# ---- softcap and scale: generated as elementwise map kernels (templates/map.cu.j2 + the op's own body)


def _softcap_trt(nn, x, cap: float):
    xf = nn.f32(x)
    y = nn.activation(nn.ew(xf, nn.scalar(1.0 / cap), "PROD"), "TANH")
    return nn.run_dtype(nn.ew(y, nn.scalar(cap), "PROD"))


def _positive_cap(attrs) -> None:
    if not attrs.cap > 0:
        raise ShapeError(f"cap must be > 0, got {attrs.cap!r}")


SOFTCAP = OpDef(
    "softcap", ("x",), {"cap": Attr("float")}, same, "cap * tanh(x / cap)",
    reference=lambda ctx, ins, a: torch.tanh(a[0] / ins.attrs.cap) * ins.attrs.cap,
    cuda=lambda ins, plan, dt: KernelCall(Kernel.MAP, dict(
        body="map_softcap.cu.j2", consts=(("cap", ins.attrs.cap), ("inv_cap", 1 / ins.attrs.cap)))),
    trt=TrtLowering(_softcap_trt, attr_kwargs("cap")),
    check_attrs=_positive_cap,
)


def scale_factor(attrs, dtype: torch.dtype) -> float:
    """The factor `scale` multiplies by: with round_factor, first rounded to the run dtype, as a
    framework does that multiplies by a constant tensor of that dtype (the product is then the
    same float32 multiply rounded once, whichever way it is spelled)."""
    if attrs.round_factor:
        return float(torch.tensor(attrs.factor, dtype=dtype).float())
    return attrs.factor


def _scale_trt(nn, x, factor: float):
    """x * factor, rounded once, as torch multiplies by a Python scalar."""
    return nn.run_dtype(nn.ew(nn.f32(x), nn.scalar(factor), "PROD"))


SCALE = OpDef(
    "scale", ("x",), {"factor": Attr("float"), "round_factor": Attr("bool", False)}, same,
    "x * factor (written `x * c` in specs); round_factor=true first rounds factor to the "
    "run dtype, as a framework does that multiplies by a constant tensor of that dtype",
    reference=lambda ctx, ins, a: a[0] * scale_factor(ins.attrs, a[0].dtype),
    cuda=lambda ins, plan, dt: KernelCall(Kernel.MAP, dict(
        body="map_scale.cu.j2", consts=(("factor", scale_factor(ins.attrs, dt)),))),
    trt=TrtLowering(_scale_trt, lambda ins, lw: [("factor", repr(scale_factor(ins.attrs, lw.torch_dtype)))]),
)

# ---- arithmetic between tensors


def _binary_shape(ins, attrs):
    """Same shapes; or b a [n] vector (a weight, broadcast over tokens); or either operand a
    per-token scalar [T, 1] (broadcast over the other's features: a gate per token)."""
    a, b = act(ins[0]), ins[1]
    need(b is not None and b.dtype == "float", f"expected a float tensor, got {b}")
    if b.shape == a.shape or b.shape == (a.shape[1],) or b.shape == (T, 1):
        return (a,)
    need(a.shape == (T, 1) and len(b.shape) == 2 and b.shape[0] == T,
         f"operands have shapes {a} and {b}; they must match (or the second be [{a.shape[1]}], "
         f"or either be a per-token scalar float[T, 1])")
    return (b,)


def _binary(name: str, symbol: str, fn, trt_op: str) -> OpDef:
    def build(nn, a, b):
        return nn.ew(a, nn.row(b) if len(b.shape) == 1 else b, trt_op)  # a [n] weight broadcasts over tokens

    return OpDef(name, ("a", "b"), {}, _binary_shape, f"a {symbol} b (written `a {symbol} b`)",
                 reference=lambda ctx, ins, a: fn(a[0], a[1]),
                 cuda=torch_only("one torch elementwise kernel; fusions take it where a pattern matches"),
                 trt=TrtLowering(build, lambda ins, lw: []))


ADD = _binary("add", "+", torch.add, "SUM")
SUB = _binary("sub", "-", torch.sub, "SUB")
MUL = _binary("mul", "*", torch.mul, "PROD")

# ---- split


def _split_shape(ins, attrs):
    x = act(ins[0])
    sizes = attrs.sizes
    need(isinstance(sizes, tuple) and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes),
         f"sizes must be a list of positive ints, got {list(sizes) if isinstance(sizes, tuple) else sizes!r}")
    need(sum(sizes) == x.shape[1], f"sizes {list(sizes)} add up to {sum(sizes)}, input has {x.shape[1]} features")
    return tuple(TType((T, s)) for s in sizes)


def _split_trt(nn, x, sizes: tuple[int, ...]):
    outs, start = [], 0
    for n in sizes:
        outs.append(nn.gather(x, nn.const(torch.arange(start, start + n, dtype=torch.int32)), 1))
        start += n
    return tuple(outs)


SPLIT = OpDef(
    "split", ("x",), {"sizes": Attr("list")}, _split_shape, "split features into consecutive parts",
    reference=lambda ctx, ins, a: tuple(a[0].split(list(ins.attrs.sizes), dim=-1)),
    cuda=torch_only("views of its input: no copy, no kernel"),
    trt=TrtLowering(_split_trt, lambda ins, lw: [("sizes", repr(tuple(ins.attrs.sizes)))]),
    outputs="sizes",
)

DEFS = (*(_activation(n) for n in ACTIVATIONS), ACT, SOFTCAP, SCALE, ADD, SUB, MUL, SPLIT)

# ---- clamp: clip_qkv (q, k, v limited to [-c, c])


def _clamp_bounds(attrs) -> None:
    if attrs.min is None and attrs.max is None:
        raise ShapeError("clamp needs min, max, or both")
    if attrs.min is not None and attrs.max is not None and attrs.min > attrs.max:
        raise ShapeError(f"min {attrs.min} is above max {attrs.max}")


def _clamp_cuda(ins, plan, dt):
    bounds = (("lo", ins.attrs.min), ("hi", ins.attrs.max))
    consts = tuple((n, v) for n, v in bounds if v is not None)
    return KernelCall(Kernel.MAP, dict(body="map_clamp.cu.j2", consts=consts))


def _clamp_trt(nn, x, min=None, max=None):
    y = nn.f32(x)
    if min is not None:
        y = nn.ew(y, nn.scalar(min), "MAX")
    if max is not None:
        y = nn.ew(y, nn.scalar(max), "MIN")
    return nn.run_dtype(y)


CLAMP = OpDef(
    "clamp", ("x",), {"min": Attr("float?", None), "max": Attr("float?", None)}, same,
    "x limited to [min, max] elementwise (either bound may be none); NaN stays NaN",
    reference=lambda ctx, ins, a: torch.clamp(a[0], ins.attrs.min, ins.attrs.max),
    cuda=_clamp_cuda,
    trt=TrtLowering(_clamp_trt, attr_kwargs("min", "max")),
    check_attrs=_clamp_bounds,
)

DEFS = (*DEFS, CLAMP)
