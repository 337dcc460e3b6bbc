"""Table lookups and matrix products: `embedding`, `linear`."""

from __future__ import annotations

import torch.nn.functional as F

from ..quant import linear as quant_linear
from .base import Gemm, Kernel, KernelCall, OpDef, T, TrtLowering, TType, act, float_weight, need


def _embedding_shape(ins, attrs):
    ids, table = ins
    need(ids is not None and ids.dtype == "int" and ids.shape == (T,), f"ids must be int[T], got {ids}")
    table = float_weight(table, "table")
    need(len(table.shape) == 2, f"table must be 2-D, got {table}")
    return (TType((T, table.shape[1])),)


def _embedding_cuda(ins, plan, dt):
    table = plan.weights[ins.inputs[1].name]
    return KernelCall(Kernel.EMBED, dict(vocab=table.shape[0], hidden=table.shape[1]))


def _embedding_trt(nn, ids, table):
    return nn.gather(table, ids, 0)  # [T, D]


EMBEDDING = OpDef(
    "embedding", ("ids", "table"), {}, _embedding_shape, "rows of table [V, D] picked by ids [T]",
    reference=lambda ctx, ins, a: F.embedding(a[0], a[1]),
    cuda=_embedding_cuda,
    trt=TrtLowering(_embedding_trt, lambda ins, lw: []),
)


def _linear_shape(ins, attrs):
    x, w, b = act(ins[0]), ins[1], ins[2]
    w = float_weight(w, "weight")
    need(len(w.shape) == 2, f"weight must be 2-D [out, in], got {w}")
    need(w.shape[1] == x.shape[1],
         f"input has {x.shape[1]} features but the weight is {w} ([out, in] expects in = {x.shape[1]})")
    if b is not None:
        need(b.shape == (w.shape[0],), f"bias must be [{w.shape[0]}], got {b}")
    return (TType((T, w.shape[0])),)


def _linear_trt(nn, x, w, b=None):
    y = nn.net.add_matrix_multiply(x, nn.trt.MatrixOperation.NONE,
                                   w, nn.trt.MatrixOperation.TRANSPOSE).get_output(0)  # [T, out]
    return y if b is None else nn.ew(y, nn.row(b), "SUM")


LINEAR = OpDef(
    "linear", ("x", "weight", "bias?"), {}, _linear_shape, "x @ weight^T + bias; weight is [out, in]",
    # a quantized weight through its format; the step's LoRA adapters (if any) per row
    reference=lambda ctx, ins, a: quant_linear(a[0], a[1], a[2], getattr(ctx, "lora", None), ins.inputs[1].name),
    cuda=lambda ins, plan, dt: Gemm(),
    trt=TrtLowering(_linear_trt, lambda ins, lw: []),
)

DEFS = (EMBEDDING, LINEAR)
