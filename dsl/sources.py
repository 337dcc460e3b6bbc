"""Weight sources: where a weight's tensor comes from in a checkpoint.

A source expression is evaluated (per block index) into a small tree:
`"name"` a checkpoint tensor (`{layer}` filled in, the section prefix prepended),
`other` another weight (tying), `src.T` a transpose, `src[a:b]` / `src[:, a:b]` a slice,
`concat(a, b, dim=0)` a concatenation, `reshape(src, [d0, d1, ...])` a row-major view
with new dimensions (one may be -1), `stack(src, i=n)` the n tensors of `src` for i = 0 .. n-1
stacked along a new first dimension (`{i}` in tensor names, `i` in expressions),
`a if cond else b`, and `none` (absent).

`reshape` is what un-interleaves fused tensors whose rows are grouped per head: viewing
`[heads * 3 * head_dim, in]` as `[heads, 3, -1]`, slicing `[:, 0:1]` and reshaping to
`[heads * head_dim, in]` picks every head's query rows.

`stack` is what gathers checkpoints that store one tensor per head (or per expert) into one
weight: `stack("q_layernorm.norms.{head}.weight", head=heads)` is `[heads, head_dim]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

from . import ir
from .errors import SpecError
from .exprs import evaluate
from .names import check_name


@dataclass(frozen=True)
class Tensor:
    name: str  # full checkpoint tensor name


@dataclass(frozen=True)
class Alias:
    weight: str  # a weight's name in the spec (resolved in the same scope)


@dataclass(frozen=True)
class Transpose:
    src: "Source"


@dataclass(frozen=True)
class SliceOf:
    src: "Source"
    dim: int
    start: int | None
    stop: int | None


@dataclass(frozen=True)
class Concat:
    srcs: tuple["Source", ...]
    dim: int


@dataclass(frozen=True)
class Reshape:
    src: "Source"
    shape: tuple[int, ...]  # -1 at most once: inferred from the element count


@dataclass(frozen=True)
class Stack:
    srcs: tuple["Source", ...]  # one per index value, stacked along a new dim 0
    index: str  # the index name, for messages


Source = Union[Tensor, Alias, Transpose, SliceOf, Concat, Reshape, Stack]

_FIELD = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)\}")


def fill(pattern: str, env: Mapping[str, Any], pos) -> str:
    def sub(m):
        key = m.group(1)
        if key not in env or not isinstance(env[key], int) or isinstance(env[key], bool):
            raise SpecError(f"'{{{key}}}' in tensor name {pattern!r} is not a block index here", pos,
                            "use the name of an enclosing repeated block, e.g. {layer}")
        return str(env[key])

    if "{" in _FIELD.sub("", pattern) or "}" in _FIELD.sub("", pattern):
        raise SpecError(f"unbalanced braces in tensor name {pattern!r}", pos)
    return _FIELD.sub(sub, pattern)


def resolve(w: ir.Weight, env: Mapping[str, Any], weights: set[str]) -> Source | None:
    return _resolve(w.source, w.prefix, env, weights)


def _resolve(e: ir.Expr, prefix: str, env, weights) -> Source | None:
    if isinstance(e, ir.Const):
        if e.value is None:
            return None
        if isinstance(e.value, str):
            return Tensor(fill(prefix + e.value, env, e.pos))
        raise SpecError(f"a weight source cannot be {e.value!r}", e.pos,
                        'give a checkpoint tensor name ("...weight"), another weight, or none')
    if isinstance(e, ir.Name):
        if e.id in weights:
            return Alias(e.id)
        raise SpecError(f"'{e.id}' is not a weight", e.pos, "tie to a weight declared in this spec")
    if isinstance(e, ir.Cond):
        branch = e.then if _truth(evaluate(e.test, env)) else e.other
        return _resolve(branch, prefix, env, weights)
    if isinstance(e, ir.Attr):
        if e.name != "T":
            raise SpecError(f"unknown weight transform '.{e.name}'", e.pos, "use .T to transpose")
        inner = _need(_resolve(e.base, prefix, env, weights), e)
        return Transpose(inner)
    if isinstance(e, ir.Index):
        src = _need(_resolve(e.base, prefix, env, weights), e)
        for dim, s in enumerate(e.subs):
            if not isinstance(s, ir.Slice):
                raise SpecError("weights are sliced with ranges like [a:b] or [:, a:b]", s.pos)
            if s.start is None and s.stop is None:
                continue
            start = _int(s.start, env)
            stop = _int(s.stop, env)
            src = SliceOf(src, dim, start, stop)
        return src
    if isinstance(e, ir.Call) and e.fn == "concat":
        dims = [v for k, v, _ in e.kwargs if k == "dim"]
        if len(e.kwargs) != len(dims):
            raise SpecError("concat() takes only dim=", e.pos)
        dim = _int(dims[0], env) if dims else 0
        parts = [_need(_resolve(a, prefix, env, weights), a) for a in e.args]
        if len(parts) < 2:
            raise SpecError("concat() needs at least two sources", e.pos)
        return Concat(tuple(parts), dim)
    if isinstance(e, ir.Call) and e.fn == "reshape":
        if len(e.args) != 2 or e.kwargs:
            raise SpecError("reshape() takes a source and a list of dimensions", e.pos,
                            'e.g. reshape("qkv.weight", [heads, 3, -1])')
        dims = evaluate(e.args[1], env)
        ok = isinstance(dims, list) and dims and all(
            isinstance(d, int) and not isinstance(d, bool) and (d > 0 or d == -1) for d in dims)
        if not ok or dims.count(-1) > 1:
            raise SpecError(f"reshape() dimensions must be positive ints (one may be -1), got {dims!r}",
                            e.args[1].pos)
        return Reshape(_need(_resolve(e.args[0], prefix, env, weights), e.args[0]), tuple(dims))
    if isinstance(e, ir.Call) and e.fn == "stack":
        return _stack(e, prefix, env, weights)
    raise SpecError("not a weight source", getattr(e, "pos", None),
                    'sources are "tensor.name", another weight, .T, [a:b], concat(...), reshape(...), '
                    'stack(...), a if c else b, none')


def _stack(e: ir.Call, prefix: str, env, weights) -> Stack:
    """`stack(src, i=n)`: src resolved once per i in 0 .. n-1 (with `{i}` filled in), the n
    tensors stacked along a new first dimension."""
    usage = 'e.g. stack("norms.{head}.weight", head=heads): one tensor per head, stacked'
    if len(e.args) != 1 or len(e.kwargs) != 1:
        raise SpecError("stack() takes one source and one index=count", e.pos, usage)
    index, count_expr, kpos = e.kwargs[0]
    check_name(index, kpos, "stack index")
    if index in env:
        raise SpecError(f"stack index '{index}' is already a name here (a parameter or block index)", kpos,
                        "pick a name of its own for the index")
    count = evaluate(count_expr, env)
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise SpecError(f"stack() count must be a positive int, got {count!r}", count_expr.pos, usage)
    parts = []
    for i in range(count):
        inner = {**env, index: i}
        part = _need(_resolve(e.args[0], prefix, inner, weights), e.args[0])
        if isinstance(part, Alias):
            raise SpecError("stack() stacks checkpoint tensors, not another weight", e.args[0].pos,
                            usage)
        parts.append(part)
    return Stack(tuple(parts), index)


def _need(src: Source | None, e) -> Source:
    if src is None:
        raise SpecError("cannot transform an absent (none) weight", e.pos)
    return src


def _int(e: ir.Expr | None, env) -> int | None:
    if e is None:
        return None
    v = evaluate(e, env)
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"slice bounds must be ints, got {v!r}", e.pos)
    return v


def _truth(v) -> bool:
    return v is not None and v is not False and v != 0
