"""One step's work for a backend: a flattened batch of tokens from several sequences.

Every backend (reference, cuda, tensorrt) executes a `StepBatch`: the new tokens of
all scheduled sequences concatenated into one 1-D tensor (no padding to the longest
sequence), plus, per sequence, where its tokens sit in that tensor, how many tokens
it already has in the KV cache, and its block table into the paged KV cache.

Invariants (checked by `StepBatch.validate`):
- sequences are laid out back to back: seqs[i].start == sum(len of seqs[:i]);
- a sequence's block table covers context + length tokens:
  len(block_table) * page_size >= context + length;
- the token at flat index seqs[i].start + j has position seqs[i].context + j.

Overlap (runtime/engine.py): a step may be launched before the step before it has been read
back. The input tokens it continues from are then still on the device: `StepBatch.pending`
names them (flat index here <- row of the earlier step's sampled tokens) and `tokens` holds a
placeholder (0) at those indices. A backend makes its device token input with `device_tokens`
(or writes them into its own buffer with `PendingTokens.apply`), on the stream: no host sync.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a step."""

    start: int  # offset of its first new token in the flat token tensor
    length: int  # number of new tokens this step (prefill chunk, or 1 for decode)
    context: int  # tokens of this sequence already written to the KV cache
    block_table: tuple[int, ...]  # KV cache page ids, in order
    sample: bool = True  # produce logits for its last new token
    state_slot: int = 0  # its slot in the recurrent state cache (models with state sites: runtime/state_cache.py)
    # Logits for its last `logits` new tokens when sampled (speculative verification: the last
    # accepted token and k draft tokens give k + 1 rows); 1 otherwise.
    logits: int = 1
    adapter: int = -1  # LoRA adapter slot of its request (runtime/lora.py LoraSet); -1: the base model

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class PendingTokens:
    """Input tokens this step takes on the device from the step launched before it."""

    source: torch.Tensor  # [R] int64: the earlier step's sampled tokens, on its device (not yet read back)
    index: tuple[int, ...]  # flat token indices of this batch to fill ...
    rows: tuple[int, ...]  # ... each from this row of `source`

    def apply(self, tokens: torch.Tensor) -> None:
        """Write the pending tokens into `tokens` ([>= T] int64, this step's input on the source's
        device) in place, in stream order after the kernels that produce them."""
        k = len(self.index)
        if not k:
            return
        if self.index == self.rows == tuple(range(k)):  # steady decode: the same rows, in the same order
            tokens[:k].copy_(self.source[:k])
            return
        idx = torch.tensor([self.index, self.rows], dtype=torch.long)
        if tokens.device.type == "cuda":
            idx = idx.pin_memory().to(tokens.device, non_blocking=True)
        tokens.index_copy_(0, idx[0], self.source.index_select(0, idx[1]))


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [T] int64, the new tokens of all sequences (placeholders where `pending`)
    seqs: list[SeqSlice] = field(default_factory=list)
    pending: PendingTokens | None = None  # overlap: tokens still on the device (module docstring)

    def device_tokens(self, device) -> torch.Tensor:
        """The [T] token input on `device`, the pending tokens written in (a copy: `tokens` stays
        as it is)."""
        device = torch.device(device)
        if device.type == "cuda" and self.tokens.device.type == "cpu":  # pinned staging: the copy never
            # waits for the GPU's queued work
            out = self.tokens.pin_memory().to(device, non_blocking=True)
        else:
            out = self.tokens.to(device, copy=self.pending is not None)  # already there (e.g. eval's ids): as is
        if self.pending is not None:
            self.pending.apply(out)
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def positions(self) -> torch.Tensor:
        """[T] int64: the absolute position of every new token."""
        parts = [torch.arange(s.context, s.context + s.length) for s in self.seqs]
        if not parts:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(parts).to(self.tokens.device)

    def sample_rows(self) -> list[int]:
        """Flat indices of the tokens whose logits are sampled: the last token of each sampled seq
        (its last `logits` tokens for a speculative verification)."""
        return [i for s in self.seqs if s.sample for i in range(s.end - s.logits, s.end)]

    def validate(self, page_size: int) -> None:
        offset = 0
        for i, s in enumerate(self.seqs):
            if s.start != offset:
                raise ValueError(f"sequence {i} starts at {s.start}, expected {offset}")
            if s.length <= 0:
                raise ValueError(f"sequence {i} has no new tokens")
            if not 1 <= s.logits <= s.length:
                raise ValueError(f"sequence {i}: logits for {s.logits} tokens of {s.length} new ones")
            if len(s.block_table) * page_size < s.context + s.length:
                raise ValueError(
                    f"sequence {i}: block table of {len(s.block_table)} pages cannot hold "
                    f"{s.context + s.length} tokens at page size {page_size}"
                )
            offset = s.end
        if offset != self.num_tokens:
            raise ValueError(f"slices cover {offset} tokens, batch has {self.num_tokens}")
        p = self.pending
        if p is not None and (len(p.index) != len(p.rows) or any(not 0 <= i < offset for i in p.index)
                              or any(not 0 <= r < p.source.shape[0] for r in p.rows)):
            raise ValueError(f"pending tokens {list(zip(p.index, p.rows))} do not fit {offset} tokens "
                             f"and {p.source.shape[0]} source rows")


@dataclass
class HostMeta:
    """A step's attention metadata as host (numpy) arrays, built without a per-sequence
    Python loop over tokens: a 2,000-token mixed step of 160 sequences costs well under a
    millisecond instead of tens (the loop of torch ops it replaces)."""

    positions: np.ndarray  # [T] int64: absolute position of every new token
    slots: np.ndarray  # [T] int32: page * page_size + offset where each token's K/V goes
    block_tables: np.ndarray  # [S, width] int32, zero-padded
    kv_lens: np.ndarray  # [S] int32: tokens in the cache after this step
    cu_seqlens: np.ndarray  # [S + 1] int32: prefix sums of the new-token counts
    lengths: np.ndarray  # [S] int32: new tokens per sequence


def host_meta(batch: StepBatch, page_size: int, width: int) -> HostMeta:
    """Metadata of `batch` (which must satisfy `validate(page_size)`); block tables padded to
    `width` pages (at least the longest table)."""
    seqs = batch.seqs
    S, T = len(seqs), batch.num_tokens
    lengths = np.fromiter((s.length for s in seqs), np.int64, S)
    contexts = np.fromiter((s.context for s in seqs), np.int64, S)
    pages = np.fromiter((len(s.block_table) for s in seqs), np.int64, S)
    if S and pages.max() > width:
        raise ValueError(f"a block table of {pages.max()} pages does not fit a width of {width}")
    tables = np.zeros((S, width), np.int32)
    # Boolean-mask assignment fills row by row, in the order the tables are chained.
    tables[np.arange(width) < pages[:, None]] = np.fromiter(
        itertools.chain.from_iterable(s.block_table for s in seqs), np.int32, int(pages.sum()))
    seq_of = np.repeat(np.arange(S), lengths)  # [T]: the sequence of each token
    starts = np.cumsum(lengths) - lengths
    positions = np.arange(T, dtype=np.int64) - np.repeat(starts - contexts, lengths)
    slots = (tables[seq_of, positions // page_size].astype(np.int64) * page_size + positions % page_size)
    cu = np.zeros(S + 1, np.int32)
    cu[1:] = np.cumsum(lengths)
    return HostMeta(positions, slots.astype(np.int32), tables, (contexts + lengths).astype(np.int32), cu,
                    lengths.astype(np.int32))
