"""The backend IR: what the checker hands every backend, and what passes rewrite.

The AST's IR (dsl/ir.py) keeps a spec as written: blocks, symbolic shapes, expressions. A
`Plan` is one config's model, unrolled and typed: a `Program` of `Instr`s over SSA `Value`s
and `WeightArg`s, every shape an int, every attribute a frozen record with real fields
(dsl/ops), and one `WeightSlot` per weight tensor carrying how it is stored (`QuantDesc`)
and how it is split across ranks (`ShardDesc`). Passes fill those descriptors; `verify()`
checks the invariants between passes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Union

from . import ir
from .ops import OPS, OpKind, TType
from .quant import UNQUANTIZED, QuantDesc
from .sources import Alias, Source

# ---------------------------------------------------------------- operands


@dataclass(frozen=True)
class Value:
    """An SSA value of one step: "layer.3/h" (frame path / name), or a graph input ("tokens")."""

    id: str

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class WeightArg:
    """An operand that is a weight: the full name of its slot ("layer.3.wq")."""

    name: str

    def __str__(self) -> str:
        return f"@{self.name}"


Arg = Union[Value, WeightArg, None]  # None: an optional operand left out (`bias` of a bias-free linear)

# ---------------------------------------------------------------- weight descriptors


@dataclass(frozen=True)
class ShardDesc:
    """How a weight is split across tensor-parallel ranks: `replicated`, or `split` along `axis`
    (0: output rows, column-parallel; 1: input columns, row-parallel), or `expert` (whole
    copies of an experts block per rank)."""

    kind: str = "replicated"  # replicated | split | expert | first
    axis: int | None = None
    # split: the number of distinct equal slices along `axis` (0: one per rank). Fewer than the ranks
    # for the K/V projections of a model with fewer KV heads than ranks: rank r holds slice
    # r * parts // ranks (the KV head its query heads read), so ranks share slices.
    parts: int = 0
    rank: int | None = None  # expert: the rank that holds this expert's weights

    def __str__(self) -> str:
        if self.kind == "split":
            how = "column-parallel" if self.axis == 0 else "row-parallel"
            return f"split axis {self.axis} ({how})" + (f", {self.parts} slices shared" if self.parts else "")
        if self.kind == "expert":
            return f"expert on rank {self.rank}"
        if self.kind == "first":
            return "rank 0 only (bias added once before the all-reduce)"
        return "replicated"


REPLICATED = ShardDesc()


@dataclass(frozen=True)
class Collective:
    """A collective the shard pass placed after the op defining `value`: "all_reduce" (a sum of
    the ranks' partial results: a row-parallel linear, a moe whose experts are split) or
    "all_gather" (the ranks' column slices concatenated along features: the LM head's logits)."""

    kind: str
    value: Value
    op: str  # where: "linear at SPEC.kiln:51"
    # "send" (dsl/passes.py `stage`, pipeline parallelism): the stage `src` sends `value` to the stage
    # `dst`, which receives it before its first instruction (the logits: the last stage to stage 0).
    src: int | None = None
    dst: int | None = None


@dataclass(frozen=True)
class Stage:
    """A pipeline stage (dsl/passes.py `stage`): the instructions program.instrs[start:stop], which
    hold the unrolled layers (top-level frames) `layers`."""

    index: int
    start: int
    stop: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class WeightSlot:
    name: str  # full name: "embed", "layer.3.wq", "layer.3.expert.5.w1"
    decl: ir.Weight
    shape: tuple[int, ...]
    source: Source | None  # None: the weight is absent (an optional operand)
    scope: str  # frame path of the block that declared it ("" for globals)
    quant: QuantDesc = UNQUANTIZED
    shard: ShardDesc = REPLICATED


# ---------------------------------------------------------------- program


@dataclass(frozen=True)
class AttentionSite:
    """One attention op after unrolling: it owns one slice of the paged KV cache."""

    index: int
    path: str
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    # how its K/V pages are stored: "run" (the run dtype), "fp8" (E4M3, scaled) or "fp8-rotated" (E4M3 in a
    # Hadamard-rotated basis of each head, keys less k_mean and shifted so that each sequence's first is exact:
    # runtime/kv_store.py)
    kv_dtype: str = "run"
    k_scale: float = 1.0  # fp8 pages hold K / k_scale (1.0 unless calibrated: `kiln quantize --scheme fp8-kv`)
    v_scale: float = 1.0  # ... and V / v_scale
    k_mean: tuple[float, ...] = ()  # fp8-rotated: the keys' calibrated per-channel mean, [kv_heads * head_dim]; ()=0


@dataclass(frozen=True)
class StateSite:
    """One stateful op after unrolling (a `causal_conv1d` or `selective_scan`): it owns one slice of
    the per-sequence recurrent state cache, `shape` per sequence (a fixed size, whatever the
    context length), stored in `dtype` ("float": the run dtype; "fp32")."""

    index: int
    path: str
    kind: str  # the op's name
    shape: tuple[int, ...]
    dtype: str = "float"


@dataclass(frozen=True)
class Instr:
    kind: OpKind
    inputs: tuple[Arg, ...]
    attrs: Any  # the op's frozen attribute record (OPS[kind].attrs_type): `ins.attrs.eps`
    outputs: tuple[Value, ...]
    op: ir.Op  # where it came from (position and source text, for messages and comments)
    site: int | None = None  # attention: its KV cache site
    experts: tuple["Program", ...] = ()  # moe: one program per expert
    state: int | None = None  # stateful ops (causal_conv1d, selective_scan): its state site

    @property
    def out(self) -> Value:
        return self.outputs[0]


@dataclass(frozen=True)
class Program:
    inputs: tuple[Value, ...]
    instrs: tuple[Instr, ...]
    output: Value

    def walk(self) -> Iterator[Instr]:
        """Every instruction, experts' programs included, in order."""
        for ins in self.instrs:
            yield ins
            for p in ins.experts:
                yield from p.walk()


class PlanError(Exception):
    """A plan breaks an invariant: a bug in the checker or a pass, never a user's mistake."""


@dataclass
class Plan:
    spec: ir.Spec
    params: dict[str, Any]
    program: Program
    weights: dict[str, WeightSlot]
    sites: list[AttentionSite]
    types: dict[Value, TType]
    op_counts: Counter = field(default_factory=Counter)
    state_sites: list[StateSite] = field(default_factory=list)  # per-sequence recurrent state (SSM layers)
    # Tensor parallelism (dsl/passes.py shard): the ranks, each collective after the op it follows,
    # and why a region the pass could not split stays replicated (every rank computes it whole).
    ranks: int = 1
    collectives: tuple[Collective, ...] = ()
    replicated_why: tuple[str, ...] = ()
    # Pipeline parallelism (dsl/passes.py stage): contiguous slices of program.instrs, the values
    # crossing them as "send" collectives. Empty: one stage.
    stages: tuple[Stage, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.types[self.program.output].shape[1]

    def alias_target(self, name: str) -> str:
        """The weight a tie (`lm_head <- embed`) finally names; a weight that is no tie names itself."""
        return tie_chain(self.weights, self.weights[name])[-1].name

    def num_parameters(self) -> int:
        n = 0
        for w in self.weights.values():
            if w.source is not None and not isinstance(w.source, Alias):
                size = 1
                for d in w.shape:
                    size *= d
                n += size
        return n

    def verify(self) -> "Plan":
        """Check the invariants every backend relies on; returns the plan. Run after the checker
        and after every pass. A failure is a bug in Kiln (PlanError), not in the spec."""
        seen_sites: list[int] = []
        seen_states: list[int] = []

        def program(prog: Program, defined: set[Value]) -> None:
            defined = set(defined) | set(prog.inputs)
            for v in prog.inputs:
                if v not in self.types:
                    raise PlanError(f"program input {v} has no type")
            for ins in prog.instrs:
                sig = OPS[ins.kind]
                if not isinstance(ins.attrs, sig.attrs_type):
                    raise PlanError(f"{ins.kind.value} at {ins.op.pos}: attrs are {type(ins.attrs).__name__}")
                if len(ins.inputs) != len(sig.inputs):
                    raise PlanError(f"{ins.kind.value} at {ins.op.pos}: {len(ins.inputs)} operands")
                for a, name in zip(ins.inputs, sig.inputs):
                    if a is None and not name.endswith("?"):
                        raise PlanError(f"{ins.kind.value} at {ins.op.pos}: operand {name} is missing")
                    if isinstance(a, Value) and a not in defined:
                        raise PlanError(f"{ins.kind.value} at {ins.op.pos}: {a} is read before it is defined")
                    if isinstance(a, WeightArg):
                        slot = self.weights.get(a.name)
                        if slot is None or slot.source is None:
                            raise PlanError(f"{ins.kind.value} at {ins.op.pos}: weight {a.name} has no tensor")
                for o in ins.outputs:
                    if o in defined:
                        raise PlanError(f"{ins.kind.value} at {ins.op.pos}: {o} is defined twice")
                    if o not in self.types:
                        raise PlanError(f"{ins.kind.value} at {ins.op.pos}: {o} has no type")
                    defined.add(o)
                if (ins.kind is OpKind.ATTENTION) != (ins.site is not None):
                    raise PlanError(f"{ins.kind.value} at {ins.op.pos}: KV site {ins.site}")
                if ins.site is not None:
                    seen_sites.append(ins.site)
                if (sig.state is not None) != (ins.state is not None):
                    raise PlanError(f"{ins.kind.value} at {ins.op.pos}: state site {ins.state}")
                if ins.state is not None:
                    seen_states.append(ins.state)
                if (ins.kind is OpKind.MOE) != bool(ins.experts):
                    raise PlanError(f"{ins.kind.value} at {ins.op.pos}: {len(ins.experts)} expert programs")
                for p in ins.experts:
                    program(p, defined)
            if prog.output not in defined:
                raise PlanError(f"program output {prog.output} is never defined")

        program(self.program, set())
        if seen_sites != list(range(len(self.sites))) or any(s.index != i for i, s in enumerate(self.sites)):
            raise PlanError(f"attention sites {seen_sites} do not number 0..{len(self.sites) - 1} in order")
        if seen_states != list(range(len(self.state_sites))) or \
                any(s.index != i for i, s in enumerate(self.state_sites)):
            raise PlanError(f"state sites {seen_states} do not number 0..{len(self.state_sites) - 1} in order")
        if self.stages:
            self._verify_stages()
        for name, slot in self.weights.items():
            if slot.name != name:
                raise PlanError(f"weight slot {name} is named {slot.name}")
            if slot.source is not None and slot.quant.quantized and slot.quant.scale_layout == "none":
                raise PlanError(f"weight {name} is stored as {slot.quant.dtype} with no scales")
        return self


    def _verify_stages(self) -> None:
        """Stages cover the program in order; every value a stage reads is its own, a program input,
        or sent to it by an earlier stage; the last stage sends the logits to stage 0."""
        n = len(self.stages)
        if [s.index for s in self.stages] != list(range(n)) or self.stages[0].start != 0 \
                or self.stages[-1].stop != len(self.program.instrs) \
                or any(a.stop != b.start or a.start >= a.stop for a, b in zip(self.stages, self.stages[1:])) \
                or self.stages[-1].start >= self.stages[-1].stop:
            raise PlanError(f"stages {[(s.start, s.stop) for s in self.stages]} do not cover the "
                            f"{len(self.program.instrs)} instructions in order")
        home = {}
        for s in self.stages:
            for ins in self.program.instrs[s.start:s.stop]:
                for sub in [ins, *(i for p in ins.experts for i in p.walk())]:
                    for o in sub.outputs:
                        home[o] = s.index
        got: dict[int, set] = {s.index: set(self.program.inputs) for s in self.stages}
        for c in self.collectives:
            if c.kind != "send":
                continue
            if c.src is None or c.dst is None or home.get(c.value) != c.src or c.value in got[c.dst] and \
                    c.dst != 0 or (c.src >= c.dst and c.value != self.program.output):
                raise PlanError(f"send of {c.value} from stage {c.src} to stage {c.dst} (defined in stage "
                                f"{home.get(c.value)})")
            got[c.dst].add(c.value)
        for s in self.stages:
            for ins in self.program.instrs[s.start:s.stop]:
                inner = {o for p in ins.experts for i in p.walk() for o in i.outputs} | \
                    {v for p in ins.experts for v in p.inputs}
                for sub in [ins, *(i for p in ins.experts for i in p.walk())]:
                    for a in sub.inputs:
                        if isinstance(a, Value) and a not in inner and home.get(a) != s.index \
                                and a not in got[s.index]:
                            raise PlanError(f"{sub.kind.value} at {sub.op.pos} in stage {s.index} reads {a}, "
                                            f"which stage {home.get(a)} never sends it")
        if n > 1 and self.program.output not in got[0]:
            raise PlanError("the last stage does not send the logits to stage 0")


def tie_chain(weights: dict[str, WeightSlot], slot: WeightSlot) -> list[WeightSlot]:
    """The slot, then each slot its tie (`lm_head <- embed`) names, to the one holding a tensor.
    A tie inside a block copy names the copy's own weight first, else a global one. (The one
    alias resolver: the checker walks it to type a tie, backends to find a tie's tensor.)"""
    chain = [slot]
    while isinstance(slot.source, Alias):
        scoped = f"{slot.scope}.{slot.source.weight}" if slot.scope else slot.source.weight
        slot = weights.get(scoped) or weights[slot.source.weight]
        chain.append(slot)
    return chain


def fetch(arg: Arg, env: dict[Value, Any], weights: dict[str, Any]) -> Any:
    """An operand's tensor: a value from `env`, a weight from `weights`, None if left out."""
    if arg is None:
        return None
    if isinstance(arg, WeightArg):
        return weights[arg.name]
    return env[arg]
