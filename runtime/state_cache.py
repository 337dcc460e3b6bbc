"""The per-sequence recurrent state cache of state-space layers (Mamba's conv and SSM states).

Where the paged KV cache grows with a sequence, a state site (dsl/plan.StateSite: one
`causal_conv1d` or `selective_scan` instance) keeps a fixed-size state per sequence. A sequence
owns one *slot*, the same index in every site: `StatePool` does the accounting (which slot
belongs to whom; the scheduler allocates a slot when it admits a request and frees it when the
request finishes, is cancelled or is preempted), `StateStore` holds the memory, one
`[num_slots, *site.shape]` tensor per site, beside the KV pages (`KVStore.state`).

Nothing needs clearing between owners: an op whose sequence starts at context 0 starts from a
zero state and overwrites its slot (dsl/ops/ssm.py). A preempted request is recomputed from its
prompt like any other, so its state is rebuilt, not saved.

Invariants of `StatePool`: every slot in [0, num_slots) is free or held, never both;
`allocate` hands out the lowest free slot; freeing a free slot raises `StateAccountingError`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch


class StateCacheError(Exception):
    """Base class of this module's errors."""


class OutOfStateSlots(StateCacheError):
    """No free slot; nothing was allocated."""


class StateAccountingError(StateCacheError):
    """A slot was freed while free, or is not a slot id: a bug in the caller's bookkeeping."""


class StatePool:
    """Slots 0..num_slots-1, each held by at most one sequence."""

    def __init__(self, num_slots: int):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise StateCacheError(f"num_slots must be a positive integer, got {num_slots!r}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))  # a min-heap: the lowest free slot first
        self._held = [False] * num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfStateSlots(f"all {self.num_slots} recurrent state slots are in use")
        slot = heapq.heappop(self._free)
        self._held[slot] = True
        return slot

    def free(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.num_slots:
            raise StateAccountingError(f"state slot {slot!r} is not in [0, {self.num_slots})")
        if not self._held[slot]:
            raise StateAccountingError(f"cannot free state slot {slot}: it is free")
        self._held[slot] = False
        heapq.heappush(self._free, slot)


def _torch_dtype(site_dtype: str, run_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if site_dtype == "fp32" else run_dtype


def state_bytes_per_slot(sites: Sequence, run_dtype: torch.dtype) -> int:
    """Bytes one sequence's state takes over all state sites (0 without any)."""
    total = 0
    for s in sites:
        n = 1
        for d in s.shape:
            n *= d
        total += n * _torch_dtype(s.dtype, run_dtype).itemsize
    return total


class StateStore:
    """The state tensors, one `[num_slots, *shape]` per state site.

    A store made without sites (the default `KVStore.state`) creates a site's tensor on its first
    use, for `num_slots` slots: enough for drivers of one sequence (kiln verify, generate, bench,
    whose slices all name slot 0). The engine makes it with every site allocated up front, from
    the same memory budget as the KV pages."""

    def __init__(self, num_slots: int = 1, sites: Sequence = (), dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise StateCacheError(f"num_slots must be a positive integer, got {num_slots!r}")
        self.num_slots = num_slots
        self.tensors: dict[int, torch.Tensor] = {
            s.index: torch.zeros(num_slots, *s.shape, dtype=_torch_dtype(s.dtype, dtype), device=device)
            for s in sites}

    def site(self, index: int, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device | str) -> torch.Tensor:
        """Site `index`'s tensor [num_slots, *shape] (made on first use if not allocated)."""
        t = self.tensors.get(index)
        if t is None:
            t = self.tensors[index] = torch.zeros(self.num_slots, *shape, dtype=dtype, device=device)
        elif tuple(t.shape[1:]) != tuple(shape) or t.dtype != dtype:
            raise StateCacheError(f"state site {index} holds {tuple(t.shape[1:])} {t.dtype}, the op asks for "
                                  f"{tuple(shape)} {dtype}")
        return t

    def slots(self, seqs: Sequence) -> list[int]:
        """The state slot of each sequence of a step; each in range and named by one sequence only."""
        slots = [s.state_slot for s in seqs]
        for i, slot in enumerate(slots):
            if not 0 <= slot < self.num_slots:
                raise StateCacheError(f"sequence {i} names state slot {slot}, the store has {self.num_slots}")
        if len(set(slots)) != len(slots):
            raise StateCacheError(f"sequences of one step share a state slot ({slots}): a model with state sites "
                                  f"needs one slot per sequence (runtime/state_cache.StatePool)")
        return slots

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
