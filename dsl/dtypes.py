"""The one table of run dtypes: each name Kiln accepts, and how every layer spells it.

A run dtype is what activations and (unquantized) weights are held in. Storage dtypes of
quantized weights are the quantization descriptor's business (dsl/plan.py), not this table's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # Kiln's name: "bf16"
    torch: torch.dtype
    ctype: str  # the CUDA C type generated kernels use
    itemsize: int
    trt: str  # the TensorRT DataType attribute


RUN_DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("fp32", torch.float32, "float", 4, "float32"),
    DType("fp16", torch.float16, "__half", 2, "float16"),
    DType("bf16", torch.bfloat16, "__nv_bfloat16", 2, "bfloat16"),
)}
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's names, accepted on input


def dtype(name: str) -> DType:
    """The run dtype called `name` (Kiln's or torch's spelling); KeyError names the known ones."""
    key = ALIASES.get(name, name)
    if key not in RUN_DTYPES:
        raise KeyError(f"unknown dtype {name!r} (known: {', '.join(RUN_DTYPES)})")
    return RUN_DTYPES[key]


def of_torch(t: torch.dtype) -> DType:
    for d in RUN_DTYPES.values():
        if d.torch == t:
            return d
    raise KeyError(f"{t} is not a run dtype (known: {', '.join(RUN_DTYPES)})")
