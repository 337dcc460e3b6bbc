"""Paged KV cache bookkeeping: a pool of fixed-size pages and per-sequence block tables.

This module only does accounting (which page belongs to whom); the K/V tensors themselves
are `[num_pages, kv_heads, page_size, head_dim]` per attention site and live in the backend.
A sequence's block table is a plain `list[int]` of page ids: token at position p lives in
page `table[p // page_size]`, slot `p % page_size`.

Prefix caching (vLLM's block pool design): a *full* page can be registered under the hash of
its tokens chained with the hash of every page before it (`page_hashes`, whose chain starts
from a namespace: model, quantization, KV dtype, adapter). A later sequence whose leading pages
hash the same `lookup`s them and `touch`es them instead of recomputing them. Only full pages are
registered and a registered page is never written again (its tokens are fixed), so sharing
needs no copy-on-write: a sequence's last, partial page is always its own.

Each page is in exactly one of three states:
- *free*: reference count 0, no hash, on the free heap;
- *cached*: reference count 0, registered under a hash, in the eviction order (least recently
  released first). Its K/V stay valid until `allocate` evicts it (drops its hash) for lack of
  free pages; free pages are always taken before any cached page is evicted;
- *used*: reference count >= 1 (registered or not).

Invariants of `BlockPool` (checked by `check`):
- `num_free` counts free and cached pages (all that `allocate` can hand out):
  `num_free + num_used == num_pages`;
- a hash names at most one page and a page has at most one hash, for as long as it is registered;
- allocation hands out the lowest free ids first, then evicts cached pages in eviction order,
  so page ids are deterministic;
- `allocate`/`ensure`/`touch` are all-or-nothing: on an error nothing changed;
- a page's reference count drops to 0 exactly when its last holder frees it; dropping an unused
  page is a bookkeeping bug and raises `PageAccountingError` without changing any state.

Shared pages (`fork`, `incref`, `touch`) are read-only by convention: a writer must copy a page
whose `refcount` is above 1 before appending into it (copy-on-write is the caller's job; the
scheduler never needs it, as it only shares full pages).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence


class KVCacheError(Exception):
    """Base class of this module's errors."""


class OutOfPages(KVCacheError):
    """Fewer free pages than requested; nothing was allocated."""


class PageAccountingError(KVCacheError):
    """A page was freed or shared while not in use: a bug in the caller's bookkeeping."""


def namespace_hash(*parts: str) -> bytes:
    """The root of a hash chain: a digest of everything the K/V of a page depend on besides its
    tokens (model identity, dtypes, quantization, adapter), so pages never match across them."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode()
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return h.digest()


def page_hashes(parent: bytes, tokens: Sequence[int], page_size: int, start: int = 0) -> list[bytes]:
    """Chained hashes of the full pages of `tokens` from page `start` on; `parent` is the hash of
    page `start - 1` (or the namespace root when `start` is 0). A partial last page has none."""
    out = []
    for i in range(start, len(tokens) // page_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens[i * page_size : (i + 1) * page_size]).tobytes())
        parent = h.digest()
        out.append(parent)
    return out


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
        self._hash_of: dict[int, bytes] = {}  # registered page -> its hash
        self._page_of: dict[bytes, int] = {}  # hash -> registered page
        self._cached: OrderedDict[int, None] = OrderedDict()  # cached (unreferenced) pages, evicted first to last
        self.num_evictions = 0

    # -- counters -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: free ones and cached (unreferenced) ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered pages nobody references: resident, evicted only when pages run out."""
        return len(self._cached)

    @property
    def num_registered(self) -> int:
        """Pages registered under a hash, referenced or not."""
        return len(self._hash_of)

    @property
    def usage(self) -> float:
        """Fraction of pages in use, in [0, 1]."""
        return self.num_used / self.num_pages

    def refcount(self, page: int) -> int:
        self._check_id(page)
        return self._refcount[page]

    def page_hash(self, page: int) -> bytes | None:
        self._check_id(page)
        return self._hash_of.get(page)

    def pages_needed(self, num_tokens: int) -> int:
        """Pages a sequence of `num_tokens` tokens occupies."""
        return -(-num_tokens // self.page_size)

    # -- pages --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take `n` pages, each with reference count 1: free ones (lowest ids first), then cached
        ones in eviction order, whose hashes are dropped."""
        if not isinstance(n, int) or n < 0:
            raise KVCacheError(f"number of pages to allocate must be a non-negative integer, got {n!r}")
        if n > self.num_free:
            raise OutOfPages(f"need {n} KV cache pages, only {self.num_free} of {self.num_pages} free")
        pages = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        while len(pages) < n:
            page, _ = self._cached.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
            self.num_evictions += 1
            pages.append(page)
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
        """Drop one reference per occurrence. Pages reaching 0 become free, or, when registered,
        cached: they join the end of the eviction order in the order given."""
        pages = list(pages)
        drops = Counter(pages)
        # Check everything first so a bad call leaves the pool untouched.
        for p, k in drops.items():
            self._check_id(p)
            if self._refcount[p] < k:
                state = "free" if self._refcount[p] == 0 else f"held {self._refcount[p]} time(s)"
                raise PageAccountingError(f"cannot free page {p} {k} time(s): it is {state}")
        for p in pages:
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                if p in self._hash_of:
                    self._cached[p] = None
                else:
                    heapq.heappush(self._free, p)

    # -- prefix cache -------------------------------------------------------------------
    def register(self, page: int, page_hash: bytes) -> bool:
        """Register a used, full page under `page_hash`. False (and nothing changes) when another
        page already holds that hash (two sequences computed the same page at once) or this page
        is already registered (under any hash)."""
        self._check_id(page)
        if self._refcount[page] == 0:
            raise PageAccountingError(f"cannot register page {page}: it is not in use")
        if page in self._hash_of or page_hash in self._page_of:
            return False
        self._hash_of[page] = page_hash
        self._page_of[page_hash] = page
        return True

    def lookup(self, hashes: Iterable[bytes]) -> list[int]:
        """The registered pages of the leading hashes of a chain, up to the first miss."""
        out = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def touch(self, pages: Iterable[int]) -> None:
        """Add one reference to each registered page (a prefix hit): cached ones leave the
        eviction order and count as used again."""
        pages = list(pages)
        for p in pages:
            self._check_id(p)
            if p not in self._hash_of:
                raise PageAccountingError(f"cannot reuse page {p}: it is not registered")
        for p in pages:
            if self._refcount[p] == 0:
                del self._cached[p]
            self._refcount[p] += 1

    def num_cached_among(self, pages: Iterable[int]) -> int:
        """How many of `pages` are cached (unreferenced): touching them takes them out of
        `num_free`."""
        return sum(1 for p in set(pages) if p in self._cached)

    def check(self) -> None:
        """Verify the invariants in the module docstring; PageAccountingError names the first broken one."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise PageAccountingError("a page is on the free heap twice")
        for p in range(self.num_pages):
            rc, registered = self._refcount[p], p in self._hash_of
            if rc < 0:
                raise PageAccountingError(f"page {p} has reference count {rc}")
            states = (p in free) + (p in self._cached) + (rc > 0)
            if states != 1:
                raise PageAccountingError(f"page {p} (count {rc}) is in {states} states, not 1")
            if p in free and registered:
                raise PageAccountingError(f"free page {p} is still registered")
            if p in self._cached and not registered:
                raise PageAccountingError(f"cached page {p} has no hash")
        if len(self._page_of) != len(self._hash_of) or any(self._page_of.get(h) != p for p, h in self._hash_of.items()):
            raise PageAccountingError("the hash -> page and page -> hash maps disagree")
        if self.num_free + sum(1 for c in self._refcount if c > 0) != self.num_pages:
            raise PageAccountingError("free + cached + used pages do not add up to num_pages")

    # -- block tables -------------------------------------------------------------------
    def ensure(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` in place to hold `num_tokens` tokens (all-or-nothing; never shrinks)."""
        missing = self.pages_needed(num_tokens) - len(table)
        if missing > 0:
            table.extend(self.allocate(missing))

    def release(self, table: list[int]) -> None:
        """Drop the table's references and empty it. Its pages are freed last page first, so
        that of a chain of cached pages the deepest are evicted first (a page is only ever
        found after every page before it)."""
        self.free(reversed(table))
        table.clear()

    def fork(self, table: Sequence[int]) -> list[int]:
        """A new table sharing every page of `table` (one more reference each)."""
        self.incref(table)
        return list(table)

    def _check_id(self, page: int) -> None:
        if not isinstance(page, int) or not 0 <= page < self.num_pages:
            raise PageAccountingError(f"page id {page!r} is not in [0, {self.num_pages})")


# -- capacity sizing ------------------------------------------------------------------------
def kv_bytes_per_page(page_size: int, sites: Sequence[tuple[int, ...]]) -> int:
    """Bytes one page takes over all attention sites; each site is (kv_heads, head_dim_k, head_dim_v, bytes a
    value[, bytes a page beside its tokens]) (kv_store.page_sites: 1 a value for an fp8 cache; fp8-rotated's first
    key a page)."""
    if page_size < 1:
        raise KVCacheError(f"page_size must be positive, got {page_size}")
    if not sites:
        raise KVCacheError("kv_bytes_per_page needs at least one attention site")
    per_token = per_page = 0
    for i, site in enumerate(sites):
        if len(site) not in (4, 5) or min(site[:4]) < 1 or min(site[4:], default=0) < 0:
            raise KVCacheError(f"attention site {i}: kv_heads, head dims and bytes a value must be positive (and "
                               f"bytes a page not negative), got {tuple(site)}")
        kv_heads, dk, dv, nbytes = site[:4]
        per_token += kv_heads * (dk + dv) * nbytes
        per_page += site[4] if len(site) == 5 else 0
    return page_size * per_token + per_page


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
