"""The op table: every dataflow op a spec can use, each defined once (dsl/ops/base.py says what a
definition holds). `OpKind` is the closed set of their names; backends dispatch through `OPS`,
a table keyed by it, and each backend's lowering of an op is part of that op's definition.

An op joins the language by being listed in its module's `DEFS`; the modules are named here.
"""

from __future__ import annotations

import enum

from . import attention, elementwise, layout, linear, moe, norm, rope, ssm
from .base import (  # noqa: F401  (the vocabulary of op definitions)
    Attr,
    CudaLowering,
    Gemm,
    Kernel,
    KernelCall,
    OpDef,
    RefContext,
    ShapeError,
    T,
    Torch,
    TrtLowering,
    TType,
)
from .elementwise import ACTIVATIONS, HF_ACTIVATIONS, activation_of  # noqa: F401

_DEFS: tuple[OpDef, ...] = (*linear.DEFS, *norm.DEFS, *rope.DEFS, *attention.DEFS, *elementwise.DEFS, *moe.DEFS,
                             *layout.DEFS, *ssm.DEFS)

OpKind = enum.Enum("OpKind", {d.name.upper(): d.name for d in _DEFS})
OpKind.__doc__ = "The closed set of op kinds: OpKind.LINEAR.value == 'linear'."

OPS: dict[OpKind, OpDef] = {OpKind(d.name): d for d in _DEFS}
BY_NAME: dict[str, OpDef] = {d.name: d for d in _DEFS}  # for the parser, which sees names

INFIX = {"+": "add", "-": "sub", "*": "mul"}  # what `a + b` etc. become in the AST


def trt_unsupported(ins) -> str | None:
    """Why TensorRT cannot express this instruction (its op definition says), or None."""
    low = OPS[ins.kind].trt
    if isinstance(low, str):
        return f"op '{ins.kind.value}' has no TensorRT lowering: {low}"
    return low.unsupported(ins) if low.unsupported else None
