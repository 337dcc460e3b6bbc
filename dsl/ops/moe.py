"""`moe`: mixture of experts. A router scores every expert of each token, picks some, and the
output is the picked experts' outputs weighted by their scores. The experts are copies of a block
(`experts=NAME`). The router is described by attributes, each one a step of one pipeline:

1. scores from the router logits: `scoring="softmax"` (over the experts) or `"sigmoid"` (each);
2. scores for choosing: the scores plus an optional correction-bias weight `[E]` (the third
   operand; DeepSeek-V3's e_score_correction_bias), used to pick experts, never as a weight;
3. group-limited choice: with `groups=G`, the experts form G consecutive groups, each group is
   scored by its best choice score (`group_score="max"`, DeepSeek-V2's group_limited_greedy) or
   the sum of its best two (`"top2_sum"`, DeepSeek-V3's noaux_tc), and only the `topk_groups`
   best groups stay eligible;
4. the `top_k` eligible experts with the highest choice scores; their weights are their scores
   (step 1), renormalised to sum 1 if `renormalize`, then times `scale` (routed_scaling_factor).

`select="sparsemixer"` replaces steps 1-4 by PhiMoE's sparsemixer top-2 (inference form): the
first expert is the arg-max logit, weighted by its softmax probability over the experts whose
logit is within a relative `2 * jitter_eps` of the max; the second the same with the first
masked out."""

from __future__ import annotations

import math

import torch

from . import elementwise, layout
from .base import Attr, Kernel, KernelCall, OpDef, Torch, TrtLowering, act, need

SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
SELECTS = ("topk", "sparsemixer")


def _shape(ins, attrs):
    x, logits = act(ins[0]), act(ins[1])
    n = logits.shape[1]
    k = attrs.top_k
    need(isinstance(k, int) and 0 < k <= n, f"top_k must be in 1..{n} (the number of experts), got {k!r}")
    need(attrs.scoring in SCORINGS, f"scoring must be one of {', '.join(SCORINGS)}, got {attrs.scoring!r}")
    need(attrs.select in SELECTS, f"select must be one of {', '.join(SELECTS)}, got {attrs.select!r}")
    need(attrs.group_score in GROUP_SCORES,
         f"group_score must be one of {', '.join(GROUP_SCORES)}, got {attrs.group_score!r}")
    bias = ins[2] if len(ins) > 2 else None
    if bias is not None:
        need(bias.dtype == "float" and bias.shape == (n,), f"the correction bias must be float[{n}], got {bias}")
    g, kg = attrs.groups, attrs.topk_groups
    if g is not None:
        need(isinstance(g, int) and g > 0 and n % g == 0, f"groups must divide the {n} experts, got {g!r}")
        need(isinstance(kg, int) and 0 < kg <= g, f"topk_groups must be in 1..{g} (groups), got {kg!r}")
        need(k <= kg * (n // g), f"top_k {k} is more than the {kg * (n // g)} experts of {kg} groups of {n // g}")
        need(attrs.group_score != "top2_sum" or n // g >= 2, "group_score top2_sum needs groups of 2 or more experts")
    else:
        need(kg is None, "topk_groups needs groups")
    if attrs.select == "sparsemixer":
        need(k == 2, f"sparsemixer picks exactly 2 experts (top_k=2), got {k}")
        need(attrs.scoring == "softmax" and bias is None and g is None and not attrs.renormalize
             and attrs.scale == 1.0, "sparsemixer takes no scoring, bias, groups, renormalize or scale")
    return (x,)


def _sparsemixer(logits: torch.Tensor, eps: float):
    """PhiMoE's sparsemixer at inference (transformers' `sparsemixer`, training=False)."""
    def pick(masked):
        top, idx = masked.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=top)
        gates = masked.masked_fill((top - logits) / factor > 2 * eps, float("-inf"))
        return torch.softmax(gates, dim=-1).gather(-1, idx), idx

    w1, i1 = pick(logits)
    w2, i2 = pick(torch.scatter(logits, -1, i1, float("-inf")))
    return torch.cat((w1, w2), -1), torch.cat((i1, i2), -1)


def route(logits: torch.Tensor, bias: torch.Tensor | None, at):
    """(weights, chosen) [T, k]: float32 router weights and expert indices per token."""
    logits = logits.float()
    if at.select == "sparsemixer":
        return _sparsemixer(logits, at.jitter_eps)
    scores = torch.softmax(logits, dim=-1) if at.scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores if bias is None else scores + bias.float()
    if at.groups is not None:
        t, n = choice.shape
        grouped = choice.view(t, at.groups, n // at.groups)
        gs = grouped.max(-1).values if at.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(at.topk_groups, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, n)
    chosen = torch.topk(choice, at.top_k, dim=-1).indices
    weights = scores.gather(1, chosen)
    if at.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if at.scale != 1.0:
        weights = weights * at.scale
    return weights, chosen


def _reference(ctx, ins, a):
    """Loops over experts, each on the tokens that chose it; sums in expert order."""
    x, logits = a[0], a[1]
    weights, chosen = route(logits, a[2] if len(a) > 2 else None, ins.attrs)
    out = torch.zeros_like(x)
    for e, prog in enumerate(ins.experts):
        rows, slot = torch.nonzero(chosen == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        y = ctx.run(prog, {prog.inputs[0]: x[rows]})
        out.index_add_(0, rows, (y.float() * weights[rows, slot, None]).to(x.dtype))
    return out


# ---- cuda: every expert at once, as grouped GEMMs over the token copies sorted by expert
#
# The expert programs are copies of one block, so expert 0's program stands for all of them: its
# linears become grouped GEMMs (one launch covers every expert, each on its own rows, its own
# weights stacked [E, out, in]; sibling linears of one input are one GEMM over their concatenated
# weights), and its other ops, which only transform rows, run once over all rows (sorted by expert).

# Ops that treat each row alone and read no weight: run once over every expert's rows.
ROW_OPS = frozenset(d.name for d in (*elementwise.DEFS, *layout.DEFS))


def _loc(i) -> str:
    return f"{i.kind.value} at {i.op.pos.file.rsplit('/', 1)[-1]}:{i.op.pos.line}"


def expert_stages(ins, plan) -> tuple | str:
    """Expert 0's program as steps run over all experts at once, in order: ("gemm", positions of
    sibling linears sharing one input and bias-ness) or ("op", position of a row op). Or, as a
    string, why the experts cannot run so (then they run one by one: the op's reference)."""
    progs = ins.experts
    first = progs[0]
    Value = type(first.inputs[0])  # dsl.plan.Value (the plan imports this table; not the other way)
    if len(first.inputs) != 1:
        return f"an expert program with {len(first.inputs)} inputs"
    for prog in progs[1:]:  # copies of one block: same ops, same dataflow, same weight shapes
        if len(prog.instrs) != len(first.instrs) or len(prog.inputs) != 1:
            return "the experts' programs differ"
        same = {prog.inputs[0]: first.inputs[0]}
        for a, b in zip(prog.instrs, first.instrs):
            if a.kind is not b.kind or a.attrs != b.attrs or len(a.inputs) != len(b.inputs):
                return "the experts' programs differ"
            for x, y in zip(a.inputs, b.inputs):
                if type(x) is not type(y) or (isinstance(x, Value) and same.get(x) != y):
                    return "the experts' programs differ"
                weight = x is not None and not isinstance(x, Value)
                if weight and plan.weights[x.name].shape != plan.weights[y.name].shape:
                    return "the experts' weights differ"
            same.update(zip(a.outputs, b.outputs))
        if same.get(prog.output) != first.output:
            return "the experts' programs differ"
    local = {first.inputs[0]}
    stages: list = []
    groups: dict = {}
    for n, i in enumerate(first.instrs):
        values = [a for a in i.inputs if isinstance(a, Value)]
        if any(v not in local for v in values):
            return f"{_loc(i)} reads a value from outside the expert"
        if i.kind.value == "linear":
            x, w, b = i.inputs
            if not isinstance(x, Value):
                return f"{_loc(i)} multiplies a weight, not the expert's rows"
            for prog in progs:
                for arg in prog.instrs[n].inputs[1:]:
                    if arg is not None and plan.weights[arg.name].quant.quantized:
                        return f"{_loc(i)}: quantized expert weights ({plan.weights[arg.name].quant.dtype}) " \
                               f"have no grouped GEMM yet"
            key = (x, b is None)
            if key in groups:
                k = groups[key]
                stages[k] = ("gemm", stages[k][1] + (n,))
            else:
                groups[key] = len(stages)
                stages.append(("gemm", (n,)))
        elif i.kind.value in ROW_OPS and len(values) == sum(a is not None for a in i.inputs):
            stages.append(("op", n))
        else:
            return f"{_loc(i)} inside an expert has no grouped lowering (only linears and weight-free row ops)"
        local.update(i.outputs)
    if not groups:
        return "the expert program has no linear"
    return tuple(stages)


def _cuda(ins, plan, dt):
    stages = expert_stages(ins, plan)
    if isinstance(stages, str):
        return Torch(f"experts run one by one on the tokens that chose them: {stages}")
    return KernelCall(Kernel.MOE, dict(stages=stages))


# ---- TensorRT: every expert runs on every token; a gate per expert (zero where not chosen)

def _one_hot(nn, idx, n: int):
    """[T, k] int32 indices -> float32 [T, n]: how often each of n columns is picked (0 or 1)."""
    k = idx.shape[1]
    hit = nn.ew(nn.shuffle(idx, reshape=(-1, k, 1)), nn.const(torch.arange(n, dtype=torch.int32).view(1, 1, n)),
                "EQUAL")  # [T, k, n]
    return nn.shuffle(nn.reduce(nn.cast(hit, nn.trt.float32), "SUM", 1), reshape=(-1, n))


def _topk(nn, x, k: int, axis: int):
    top = nn.net.add_topk(x, nn.trt.TopKOperation.MAX, k, 1 << axis)
    return top.get_output(0), top.get_output(1)


def _mixer_pick(nn, logits, masked, eps2):
    """One sparsemixer pick: (its weight [T, 1], its one-hot [T, E])."""
    top, idx = _topk(nn, masked, 1, 1)  # [T, 1]
    factor = nn.ew(nn.unary(logits, "ABS"), top, "MAX")
    cut = nn.ew(nn.ew(nn.ew(top, logits, "SUB"), factor, "DIV"), eps2, "GREATER")
    gates = nn.net.add_select(cut, nn.scalar(-math.inf), masked).get_output(0)
    sm = nn.net.add_softmax(gates)
    sm.axes = 1 << 1
    # the picked expert keeps its logit, the largest left: its probability is the largest
    return nn.reduce(sm.get_output(0), "MAX", 1), _one_hot(nn, idx, logits.shape[1])


def gates(nn, logits, top_k: int, renormalize: bool, experts: int, scoring: str = "softmax", bias=None,
          groups: int | None = None, topk_groups: int | None = None, group_score: str = "max", scale: float = 1.0,
          select: str = "topk", jitter_eps: float = 0.01):
    """Per expert, [T, 1] in the run dtype: its router weight for each token (0 if not chosen)."""
    lf = nn.f32(logits)
    if select == "sparsemixer":
        eps2 = nn.scalar(2 * jitter_eps)
        w1, hit1 = _mixer_pick(nn, lf, lf, eps2)
        masked = nn.net.add_select(nn.ew(hit1, nn.scalar(0.5), "GREATER"), nn.scalar(-math.inf), lf).get_output(0)
        w2, hit2 = _mixer_pick(nn, lf, masked, eps2)
        w = nn.ew(nn.ew(hit1, w1, "PROD"), nn.ew(hit2, w2, "PROD"), "SUM")  # [T, E]
    else:
        if scoring == "softmax":
            sm = nn.net.add_softmax(lf)
            sm.axes = 1 << 1
            scores = sm.get_output(0)
        else:
            scores = nn.activation(lf, "SIGMOID")
        choice = scores if bias is None else nn.ew(scores, nn.row(nn.f32(bias)), "SUM")
        if groups is not None:
            size = experts // groups
            grouped = nn.shuffle(choice, reshape=(-1, groups, size))
            if group_score == "max":
                gs = nn.reduce(grouped, "MAX", 2)  # [T, G, 1]
            else:
                gs = nn.reduce(_topk(nn, grouped, 2, 2)[0], "SUM", 2)
            _, gidx = _topk(nn, nn.shuffle(gs, reshape=(-1, groups)), topk_groups, 1)
            keep = nn.ew(nn.shuffle(_one_hot(nn, gidx, groups), reshape=(-1, groups, 1)), nn.scalar(0.5, rank=3),
                         "GREATER")
            choice = nn.shuffle(nn.net.add_select(keep, grouped, nn.scalar(-math.inf, rank=3)).get_output(0),
                                reshape=(-1, experts))
        _, chosen = _topk(nn, choice, top_k, 1)
        w = nn.ew(_one_hot(nn, chosen, experts), scores, "PROD")  # [T, E]: scores where chosen, else 0
        if renormalize:
            w = nn.ew(w, nn.reduce(w, "SUM", 1), "DIV")
        if scale != 1.0:
            w = nn.ew(w, nn.scalar(scale), "PROD")
    return [nn.run_dtype(nn.gather(w, nn.const(torch.tensor([e], dtype=torch.int32)), 1)) for e in range(experts)]


def combine(nn, outputs, gate_list):
    """sum_e outputs[e] * gates[e], experts in order (as the reference accumulates)."""
    total = None
    for y, g in zip(outputs, gate_list):
        part = nn.ew(y, g, "PROD")
        total = part if total is None else nn.ew(total, part, "SUM")
    return total


_ATTRS = {
    "experts": Attr("block"), "top_k": Attr("int"), "renormalize": Attr("bool", True),
    "scoring": Attr("str", "softmax"), "groups": Attr("int?", None), "topk_groups": Attr("int?", None),
    "group_score": Attr("str", "max"), "scale": Attr("float", 1.0),
    "select": Attr("str", "topk"), "jitter_eps": Attr("float", 0.01),
}


def _trt_kwargs(ins, lw):
    at = ins.attrs
    kw = [("top_k", repr(at.top_k)), ("renormalize", repr(at.renormalize)), ("experts", repr(len(ins.experts)))]
    for name in ("scoring", "groups", "topk_groups", "group_score", "scale", "select", "jitter_eps"):
        if getattr(at, name) != _ATTRS[name].default:  # only what differs: plain routers read as before
            kw.append((name, repr(getattr(at, name))))
    if len(ins.inputs) > 2 and ins.inputs[2] is not None:
        kw.append(("bias", lw.arg(ins.inputs[2])))
    return kw


MOE = OpDef(
    "moe", ("x", "logits", "bias?"), _ATTRS,
    _shape, "mixture of experts: a router (softmax or sigmoid scores, optional choice bias, group-limited "
            "top-k, renormalisation, scale; or sparsemixer top-2) picks experts per token; weighted sum",
    reference=_reference,
    cuda=_cuda,
    trt=TrtLowering(gates, _trt_kwargs, macro="moe"),
)

DEFS = (MOE,)
