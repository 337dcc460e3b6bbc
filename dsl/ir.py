"""Kiln's IR: small, frozen dataclasses that every backend only spells.

Two layers live here:
- `Expr` nodes: constant expressions over parameters and block indices (shapes,
  attributes, conditions), kept symbolic until a config binds the parameters;
- the model: `Spec` -> weights, `Block`s and a `Graph` of SSA `Op`s whose operands
  are value names (`Val`) or weight names (`WeightRef`).

Activations are 2-D `[T, features]` over the flattened token batch of a step (T is
the only symbolic dimension); token ids are `[T]`. Attention operands are heads-major
`[T, heads * head_dim]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Pos

# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class Const:
    value: Union[int, float, str, bool, None]
    pos: Pos


@dataclass(frozen=True)
class ListExpr:
    items: tuple["Expr", ...]
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % ** == != < <= > >= and or
    left: "Expr"
    right: "Expr"
    pos: Pos


@dataclass(frozen=True)
class UnOp:
    op: str  # - not
    operand: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Cond:
    test: "Expr"
    then: "Expr"
    other: "Expr"
    pos: Pos


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple["Expr", ...]
    kwargs: tuple[tuple[str, "Expr", Pos], ...]
    pos: Pos


@dataclass(frozen=True)
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    pos: Pos


@dataclass(frozen=True)
class Index:
    base: "Expr"
    subs: tuple["Expr", ...]  # Expr or Slice
    pos: Pos


@dataclass(frozen=True)
class Attr:
    base: "Expr"
    name: str
    pos: Pos


Expr = Union[Name, Const, ListExpr, BinOp, UnOp, Cond, Call, Slice, Index, Attr]

# ---------------------------------------------------------------- parameters

PARAM_TYPES = ("int", "float", "bool", "str", "list", "rope_scaling")


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # one of PARAM_TYPES
    optional: bool  # `int?`: may be none
    default: Expr  # may refer to earlier parameters
    keys: tuple[str, ...]  # config.json key paths tried in order ("rope_scaling.factor")
    key_optional: bool  # no key present: use the default (else a config must have one)
    pos: Pos
    null_is_none: bool = False  # `null=none`: a key present with null binds none (else null = missing)


@dataclass(frozen=True)
class Require:
    """`require [NAME:] TEST, "message"`: a condition on the bound parameters that a config must
    meet (an option the spec does not implement); checked when a config binds the spec."""

    name: str | None  # named ones can be replaced or dropped by a spec that extends this one
    test: Expr  # a constant expression over parameters that must be true
    message: str
    text: str  # the condition's source text, for the error
    pos: Pos  # of the condition
    name_pos: Pos | None = None


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weight:
    """A named weight. `source` is an Expr over checkpoint tensor names (strings),
    other weights (names), `.T`, slices, `concat(...)` and conditions; `none` makes
    an optional weight absent. How a weight is stored and split across ranks is not the spec's
    business: passes set that on the plan's WeightSlot (dsl/plan.py: QuantDesc, ShardDesc)."""

    name: str
    shape: tuple[Expr, ...]
    dtype: str  # "float" = converted to the run dtype; or a storage dtype
    source: Expr
    prefix: str  # pattern prefix of its `weights "..." {}` section
    pos: Pos


WEIGHT_DTYPES = ("float", "int8", "int32", "fp8", "uint8")

# ---------------------------------------------------------------- dataflow


@dataclass(frozen=True)
class Val:
    """An SSA value defined by an op or a graph input."""

    name: str


@dataclass(frozen=True)
class WeightRef:
    name: str  # a weight of the enclosing block, or a global weight


@dataclass(frozen=True)
class BlockRef:
    name: str  # a block passed to an op (moe experts)


Operand = Union[Val, WeightRef, BlockRef, None]


@dataclass(frozen=True)
class Op:
    kind: str  # a key of dsl.ops.OPS, or "call" (run a block)
    inputs: tuple[Operand, ...]
    attrs: tuple[tuple[str, Expr], ...]
    outputs: tuple[str, ...]
    pos: Pos
    text: str  # the source text it came from, for comments in generated code

    def attr(self, name: str) -> Expr | None:
        for k, v in self.attrs:
            if k == name:
                return v
        return None


@dataclass(frozen=True)
class Graph:
    inputs: tuple[str, ...]
    ops: tuple[Op, ...]
    output: str


@dataclass(frozen=True)
class Block:
    """A subgraph with its own weights. With a `count` it is repeated: calling it runs
    copies 0..count-1 in sequence (layers), or an op such as moe picks copies
    (experts); its index is named after the block (`{layer}` in weight names)."""

    name: str
    count: Expr | None
    weights: tuple[Weight, ...]
    graph: Graph
    pos: Pos


@dataclass(frozen=True)
class Spec:
    name: str
    file: str
    architectures: tuple[str, ...]
    gguf_arch: str | None
    gguf_flags: tuple[str, ...]
    ignore: tuple[str, ...]  # checkpoint tensor globs that are not weights
    params: tuple[Param, ...]
    weights: tuple[Weight, ...]
    blocks: tuple[Block, ...]
    graph: Graph
    files: tuple[str, ...] = field(default=())  # this spec and the ones it extends
    sources: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (file, text) for messages
    requires: tuple[Require, ...] = field(default=())  # conditions a config must meet (base's first)

    def block(self, name: str) -> Block | None:
        for b in self.blocks:
            if b.name == name:
                return b
        return None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None
