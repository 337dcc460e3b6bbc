"""Table lookups and matrix products: `embedding`, `linear`."""

from __future__ import annotations

import torch.nn.functional as F

from ..quant import linear as quant_linear
from .base import Attr, Gemm, Kernel, KernelCall, OpDef, T, TrtLowering, TType, act, float_weight, need


def _embedding_shape(ins, attrs):
    ids, table = ins
    need(ids is not None and ids.dtype == "int" and ids.shape == (T,), f"ids must be int[T], got {ids}")
    table = float_weight(table, "table")
    need(len(table.shape) == 2, f"table must be 2-D, got {table}")
    return (TType((T, table.shape[1])),)


def _embedding_reference(ctx, ins, a):
    ids, table = a
    offset = ins.attrs.offset
    if offset is None:
        return F.embedding(ids, table)
    # rows [offset, offset + V) of a larger vocabulary (a tensor-parallel rank's slice): ids outside
    # them give zero rows, which the all-reduce after the op fills in from the other ranks
    local = ids - offset
    held = (local >= 0) & (local < table.shape[0])
    return F.embedding(local.clamp(0, table.shape[0] - 1), table) * held[:, None].to(table.dtype)


def _embedding_check(attrs):
    need(attrs.offset is None or (isinstance(attrs.offset, int) and attrs.offset >= 0),
         f"offset must be an int >= 0, got {attrs.offset!r}")


def _embedding_cuda(ins, plan, dt):
    table = plan.weights[ins.inputs[1].name]
    rows = table.shape[0]
    if ins.attrs.offset is not None and table.shard.kind == "split":  # a tensor-parallel rank's rows of it
        rows //= table.shard.parts or plan.ranks
    return KernelCall(Kernel.EMBED, dict(vocab=rows, hidden=table.shape[1], offset=ins.attrs.offset or 0))


def _embedding_trt(nn, ids, table):
    return nn.gather(table, ids, 0)  # [T, D]


def _embedding_trt_unsupported(ins):
    return "offset (a tensor-parallel rank's slice of the vocabulary)" if ins.attrs.offset is not None else None


EMBEDDING = OpDef(
    "embedding", ("ids", "table"), {"offset": Attr("int?", None)}, _embedding_shape,
    "rows of table [V, D] picked by ids [T]; with an offset, the table holds vocabulary rows [offset, "
    "offset + V) and other ids give zero rows (set on each tensor-parallel rank by its local plan)",
    reference=_embedding_reference,
    cuda=_embedding_cuda,
    trt=TrtLowering(_embedding_trt, lambda ins, lw: [], _embedding_trt_unsupported),
    check_attrs=_embedding_check,
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
