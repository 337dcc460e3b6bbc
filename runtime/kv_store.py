"""The paged KV cache's storage: one K and one V tensor per attention site.

Layout (every backend uses it): [num_pages, kv_heads, page_size, head_dim]. The token
at absolute position p of a sequence lives in page block_table[p // page_size], slot
p % page_size. A site whose `kv_dtype` is "fp8" stores float8_e4m3fn values of K / k_scale
and V / v_scale (`store`/`load` say how; the scales are fp32 per site, from the plan's sites: 1.0 unless a
checkpoint brings calibrated ones, see `kiln quantize --scheme fp8-kv`).
Which pages a sequence owns is the block pool's business
(runtime/kv_cache.py); this class only holds the memory. Beside the pages, `state` holds the
per-sequence recurrent state of state-space layers (runtime/state_cache.py; one slot by default).
"""

from __future__ import annotations

import torch
from kiln.dsl.plan import AttentionSite

from .state_cache import StateStore


def page_dtype(site: AttentionSite, dtype: torch.dtype) -> torch.dtype:
    """What a site's pages hold: fp8 for an fp8 KV cache, else the model's activation dtype."""
    return torch.float8_e4m3fn if site.kv_dtype == "fp8" else dtype


def page_sites(sites: list[AttentionSite], dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    """The (kv_heads, head_dim, v_head_dim, bytes a value) of each site with KV heads, as the KV cache's sizing
    (kv_cache.kv_bytes_per_page) reads them: the bytes those of the pages KVStore allocates (session 27: an fp8
    cache had been sized at the activations' 2 bytes a value, so it took half the memory it was given)."""
    return [(s.kv_heads, s.head_dim, s.v_head_dim, page_dtype(s, dtype).itemsize) for s in sites if s.kv_heads]


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
        return sum(t.numel() * t.element_size() for t in self.k + self.v) + self.state.nbytes()

    def slots(self, block_table, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, offsets in page) of absolute positions start..stop-1 of one sequence."""
        pos = torch.arange(start, stop)
        table = torch.as_tensor(block_table, dtype=torch.long)
        return table[pos // self.page_size], pos % self.page_size
