"""Batched sampling: one row of logits per sequence, each row with its own SamplingParams.

Processing order (per row, vectorised over the batch with per-row parameter tensors):
  guided-decoding mask (disallowed tokens -> -inf, constrained rows only)
  -> penalties (repetition over prompt+output, presence/frequency over output)
  -> temperature -> top-k -> top-p -> min-p
which is Hugging Face's warper order. Greedy rows (temperature 0) take the argmax of the
penalised logits and skip temperature and filtering.

The random draw uses the exponential-race trick (argmax of probs / q, q ~ Exp(1)), the
same distribution as multinomial sampling. A row with a generator draws its whole q row from
that generator, V values per step, so a seeded request samples the same tokens whichever
batch it is in. Rows without a generator use torch's global RNG.

Logprobs are of the processed distribution (after penalties, temperature and filtering;
filtered tokens have -inf); a token's rank is 1 + the number of tokens more likely than it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .guided import GuidedMask
from .sampling_params import SamplingParams


class SamplerError(ValueError):
    """Logits or per-row inputs the sampler cannot use."""


class SamplingRow(NamedTuple):
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [N] int64
    # Only when some row asked for logprobs; K = the largest `logprobs` asked for.
    # A row that asked for fewer (or None) reads its first k columns (or ignores them).
    topk_logprobs: torch.Tensor | None = None  # [N, K] float32, descending
    topk_token_ids: torch.Tensor | None = None  # [N, K] int64
    sampled_logprobs: torch.Tensor | None = None  # [N] float32, logprob of tokens[i]
    sampled_ranks: torch.Tensor | None = None  # [N] int64, 1 + how many tokens are more likely than tokens[i]


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for a seeded request (None when unseeded)."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def _padded_ids(rows: list[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """[N, max_len] int64 token ids, padded with `vocab`; ids >= vocab are clamped to it too."""
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), vocab, dtype=np.int64)  # numpy: ~7x faster than torch from lists
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    # Checked on the host, before the copy, so the GPU path never synchronises for it.
    if (out < 0).any():
        raise SamplerError("prompt/output token ids must be non-negative")
    return _to_device(torch.from_numpy(out.clip(max=vocab)), device)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host tensor to `device` without making the host wait (pinned staging for CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _token_counts(rows: list[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """[N, V] int32: how often each token id occurs in each row. Ids >= V are ignored."""
    ids = _padded_ids(rows, vocab, device)  # column V collects padding and out-of-vocab ids
    counts = torch.zeros(len(rows), vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab]


class Sampler:
    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                guided: GuidedMask | None = None) -> torch.Tensor:
        """[N, V] float32 processed logits: the distribution each row samples from. `guided`: the
        allowed-token bitmasks of the constrained rows (runtime.guided)."""
        if logits.dim() != 2:
            raise SamplerError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
        if logits.shape[0] != len(rows):
            raise SamplerError(f"logits has {logits.shape[0]} rows but {len(rows)} requests were given")
        n, vocab = logits.shape
        dev = logits.device
        params = [r[0] for r in rows]
        logits = logits.to(torch.float32, copy=True)  # [N, V]
        if n == 0:
            return logits
        if guided is not None:
            guided.apply(logits)  # first: penalties and filters then act on allowed tokens only

        def col(values, dtype=torch.float32) -> torch.Tensor:  # [N, 1]
            return _to_device(torch.tensor(values, dtype=dtype), dev)[:, None]

        # Penalties.
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        need_rep = any(r != 1.0 for r in rep)
        if need_rep or any(pres) or any(freq):
            counts = _token_counts([r[2] for r in rows], vocab, dev)  # [N, V] output tokens
            if need_rep:
                seen = (counts > 0) | (_token_counts([r[1] for r in rows], vocab, dev) > 0)  # [N, V]
                penalty = col(rep)
                penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
                logits = torch.where(seen, penalised, logits)
            logits -= col(freq) * counts + col(pres) * (counts > 0)

        greedy = [p.greedy for p in params]
        if all(greedy):
            return logits
        # Temperature; greedy rows keep their logits and skip the filters below.
        logits /= col([1.0 if g else p.temperature for g, p in zip(greedy, params)])
        top_k = [vocab if g or p.top_k <= 0 else min(p.top_k, vocab) for g, p in zip(greedy, params)]
        top_p = [1.0 if g else p.top_p for g, p in zip(greedy, params)]
        min_p = [0.0 if g else p.min_p for g, p in zip(greedy, params)]

        need_k = any(k < vocab for k in top_k)
        need_p = any(p < 1.0 for p in top_p)
        if need_k or need_p:
            # One ascending sort serves both filters.
            sorted_logits, order = logits.sort(dim=-1)  # [N, V]
            if need_k:
                kth = sorted_logits.gather(1, vocab - col(top_k, torch.long))  # [N, 1], k-th largest
                sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
            if need_p:
                p = col(top_p)
                cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
                drop = (cum <= 1 - p) & (p < 1)
                drop[:, -1] = False  # the most likely token always survives
                sorted_logits.masked_fill_(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        if any(m > 0 for m in min_p):
            probs = logits.softmax(dim=-1)
            cutoff = col(min_p) * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < cutoff, float("-inf"))
        return logits

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               guided: GuidedMask | None = None) -> SampleOutput:
        """Sample one token per row of `logits` [N, V]; rows[i] = (params, prompt_ids, output_ids, generator)."""
        processed = self.process(logits, rows, guided)  # [N, V]
        n = processed.shape[0]
        tokens = processed.argmax(dim=-1)  # [N], exact for greedy rows
        random_rows = [i for i, r in enumerate(rows) if not r[0].greedy]
        if random_rows:
            probs = processed.softmax(dim=-1)  # [N, V]
            q = torch.empty_like(probs).exponential_()  # [N, V]
            for i in random_rows:
                gen = rows[i][3] if len(rows[i]) > 3 else None
                if gen is not None:
                    if gen.device.type != q.device.type:
                        raise SamplerError(f"row {i}: generator is on {gen.device}, logits on {q.device}")
                    q[i].exponential_(generator=gen)
            drawn = (probs / q).argmax(dim=-1)  # [N]
            is_random = torch.zeros(n, dtype=torch.bool)
            is_random[random_rows] = True
            tokens = torch.where(_to_device(is_random, processed.device), drawn, tokens)

        asked = [r[0].logprobs for r in rows if r[0].logprobs is not None]
        if not asked:
            return SampleOutput(tokens=tokens)
        logprobs = processed.log_softmax(dim=-1)  # [N, V]
        k = min(max(asked), processed.shape[1])
        top = logprobs.topk(k, dim=-1)
        sampled = logprobs.gather(1, tokens[:, None])  # [N, 1]
        return SampleOutput(
            tokens=tokens,
            topk_logprobs=top.values,
            topk_token_ids=top.indices,
            sampled_logprobs=sampled[:, 0],
            sampled_ranks=(logprobs > sampled).sum(dim=-1) + 1,
        )
