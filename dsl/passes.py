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
from typing import Any, Callable, Mapping

from . import ir
from .checker import check
from .errors import SpecError
from .ops import OpKind
from .plan import REPLICATED, Plan, Value, WeightArg
from .quant import SCHEMES, UNQUANTIZED, QuantDesc

Pass = Callable[[Plan], Plan]

QUANT_SCHEMES = tuple(SCHEMES)
SHARD_SCHEMES = (1,)  # tensor-parallel ranks


def quantize(scheme: str = "none", only: Mapping[str, QuantDesc] | None = None) -> Pass:
    """Set the storage of every quantizable weight (`quantizable`) to the scheme's; `only` (from
    a pre-quantized checkpoint) names the weights that are quantized and each one's descriptor
    instead, and must name quantizable weights only."""
    if scheme not in SCHEMES:
        raise SpecError(f"unknown quantization scheme '{scheme}'", None, "schemes: " + ", ".join(QUANT_SCHEMES))

    def run(plan: Plan) -> Plan:
        can = quantizable(plan)
        if only is not None:
            bad = sorted(set(only) - can)
            if bad:
                raise SpecError(f"weight '{bad[0]}' is stored quantized, but only the weights of linear ops "
                                f"(not the LM head, not tied ones) can be", None)
            descs = dict(only)
        else:
            desc = SCHEMES[scheme].weight
            descs = {n: desc for n in can} if desc.quantized else {}
            for n in sorted(descs):
                shape = plan.weights[n].shape
                if desc.group_size and shape[-1] % desc.group_size:
                    raise SpecError(f"--quantization {scheme}: weight '{n}' has {shape[-1]} input features, not "
                                    f"whole groups of {desc.group_size}", plan.weights[n].decl.pos)
        weights = {n: dataclasses.replace(w, quant=descs.get(n, UNQUANTIZED)) for n, w in plan.weights.items()}
        return dataclasses.replace(plan, weights=weights)
    return run


def quantizable(plan: Plan) -> set[str]:
    """Weights a scheme quantizes: those read only as the weight of `linear` ops (experts'
    included), never tied, and not the LM head (the last linear before the logits, which
    quantization hurts most and which most checkpoints keep in high precision)."""
    as_linear, elsewhere = set(), set()
    for ins in plan.program.walk():
        for i, a in enumerate(ins.inputs):
            if isinstance(a, WeightArg):
                (as_linear if ins.kind is OpKind.LINEAR and i == 1 else elsewhere).add(a.name)
    tied = {n for n, w in plan.weights.items() if plan.alias_target(n) != n}
    tied |= {plan.alias_target(n) for n in tied}
    return as_linear - elsewhere - tied - _lm_heads(plan)


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


KV_CACHE_DTYPES = ("run", "fp8")


def kv_cache(dtype: str = "run") -> Pass:
    """Set how every attention site stores its K/V pages: the run dtype, or fp8 E4M3 with one
    scale per site for K and one for V (KVStore holds them: 1.0 unless a checkpoint brings
    calibrated ones), written quantized and read back dequantized by every backend."""
    if dtype not in KV_CACHE_DTYPES:
        raise SpecError(f"--kv-cache-dtype {dtype}: no such KV cache dtype", None,
                        "KV cache dtypes: " + ", ".join(KV_CACHE_DTYPES))

    def run(plan: Plan) -> Plan:
        return dataclasses.replace(plan, sites=[dataclasses.replace(s, kv_dtype=dtype) for s in plan.sites])
    return run


def shard(ranks: int = 1) -> Pass:
    if ranks not in SHARD_SCHEMES:
        raise SpecError(f"tensor parallelism over {ranks} ranks is not supported", None,
                        "supported: " + ", ".join(map(str, SHARD_SCHEMES)))

    def run(plan: Plan) -> Plan:
        weights = {n: dataclasses.replace(w, shard=REPLICATED) for n, w in plan.weights.items()}
        return dataclasses.replace(plan, weights=weights)
    return run


def run(plan: Plan, passes: list[Pass]) -> Plan:
    plan.verify()
    for p in passes:
        plan = p(plan).verify()
    return plan


def build(spec: ir.Spec, config: Mapping[str, Any] | None = None, config_file: str = "config.json",
          quant: str = "none", ranks: int = 1, quant_only: Mapping[str, QuantDesc] | None = None) -> Plan:
    """The plan a model runs: the spec checked against the config, then the weight passes."""
    return run(check(spec, config, config_file), [quantize(quant, quant_only), shard(ranks)])


def unsupported_weights(plan: Plan, backend: str,
                        runs: Callable[[QuantDesc], bool] = lambda d: not d.quantized) -> list[str]:
    """Messages naming each weight whose descriptors `backend` cannot run: a storage `runs`
    refuses, or a split weight (every backend runs on one rank today)."""
    out = []
    for w in plan.weights.values():
        if w.source is None:
            continue
        if w.quant.quantized and not runs(w.quant):
            out.append(f"weight '{w.name}' is stored as {w.quant}; the {backend} backend does not run that "
                       f"format")
        if w.shard != REPLICATED:
            out.append(f"weight '{w.name}' is split across ranks ({w.shard.kind}, axis {w.shard.axis}); "
                       f"the {backend} backend runs on one rank")
    return out
