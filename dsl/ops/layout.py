"""Ops that only move features: `concat` (whole rows, or head by head) and `repeat` (a tensor
tiled across heads). Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) needs both: each
head's query and key are its own non-rotary part followed by a rotary part, which for the key is
one [T, d] tensor shared by every head:
`k = concat(k_nope, repeat(k_rot, times=heads), group_a=nope_dim, group_b=rope_dim)`."""

from __future__ import annotations

import torch

from .base import Attr, OpDef, T, TrtLowering, TType, act, need, torch_only


def _groups(attrs, a: int, b: int) -> tuple[int, int, int]:
    """(heads, a's width per head, b's width per head); without groups one 'head' of each row."""
    ga, gb = attrs.group_a, attrs.group_b
    need((ga is None) == (gb is None), "group_a and group_b go together (both, or neither for whole rows)")
    if ga is None:
        return 1, a, b
    need(isinstance(ga, int) and ga > 0 and a % ga == 0, f"a has {a} features, not a multiple of group_a {ga!r}")
    need(isinstance(gb, int) and gb > 0 and b % gb == 0, f"b has {b} features, not a multiple of group_b {gb!r}")
    need(a // ga == b // gb, f"a has {a // ga} groups of {ga}, b {b // gb} groups of {gb}: the counts must match")
    return a // ga, ga, gb


def _concat_shape(ins, attrs):
    a, b = act(ins[0]), act(ins[1])
    _groups(attrs, a.shape[1], b.shape[1])
    return (TType((T, a.shape[1] + b.shape[1])),)


def _concat_ref(ctx, ins, args):
    a, b = args
    h, ga, gb = _groups(ins.attrs, a.shape[1], b.shape[1])
    return torch.cat((a.reshape(-1, h, ga), b.reshape(-1, h, gb)), dim=2).reshape(a.shape[0], -1)


def _concat_trt(nn, a, b, heads: int, group_a: int, group_b: int):
    """Output column j takes a's or b's column: a gather from each, masked by 0/1 and added (exact:
    x * 1 + 0 = x; the layers the test interpreter knows, no concatenation layer)."""
    g = group_a + group_b
    j = torch.arange(heads * g)
    head, off = j // g, j % g
    from_a = off < group_a
    ia = torch.where(from_a, head * group_a + off, 0).to(torch.int32)
    ib = torch.where(from_a, 0, head * group_b + off - group_a).to(torch.int32)
    ma = nn.const(from_a.to(nn.torch_dtype).view(1, -1))
    mb = nn.const((~from_a).to(nn.torch_dtype).view(1, -1))
    return nn.ew(nn.ew(nn.gather(a, nn.const(ia), 1), ma, "PROD"), nn.ew(nn.gather(b, nn.const(ib), 1), mb, "PROD"),
                 "SUM")


def _concat_kwargs(ins, lw):
    ta, tb = (lw.plan.types[v] for v in ins.inputs)
    h, ga, gb = _groups(ins.attrs, ta.shape[1], tb.shape[1])
    return [("heads", repr(h)), ("group_a", repr(ga)), ("group_b", repr(gb))]


CONCAT = OpDef(
    "concat", ("a", "b"), {"group_a": Attr("int?", None), "group_b": Attr("int?", None)}, _concat_shape,
    "features of a then b; with group_a / group_b, group by group (per head: a's head h, then b's head h)",
    reference=_concat_ref,
    cuda=torch_only("a copy of its operands' features; no kernel"),
    trt=TrtLowering(_concat_trt, _concat_kwargs),
)


def _repeat_shape(ins, attrs):
    x = act(ins[0])
    n = attrs.times
    need(isinstance(n, int) and not isinstance(n, bool) and n > 0, f"times must be a positive int, got {n!r}")
    return (TType((T, n * x.shape[1])),)


def _repeat_trt(nn, x, times: int):
    d = x.shape[1]
    return nn.gather(x, nn.const((torch.arange(times * d) % d).to(torch.int32)), 1)


REPEAT = OpDef(
    "repeat", ("x",), {"times": Attr("int")}, _repeat_shape,
    "x [T, d] tiled `times` times along its features: [T, times * d] (one tensor shared by every head)",
    reference=lambda ctx, ins, a: a[0].repeat(1, ins.attrs.times),
    cuda=torch_only("a copy (an expanded view); no kernel"),
    trt=TrtLowering(_repeat_trt, lambda ins, lw: [("times", repr(ins.attrs.times))]),
)

DEFS = (CONCAT, REPEAT)
