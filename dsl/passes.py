"""Passes over a checked Plan: each returns a new plan, and `run` verifies the plan's invariants
(Plan.verify) after every one, so a pass that breaks one is caught where it ran.

The passes that fill the weight descriptors live here: `quantize` sets each weight's QuantDesc
(how it is stored: a scheme of dsl/quant.py), `shard` each weight's ShardDesc (how
tensor-parallel ranks split it; today every weight is replicated). A backend reads the
descriptors and refuses, naming the weight, any it cannot run, rather than computing with
weights it misreads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from . import ir
from .checker import check
from .errors import SpecError
from .ops import OpKind
from .plan import REPLICATED, Collective, Plan, ShardDesc, Stage, Value, WeightArg, tie_chain
from .quant import NAMES, UNQUANTIZED, QuantDesc, split_name
from .sources import Alias

Pass = Callable[[Plan], Plan]

QUANT_SCHEMES = NAMES


def quantize(scheme: str = "none", only: Mapping[str, QuantDesc] | None = None) -> Pass:
    """Set the storage of every quantizable weight (`quantizable`; with the LM_HEAD suffix, the LM head
    too) to the scheme's; `only` (from a pre-quantized checkpoint) names the weights that are quantized
    and each one's descriptor instead, and must name quantizable weights only."""
    if scheme not in QUANT_SCHEMES:
        raise SpecError(f"unknown quantization scheme '{scheme}'", None, "schemes: " + ", ".join(QUANT_SCHEMES))
    base, lm_head = split_name(scheme)

    def run(plan: Plan) -> Plan:
        can = quantizable(plan, lm_head or only is not None)  # a stored LM head (an engine built with +lm-head)
        if lm_head and not can & _lm_heads(plan):
            heads = ", ".join(f"'{h}'" for h in sorted(_lm_heads(plan))) or "none found"
            raise SpecError(f"--quantization {scheme}: the LM head ({heads}) is tied to another weight or read by "
                            f"more than its linear, so it cannot be quantized (--quantization {base.name} leaves it "
                            f"as it is)", None)
        if only is not None:
            bad = sorted(set(only) - can)
            if bad:
                raise SpecError(f"weight '{bad[0]}' is stored quantized, but only the weights of linear ops "
                                f"(not tied ones) can be", None)
            descs = dict(only)
        else:
            desc = base.weight
            descs = {n: desc for n in can} if desc.quantized else {}
            for n in sorted(descs):
                shape = plan.weights[n].shape
                if desc.group_size and shape[-1] % desc.group_size:
                    raise SpecError(f"--quantization {scheme}: weight '{n}' has {shape[-1]} input features, not "
                                    f"whole groups of {desc.group_size}", plan.weights[n].decl.pos)
        weights = {n: dataclasses.replace(w, quant=descs.get(n, UNQUANTIZED)) for n, w in plan.weights.items()}
        return dataclasses.replace(plan, weights=weights)
    return run


def quantizable(plan: Plan, lm_head: bool = False) -> set[str]:
    """Weights a scheme quantizes: those read only as the weight of `linear` ops (experts'
    included), never tied, and not the LM head (the last linear before the logits, which
    quantization hurts most and which most checkpoints keep in high precision) unless `lm_head`."""
    as_linear, elsewhere = set(), set()
    for ins in plan.program.walk():
        for i, a in enumerate(ins.inputs):
            if isinstance(a, WeightArg):
                (as_linear if ins.kind is OpKind.LINEAR and i == 1 else elsewhere).add(a.name)
    tied = {n for n, w in plan.weights.items() if plan.alias_target(n) != n}
    tied |= {plan.alias_target(n) for n in tied}
    return as_linear - elsewhere - tied - (set() if lm_head else _lm_heads(plan))


def sibling_groups(plan: Plan) -> list[list[str]]:
    """Quantized linear weights that read the same input with the same storage: what a backend may
    run as one GEMM (codegen/fuse.py's sibling_gemms), so what must share a per-tensor scale."""
    groups: dict[tuple, list[str]] = {}
    for ins in plan.program.walk():
        if ins.kind is OpKind.LINEAR and plan.weights[ins.inputs[1].name].quant.quantized:
            key = (ins.inputs[0], plan.weights[ins.inputs[1].name].quant)
            groups.setdefault(key, []).append(ins.inputs[1].name)
    return [g for g in groups.values() if len(g) > 1]


def _lm_heads(plan: Plan) -> set[str]:
    """The weights of the linear ops that reach the program's output through no other linear."""
    producer = {o: ins for ins in plan.program.instrs for o in ins.outputs}
    heads, todo, seen = set(), [plan.program.output], set()
    while todo:
        v = todo.pop()
        ins = producer.get(v)
        if ins is None or v in seen:
            continue
        seen.add(v)
        if ins.kind is OpKind.LINEAR:
            heads.add(ins.inputs[1].name)
            continue
        todo += [a for a in ins.inputs if isinstance(a, Value)]
    return heads


KV_CACHE_DTYPES = ("run", "fp8", "fp8-rotated")


def kv_cache(dtype: str = "run", scales: Mapping[int, tuple[float, float]] | None = None,
             means: Mapping[int, Sequence[float]] | None = None) -> Pass:
    """Set how every attention site stores its K/V pages: the run dtype, or fp8 E4M3 with one
    scale per site for K and one for V (KVStore holds them), written quantized and read back
    dequantized by every backend. `scales` {site index: (k_scale, v_scale)} are calibrated ones
    (a checkpoint's, `kiln quantize --scheme fp8-kv`); a site without one keeps 1.0 (vLLM's default
    without calibration: values below 2^-6 fall into e4m3's subnormals). "fp8-rotated" (runtime/kv_store.py):
    E4M3 in a Hadamard-rotated basis of each head (head sizes powers of 2), the keys less `means` {site:
    [kv_heads * head_dim] floats} (calibrated per channel; zeros without) and shifted so that each sequence's first
    is exact."""
    if dtype not in KV_CACHE_DTYPES:
        raise SpecError(f"--kv-cache-dtype {dtype}: no such KV cache dtype", None,
                        "KV cache dtypes: " + ", ".join(KV_CACHE_DTYPES))
    scales, means = dict(scales or {}), {i: tuple(float(x) for x in m) for i, m in (means or {}).items()}
    if scales and not dtype.startswith("fp8"):
        raise SpecError(f"KV cache scales apply to an fp8 --kv-cache-dtype, not {dtype}", None)
    if means and dtype != "fp8-rotated":
        raise SpecError(f"KV cache key means apply to --kv-cache-dtype fp8-rotated, not {dtype}", None)
    for i, pair in scales.items():
        if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in pair):
            raise SpecError(f"attention site {i}: KV cache scales must be finite floats > 0, got {pair!r}", None)
    for i, m in means.items():
        if not all(math.isfinite(x) for x in m):
            raise SpecError(f"attention site {i}: KV cache key means must be finite", None)

    def run(plan: Plan) -> Plan:
        bad = sorted((set(scales) | set(means)) - set(range(len(plan.sites))))
        if bad:
            raise SpecError(f"KV cache scales or key means for attention site {bad[0]}, but the plan has "
                            f"{len(plan.sites)} sites", None)
        sites = []
        for s in plan.sites:
            if dtype == "fp8-rotated" and s.kv_heads and (s.head_dim & (s.head_dim - 1) or s.v_head_dim != s.head_dim):
                raise SpecError(f"--kv-cache-dtype fp8-rotated: attention site {s.index} ({s.path}) has head sizes "
                                f"{s.head_dim} / {s.v_head_dim}; the rotation needs one head size, a power of 2", None,
                                "use --kv-cache-dtype fp8")
            mean = means.get(s.index, ())
            if mean and len(mean) != s.kv_heads * s.head_dim:
                raise SpecError(f"attention site {s.index}: {len(mean)} KV cache key means, expected kv_heads x "
                                f"head_dim = {s.kv_heads * s.head_dim}", None)
            k, v = scales.get(s.index, (1.0, 1.0))
            sites.append(dataclasses.replace(s, kv_dtype=dtype, k_scale=float(k), v_scale=float(v), k_mean=mean))
        return dataclasses.replace(plan, sites=sites)
    return run


# Ops that treat each slice of features on its own: a value split across ranks by features (heads,
# FFN channels) goes through them split. Norms count only per group (per head, `group=`); attention
# only without ALiBi (its slopes are per global head).
_LOCAL_OPS = frozenset({OpKind.SILU, OpKind.GELU, OpKind.GELU_TANH, OpKind.RELU, OpKind.SIGMOID, OpKind.TANH,
                        OpKind.RELU2, OpKind.ACT, OpKind.SOFTCAP, OpKind.SCALE, OpKind.CLAMP, OpKind.ADD,
                        OpKind.SUB, OpKind.MUL, OpKind.ROPE, OpKind.ATTENTION, OpKind.RMSNORM, OpKind.LAYERNORM})
EXPERT_MODES = ("tp", "ep")


def _loc(ins) -> str:
    return f"{ins.kind.value} at {ins.op.pos.file.rsplit('/', 1)[-1]}:{ins.op.pos.line}"


class _Refused(Exception):
    pass


def shard(ranks: int = 1, experts: str = "tp") -> Pass:
    """Split the weights over `ranks` tensor-parallel ranks, derived from the dataflow (no per-family
    rule): a linear whose input is whole on every rank and whose output flows only through
    feature-local ops (_LOCAL_OPS: activations, gating products, rope, attention, per-head norms) into
    other linears is column-parallel (split along output rows); those linears are row-parallel (split
    along input columns) and an all-reduce follows each. Attention splits by heads: the q side into
    `ranks` slices, K/V by KV heads (shared slices when there are fewer KV heads than ranks). The LM
    head is column-parallel with an all-gather of the logits; the token embedding is vocabulary-
    parallel (each rank its rows, an all-reduce of the looked-up rows). MoE
    experts split like a dense MLP (`experts="tp"`) or go whole to one rank each (`experts="ep"`),
    with an all-reduce after the moe. A region that matches no rule (a norm over all features of a
    split value, a split/concat of heads, latent attention, ALiBi) keeps its weights replicated and
    every rank computes it whole; `plan.replicated_why` says where. Refused: state-space layers."""
    if not isinstance(ranks, int) or ranks < 1:
        raise SpecError(f"--tp {ranks}: the number of tensor-parallel ranks must be a positive integer", None)
    if experts not in EXPERT_MODES:
        raise SpecError(f"experts '{experts}': no such expert sharding", None, "modes: " + ", ".join(EXPERT_MODES))

    def run(plan: Plan) -> Plan:
        weights = {n: dataclasses.replace(w, shard=REPLICATED) for n, w in plan.weights.items()}
        if ranks == 1:
            return dataclasses.replace(plan, weights=weights, ranks=1, collectives=(), replicated_why=())
        if plan.state_sites:
            ins = next(i for i in plan.program.walk() if i.state is not None)
            raise SpecError(f"--tp {ranks}: {_loc(ins)} is a state-space layer; tensor parallelism does not "
                            f"split recurrent state yet", ins.op.pos)
        if any(w.quant.quantized for w in plan.weights.values()):
            raise SpecError(f"--tp {ranks}: quantized weights are not split across ranks yet", None,
                            "leave --quantization out with --tp")
        descs: dict[str, ShardDesc] = {}
        colls: list[Collective] = []
        why: list[str] = []
        uses: dict[str, int] = {}
        for ins in plan.program.walk():
            for a in ins.inputs:
                if isinstance(a, WeightArg):
                    uses[plan.alias_target(a.name)] = uses.get(plan.alias_target(a.name), 0) + 1
        heads = _lm_heads(plan)
        for ins in plan.program.instrs:
            if ins.kind is OpKind.LINEAR and ins.inputs[1].name in heads:
                w = plan.weights[ins.inputs[1].name]
                if w.shape[0] % ranks:
                    why.append(f"{_loc(ins)}: LM head with {w.shape[0]} rows, not a multiple of {ranks}")
                    continue
                descs[w.name] = ShardDesc("split", 0)
                if ins.inputs[2] is not None:
                    descs[ins.inputs[2].name] = ShardDesc("split", 0)
                colls.append(Collective("all_gather", ins.out, _loc(ins)))
        # The token embedding is vocabulary-parallel: rank r holds rows [r V/N, (r + 1) V/N) and looks up
        # only the ids among them (zero rows for the rest: `embedding`'s offset, set per rank by
        # runtime/parallel_weights.local_plan); an all-reduce sums the ranks' rows. A table any other op
        # reads (other than an LM head, which splits the same rows) stays whole.
        for ins in plan.program.instrs:
            if ins.kind is not OpKind.EMBEDDING or ins.inputs[0] != Value("tokens"):
                continue
            table = plan.alias_target(ins.inputs[1].name)
            readers = [i for i in plan.program.walk() for a in i.inputs
                       if isinstance(a, WeightArg) and plan.alias_target(a.name) == table]
            if any(i.kind is not OpKind.EMBEDDING and not (i.kind is OpKind.LINEAR and i.inputs[1].name in heads)
                   for i in readers):
                continue
            if plan.weights[table].shape[0] % ranks:
                why.append(f"{_loc(ins)}: embedding with {plan.weights[table].shape[0]} rows, not a multiple of "
                           f"{ranks}")
                continue
            descs[table] = ShardDesc("split", 0)
            colls.append(Collective("all_reduce", ins.out, _loc(ins) + " (vocabulary-parallel embedding)"))
        _shard_program(plan, plan.program, ranks, descs, colls, why, uses, top=True, skip=heads)
        for ins in plan.program.walk():
            if ins.kind is not OpKind.MOE:
                continue
            if experts == "ep":
                n = len(ins.experts)
                for e, prog in enumerate(ins.experts):
                    for i in prog.walk():
                        for a in i.inputs:
                            if isinstance(a, WeightArg):
                                descs[a.name] = ShardDesc("expert", rank=e * ranks // n)
                colls.append(Collective("all_reduce", ins.out, _loc(ins) + " (experts split across ranks)"))
            else:
                partial = [_shard_program(plan, p, ranks, descs, colls, why, uses, top=False) for p in ins.experts]
                if all(partial):
                    colls.append(Collective("all_reduce", ins.out, _loc(ins) + " (each expert split)"))
                elif any(partial):
                    raise SpecError(f"--tp {ranks}: {_loc(ins)}: its experts split differently", ins.op.pos)
        for n, d in descs.items():
            weights[n] = dataclasses.replace(weights[n], shard=d)
        for n, w in plan.weights.items():  # a tie splits as the tensor it names
            if isinstance(w.source, Alias) and n not in descs:
                weights[n] = dataclasses.replace(weights[n], shard=weights[plan.alias_target(n)].shard)
        return dataclasses.replace(plan, weights=weights, ranks=ranks, collectives=tuple(colls),
                                   replicated_why=tuple(why))
    return run


def _shard_program(plan: Plan, prog, ranks: int, descs: dict, colls: list, why: list, uses: dict,
                   top: bool, skip: frozenset | set = frozenset()) -> bool:
    """Split the column/row groups of one program (not its experts'); True if its output is partial
    (an expert whose last linear is row-parallel: the moe sums it)."""
    producer = {o: i for i in prog.instrs for o in i.outputs}
    consumers: dict = {}
    for i in prog.instrs:
        for a in i.inputs:
            if isinstance(a, Value):
                consumers.setdefault(a, []).append(i)
    split_vals: set = set()
    done: set = set()
    partial_out = False
    for seed in prog.instrs:
        if seed.kind is not OpKind.LINEAR or id(seed) in done or seed.inputs[1].name in skip \
                or seed.inputs[0] in split_vals:
            continue
        try:
            cols, rows, vals, parts, local = _grow(plan, prog, seed, producer, consumers, split_vals, ranks,
                                                    uses, skip)
        except _Refused as e:
            done.add(id(seed))
            if not (str(e).startswith("-")):
                why.append(str(e))
            continue
        if not top and any(r.out != prog.output for r in rows):
            why.append(f"{_loc(seed)}: an expert's row-parallel output is not the expert's output")
            continue
        done.update(id(i) for i in cols + rows)
        split_vals |= vals
        for i in cols:
            p = parts.get(i.out, 0)
            descs[i.inputs[1].name] = ShardDesc("split", 0, p)
            if i.inputs[2] is not None:
                descs[i.inputs[2].name] = ShardDesc("split", 0, p)
        for i in local:
            if i.kind in (OpKind.RMSNORM, OpKind.LAYERNORM):
                for w in i.inputs[1:]:
                    shape = plan.weights[w.name].shape if w is not None else ()
                    if w is not None and math.prod(shape) == plan.types[i.out].shape[1]:  # a weight per feature
                        descs[w.name] = ShardDesc("split", 0, parts.get(i.out, 0))
        for i in rows:
            descs[i.inputs[1].name] = ShardDesc("split", 1)
            if i.inputs[2] is not None:
                descs[i.inputs[2].name] = ShardDesc("first")
            if top:
                colls.append(Collective("all_reduce", i.out, _loc(i)))
            else:
                partial_out = True
    return partial_out


def _grow(plan: Plan, prog, seed, producer, consumers, taken: set, ranks: int, uses: dict, skip):
    """The column/row group of `seed`: (column linears, row linears, split values, slices per value
    where not one per rank, feature-local ops), or _Refused saying why it stays replicated."""
    cols, rows, local, vals = [], [], [], set()
    seen: set = set()
    todo = [("col", seed)]

    def refuse(msg):
        raise _Refused(msg)

    def pull(v):  # a value a local op reads: it must be split too
        if v in vals:
            return
        p = producer.get(v)
        if p is None or v in taken:
            refuse(f"-{v} comes from outside")
        if p.kind is OpKind.LINEAR and p.inputs[0] not in vals and p.inputs[1].name not in skip:
            todo.append(("col", p))
        elif p.kind in _LOCAL_OPS:
            todo.append(("local", p))
        else:
            refuse(f"{_loc(p)}: its output is mixed with split values; kept replicated")

    def push(v):  # a split value: each consumer must take it split
        if v == prog.output:
            refuse(f"-{v} is the program output")
        for c in consumers.get(v, ()):
            if c.kind is OpKind.LINEAR and c.inputs[0] == v:
                todo.append(("row", c))
            elif c.kind in _LOCAL_OPS:
                todo.append(("local", c))
            else:
                refuse(f"{_loc(c)} reads whole a value a split would cut ({v}); kept replicated")

    while todo:
        role, ins = todo.pop()
        if id(ins) in seen:
            continue
        seen.add(id(ins))
        if role == "col":
            w = plan.weights[ins.inputs[1].name]
            if uses.get(plan.alias_target(w.name), 0) > 1 or isinstance(w.source, Alias):
                refuse(f"{_loc(ins)}: weight '{w.name}' is shared; kept replicated")
            cols.append(ins)
            vals.add(ins.out)
            push(ins.out)
        elif role == "row":
            w = plan.weights[ins.inputs[1].name]
            if uses.get(plan.alias_target(w.name), 0) > 1 or isinstance(w.source, Alias):
                refuse(f"{_loc(ins)}: weight '{w.name}' is shared; kept replicated")
            rows.append(ins)
        else:
            if ins.kind is OpKind.ATTENTION and ins.attrs.alibi:
                refuse(f"{_loc(ins)}: ALiBi slopes are per global head; kept replicated")
            if ins.kind in (OpKind.RMSNORM, OpKind.LAYERNORM) and not ins.attrs.group:
                refuse(f"{_loc(ins)} normalises over all features; kept replicated")
            local.append(ins)
            for a in ins.inputs:
                if isinstance(a, Value):
                    pull(a)
            for o in ins.outputs:
                vals.add(o)
                push(o)
    # Slices: one per rank, but K/V by KV heads; values joined by a local op share their slicing.
    parts: dict = {}
    for ins in local:
        if ins.kind is OpKind.ATTENTION:
            hd = ins.attrs.head_dim
            hq, hk = plan.types[ins.inputs[0]].shape[1] // hd, plan.types[ins.inputs[1]].shape[1] // hd
            if hq % ranks or not (hk % ranks == 0 or ranks % hk == 0):
                refuse(f"{_loc(ins)}: {hq} query / {hk} KV heads do not divide over {ranks} ranks; kept replicated")
            if hk < ranks:
                for v in ins.inputs[1:]:
                    parts[v] = hk
    changed = True
    while changed:  # K/V slicing spreads back through rope, clamps, per-head norms to the projections
        changed = False
        for ins in local:
            if ins.kind is OpKind.ATTENTION:
                continue
            group = [a for a in ins.inputs if isinstance(a, Value)] + list(ins.outputs)
            p = {parts.get(v, 0) for v in group}
            if len(p) > 1:
                if len(p - {0}) > 1:
                    refuse(f"{_loc(ins)} mixes differently split values; kept replicated")
                for v in group:
                    if parts.get(v) is None:
                        parts[v] = max(p)
                        changed = True
    for v in vals:
        width, n = plan.types[v].shape[1], parts.get(v, 0) or ranks
        if width % n:
            refuse(f"-{v}: {width} features do not divide into {n}")
    for ins in local:
        if ins.kind in (OpKind.RMSNORM, OpKind.LAYERNORM):
            n = parts.get(ins.out, 0) or ranks
            if (plan.types[ins.out].shape[1] // n) % ins.attrs.group:
                refuse(f"{_loc(ins)}: its groups of {ins.attrs.group} do not fall whole on each rank")
    return cols, rows, vals, parts, local


def stage(stages: int = 1) -> Pass:
    """Split the unrolled program into `stages` contiguous pipeline stages, balanced by layer count
    (a layer: a top-level frame, "layer.3"; stage s runs layers [s*L//stages, (s+1)*L//stages)). What
    runs before the first layer (the embedding) is stage 0's, what runs after the last (final norm,
    LM head) the last stage's. Each value a later stage reads (the hidden state, and the residual
    stream where the spec carries it apart) is derived from the dataflow and recorded as a "send"
    collective from the stage that defines it to each stage that reads it; the last stage sends the
    logits to stage 0 (which samples). Composes with `shard` (run it after): each stage's
    tensor-parallel ranks keep the same slices, so rank t of one stage sends to rank t of the next.
    Refused: fewer layers than stages, state-space layers."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise SpecError(f"--pp {stages}: the number of pipeline stages must be a positive integer", None)

    def run(plan: Plan) -> Plan:
        colls = tuple(c for c in plan.collectives if c.kind != "send")
        if stages == 1:
            return dataclasses.replace(plan, stages=(), collectives=colls)
        if plan.state_sites:
            ins = next(i for i in plan.program.walk() if i.state is not None)
            raise SpecError(f"--pp {stages}: {_loc(ins)} is a state-space layer; pipeline parallelism does not "
                            f"carry recurrent state between stages yet", ins.op.pos)
        instrs = plan.program.instrs
        frame = [_frame(ins) for ins in instrs]
        layers: list[str] = []
        for f in frame:
            if f and f not in layers:
                layers.append(f)
        if len(layers) < stages:
            raise SpecError(f"--pp {stages}: the model has {len(layers)} layers, fewer than the stages", None,
                            f"use --pp {max(1, len(layers))} or fewer")
        owner = [s * len(layers) // stages for s in range(stages)]  # each stage's first layer
        cuts = [0] + [frame.index(layers[i]) for i in owner[1:]] + [len(instrs)]
        if cuts != sorted(cuts) or len(set(cuts)) != len(cuts):
            raise SpecError(f"--pp {stages}: the layers' instructions interleave; no contiguous split", None)
        staged = tuple(Stage(s, cuts[s], cuts[s + 1],
                             tuple(layers[owner[s]:owner[s + 1] if s + 1 < stages else len(layers)]))
                       for s in range(stages))
        home: dict = {}
        sends: list[Collective] = []
        for st in staged:
            wanted: list = []
            for ins in instrs[st.start:st.stop]:
                for sub in [ins, *(i for p in ins.experts for i in p.walk())]:
                    for a in sub.inputs:
                        if isinstance(a, Value) and home.get(a, st.index) != st.index and a not in wanted:
                            wanted.append(a)
                    for o in sub.outputs:
                        home.setdefault(o, st.index)
            for v in sorted(wanted, key=lambda v: home[v]):  # by sender: no stage waits on a later one
                sends.append(Collective("send", v, f"stage {home[v]} -> stage {st.index}", home[v], st.index))
        sends.sort(key=lambda c: (c.src, c.dst))
        sends.append(Collective("send", plan.program.output, f"logits: stage {stages - 1} -> stage 0",
                                stages - 1, 0))
        return dataclasses.replace(plan, stages=staged, collectives=colls + tuple(sends))
    return run


def _frame(ins) -> str:
    """The top-level frame of an instruction ("layer.3"), "" for the spec's global ops."""
    v = ins.out.id
    return v.split("/", 1)[0] if "/" in v else ""


def stage_of(plan: Plan, rank: int) -> int:
    """The pipeline stage of global rank `rank` (ranks are stage-major: stage * tp + tp rank)."""
    return rank // plan.ranks if plan.stages else 0


def stage_weights(plan: Plan, index: int) -> set[str]:
    """The weights pipeline stage `index` reads, and the tensors their ties name (a last stage whose
    LM head is tied to the embedding loads the embedding)."""
    if not plan.stages:
        return set(plan.weights)
    st = plan.stages[index]
    out: set[str] = set()
    for ins in plan.program.instrs[st.start:st.stop]:
        for sub in [ins, *(i for p in ins.experts for i in p.walk())]:
            for a in sub.inputs:
                if isinstance(a, WeightArg):
                    out |= {w.name for w in tie_chain(plan.weights, plan.weights[a.name])}
    return out


def stage_sites(plan: Plan, index: int) -> set[int]:
    """The attention sites (KV cache slices) of pipeline stage `index`'s layers."""
    if not plan.stages:
        return {s.index for s in plan.sites}
    st = plan.stages[index]
    return {i.site for ins in plan.program.instrs[st.start:st.stop] for i in [ins, *(j for p in ins.experts
                                                                                       for j in p.walk())]
            if i.site is not None}


def run(plan: Plan, passes: list[Pass]) -> Plan:
    plan.verify()
    for p in passes:
        plan = p(plan).verify()
    return plan


def build(spec: ir.Spec, config: Mapping[str, Any] | None = None, config_file: str = "config.json",
          quant: str = "none", ranks: int = 1, quant_only: Mapping[str, QuantDesc] | None = None,
          experts: str = "tp", stages: int = 1) -> Plan:
    """The plan a model runs: the spec checked against the config, then the weight passes (and the
    pipeline split with `stages` > 1)."""
    return run(check(spec, config, config_file), [quantize(quant, quant_only), shard(ranks, experts)]
               + ([stage(stages)] if stages != 1 else []))


def unsupported_weights(plan: Plan, backend: str,
                        runs: Callable[[QuantDesc], bool] = lambda d: not d.quantized,
                        split: bool = False) -> list[str]:
    """Messages naming each weight whose descriptors `backend` cannot run: a storage `runs`
    refuses, or a split weight unless `split` (the reference backend of runtime/distributed.py)."""
    out = []
    for w in plan.weights.values():
        if w.source is None:
            continue
        if w.quant.quantized and not runs(w.quant):
            out.append(f"weight '{w.name}' is stored as {w.quant}; the {backend} backend does not run that "
                       f"format")
        if w.shard != REPLICATED and not split:
            out.append(f"weight '{w.name}' is split across ranks ({w.shard.kind}, axis {w.shard.axis}); "
                       f"the {backend} backend runs on one rank")
    return out
