"""The interface every backend implements (`reference`, `cuda`, `tensorrt`): what the engine,
`SingleSequence` and the benchmarks call, and nothing else."""

from __future__ import annotations

from typing import Protocol

import torch
from kiln.dsl.plan import Plan

from .batch import StepBatch
from .kv_store import KVStore


class Backend(Protocol):
    backend: str  # "reference" | "cuda" | "tensorrt"
    plan: Plan

    def reserve(self, max_seqs: int, max_context: int) -> None:
        """Size everything per-step for up to `max_seqs` sequences of `max_context` tokens (the
        engine's limits), before the first step; raise if the backend cannot take them."""

    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        """Logits [rows, vocab] float32 of the tokens to sample (every token with all_logits); the
        step's K/V are appended to `kv`."""
