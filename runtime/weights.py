"""Weights for a Plan from a checkpoint, through the spec's mapping.

Each weight slot's source tree (checkpoint tensor, tie, transpose, slice, concat, reshape,
stack) is
materialised, checked against the declared shape and dtype, and converted to the run
dtype. Every failure names the tensor, the checkpoint file and the spec line; tensors
the spec neither uses nor ignores are reported too, so a wrong spec cannot load
silently.
"""

from __future__ import annotations

import fnmatch

import torch
from kiln.dsl.ops import OpKind
from kiln.dsl.plan import Plan, WeightSlot
from kiln.dsl.quant import QWeight, quantize_weight
from kiln.dsl.sources import Alias, Concat, Reshape, SliceOf, Source, Stack, Tensor, Transpose

from .checkpoint import Checkpoint, CheckpointError
from .gguf_file import unpermute_rope_rows
from .quant_formats import Format, source_tensor

_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}


def load_weights(plan: Plan, ckpt: Checkpoint, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", fmt: Format | None = None) -> dict[str, torch.Tensor | QWeight]:
    """Every weight slot's tensor in the run dtype — or, for a slot the plan stores quantized, its
    QWeight: read from the checkpoint's quantized tensors when `fmt` (a quantized checkpoint's
    format) covers it, else quantized here from the float weight (an on-load scheme)."""
    permuted = _rope_permuted_tensors(plan) if (
        ckpt.format == "gguf" and "rope_permuted" in plan.spec.gguf_flags) else {}
    used: set[str] = set()
    cache: dict[str, torch.Tensor] = {}

    def fetch(name: str, slot: WeightSlot) -> torch.Tensor:
        if name not in cache:
            if name not in ckpt:
                raise CheckpointError(
                    f"missing tensor '{name}' in checkpoint {ckpt.path} "
                    f"(weight '{slot.name}', declared at {slot.decl.pos})")
            info = ckpt.info(name)
            if slot.decl.dtype == "float" and info.dtype not in _FLOAT_DTYPES and ckpt.format != "gguf":
                raise CheckpointError(
                    f"tensor '{name}' in {info.file} has dtype {info.dtype}; weight '{slot.name}' "
                    f"({slot.decl.pos}) needs a floating-point tensor")
            t = ckpt.get(name)
            if name in permuted:
                t = unpermute_rope_rows(t, permuted[name])
            cache[name] = t
            used.add(name)
        return cache[name]

    def build(src: Source, slot: WeightSlot) -> torch.Tensor:
        if isinstance(src, Tensor):
            return fetch(src.name, slot)
        if isinstance(src, Transpose):
            t = build(src.src, slot)
            if t.dim() != 2:
                raise CheckpointError(f"weight '{slot.name}' ({slot.decl.pos}): .T needs a 2-D tensor, "
                                      f"got shape {list(t.shape)} from {_names(src)}")
            return t.t()
        if isinstance(src, SliceOf):
            t = build(src.src, slot)
            size = t.shape[src.dim] if src.dim < t.dim() else 0
            start, stop = src.start or 0, size if src.stop is None else src.stop
            if src.dim >= t.dim() or not 0 <= start < stop <= size:
                raise CheckpointError(
                    f"weight '{slot.name}' ({slot.decl.pos}): slice [{start}:{stop}] of dim {src.dim} "
                    f"is outside tensor {_names(src)} of shape {list(t.shape)}")
            return t.narrow(src.dim, start, stop - start)
        if isinstance(src, Concat):
            parts = [build(s, slot) for s in src.srcs]
            try:
                return torch.cat(parts, dim=src.dim)
            except RuntimeError:
                raise CheckpointError(
                    f"weight '{slot.name}' ({slot.decl.pos}): cannot concatenate "
                    f"{[list(p.shape) for p in parts]} along dim {src.dim}") from None
        if isinstance(src, Reshape):
            t = build(src.src, slot)
            try:
                return t.reshape(src.shape)
            except RuntimeError:
                raise CheckpointError(
                    f"weight '{slot.name}' ({slot.decl.pos}): cannot reshape {_names(src)} of shape "
                    f"{list(t.shape)} to {list(src.shape)}") from None
        if isinstance(src, Stack):
            parts = [build(s, slot) for s in src.srcs]
            odd = next((i for i, p in enumerate(parts) if p.shape != parts[0].shape), None)
            if odd is not None:
                raise CheckpointError(
                    f"weight '{slot.name}' ({slot.decl.pos}): cannot stack tensors of different shapes "
                    f"over '{src.index}': {_names(src.srcs[0])} is {list(parts[0].shape)}, "
                    f"{_names(src.srcs[odd])} is {list(parts[odd].shape)}")
            return torch.stack(parts)
        raise CheckpointError(f"weight '{slot.name}': unhandled source {src!r}")

    out: dict[str, torch.Tensor] = {}
    for slot in plan.weights.values():
        if slot.source is None or isinstance(slot.source, Alias):
            continue
        if slot.quant.quantized:
            out[slot.name] = _quantized(slot, fmt, lambda: build(slot.source, slot), permuted, used, device)
            continue
        t = build(slot.source, slot)
        if tuple(t.shape) != slot.shape:
            raise CheckpointError(
                f"tensor {_names(slot.source)} in {_files(ckpt, slot.source)} has shape {list(t.shape)}, "
                f"but weight '{slot.name}' is declared {list(slot.shape)} at {slot.decl.pos}")
        # A storage dtype (int8, fp8, ...) is kept as stored; the checker lets no op read it as a float.
        out[slot.name] = t.to(device=device, dtype=dtype if slot.decl.dtype == "float" else None).contiguous()
    for slot in plan.weights.values():  # ties share the tensor they name
        if isinstance(slot.source, Alias):
            out[slot.name] = out[plan.alias_target(slot.name)]
    if fmt is not None:  # calibrated KV cache scales (read by quantize_plan) are not weights
        used.update(getattr(fmt, "kv_tensors", ()))
    extra = [n for n in ckpt.unexpected(used) if not any(fnmatch.fnmatchcase(n, g) for g in plan.spec.ignore)]
    if extra:
        shown = ", ".join(f"'{n}'" for n in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise CheckpointError(
            f"unexpected tensor(s) {shown} in {_files(ckpt, Tensor(extra[0]))}: the spec "
            f"{plan.spec.file} does not use them (list them under `ignore` if they are not weights)")
    return out


def _quantized(slot: WeightSlot, fmt: Format | None, build_float, permuted: dict[str, int], used: set[str],
               device) -> QWeight:
    if fmt is None:  # an on-load scheme: quantize the float weight (on the device: it is faster there)
        t = build_float()
        if tuple(t.shape) != slot.shape:
            raise CheckpointError(f"tensor {_names(slot.source)} has shape {list(t.shape)}, but weight "
                                  f"'{slot.name}' is declared {list(slot.shape)} at {slot.decl.pos}")
        return quantize_weight(t.to(device), slot.quant, slot.name)
    w = fmt.load(slot)
    name = source_tensor(slot)
    used.update(fmt.tensors_of(name))
    if name in permuted:  # llama.cpp's rotary row order: rows are whole, so blocks permute like values
        w.q = unpermute_rope_rows(w.q, permuted[name]).contiguous()
    return w.to(device)


def _names(src: Source) -> str:
    if isinstance(src, Tensor):
        return f"'{src.name}'"
    if isinstance(src, (Transpose, SliceOf, Reshape)):
        return _names(src.src)
    if isinstance(src, Concat):
        return " + ".join(_names(s) for s in src.srcs)
    if isinstance(src, Stack):
        return f"{_names(src.srcs[0])} .. {_names(src.srcs[-1])}" if len(src.srcs) > 1 else _names(src.srcs[0])
    return repr(src)


def _files(ckpt: Checkpoint, src: Source) -> str:
    while not isinstance(src, Tensor):
        src = src.srcs[0] if isinstance(src, (Concat, Stack)) else src.src
    try:
        return ckpt.file_of(src.name)
    except CheckpointError:
        return str(ckpt.path)


def _rope_permuted_tensors(plan: Plan) -> dict[str, int]:
    """Checkpoint tensors whose rows llama.cpp permuted: the weights (and biases) of
    linear ops that feed a rope op, found by following the dataflow; value -> heads."""
    producers = {}
    for ins in plan.program.instrs:
        for o in ins.outputs:
            producers[o] = ins
    out: dict[str, int] = {}
    for ins in plan.program.instrs:
        if ins.kind is not OpKind.ROPE:
            continue
        src = producers.get(ins.inputs[0])
        if src is None or src.kind is not OpKind.LINEAR:
            continue
        for ref in src.inputs[1:]:
            if ref is None:
                continue
            slot = plan.weights[ref.name]
            if isinstance(slot.source, Tensor):
                out[slot.source.name] = slot.shape[0] // ins.attrs.head_dim
    return out
