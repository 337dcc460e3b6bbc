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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's share of a step."""

    start: int  # offset of its first new token in the flat token tensor
    length: int  # number of new tokens this step (prefill chunk, or 1 for decode)
    context: int  # tokens of this sequence already written to the KV cache
    block_table: tuple[int, ...]  # KV cache page ids, in order
    sample: bool = True  # produce logits for its last new token

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class StepBatch:
    tokens: torch.Tensor  # [T] int64, the new tokens of all sequences
    seqs: list[SeqSlice] = field(default_factory=list)

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
        """Flat indices of the tokens whose logits are sampled (last token of each sampled seq)."""
        return [s.end - 1 for s in self.seqs if s.sample]

    def validate(self, page_size: int) -> None:
        offset = 0
        for i, s in enumerate(self.seqs):
            if s.start != offset:
                raise ValueError(f"sequence {i} starts at {s.start}, expected {offset}")
            if s.length <= 0:
                raise ValueError(f"sequence {i} has no new tokens")
            if len(s.block_table) * page_size < s.context + s.length:
                raise ValueError(
                    f"sequence {i}: block table of {len(s.block_table)} pages cannot hold "
                    f"{s.context + s.length} tokens at page size {page_size}"
                )
            offset = s.end
        if offset != self.num_tokens:
            raise ValueError(f"slices cover {offset} tokens, batch has {self.num_tokens}")
