"""Rotary position embedding: `rope`. The frequency math is dsl/rope.py's (HF's, for every scaling)."""

from __future__ import annotations

import torch

from .. import rope as math
from .base import Attr, Kernel, KernelCall, OpDef, TrtLowering, act, heads, need


def _shape(ins, attrs):
    x = act(ins[0])
    hd = attrs.head_dim
    heads(x.shape[1], hd, "input")
    rd = attrs.rotary_dim or hd
    need(isinstance(rd, int) and 0 < rd <= hd and rd % 2 == 0,
         f"rotary_dim must be an even int in (0, head_dim={hd}], got {rd!r}")
    need(attrs.layout in ("half", "interleaved"), f"layout must be half or interleaved, got {attrs.layout!r}")
    sc = attrs.scaling
    if sc is not None and sc.kind == "longrope":
        need(len(sc.short_factor) == rd // 2,
             f"longrope short_factor / long_factor need rotary_dim / 2 = {rd // 2} entries, got {len(sc.short_factor)}")
    if sc is not None and sc.kind in ("yarn", "longrope"):
        need(sc.factor is not None or attrs.max_pos is not None,
             f"{sc.kind} rope scaling without a factor needs max_pos")
    return (x,)


def _scaling(at):
    """The op's scaling with HF's config-level defaults filled in (dsl/rope.resolve)."""
    return math.resolve(at.scaling, at.max_pos, at.original_max_pos)


def _reference(ctx, ins, a):
    at, x = ins.attrs, a[0]
    rd, sc = at.rotary_dim or at.head_dim, _scaling(at)
    if sc is not None and sc.kind == "dynamic":  # frequencies per sequence length
        freqs = torch.stack([math.inv_freq(rd, at.theta, sc, int(n), at.max_pos)
                             for n in ctx.seq_len.tolist()]) if x.shape[0] else torch.zeros(0, rd // 2)
    elif sc is not None and sc.kind == "longrope":
        # One table for the whole step, by its longest sequence: transformers picks by
        # max(position_ids) + 1 over the forward's batch, and the cuda kernel by the step's seq_len.
        n = int(ctx.seq_len.max()) if x.shape[0] else 0
        freqs = math.inv_freq(rd, at.theta, sc, n, at.max_pos)
    else:
        freqs = math.inv_freq(rd, at.theta, sc, None, at.max_pos)
    return math.apply_rope(x, ctx.positions, freqs.to(x.device), at.head_dim, rd, at.layout,
                           math.attention_factor(sc))


def kernel_constants(attrs) -> dict:
    """The rotary half of the rope + KV-write kernel (codegen/specs.RopeCacheSpec's fields)."""
    sc = _scaling(attrs)
    out = dict(rotary_dim=attrs.rotary_dim or attrs.head_dim, layout=attrs.layout, theta=attrs.theta,
               scaling=sc.kind if sc else "none")
    if sc is not None:
        out.update(factor=sc.factor, low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                   original_max_position=sc.original_max_position_embeddings or attrs.max_pos or 0,
                   attention_factor=math.attention_factor(sc))
    if sc is not None and sc.kind == "yarn":
        out.update(beta_fast=sc.beta_fast, beta_slow=sc.beta_slow, truncate=sc.truncate)
    if sc is not None and sc.kind == "longrope":
        out.update(short_factor=sc.short_factor, long_factor=sc.long_factor)
    return out


def _cuda(ins, plan, dt):
    # Only in front of an attention (codegen/fuse.py's rope_attention pattern): it writes the
    # rotated K and V into the paged cache. A rope feeding anything else runs as torch ops.
    return KernelCall(Kernel.ROPE_KV, kernel_constants(ins.attrs))


def _trt(nn, x, head_dim: int, rotary_dim: int, layout: str, table):
    n_heads = x.shape[1] // head_dim
    cos, sin = table
    layer = nn.net.add_rotary_embedding(nn.to_heads(x, n_heads, head_dim), cos, sin, layout == "interleaved",
                                        rotary_dim)
    layer.set_input(3, nn.position_ids())
    return nn.from_heads(layer.get_output(0), n_heads, head_dim)


def table(nn, rotary_dim: int, theta: float, scaling, max_pos):
    """cos, sin [max_seq_len, rotary_dim / 2] in the run dtype (angles in float32, as HF; yarn's
    attention factor multiplies both in float32 before the cast)."""
    key = ("rope", rotary_dim, theta, scaling, max_pos)
    if key not in nn.cache:
        freqs = math.inv_freq(rotary_dim, theta, scaling, None, max_pos)  # [R/2]
        angles = torch.arange(nn.max_seq_len, dtype=torch.float32)[:, None] * freqs
        cos, sin, af = angles.cos(), angles.sin(), math.attention_factor(scaling, max_pos)
        if af != 1.0:
            cos, sin = cos * af, sin * af
        nn.cache[key] = (nn.const(cos.to(nn.torch_dtype)), nn.const(sin.to(nn.torch_dtype)))
    return nn.cache[key]


def _scaling_code(scaling) -> str:
    if scaling is None:
        return "None"
    fields = ", ".join(f"{k}={v!r}" for k, v in vars(scaling).items())
    return f"RopeScaling({fields})"


def _trt_kwargs(ins, lw):
    at = ins.attrs
    rd = at.rotary_dim or at.head_dim
    tab = lw.table(f"rope_table(nn, {rd!r}, {at.theta!r}, {_scaling_code(_scaling(at))}, {at.max_pos!r})")
    return [("head_dim", repr(at.head_dim)), ("rotary_dim", repr(rd)), ("layout", repr(at.layout)), ("table", tab)]


def _trt_unsupported(ins):
    sc = ins.attrs.scaling
    if sc is not None and sc.kind == "dynamic":
        return "rope with dynamic NTK scaling has per-sequence frequencies, which a TensorRT network cannot tabulate"
    if sc is not None and sc.kind == "longrope":
        return ("rope with longrope scaling switches from its short to its long factors once a sequence passes "
                "original_max_position_embeddings, which a TensorRT network's one cos/sin table cannot do")
    return None


ROPE = OpDef(
    "rope", ("x",), {
        "head_dim": Attr("int"), "rotary_dim": Attr("int?", None), "theta": Attr("float", 10000.0),
        "layout": Attr("str", "half"), "scaling": Attr("rope_scaling?", None), "max_pos": Attr("int?", None),
        "original_max_pos": Attr("int?", None),  # a config-level original_max_position_embeddings
    }, _shape, "rotary position embedding of every head of x at the tokens' positions",
    reference=_reference,
    cuda=_cuda,
    trt=TrtLowering(_trt, _trt_kwargs, _trt_unsupported),
)

DEFS = (ROPE,)
