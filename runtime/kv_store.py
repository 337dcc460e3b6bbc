"""The paged KV cache's storage: one K and one V tensor per attention site.

Layout (every backend uses it): [num_pages, kv_heads, page_size, head_dim]. The token
at absolute position p of a sequence lives in page block_table[p // page_size], slot
p % page_size. Which pages a sequence owns is the block pool's business
(runtime/kv_cache.py); this class only holds the memory.
"""

from __future__ import annotations

import torch
from kiln.dsl.plan import AttentionSite


class KVStore:
    def __init__(self, sites: list[AttentionSite], num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_pages = num_pages
        self.page_size = page_size
        self.k = [torch.zeros(num_pages, s.kv_heads, page_size, s.head_dim, dtype=dtype, device=device)
                  for s in sites]
        self.v = [torch.zeros(num_pages, s.kv_heads, page_size, s.v_head_dim, dtype=dtype, device=device)
                  for s in sites]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def slots(self, block_table, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(page ids, offsets in page) of absolute positions start..stop-1 of one sequence."""
        pos = torch.arange(start, stop)
        table = torch.as_tensor(block_table, dtype=torch.long)
        return table[pos // self.page_size], pos % self.page_size
