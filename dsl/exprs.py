"""Evaluation of constant expressions (shapes, attributes, defaults, weight sources).

Constant expressions are evaluated in an environment of bound parameters and block
indices. Any failure (undefined name, wrong operand type, division by zero) is a
SpecError at the expression's position: user input never raises anything else.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Mapping

from . import ir
from .errors import SpecError

_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow,
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}

_FUNCS: dict[str, tuple[int, Callable[..., Any]]] = {
    "sqrt": (1, math.sqrt), "min": (2, min), "max": (2, max), "abs": (1, abs),
    "int": (1, int), "float": (1, float), "len": (1, len), "log": (1, math.log),
    "ceil": (1, math.ceil),
}
CONST_FUNCS = frozenset(_FUNCS)


def evaluate(e: ir.Expr, env: Mapping[str, Any]) -> Any:
    """Evaluate a constant expression; `env` maps parameter and index names to values."""
    if isinstance(e, ir.Const):
        return e.value
    if isinstance(e, ir.Name):
        if e.id not in env:
            raise SpecError(f"undefined name '{e.id}'", e.pos,
                            "constant expressions may use parameters and block indices")
        return env[e.id]
    if isinstance(e, ir.ListExpr):
        return [evaluate(x, env) for x in e.items]
    if isinstance(e, ir.Cond):
        return evaluate(e.then, env) if _truth(evaluate(e.test, env), e.test) else evaluate(e.other, env)
    if isinstance(e, ir.UnOp):
        v = evaluate(e.operand, env)
        if e.op == "not":
            return not _truth(v, e.operand)
        _numeric(v, e.operand, "-")
        return -v
    if isinstance(e, ir.BinOp):
        if e.op == "and":
            return _truth(evaluate(e.left, env), e.left) and _truth(evaluate(e.right, env), e.right)
        if e.op == "or":
            left = evaluate(e.left, env)
            return left if left is not None and left is not False else evaluate(e.right, env)
        a, b = evaluate(e.left, env), evaluate(e.right, env)
        if e.op in ("==", "!="):
            return _ARITH[e.op](a, b)
        if e.op in ("in", "not in"):  # membership in a list (or a substring of a string)
            if not isinstance(b, (list, str)) or (isinstance(b, str) and not isinstance(a, str)):
                raise SpecError(f"'{e.op}' needs a list (or a string) on its right, got {b!r}", e.right.pos)
            return (a in b) == (e.op == "in")
        _numeric(a, e.left, e.op)
        _numeric(b, e.right, e.op)
        if e.op in ("/", "//", "%") and b == 0:
            raise SpecError("division by zero", e.pos)
        if e.op == "**" and (abs(b) > 64 or abs(a) > 2 ** 64):
            raise SpecError(f"{a!r} ** {b!r} is out of range", e.pos, "exponents are limited to 64")
        try:
            return _ARITH[e.op](a, b)
        except (OverflowError, ValueError) as err:
            raise SpecError(f"cannot compute {a!r} {e.op} {b!r}: {err}", e.pos) from None
    if isinstance(e, ir.Call):
        if e.fn not in _FUNCS:
            raise SpecError(f"unknown function '{e.fn}' in a constant expression", e.pos,
                            "constant functions: " + ", ".join(sorted(_FUNCS)))
        arity, fn = _FUNCS[e.fn]
        if len(e.args) != arity or e.kwargs:
            raise SpecError(f"{e.fn}() takes {arity} argument(s)", e.pos)
        args = [evaluate(a, env) for a in e.args]
        try:
            return fn(*args)
        except (TypeError, ValueError, OverflowError) as err:
            raise SpecError(f"{e.fn}() failed: {err}", e.pos) from None
    if isinstance(e, ir.Index):
        base = evaluate(e.base, env)
        if not isinstance(base, list) or len(e.subs) != 1 or isinstance(e.subs[0], ir.Slice):
            raise SpecError("only a list can be indexed, with one integer index", e.pos)
        i = evaluate(e.subs[0], env)
        if not isinstance(i, int) or not -len(base) <= i < len(base):
            raise SpecError(f"index {i!r} out of range for a list of {len(base)}", e.pos)
        return base[i]
    if isinstance(e, ir.Attr):
        base = evaluate(e.base, env)
        if base is None or not hasattr(base, "__dataclass_fields__") or e.name not in base.__dataclass_fields__:
            raise SpecError(f"no field '{e.name}' here", e.pos)
        return getattr(base, e.name)
    raise SpecError("this expression is not a constant", getattr(e, "pos", None))


def _truth(v: Any, e: ir.Expr) -> bool:
    if v is None:
        return False
    if isinstance(v, (bool, int, float, str, list)):
        return bool(v)
    raise SpecError(f"{v!r} is not a condition", e.pos)


def _numeric(v: Any, e: ir.Expr, op: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SpecError(f"operator '{op}' needs numbers, got {_describe(v)}", e.pos)


def _describe(v: Any) -> str:
    return "none" if v is None else f"{type(v).__name__} {v!r}"
