"""Passes over a checked Plan: each returns a new plan, and `run` verifies the plan's invariants
(Plan.verify) after every one, so a pass that breaks one is caught where it ran.

The passes that fill the weight descriptors live here: `quantize` sets each weight's QuantDesc
(how it is stored), `shard` each weight's ShardDesc (how tensor-parallel ranks split it).
Today's schemes are the identity ones — every weight in the run dtype, replicated — which is
what every backend runs; a backend reads the descriptors and refuses, naming the weight, any it
cannot run, rather than computing with weights it misreads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from . import ir
from .checker import check
from .errors import SpecError
from .plan import REPLICATED, UNQUANTIZED, Plan

Pass = Callable[[Plan], Plan]

QUANT_SCHEMES = ("none",)
SHARD_SCHEMES = (1,)  # tensor-parallel ranks


def quantize(scheme: str = "none") -> Pass:
    if scheme not in QUANT_SCHEMES:
        raise SpecError(f"unknown quantization scheme '{scheme}'", None, "schemes: " + ", ".join(QUANT_SCHEMES))

    def run(plan: Plan) -> Plan:
        weights = {n: dataclasses.replace(w, quant=UNQUANTIZED) for n, w in plan.weights.items()}
        return dataclasses.replace(plan, weights=weights)
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
          quant: str = "none", ranks: int = 1) -> Plan:
    """The plan a model runs: the spec checked against the config, then the weight passes."""
    return run(check(spec, config, config_file), [quantize(quant), shard(ranks)])


def unsupported_weights(plan: Plan, backend: str) -> list[str]:
    """Messages naming each weight whose descriptors `backend` cannot run (today: any quantized or
    split weight, on every backend)."""
    out = []
    for w in plan.weights.values():
        if w.source is None:
            continue
        if w.quant.quantized:
            out.append(f"weight '{w.name}' is stored as {w.quant.dtype} ({w.quant.scale_layout} scales); "
                       f"the {backend} backend runs unquantized weights only")
        if w.shard != REPLICATED:
            out.append(f"weight '{w.name}' is split across ranks ({w.shard.kind}, axis {w.shard.axis}); "
                       f"the {backend} backend runs on one rank")
    return out
