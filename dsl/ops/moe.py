"""`moe`: mixture of experts. A softmax router picks the top-k experts of each token; the
output is their outputs' weighted sum. The experts are copies of a block (`experts=NAME`)."""

from __future__ import annotations

import torch

from .base import Attr, OpDef, TrtLowering, act, need, torch_only


def _shape(ins, attrs):
    x, logits = act(ins[0]), act(ins[1])
    k = attrs.top_k
    need(isinstance(k, int) and 0 < k <= logits.shape[1],
         f"top_k must be in 1..{logits.shape[1]} (the number of experts), got {k!r}")
    return (x,)


def _route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(weights, chosen) [T, k]: float32 router weights and expert indices per token."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, chosen = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, chosen


def _reference(ctx, ins, a):
    """Loops over experts, each on the tokens that chose it; sums in expert order."""
    x, logits = a
    weights, chosen = _route(logits, ins.attrs.top_k, ins.attrs.renormalize)
    out = torch.zeros_like(x)
    for e, prog in enumerate(ins.experts):
        rows, slot = torch.nonzero(chosen == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        y = ctx.run(prog, {prog.inputs[0]: x[rows]})
        out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
    return out


# ---- TensorRT: every expert runs on every token; a gate per expert (zero where not chosen)

def gates(nn, logits, top_k: int, renormalize: bool, experts: int):
    """Per expert, [T, 1] in the run dtype: its router weight for each token (0 if not chosen)."""
    sm = nn.net.add_softmax(nn.f32(logits))
    sm.axes = 1 << 1
    top = nn.net.add_topk(sm.get_output(0), nn.trt.TopKOperation.MAX, top_k, 1 << 1)
    weights, chosen = top.get_output(0), top.get_output(1)  # [T, k] float32, [T, k] int32
    if renormalize:
        weights = nn.ew(weights, nn.reduce(weights, "SUM", 1), "DIV")
    out = []
    for e in range(experts):
        hit = nn.cast(nn.ew(chosen, nn.scalar(e, torch.int32), "EQUAL"), nn.trt.float32)
        out.append(nn.run_dtype(nn.reduce(nn.ew(hit, weights, "PROD"), "SUM", 1)))
    return out


def combine(nn, outputs, gate_list):
    """sum_e outputs[e] * gates[e], experts in order (as the reference accumulates)."""
    total = None
    for y, g in zip(outputs, gate_list):
        part = nn.ew(y, g, "PROD")
        total = part if total is None else nn.ew(total, part, "SUM")
    return total


MOE = OpDef(
    "moe", ("x", "logits"), {"experts": Attr("block"), "top_k": Attr("int"), "renormalize": Attr("bool", True)},
    _shape, "mixture of experts: softmax router, top-k experts per token, weighted sum",
    reference=_reference,
    cuda=torch_only("experts run one by one on the tokens that chose them (a grouped expert GEMM is to come)"),
    trt=TrtLowering(gates, lambda ins, lw: [("top_k", repr(ins.attrs.top_k)),
                                             ("renormalize", repr(ins.attrs.renormalize)),
                                             ("experts", repr(len(ins.experts)))], macro="moe"),
)

DEFS = (MOE,)
