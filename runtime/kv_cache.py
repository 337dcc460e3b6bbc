"""Paged KV cache bookkeeping: a pool of fixed-size pages and per-sequence block tables.

This module only does accounting (which page belongs to whom); the K/V tensors themselves
are `[num_pages, kv_heads, page_size, head_dim]` per attention site and live in the backend.
A sequence's block table is a plain `list[int]` of page ids: token at position p lives in
page `table[p // page_size]`, slot `p % page_size`.

Invariants of `BlockPool`:
- every page id in [0, num_pages) is either free (reference count 0, on the free list) or
  used (count >= 1, not on the free list); `num_free + num_used == num_pages`;
- allocation hands out the lowest free ids first, so page ids are deterministic;
- `allocate`/`ensure` are all-or-nothing: on `OutOfPages` nothing was allocated;
- a page returns to the free list exactly when its count drops to 0; dropping a free
  page is a bookkeeping bug and raises `PageAccountingError` without changing any state.

Shared pages (`fork`, `incref`) are read-only by convention: a writer must copy a page whose
`refcount` is above 1 before appending into it (copy-on-write is the caller's job).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence


class KVCacheError(Exception):
    """Base class of this module's errors."""


class OutOfPages(KVCacheError):
    """Fewer free pages than requested; nothing was allocated."""


class PageAccountingError(KVCacheError):
    """A page was freed or shared while not in use: a bug in the caller's bookkeeping."""


class BlockPool:
    """Reference-counted pages of `page_size` tokens each, ids 0..num_pages-1."""

    def __init__(self, num_pages: int, page_size: int):
        if not isinstance(num_pages, int) or num_pages < 1:
            raise KVCacheError(f"num_pages must be a positive integer, got {num_pages!r}")
        if not isinstance(page_size, int) or page_size < 1:
            raise KVCacheError(f"page_size must be a positive integer, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcount = [0] * num_pages
        # A min-heap, so the lowest free id is always handed out first.
        self._free = list(range(num_pages))

    # -- counters -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages in use, in [0, 1]."""
        return self.num_used / self.num_pages

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._refcount[page]

    def pages_needed(self, num_tokens: int) -> int:
        """Pages a sequence of `num_tokens` tokens occupies."""
        return -(-num_tokens // self.page_size)

    # -- pages --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages (lowest ids first), each with reference count 1."""
        if not isinstance(n, int) or n < 0:
            raise KVCacheError(f"number of pages to allocate must be a non-negative integer, got {n!r}")
        if n > len(self._free):
            raise OutOfPages(f"need {n} KV cache pages, only {len(self._free)} of {self.num_pages} free")
        pages = [heapq.heappop(self._free) for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one reference to each page (which must be in use)."""
        pages = list(pages)
        for p in pages:
            self._check_id(p)
            if self._refcount[p] == 0:
                raise PageAccountingError(f"cannot share page {p}: it is free")
        for p in pages:
            self._refcount[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference per occurrence; pages reaching 0 go back to the free list."""
        drops = Counter(pages)
        # Check everything first so a bad call leaves the pool untouched.
        for p, k in drops.items():
            self._check_id(p)
            if self._refcount[p] < k:
                state = "free" if self._refcount[p] == 0 else f"held {self._refcount[p]} time(s)"
                raise PageAccountingError(f"cannot free page {p} {k} time(s): it is {state}")
        for p, k in drops.items():
            self._refcount[p] -= k
            if self._refcount[p] == 0:
                heapq.heappush(self._free, p)

    # -- block tables -------------------------------------------------------------------
    def ensure(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` in place to hold `num_tokens` tokens (all-or-nothing; never shrinks)."""
        missing = self.pages_needed(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    def release(self, table: list[int]) -> None:
        """Drop the table's references and empty it."""
        self.free(table)
        table.clear()

    def fork(self, table: Sequence[int]) -> list[int]:
        """A new table sharing every page of `table` (one more reference each)."""
        self.incref(table)
        return list(table)

    def _check_id(self, page: int) -> None:
        if not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise PageAccountingError(f"page id {page!r} is not in [0, {self.num_pages})")


# -- capacity sizing ------------------------------------------------------------------------
def kv_bytes_per_page(page_size: int, sites: Sequence[tuple[int, int, int]], dtype_bytes: int) -> int:
    """Bytes one page takes over all attention sites; each site is (kv_heads, head_dim_k, head_dim_v)."""
    if page_size < 1 or dtype_bytes < 1:
        raise KVCacheError(f"page_size and dtype_bytes must be positive, got {page_size}, {dtype_bytes}")
    if not sites:
        raise KVCacheError("kv_bytes_per_page needs at least one attention site")
    per_token = 0
    for i, (kv_heads, dk, dv) in enumerate(sites):
        if kv_heads < 1 or dk < 1 or dv < 1:
            raise KVCacheError(f"attention site {i}: kv_heads and head dims must be positive, got {(kv_heads, dk, dv)}")
        per_token += kv_heads * (dk + dv)
    return page_size * per_token * dtype_bytes


def pages_for_memory(free_bytes: int, fraction: float, bytes_per_page: int) -> int:
    """How many pages fit in `fraction` of `free_bytes`."""
    if not 0.0 < fraction <= 1.0:
        raise KVCacheError(f"KV cache memory fraction must be in (0, 1], got {fraction}")
    if bytes_per_page < 1:
        raise KVCacheError(f"bytes_per_page must be positive, got {bytes_per_page}")
    if free_bytes < 0:
        raise KVCacheError(f"free_bytes must be non-negative, got {free_bytes}")
    return int(free_bytes * fraction) // bytes_per_page


def describe_capacity(num_pages: int, page_size: int, bytes_per_page: int, fraction: float, free_bytes: int) -> str:
    """One start-up line, e.g. 'KV cache: 2,048 pages x 16 tokens = 32,768 tokens, 4.0 GiB (90% of free 41.2 GiB)'."""
    gib = 1024**3
    return (
        f"KV cache: {num_pages:,} pages x {page_size} tokens = {num_pages * page_size:,} tokens, "
        f"{num_pages * bytes_per_page / gib:.1f} GiB ({fraction:.0%} of free {free_bytes / gib:.1f} GiB)"
    )
