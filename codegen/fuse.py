"""Fusion pass: a checked Plan -> the kernel program the `cuda` backend runs.

Patterns, matched on the unrolled SSA program (each needs the intermediate to have no
other use, so fusing never changes what any other op sees):
- `r = a + b; h = norm(r, w)`        -> one fused residual-add + norm kernel (writes h and r);
- sibling `linear(x, w_i)` ops         -> one GEMM over the concatenated weights (QKV, gate|up);
- `rope(q), rope(k), v -> attention`  -> rotary + paged KV write, then paged attention;
- `act(g) * u`                         -> one gated activation kernel;
- `embedding`, plain activations, `softcap` -> their kernels;
and every other op runs as torch ops through the reference implementation. Each kernel op
keeps the instructions it covers, so generated code names the spec op it came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.dsl.checker import Instr, Plan
from kiln.dsl.ops import HF_ACTIVATIONS

from . import specs as ks

_KERNEL_ACTS = {"silu", "gelu", "gelu_tanh", "relu"}
_SCALINGS = {None: "none", "linear": "linear", "llama3": "smooth", "dynamic": "dynamic"}


@dataclass
class KOp:
    kind: str  # embed | norm | gemm | attn | act | softcap | torch
    ins: tuple[str | None, ...]
    outs: tuple[str, ...]
    instrs: tuple[Instr, ...]
    spec: Any = None  # the kernel spec (attn: (RopeCacheSpec, DecodeAttnSpec, PrefillAttnSpec))
    extra: dict = field(default_factory=dict)


def origin(instr: Instr) -> str:
    return f"{Path(instr.op.pos.file).name}:{instr.op.pos.line} {instr.op.text}"


def fuse(plan: Plan, dtype: str, page_size: int) -> list[KOp]:
    """Match patterns over the whole program first, then emit: a group runs where its last
    instruction stood (a GEMM group where its first did), everything else in program order."""
    instrs = plan.program.instrs
    pos = {id(ins): n for n, ins in enumerate(instrs)}
    uses: Counter = Counter(i for ins in instrs for i in ins.inputs if i is not None)
    uses[plan.program.output] += 1
    users: dict[str, list[int]] = {}
    for n, ins in enumerate(instrs):
        for i in ins.inputs:
            if i is not None:
                users.setdefault(i, []).append(n)
    producer = {o: ins for ins in instrs for o in ins.outputs}
    types = plan.types
    anchor: dict[int, KOp] = {}  # instruction position -> the op emitted there
    covered: set[int] = set()

    def claim(op: KOp, at: Instr) -> None:
        anchor[pos[id(at)]] = op
        covered.update(id(i) for i in op.instrs)

    def free(*xs: Instr | None) -> bool:
        return all(x is not None and id(x) not in covered for x in xs)

    # Sibling linears (same input, all with or all without bias): one GEMM at the first.
    groups: dict[tuple, list[Instr]] = {}
    for ins in instrs:
        if ins.kind == "linear":
            groups.setdefault((ins.inputs[0], ins.inputs[2] is None), []).append(ins)
    for group in groups.values():
        fused = "gemm__" + "__".join(g.outputs[0].replace("/", "_") for g in group) if len(group) > 1 else None
        widths = [types[g.outputs[0]].shape[1] for g in group]
        starts = [sum(widths[:n]) for n in range(len(group))]
        claim(KOp("gemm", (group[0].inputs[0],), tuple(g.outputs[0] for g in group), tuple(group),
                  extra={"weights": tuple(g.inputs[1] for g in group), "biases": tuple(g.inputs[2] for g in group),
                         "fused": fused, "slices": tuple(zip(starts, widths))}), group[0])

    for ins in instrs:
        k = ins.kind
        if k == "attention":
            q, kk, v = ins.inputs
            qr, kr = producer.get(q), producer.get(kk)
            roped = free(qr, kr) and qr.kind == kr.kind == "rope" and uses[q] == uses[kk] == 1 \
                and qr.attrs == kr.attrs
            a, hd, site = ins.attrs, ins.attrs["head_dim"], plan.sites[ins.site]
            common = dict(heads=site.heads, kv_heads=site.kv_heads, head_dim=hd, page_size=page_size,
                          scale=a["scale"] if a["scale"] is not None else hd ** -0.5, window=a["window"] or 0,
                          softcap=a["softcap"] or 0.0, dtype=dtype, origin=origin(ins))
            rope = _rope_spec(qr.attrs if roped else None, site, hd, page_size, dtype, origin(ins))
            claim(KOp("attn", (qr.inputs[0] if roped else q, kr.inputs[0] if roped else kk, v), ins.outputs,
                      (qr, kr, ins) if roped else (ins,),
                      (rope, ks.DecodeAttnSpec(**common), ks.PrefillAttnSpec(causal=a["causal"], **common)),
                      extra={"site": ins.site}), ins)
        elif k in ("rmsnorm", "layernorm") and not ins.attrs.get("group"):  # grouped: torch ops
            x = ins.inputs[0]
            add = producer.get(x)
            # Fuse the add only if nothing between it and the norm reads its result.
            fused_add = free(add) and add.kind == "add" and types[add.inputs[0]] == types[add.inputs[1]] and \
                all(u >= pos[id(ins)] for u in users.get(x, []))
            spec = ks.NormSpec("rms" if k == "rmsnorm" else "layer", types[x].shape[1], ins.attrs["eps"],
                               weight_offset=ins.attrs.get("offset", 0.0),
                               has_bias=k == "layernorm" and ins.inputs[2] is not None,
                               has_residual=fused_add, dtype=dtype, origin=origin(ins))
            claim(KOp("norm", (add.inputs[0], add.inputs[1]) if fused_add else (x,),
                      (ins.outputs[0], x) if fused_add else ins.outputs, (add, ins) if fused_add else (ins,), spec,
                      extra={"weight": ins.inputs[1], "bias": ins.inputs[2] if k == "layernorm" else None}), ins)
        elif k == "mul":
            act = producer.get(ins.inputs[0])
            if free(act) and _act_kind(act) in _KERNEL_ACTS and uses[ins.inputs[0]] == 1:
                spec = ks.ActSpec(_act_kind(act), True, types[ins.outputs[0]].shape[1], dtype, origin(ins))
                claim(KOp("act", (act.inputs[0], ins.inputs[1]), ins.outputs, (act, ins), spec), ins)

    for ins in instrs:  # single-instruction kernels for what no pattern took
        if id(ins) in covered:
            continue
        if _act_kind(ins) in _KERNEL_ACTS:
            spec = ks.ActSpec(_act_kind(ins), False, types[ins.outputs[0]].shape[1], dtype, origin(ins))
            claim(KOp("act", (ins.inputs[0],), ins.outputs, (ins,), spec), ins)
        elif ins.kind == "embedding" and ins.inputs[0] == "tokens":
            table = plan.weights[ins.inputs[1][2:]]
            claim(KOp("embed", ins.inputs, ins.outputs, (ins,),
                      ks.EmbedSpec(table.shape[0], table.shape[1], dtype=dtype, origin=origin(ins))), ins)
        elif ins.kind == "softcap":
            claim(KOp("softcap", ins.inputs, ins.outputs, (ins,), ks.SoftcapSpec(ins.attrs["cap"], dtype, origin(ins))),
                  ins)
        else:
            claim(KOp("torch", ins.inputs, ins.outputs, (ins,)), ins)
    return [anchor[n] for n in sorted(anchor)]


def _act_kind(ins: Instr | None) -> str | None:
    if ins is None:
        return None
    if ins.kind == "act":
        return HF_ACTIVATIONS.get(ins.attrs["fn"])
    return ins.kind if ins.kind in _KERNEL_ACTS else None


def _rope_spec(attrs: dict | None, site, hd: int, page_size: int, dtype: str, org: str) -> ks.RopeCacheSpec:
    if attrs is None:
        return ks.RopeCacheSpec(site.heads, site.kv_heads, hd, 0, page_size, dtype=dtype, origin=org)
    sc = attrs["scaling"]
    kind = _SCALINGS.get(sc.kind if sc else None)
    if kind is None:
        raise ks.KernelSpecError(f"rope scaling {sc.kind!r} has no kernel yet ({org})")
    extra: dict[str, Any] = {}
    if sc is not None:
        extra = dict(factor=sc.factor, low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                     original_max_position=sc.original_max_position_embeddings or attrs["max_pos"] or 0)
    return ks.RopeCacheSpec(site.heads, site.kv_heads, hd, attrs["rotary_dim"] or hd, page_size,
                            layout=attrs["layout"], theta=attrs["theta"], scaling=kind, dtype=dtype,
                            origin=org, **extra)
