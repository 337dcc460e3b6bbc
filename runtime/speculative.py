"""Speculative decoding: proposers, the rejection sampler and its bookkeeping.

A speculating sequence's decode step carries its last token plus k draft tokens; the target
computes logits for all k + 1 of them in one forward (SeqSlice.logits = k + 1), and
`verify` turns those rows into 1..k+1 new tokens:

- greedy requests keep draft token j while it equals the argmax of target row j; the first
  mismatch is replaced by that argmax (all accepted: the argmax of row k is a bonus token), so
  the output is token for token the output without speculation;
- sampled requests use the rejection sampler of Leviathan et al. / Chen et al. (2023): draft
  token d_j, drawn from q_j, is kept with probability min(1, p_j(d) / q_j(d)); at the first
  rejection a token is drawn from norm(max(0, p_j - q_j)) and the rest are dropped; all kept: a
  bonus token from p_k. Each emitted token is then distributed exactly as p, the target's
  processed distribution (penalties, temperature, top-k/p, min-p). An n-gram proposal is a
  point mass (q_j(d) = 1): it is kept with probability p_j(d), and a rejection draws from p_j
  with d removed.

The KV entries of rejected tokens stay in their pages: the sequence's length (num_computed)
is what counts, and the next step writes over them (runtime/scheduler.py trims the pages
beyond it). Proposers:

- `ngram_propose`: prompt lookup (no model): the tokens that followed the most recent earlier
  occurrence of the sequence's last n tokens (n from 3 down to 1);
- `DraftProposer`: a smaller model sharing the target's tokenizer, run by the same backends on
  its own paged KV cache; its cache positions that still match the sequence are kept from step
  to step, so each proposal feeds only the tokens the draft has not seen plus k - 1 drafts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .batch import SeqSlice, StepBatch
from .kv_cache import BlockPool, OutOfPages
from .kv_store import KVStore
from .sampler import Sampler, SamplingRow

METHODS = ("ngram", "draft")
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
NGRAM_MAX, NGRAM_MIN = 3, 1


class SpeculativeError(ValueError):
    """A speculative-decoding setting or draft model that cannot be used; names the option."""


# -- proposers ------------------------------------------------------------------------------------
def ngram_propose(tokens: Sequence[int], k: int, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens of
    `tokens`, for the longest n in [min_n, max_n] that occurs; [] if none does."""
    if k < 1 or len(tokens) < min_n + 1:
        return []
    a = np.asarray(tokens, dtype=np.int64)
    L = len(a)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = a[L - n:]
        # Windows starting at 0..L-n-1 (the suffix itself excluded), newest first.
        windows = np.lib.stride_tricks.sliding_window_view(a[:L - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return a[start:start + k].tolist()
    return []


@dataclass
class _DraftSeq:
    table: list[int] = field(default_factory=list)
    n_ok: int = 0  # leading positions of the draft cache known to hold the sequence's tokens
    tail: list[int] = field(default_factory=list)  # tokens at positions n_ok.. in the cache, unverified


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Draft logits over the target's vocabulary: ids the draft lacks get -inf, ids the target
    lacks are dropped."""
    have = logits.shape[-1]
    if have >= vocab:
        return logits[:, :vocab]
    pad = torch.full((logits.shape[0], vocab - have), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits, pad], dim=1)


def exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` [N, V], row i drawing its noise from generators[i] (or the
    global RNG): argmax(p / E), E ~ Exp(1), the same distribution as multinomial sampling."""
    e = torch.empty_like(probs).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            e[i].exponential_(generator=g)
    return (probs / e).argmax(dim=-1)


class DraftProposer:
    """A draft model with its own KV cache (pages of `page_size`), proposing for many sequences
    at once: one batched forward per draft position."""

    def __init__(self, draft, num_pages: int, page_size: int, vocab: int):
        self.loaded = draft
        self.kv = KVStore(draft.plan.sites, num_pages, page_size, draft.dtype, draft.device)
        self.pool = BlockPool(num_pages, page_size)
        self.vocab = vocab
        self.seqs: dict[str, _DraftSeq] = {}
        self.sampler = Sampler()

    def release(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.pool.release(seq.table)

    def propose(self, reqs: list[tuple[str, list[int], int, SamplingRow]], keep: set[str] | None = None
                ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """reqs: (request id, its tokens so far, k, its sampling row). Returns per request its
        drafts and, for a sampled request, q [k, V]: the distributions they were drawn from.
        `keep`: ids whose draft caches must not be evicted for room (the others may be)."""
        out: dict[str, tuple[list[int], torch.Tensor | None]] = {}
        active = []
        for rid, tokens, k, row in reqs:
            seq = self.seqs.setdefault(rid, _DraftSeq())
            j = seq.n_ok  # extend the verified prefix with the tail tokens the sequence kept
            while j - seq.n_ok < len(seq.tail) and j < len(tokens) and seq.tail[j - seq.n_ok] == tokens[j]:
                j += 1
            seq.n_ok, seq.tail = min(j, len(tokens) - 1), []  # feed at least the last token
            if not self._room(rid, seq, len(tokens) + k - 1, keep):
                self.release(rid)
                continue
            active.append((rid, seq, tokens[seq.n_ok:], k, row))
            out[rid] = ([], [])
        for i in range(max((a[3] for a in active), default=0)):
            step = [a for a in active if a[3] > i]
            feeds = [a[2] if i == 0 else [out[a[0]][0][-1]] for a in step]
            flat, slices = [], []
            for (rid, seq, _, _, _), toks in zip(step, feeds):
                ctx = seq.n_ok + len(seq.tail)
                slices.append(SeqSlice(len(flat), len(toks), ctx, tuple(seq.table)))
                flat.extend(toks)
                seq.tail.extend(toks)
            batch = StepBatch(torch.tensor(flat, dtype=torch.long, device=self.loaded.device), slices)
            with torch.no_grad():
                logits = fit_vocab(self.loaded.model.forward(batch, self.kv), self.vocab)
            rows = [SamplingRow(a[4].params, a[4].prompt_ids, list(a[4].output_ids) + out[a[0]][0], a[4].generator)
                    for a in step]
            processed = self.sampler.process(logits, rows)
            tokens = processed.argmax(dim=-1)
            sampled = [n for n, r in enumerate(rows) if not r.params.greedy]
            if sampled:
                probs = processed[sampled].softmax(dim=-1)
                drawn = exponential_race(probs, [rows[n].generator for n in sampled])
                tokens[sampled] = drawn
                for m, n in enumerate(sampled):
                    out[step[n][0]][1].append(probs[m])
            for a, t in zip(step, tokens.tolist()):
                out[a[0]][0].append(int(t))
        return {rid: (d, torch.stack(q) if q else None) for rid, (d, q) in out.items()}

    def _room(self, rid: str, seq: _DraftSeq, positions: int, keep: set[str] | None) -> bool:
        """Pages for `positions` cache positions, evicting other sequences' draft caches (not in
        `keep`) when the pool is short."""
        while True:
            try:
                self.pool.ensure(seq.table, positions)
                return True
            except OutOfPages:
                victims = [v for v in self.seqs if v != rid and (keep is None or v not in keep)]
                if not victims:
                    return False
                self.release(victims[0])


# -- verification -----------------------------------------------------------------------------------
@dataclass
class Verified:
    tokens: list[list[int]]  # per speculating request: the accepted drafts + one target token
    rows: list[int]  # first row of each request in the processed matrix


def verify(processed: torch.Tensor, drafts: Sequence[Sequence[int]], qs: Sequence[torch.Tensor | None],
           greedy: Sequence[bool], generators: Sequence[torch.Generator | None]) -> Verified:
    """Accept or reject each request's drafts against the target's processed logits.

    processed: [R, V], request b owning len(drafts[b]) + 1 consecutive rows (row j: the
    distribution of the token after draft j - 1). qs[b]: [k_b, V] draft distributions, or None
    for a point mass (n-gram) or a greedy request. Two host synchronisations in all."""
    dev = processed.device
    counts = [len(d) + 1 for d in drafts]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if processed.shape[0] != sum(counts):
        raise SpeculativeError(f"verify: {processed.shape[0]} rows for {sum(counts)} draft positions")
    d_rows = [int(starts[b]) + j for b, d in enumerate(drafts) for j in range(len(d))]
    d_tok = [t for d in drafts for t in d]
    accept_all: list[bool] = []
    if d_rows:
        rows_t = torch.tensor(d_rows, device=dev)
        tok_t = torch.tensor(d_tok, device=dev)
        probs = processed.softmax(dim=-1)
        p_d = probs[rows_t, tok_t]
        q_d = torch.ones_like(p_d)
        u = torch.empty_like(p_d)
        argmax_ok = processed[rows_t].argmax(dim=-1) == tok_t
        at = 0
        for b, d in enumerate(drafts):
            if d and qs[b] is not None and not greedy[b]:
                q_d[at:at + len(d)] = qs[b][torch.arange(len(d), device=dev), tok_t[at:at + len(d)]]
            if d and not greedy[b]:
                g = generators[b]
                u[at:at + len(d)] = torch.rand(len(d), generator=g, device=dev) if g is not None else \
                    torch.rand(len(d), device=dev)
            at += len(d)
        # u < p / q, written without the division (q > 0 for a token drawn from q).
        greedy_t = torch.tensor([g for b, g in enumerate(greedy) for _ in drafts[b]], device=dev)
        accept_all = torch.where(greedy_t, argmax_ok, u * q_d < p_d).tolist()
    else:
        probs = None
    # How many leading drafts each request keeps, and the distribution of its next token.
    kept, final_rows, at = [], [], 0
    for b, d in enumerate(drafts):
        a = 0
        while a < len(d) and accept_all[at + a]:
            a += 1
        at += len(d)
        kept.append(a)
        final_rows.append(int(starts[b]) + a)
    final = processed[torch.tensor(final_rows, device=dev)]  # [B, V]
    out_tok = final.argmax(dim=-1)
    sampled = [b for b in range(len(drafts)) if not greedy[b]]
    if sampled:
        p = (probs[torch.tensor(final_rows, device=dev)] if probs is not None else final.softmax(dim=-1))[sampled]
        for m, b in enumerate(sampled):
            a = kept[b]
            if a < len(drafts[b]):  # rejected at a: the residual max(0, p - q), renormalised
                if qs[b] is not None:
                    resid = (p[m] - qs[b][a]).clamp_min(0)
                else:
                    resid = p[m].clone()
                    resid[drafts[b][a]] = 0
                # p == q (up to rounding) leaves nothing: p itself is then the right draw.
                p[m] = torch.where(resid.sum() > 0, resid, p[m])
        out_tok[sampled] = exponential_race(p, [generators[b] for b in sampled])
    last = out_tok.tolist()
    return Verified([list(d[:kept[b]]) + [int(last[b])] for b, d in enumerate(drafts)], starts.tolist())


# -- statistics -------------------------------------------------------------------------------------
@dataclass
class SpecStats:
    """Counters over an engine's life: what `kiln bench` and /metrics report."""

    target_steps: int = 0  # engine steps that verified at least one sequence
    verifications: int = 0  # sequence-steps that carried drafts
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens the verifications produced (accepted + 1 each, before stops)

    @property
    def acceptance_length(self) -> float:
        """Tokens per verified sequence-step: 1 + the accepted drafts (1.0 = no gain)."""
        return self.emitted / self.verifications if self.verifications else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


# -- a truncated copy of a model (benchmarks, tests) --------------------------------------------------
def truncated_copy(loaded, spec, config: dict, num_layers: int, backend: str = "reference",
                   layer_key: str = "num_hidden_layers"):
    """A draft model: `config` with `num_layers` layers whose weights are the target's own
    tensors (its first layers, its embeddings, final norm and head), shared, not copied.
    `loaded` must run on the reference backend (its `weights` dict is read)."""
    from kiln.dsl import load_spec, passes

    from .model import LoadedModel, make_backend

    if not 1 <= num_layers < int(config.get(layer_key, 0)):
        raise SpeculativeError(f"draft layers must be in [1, {config.get(layer_key)}), got {num_layers}")
    plan = passes.build(load_spec(spec), dict(config, **{layer_key: num_layers}))
    weights = loaded.model.weights
    missing = [s.name for s in plan.weights.values() if s.source is not None and s.name not in weights]
    if missing:
        raise SpeculativeError(f"the truncated draft needs weight {missing[0]}, which the target lacks")
    mine = {s.name: weights[s.name] for s in plan.weights.values() if s.source is not None}
    return LoadedModel(plan, make_backend(plan, mine, backend, str(loaded.device)), None, loaded.dtype,
                       loaded.device)
