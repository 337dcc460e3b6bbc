"""The paged KV cache's storage: one K and one V tensor per attention site.

Layout (every backend uses it): [num_pages, kv_heads, page_size, head_dim]. The token
at absolute position p of a sequence lives in page block_table[p // page_size], slot
p % page_size. A site whose `kv_dtype` is "fp8" stores float8_e4m3fn values of K / k_scale
and V / v_scale (`store`/`load` say how; the scales are fp32 per site, from the plan's sites: 1.0 unless a
checkpoint brings calibrated ones, see `kiln quantize --scheme fp8-kv`).
Which pages a sequence owns is the block pool's business
(runtime/kv_cache.py); this class only holds the memory. Beside the pages, `state` holds the
per-sequence recurrent state of state-space layers (runtime/state_cache.py; one slot by default).

"fp8-rotated" (`write` / `read`) rounds in a better basis: each head's key less a shift, and each head's value,
turned by the normalised Hadamard matrix H of the head size (orthonormal and symmetric: H H = I), so that a channel
large in both queries and keys has its rounding spread over all of them, as QuaRot does. A sequence's shift is the
site's calibrated per-channel key mean (k_mean) plus its first key's rounding residual (`shift`, one per page, in
the run dtype: that of the page holding position 0), so that the first key, the attention sink most queries weigh
heavily, is stored exactly. A shift is the same for every key a query sees, so attention without a logit
soft-cap is unchanged by it: kernels would only write differently, never read differently. Read back here: H of
the stored values, plus the shift. On SmolLM2-135M (CPU, the whole of pydoc_data.topics, calibrated means)
perplexity +0.31% / mean KL 0.0030 against fp8's +0.89% / 0.0098 (BENCHMARKS.md, session 31). The cuda backend
writes the same pages with its own kernel (templates/rope_cache_rotated.cu.j2), which turns q as well instead of
turning keys back on read, and turns the attention's output back after it.
"""

from __future__ import annotations

import torch
from kiln.dsl.plan import AttentionSite

from .state_cache import StateStore

ROTATED = "fp8-rotated"


def page_dtype(site: AttentionSite, dtype: torch.dtype) -> torch.dtype:
    """What a site's pages hold: fp8 for an fp8 KV cache, else the model's activation dtype."""
    return torch.float8_e4m3fn if site.kv_dtype in ("fp8", ROTATED) else dtype


def page_sites(sites: list[AttentionSite], dtype: torch.dtype) -> list[tuple[int, int, int, int, int]]:
    """The (kv_heads, head_dim, v_head_dim, bytes a value, bytes a page beside its tokens) of each site with KV
    heads, as the KV cache's sizing (kv_cache.kv_bytes_per_page) reads them: the bytes of what KVStore allocates
    (session 27: an fp8 cache had been sized at the activations' 2 bytes a value, so it took half the memory it was
    given); fp8-rotated: a first key's residual a page in the run dtype."""
    return [(s.kv_heads, s.head_dim, s.v_head_dim, page_dtype(s, dtype).itemsize,
             s.kv_heads * s.head_dim * dtype.itemsize if s.kv_dtype == ROTATED else 0) for s in sites if s.kv_heads]


def hadamard(n: int, device=None) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size n (a power of 2), fp32: orthonormal and symmetric."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n ** 0.5).to(device)


class KVStore:
    def __init__(self, sites: list[AttentionSite], num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", state: StateStore | None = None):
        self.num_pages = num_pages
        self.state = state if state is not None else StateStore()
        self.page_size = page_size
        self.k = [torch.zeros(num_pages, s.kv_heads, page_size, s.head_dim, dtype=page_dtype(s, dtype), device=device)
                  for s in sites]
        self.v = [torch.zeros(num_pages, s.kv_heads, page_size, s.v_head_dim, dtype=page_dtype(s, dtype),
                              device=device) for s in sites]
        self.k_scale = [float(s.k_scale) for s in sites]  # the plan's (passes.kv_cache), 1.0 unless calibrated
        self.v_scale = [float(s.v_scale) for s in sites]
        rotated = [s.kv_dtype == ROTATED and s.kv_heads > 0 for s in sites]
        # fp8-rotated: H of the head size, the keys' mean [kv_heads, head_dim] and, per page, the first key's rounding
        # residual of the sequence whose position 0 it holds (run dtype)
        self.rotation = [hadamard(s.head_dim, device) if r else None for s, r in zip(sites, rotated)]
        self.k_mean = [(torch.tensor(s.k_mean, dtype=torch.float32, device=device).view(s.kv_heads, s.head_dim)
                        if s.k_mean else torch.zeros(s.kv_heads, s.head_dim, device=device)) if r else None
                       for s, r in zip(sites, rotated)]
        self.shift = [torch.zeros(num_pages, s.kv_heads, s.head_dim, dtype=dtype, device=device) if r else None
                      for s, r in zip(sites, rotated)]

    def write(self, site: int, block_table, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A sequence's new tokens at positions first.. (k, v [L, kv_heads, head size]) into their pages, as the site
        stores them."""
        kc, vc = self.k[site], self.v[site]
        pages, offs = self.slots(block_table, first, first + k.shape[0])
        H = self.rotation[site]
        if H is not None:
            mean, home = self.k_mean[site], int(block_table[0])  # home: the page of position 0, holding the shift
            if first == 0:  # the first key's rounding residual: stored less it, that key is an exact fp8 value
                d = k[0].float() - mean
                rounded = self.load(self.store(kc, self.k_scale[site], d @ H), self.k_scale[site])
                self.shift[site][home] = (d - rounded @ H).to(self.shift[site].dtype)
            shift = mean + self.shift[site][home].float()  # (as stored: the run dtype's rounding)
            k, v = (k.float() - shift) @ H, v.float() @ H
        kc[pages, :, offs] = self.store(kc, self.k_scale[site], k)
        vc[pages, :, offs] = self.store(vc, self.v_scale[site], v)

    def read(self, site: int, block_table, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions 0..length-1 of a sequence as fp32 keys and values [length, kv_heads, head size]."""
        pages, offs = self.slots(block_table, 0, length)
        keys = self.load(self.k[site][pages, :, offs], self.k_scale[site])
        vals = self.load(self.v[site][pages, :, offs], self.v_scale[site])
        H = self.rotation[site]
        if H is not None:
            keys = keys @ H + self.k_mean[site] + self.shift[site][int(block_table[0])].float()
            vals = vals @ H
        return keys, vals

    def store(self, cache: torch.Tensor, scale: float, values: torch.Tensor) -> torch.Tensor:
        """`values` as `cache` holds them: fp8 pages take values / scale, rounded, within +-448. The
        division is IEEE's on every device, as the kernels' (__fdiv_rn): torch divides a CUDA tensor by a
        Python number as a product with its reciprocal (one bit off at times), not by a tensor."""
        if cache.dtype == torch.float8_e4m3fn:
            divisor = torch.full((), float(scale), dtype=torch.float32, device=values.device)  # a fill: capturable
            return (values.float() / divisor).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return values

    @staticmethod
    def load(pages: torch.Tensor, scale: float) -> torch.Tensor:
        """Stored values back as fp32 (fp8 ones times their scale)."""
        return pages.float() * scale if pages.dtype == torch.float8_e4m3fn else pages.float()

    def nbytes(self) -> int:
        shifts = [t for t in self.shift if t is not None]
        return sum(t.numel() * t.element_size() for t in self.k + self.v + shifts) + self.state.nbytes()

    def slots(self, block_table, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, offsets in page) of absolute positions start..stop-1 of one sequence."""
        pos = torch.arange(start, stop)
        table = torch.as_tensor(block_table, dtype=torch.long)
        return table[pos // self.page_size], pos % self.page_size
