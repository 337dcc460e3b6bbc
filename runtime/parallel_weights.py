"""Each tensor-parallel rank's share of the weights, as the shard pass (dsl/passes.py `shard`)
describes it, of its pipeline stage's weights only (dsl/passes.py `stage`; ranks are stage-major:
global rank = stage * tp + tp rank): `local_weights` cuts it from whole tensors (random models),
`load_sharded` reads only it from safetensors files (`safe_open(...).get_slice`), counting the bytes each rank read.

The single-rank path (runtime/weights.py load_weights) is untouched; this one handles plain
float checkpoints (no quantized formats, no GGUF: `--tp` refuses those).
"""

from __future__ import annotations

import dataclasses

import torch
from kiln.dsl.errors import SpecError
from kiln.dsl.ops import OpKind
from kiln.dsl.passes import stage_of, stage_sites, stage_weights
from kiln.dsl.plan import Plan, Program, Value, WeightSlot
from kiln.dsl.sources import Alias, Tensor, Transpose

from .checkpoint import Checkpoint, CheckpointError
from .weights import load_weights


def slice_of(slot: WeightSlot, rank: int, ranks: int):
    """(axis, start, stop) of `rank`'s slice, None for the whole tensor, or False where the rank
    holds none of it (an expert another rank holds). A bias added once (`first`) is the whole
    tensor on rank 0 and False elsewhere (zeros)."""
    d = slot.shard
    if d.kind == "split":
        parts = d.parts or ranks
        size = slot.shape[d.axis] // parts
        part = rank * parts // ranks
        return d.axis, part * size, (part + 1) * size
    if d.kind == "expert":
        return None if d.rank == rank else False
    if d.kind == "first":
        return None if rank == 0 else False
    return None


def tp_rank(plan: Plan, rank: int) -> int:
    """The tensor-parallel rank (within its pipeline stage) of global rank `rank`."""
    return rank % plan.ranks


def local_weights(plan: Plan, weights: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """`rank`'s share of whole weights (a "first" bias: zeros on the other ranks): its stage's
    weights, cut for its tensor-parallel rank."""
    out = {}
    mine = stage_weights(plan, stage_of(plan, rank))
    for name, slot in plan.weights.items():
        if name not in weights or name not in mine:
            continue
        s = slice_of(slot, tp_rank(plan, rank), plan.ranks)
        t = weights[name]
        if s is False:
            if slot.shard.kind == "first":
                out[name] = torch.zeros_like(t)
            continue
        out[name] = t if s is None else t.narrow(s[0], s[1], s[2] - s[1]).contiguous()
    return out


def local_plan(plan: Plan, rank: int) -> Plan:
    """The plan as `rank` runs it: each attention site with the heads it holds (its KV cache's); the
    sites of other pipeline stages with none (their KV cache slices hold no memory here)."""
    if plan.ranks == 1 and not plan.stages:
        return plan
    ours = stage_sites(plan, stage_of(plan, rank))
    sites = []
    for s in plan.sites:
        if s.index not in ours:
            sites.append(dataclasses.replace(s, kv_heads=0))
            continue
        if plan.ranks == 1:
            sites.append(s)
            continue
        kv = s.kv_heads // plan.ranks if s.kv_heads % plan.ranks == 0 else 1
        split = _site_split(plan, s.index)
        sites.append(dataclasses.replace(s, heads=s.heads // plan.ranks, kv_heads=kv) if split else s)
    return dataclasses.replace(plan, sites=sites, program=_embedding_offsets(plan, rank))


def _embedding_offsets(plan: Plan, rank: int) -> Program:
    """The program with each vocabulary-parallel embedding (its table split along rows) looking up
    only this rank's rows: `offset` = the first vocabulary row the rank holds."""
    instrs = []
    for ins in plan.program.instrs:
        if ins.kind is OpKind.EMBEDDING:
            slot = plan.weights[plan.alias_target(ins.inputs[1].name)]
            s = slice_of(slot, tp_rank(plan, rank), plan.ranks)
            if s and s[0] == 0:
                ins = dataclasses.replace(ins, attrs=dataclasses.replace(ins.attrs, offset=s[1]))
        instrs.append(ins)
    return dataclasses.replace(plan.program, instrs=tuple(instrs))


def local_types(plan: Plan, rank: int) -> dict:
    """Each value's type as `rank` holds it: the op definitions' shape rules (dsl/ops `infer`) over its
    slices of the weights, so the fused kernel program (codegen/fuse.py) is sized for its shard (heads,
    FFN channels, experts' channels). A value a collective follows has its whole type (the all-reduce's
    sum, the all-gather's concatenation)."""
    if plan.ranks == 1:
        return plan.types
    from kiln.dsl.ops import OPS, TType

    after = {c.value for c in plan.collectives if c.kind != "send"}
    r = tp_rank(plan, rank)
    types = {v: plan.types[v] for v in plan.program.inputs}

    def weight_type(name: str) -> TType:
        slot, target = plan.weights[name], plan.weights[plan.alias_target(name)]
        s = slice_of(slot, r, plan.ranks)
        shape = tuple(slot.shape) if s in (None, False) else \
            tuple(s[2] - s[1] if d == s[0] else n for d, n in enumerate(slot.shape))
        return TType(shape, target.decl.dtype)

    def walk(prog) -> None:
        for ins in prog.instrs:
            args = [types[a] if isinstance(a, Value) else weight_type(a.name) if a is not None else None
                    for a in ins.inputs]
            for e in ins.experts:  # each expert reads the moe's input
                types[e.inputs[0]] = args[0]
                walk(e)
            for o, t in zip(ins.outputs, OPS[ins.kind].infer(args, ins.attrs)):
                types[o] = plan.types[o] if o in after else t
    walk(plan.program)
    return types


def _site_split(plan: Plan, site: int) -> bool:
    for ins in plan.program.walk():
        if ins.site == site:
            return _attention_split(plan, ins)
    return False


def _attention_split(plan: Plan, ins) -> bool:
    """Whether the shard pass split an attention op: its q's projection is split."""
    producer = {o: i for i in plan.program.walk() for o in i.outputs}
    v = ins.inputs[0]
    while v in producer:
        p = producer[v]
        if p.kind.value == "linear":
            return plan.weights[p.inputs[1].name].shard.kind == "split"
        vals = [a for a in p.inputs if a is not None and not hasattr(a, "name")]
        if not vals:
            return False
        v = vals[0]
    return False


def expert_programs_elsewhere(plan: Plan, rank: int) -> frozenset[int]:
    """ids of the expert programs whose weights another rank holds (expert parallelism)."""
    out, rank = set(), tp_rank(plan, rank)
    for ins in plan.program.walk():
        for prog in ins.experts:
            names = [a.name for i in prog.walk() for a in i.inputs if a is not None and hasattr(a, "name")]
            if names and all(plan.weights[n].shard.kind == "expert" and plan.weights[n].shard.rank != rank
                             for n in names):
                out.add(id(prog))
    return frozenset(out)


def load_sharded(plan: Plan, ckpt: Checkpoint, rank: int, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> tuple[dict[str, torch.Tensor], int]:
    """`rank`'s weights (global rank: its pipeline stage's weights, its tensor-parallel slices) and
    the bytes it read from the checkpoint. A weight whose source is one checkpoint tensor (or its
    `.T`) is read slice by slice; other sources (concat, stack, reshape) are built whole and then cut
    (their bytes counted whole)."""
    if plan.ranks == 1 and not plan.stages:
        w = load_weights(plan, ckpt, dtype, device)
        return w, sum(t.numel() * t.element_size() for t in w.values())
    if ckpt.format != "safetensors":
        opt = f"--tp {plan.ranks}" if plan.ranks > 1 else f"--pp {len(plan.stages)}"
        raise SpecError(f"{opt}: sharded loading reads safetensors checkpoints; {ckpt.path} is "
                        f"{ckpt.format}", None)
    mine = stage_weights(plan, stage_of(plan, rank))
    rank = tp_rank(plan, rank)
    from safetensors import safe_open

    handles: dict = {}
    nbytes = 0
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, WeightSlot] = {}
    for name, slot in plan.weights.items():
        if slot.source is None or isinstance(slot.source, Alias) or name not in mine:
            continue
        s = slice_of(slot, rank, plan.ranks)
        if s is False:
            if slot.shard.kind == "first":
                out[name] = torch.zeros(slot.shape, dtype=dtype, device=device)
            continue
        src, axis = slot.source, None if s is None else s[0]
        if isinstance(src, Transpose) and isinstance(src.src, Tensor):
            src, axis = src.src, None if s is None else 1 - s[0]
        if not isinstance(src, Tensor):
            rest[name] = slot
            continue
        if src.name not in ckpt:
            raise CheckpointError(f"missing tensor '{src.name}' in checkpoint {ckpt.path} (weight '{name}', "
                                  f"declared at {slot.decl.pos})")
        file = ckpt.file_of(src.name)
        h = handles.get(file) or handles.setdefault(file, safe_open(file, framework="pt"))
        part = h.get_slice(src.name)
        shape = tuple(part.get_shape())
        if s is None:
            t = part[:]
        else:
            idx = tuple(slice(s[1], s[2]) if d == axis else slice(None) for d in range(len(shape)))
            t = part[idx]
        nbytes += t.numel() * t.element_size()
        if isinstance(slot.source, Transpose):
            t = t.t()
        want = slot.shape if s is None else tuple(s[2] - s[1] if d == s[0] else n for d, n in enumerate(slot.shape))
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor '{src.name}' in {file} has shape {list(shape)}, but weight '{name}' is "
                                  f"declared {list(slot.shape)} at {slot.decl.pos}")
        out[name] = t.to(device=device, dtype=dtype if slot.decl.dtype == "float" else None).contiguous()
    if rest:  # built whole by the single-rank loader's rules, then cut
        sub = dataclasses.replace(plan, weights={n: plan.weights[n] for n in rest})
        whole = _build_some(sub, ckpt, dtype, device)
        nbytes += sum(t.numel() * t.element_size() for t in whole.values())
        out.update(local_weights(dataclasses.replace(sub, stages=()), whole, rank))
    for name, slot in plan.weights.items():  # ties: the tensor they name, cut as they are split
        if isinstance(slot.source, Alias) and name in mine:
            target = plan.alias_target(name)
            t = out.get(target)
            s = slice_of(slot, rank, plan.ranks)
            if t is not None and s is not None and s is not False and plan.weights[target].shard != slot.shard:
                t = t.narrow(s[0], s[1], s[2] - s[1]).contiguous()
            if t is not None:
                out[name] = t
    return out, nbytes


def _build_some(plan: Plan, ckpt: Checkpoint, dtype, device) -> dict[str, torch.Tensor]:
    """The named slots' whole tensors through load_weights, which reports other tensors as unexpected:
    a checkpoint that lists only what these slots read does not, so ask it for them alone."""
    class Only:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __contains__(self, name):
            return name in self._inner

        def unexpected(self, used):
            return []

    return load_weights(plan, Only(ckpt), dtype, device)
