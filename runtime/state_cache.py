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

Prefix reuse: a state cannot be rewound, so a request can skip a cached prefix only where the state
after exactly that prefix was kept. `StateSnapshots` names up to `capacity` *snapshots* (copies of
every site's state of one sequence, `StateStore.save` / `restore`) by the chained hash of the full
pages before the boundary (kv_cache.page_hashes); the scheduler takes one where a prompt chunk ends
on a page boundary and restores it into a request admitted with that prefix. Snapshots are evicted
least recently used first, like cached pages; a snapshot whose pages were evicted is never found
(the pages are looked up first).

Invariants of `StatePool`: every slot in [0, num_slots) is free or held, never both;
`allocate` hands out the lowest free slot; freeing a free slot raises `StateAccountingError`.
Invariants of `StateSnapshots`: a hash names at most one snapshot slot and a slot at most one hash;
kept + free == capacity; `put` takes the lowest free slot, else the least recently used one's.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
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


class StateSnapshots:
    """Which snapshot slot holds the state at which prefix (module docstring): accounting only."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise StateCacheError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(capacity))  # a min-heap

    @property
    def num_kept(self) -> int:
        return len(self._slot_of)

    def find(self, key: bytes) -> int | None:
        """The slot of the snapshot named `key`, or None (its recency unchanged)."""
        return self._slot_of.get(key)

    def use(self, key: bytes) -> int:
        """The slot of the kept snapshot `key`, now the most recently used."""
        self._slot_of.move_to_end(key)
        return self._slot_of[key]

    def put(self, key: bytes) -> int:
        """A slot for a new snapshot named `key` (not kept yet): a free one, else the least recently used
        snapshot's, whose name is dropped."""
        if key in self._slot_of:
            raise StateAccountingError("a snapshot of this prefix is kept already")
        slot = heapq.heappop(self._free) if self._free else self._slot_of.popitem(last=False)[1]
        self._slot_of[key] = slot
        return slot

    def check(self) -> None:
        slots = list(self._slot_of.values())
        if len(set(slots)) != len(slots) or set(slots) & set(self._free) \
                or len(slots) + len(self._free) != self.capacity:
            raise StateAccountingError(f"snapshot slots inconsistent: kept {sorted(slots)}, free {sorted(self._free)}")


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
                 device: torch.device | str = "cpu", num_snapshots: int = 0):
        if not isinstance(num_slots, int) or num_slots < 1:
            raise StateCacheError(f"num_slots must be a positive integer, got {num_slots!r}")
        if not isinstance(num_snapshots, int) or num_snapshots < 0 or (num_snapshots and not sites):
            raise StateCacheError(f"num_snapshots must be an integer >= 0 (and > 0 only with the sites allocated), "
                                  f"got {num_snapshots!r}")
        self.num_slots = num_slots
        self.num_snapshots = num_snapshots
        self.tensors: dict[int, torch.Tensor] = {
            s.index: torch.zeros(num_slots, *s.shape, dtype=_torch_dtype(s.dtype, dtype), device=device)
            for s in sites}
        # snapshots (StateSnapshots' slots), apart from the live slots the kernels index
        self.snapshots: dict[int, torch.Tensor] = {
            i: t.new_zeros(num_snapshots, *t.shape[1:]) for i, t in self.tensors.items()} if num_snapshots else {}

    def save(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy live slot a's state to snapshot slot b for each (a, b), in stream order (after the step that
        computed it, before the next one)."""
        if pairs:
            src, dst = self._indices(pairs, self.num_slots, self.num_snapshots)
            for i, t in self.tensors.items():
                self.snapshots[i].index_copy_(0, dst, t.index_select(0, src))

    def restore(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy snapshot slot a's state to live slot b for each (a, b) (before the step that continues from it)."""
        if pairs:
            src, dst = self._indices(pairs, self.num_snapshots, self.num_slots)
            for i, t in self.tensors.items():
                t.index_copy_(0, dst, self.snapshots[i].index_select(0, src))

    def _indices(self, pairs, n_src: int, n_dst: int):
        if any(not 0 <= a < n_src or not 0 <= b < n_dst for a, b in pairs) or len({b for _, b in pairs}) != len(pairs):
            raise StateAccountingError(f"state copies {list(pairs)}: out of range ({n_src}, {n_dst}) or a target twice")
        dev = next(iter(self.tensors.values())).device
        idx = torch.tensor([[a for a, _ in pairs], [b for _, b in pairs]])
        if dev.type == "cuda":  # (from pinned memory, not synchronously: the host does not wait for the GPU)
            idx = idx.pin_memory().to(dev, non_blocking=True)
        return idx[0], idx[1]

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
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *self.snapshots.values()))
