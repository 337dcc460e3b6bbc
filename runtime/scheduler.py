"""In-flight batching: which tokens of which requests run in the next step.

One step = one `StepBatch` through the model. Each step the scheduler:
1. gives every running request that is decoding its next token (1 token each);
2. continues running requests whose prompt is only partly in the KV cache (chunked prefill);
3. admits waiting requests (new, or preempted) while there are free seats
   (`max_num_seqs`), token budget (`max_tokens_per_step`) and pages.
Slices are laid out in that order: all decode slices first, then prefill chunks.

Requests are ranked by importance: FCFS by arrival, or with policy="priority" by
(priority, arrival) where a smaller priority value is served first (vLLM's convention).
When a running request needs a page and none is free, the least important running request
(the newest under FCFS) is preempted by recompute: its pages are freed, num_computed = 0, and
it goes back to the waiting queue in rank order, i.e. ahead of every request that arrived after
it. On readmission it re-prefills prompt + tokens generated so far, so its final prefill chunk
samples exactly the token its next decode step would have sampled.

Prefix caching (`prefix_caching=True`; kv_cache.py describes the pool's side): when a step
fills one of a request's pages, `update` registers it under the chained hash of its tokens
(`Request.page_hashes`, rooted in the scheduler's `namespace` plus the request's `cache_salt`).
A request being admitted looks up its leading full pages, takes a reference to the resident
ones and starts with `num_computed` = their tokens, so its first chunk is a query that starts
after a cached context, like any later chunk of a chunked prefill. At most num_tokens - 1
tokens come from the cache: the last prompt token is always computed, as its logits are needed.
Preemption and finishing release pages as before; registered ones stay resident (cached) until
evicted, so a preempted request usually finds its own prefix again on readmission.

Recurrent state (models with state sites, `states`): a request holds one state slot while RUNNING. With
prefix caching such a model also needs `snapshots` (runtime/state_cache.StateSnapshots): a prefix hit
stops at the last hit page boundary whose state was kept, and the step that admits the request
restores that snapshot into its slot first (`ScheduledStep.restore`). A prompt chunk then ends on a
page boundary where the budget allows, and always at the request's last boundary before its final
token (`_state_chunk`: one more step for that token's page) and at the end of the resident pages it
found past its kept state (a prefix another request shares: the next one with it restores the state);
a chunk that ends on a boundary whose state is not kept yet saves it after the step
(`ScheduledStep.save`), named by the chain hash of the pages before it. With chunked prefill off no
chunk ends early, so no state is kept.

Admission order with prefix caching: among the first `max_num_seqs` waiting requests (in rank
order), those whose first page is resident are admitted first (then by rank; under the priority
policy only within one priority value). Starvation bound: each time a request is admitted ahead
of a waiting request that ranks before it, that request's `passed_over` grows by one; while any
request in that window has been passed over `max_num_seqs` times, admission is in plain rank
order. So a request is overtaken at most `max_num_seqs` times for the sake of the cache.

Invariants:
- a request holds pages iff it is RUNNING; len(block_table) == pages_needed(num_computed)
  between steps (pages are allocated for a step's tokens when it is scheduled, prefix hits
  when it is admitted);
- with prefix caching, a request's first `num_registered` pages are registered in the pool
  (by it, or found there) and hold exactly the tokens their hashes name; its other pages are
  its own;
- every request accepted by `add` fits the pool on its own (prompt + max_tokens - 1 cached tokens,
  and with chunked prefill off also the token budget), so the most important running request can
  always make progress by preempting the others: no livelock;
- once every request is finished or cancelled, no page is used: each is free or cached.

Overlap (`schedule_ahead`, used by runtime/engine.py): the step after a launched one may be
scheduled before that one's sampled tokens are known. At most one step is ever scheduled and not
yet `update`d when `schedule_ahead` is called, and none when `schedule` is. Every running request
must then have a slice in the launched step. One that samples continues with one decode token (the
one being sampled, taken on the device: StepBatch.pending), except one whose token is its last
(max_tokens): it is known to finish. One whose slice was a prompt chunk with more to go continues
with its next chunk, whose tokens are on the host (a long prompt no longer stops the overlap for
every step it spans). The rows must fit the token budget and the free pages without preemption,
else None (the caller updates first, then calls `schedule`). An optimistic row is an
ordinary decode row for the accounting (a seat, a token of budget, its pages); if its request
finishes at the launched step (eos, a stop token or string, an abort), `update` skips the row (its
num_computed no longer matches) and `_finish` frees its pages, the one just ensured included.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .batch import PendingTokens, SeqSlice, StepBatch
from .kv_cache import BlockPool, OutOfPages, namespace_hash, page_hashes
from .sampling_params import SamplingParams
from .state_cache import StatePool, StateSnapshots


class SchedulerError(ValueError):
    """A request or setting the scheduler cannot accept."""


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    adapter: int = -1  # LoRA adapter slot (runtime/lora.py); -1: the base model
    # Set by the scheduler:
    arrival: int = -1
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of all_token_ids already in the KV cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    error: str | None = None  # why, when finish_reason == "error"
    cache_salt: str = ""  # mixed into the hash namespace of this request's pages (e.g. a LoRA adapter id)
    # Prefix caching, set by the scheduler:
    page_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its leading full pages
    num_registered: int = 0  # leading block_table pages registered in the pool's prefix cache
    num_cached_tokens: int = 0  # tokens found in the prefix cache when it was last admitted
    passed_over: int = 0  # times a lower-ranked request with a resident prefix was admitted first
    state_slot: int | None = None  # its recurrent state slot while RUNNING (models with state sites)
    # With kept states: a page boundary past its prefix hit up to which its pages were resident (a prefix another
    # request shares, whose state nobody kept): a chunk ends there so that it is kept (_state_chunk)
    state_cut: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole history."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - n)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass
class ScheduledStep:
    batch: StepBatch
    requests: list[Request]  # parallel to batch.seqs
    # Speculative decoding: request id -> the draft tokens its decode slice carries after its
    # last token (the slice then has logits for all 1 + len(drafts) tokens).
    drafts: dict[str, list[int]] = field(default_factory=dict)
    # Recurrent state kept for prefix reuse (module docstring): (snapshot slot, state slot) pairs to copy
    # before the step runs, and (state slot, snapshot slot) pairs after it (StateStore.restore / save).
    restore: list[tuple[int, int]] = field(default_factory=list)
    save: list[tuple[int, int]] = field(default_factory=list)

    @property
    def sampled_requests(self) -> list[Request]:
        """Requests whose next token this step produces, in batch.sample_rows() order."""
        return [r for r, s in zip(self.requests, self.batch.seqs) if s.sample]


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int,
        max_tokens_per_step: int,
        chunked_prefill: bool = True,
        policy: str = "fcfs",
        eos_token_ids: Iterable[int] = (),
        prefix_caching: bool = False,
        namespace: str = "",
        states: StatePool | None = None,
        snapshots: StateSnapshots | None = None,
    ):
        """`namespace`: what the K/V of a page depend on besides its tokens (the model, its weights,
        dtype and quantization); prefix cache hits only happen within one namespace. `snapshots`: with
        `states` and prefix caching, the kept states a prefix hit restores (module docstring)."""
        if max_num_seqs < 1:
            raise SchedulerError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_tokens_per_step < 1:
            raise SchedulerError(f"max_tokens_per_step must be >= 1, got {max_tokens_per_step}")
        if policy not in ("fcfs", "priority"):
            raise SchedulerError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        if prefix_caching and states is not None and snapshots is None:
            raise SchedulerError("prefix caching for a model with recurrent state needs state snapshots: a hit "
                                 "would skip the tokens that build the state")
        if snapshots is not None and (states is None or not prefix_caching):
            raise SchedulerError("state snapshots serve prefix caching of a model with recurrent state only")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.chunked_prefill = chunked_prefill
        self.policy = policy
        self.eos_token_ids = frozenset(eos_token_ids)
        self.num_preemptions = 0
        self.prefix_caching = prefix_caching
        self.namespace = namespace
        # Recurrent state slots (runtime/state_cache.py) of a model with state sites: one per running
        # request, taken on admission, given back on finish, cancel and preemption (recompute rebuilds it).
        self.states = states
        self.snapshots = snapshots
        # Prefix cache hit rate = prefix_hit_tokens / prefix_query_tokens, over admissions: a request
        # asks for its num_tokens (prompt, plus output so far after a preemption) each time it is
        # admitted; the hits are the tokens it then reuses from the cache.
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self._roots: dict[str, bytes] = {}
        self.waiting: list[Request] = []  # sorted by _rank
        self.running: list[Request] = []  # sorted by _rank
        self._live: dict[str, Request] = {}
        self._finished: list[Request] = []
        self._arrivals = itertools.count()

    # -- requests in and out --------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; it can join the batch at the next `schedule()`.

        A request that could never fit (prompt + max_tokens - 1 tokens need more pages than the
        pool, or, with chunked prefill off, more tokens than one step) finishes at once with
        finish_reason "error" (see `take_finished`)."""
        if request.request_id in self._live:
            raise SchedulerError(f"request id {request.request_id!r} is already in flight")
        if not request.prompt_token_ids:
            raise SchedulerError(f"request {request.request_id!r}: prompt_token_ids is empty")
        if request.state is not RequestState.WAITING or request.num_computed or request.block_table:
            raise SchedulerError(f"request {request.request_id!r} was already scheduled once")
        request.arrival = next(self._arrivals)
        max_cached = len(request.prompt_token_ids) + request.params.max_tokens - 1
        if self.pool.pages_needed(max_cached) > self.pool.num_pages:
            request.error = (
                f"prompt ({len(request.prompt_token_ids)}) + max_tokens ({request.params.max_tokens}) "
                f"needs {self.pool.pages_needed(max_cached)} KV cache pages, the cache has {self.pool.num_pages}"
            )
            self._finish(request, "error")
            return
        if not self.chunked_prefill and max_cached > self.max_tokens_per_step:
            request.error = (
                f"prompt ({len(request.prompt_token_ids)}) + max_tokens ({request.params.max_tokens}) exceeds "
                f"max_tokens_per_step ({self.max_tokens_per_step}) with chunked prefill off"
            )
            self._finish(request, "error")
            return
        self._live[request.request_id] = request
        bisect.insort(self.waiting, request, key=self._rank)

    def cancel(self, request_id: str) -> bool:
        """Abort a request now, freeing its pages. False if it is unknown or already finished."""
        request = self._live.get(request_id)
        if request is None:
            return False
        self.finish(request_id, "abort")
        return True

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a live request from outside (a stop string matched, an abort); frees its pages."""
        request = self._live.get(request_id)
        if request is None:
            raise SchedulerError(f"request id {request_id!r} is not in flight")
        if request.state is RequestState.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.stop_reason = stop_reason
        self._finish(request, reason)

    def get(self, request_id: str) -> Request | None:
        """The live (waiting or running) request with this id, if any."""
        return self._live.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_finished(self) -> list[Request]:
        """Requests finished since the last call (by update, finish, cancel or add), in order."""
        done, self._finished = self._finished, []
        return done

    # -- one step ---------------------------------------------------------------------------
    def schedule(self, drafts: dict[str, list[int]] | None = None) -> ScheduledStep:
        """`drafts`: proposed draft tokens of decoding requests (speculative decoding). They are
        given the token budget and free pages left after the running requests' own work (never
        preempting anything), trimmed to fit; the step's slice of such a request carries its last
        token plus the drafts kept (ScheduledStep.drafts)."""
        budget = self.max_tokens_per_step
        preemptions_before = self.num_preemptions
        decodes: list[tuple[Request, int]] = []
        prefills: list[tuple[Request, int]] = []
        scheduled = {}  # request -> the list it is in

        def reserve(req: Request, num_new: int, into: list) -> bool:
            """Give req pages for num_new more tokens, preempting others if needed."""
            nonlocal budget
            while True:
                try:
                    self.pool.ensure(req.block_table, req.num_computed + num_new)
                    break
                except OutOfPages:
                    victim = self.running[-1]  # least important
                    if victim in scheduled:
                        lst = scheduled.pop(victim)
                        k = next(i for i, (r, _) in enumerate(lst) if r is victim)
                        budget += lst.pop(k)[1]
                    self._preempt(victim)
                    if victim is req:
                        return False
            into.append((req, num_new))
            scheduled[req] = into
            budget -= num_new
            return True

        # Iterate over snapshots: preemption removes requests from self.running.
        for req in [r for r in self.running if r.num_tokens - r.num_computed == 1]:
            if budget == 0:
                break
            if req.state is RequestState.RUNNING:
                reserve(req, 1, decodes)
        for req in [r for r in self.running if r.num_tokens - r.num_computed > 1]:
            if budget == 0:
                break
            if req.state is RequestState.RUNNING:
                num_new = min(req.num_tokens - req.num_computed, budget)
                # Shrink the chunk to the free pages rather than preempt, while any token fits.
                room = (len(req.block_table) + self.pool.num_free) * self.pool.page_size - req.num_computed
                num_new = min(num_new, room) if room > 0 else num_new
                reserve(req, self._state_chunk(req, req.num_computed, num_new), prefills)
        kept: dict[str, list[int]] = {}
        for n, (req, num_new) in enumerate(decodes):
            proposal = drafts.get(req.request_id) if drafts else None
            if not proposal or budget == 0:
                continue
            # Lookahead slots: pages for the drafts out of what is free, never by preemption.
            room = (len(req.block_table) + self.pool.num_free) * self.pool.page_size - req.num_computed - 1
            d = list(proposal[:min(budget, room)])
            if d:
                self.pool.ensure(req.block_table, req.num_computed + 1 + len(d))
                decodes[n] = (req, 1 + len(d))
                kept[req.request_id] = d
                budget -= len(d)
        # After a preemption pages are short: admitting now would only cause more (as in vLLM).
        restore: list[tuple[int, int]] = []
        if self.num_preemptions == preemptions_before and self.waiting and budget > 0:
            self._admit(budget, prefills, restore)
        return self._build(decodes + prefills, kept, restore=restore)

    def _admit(self, budget: int, prefills: list[tuple[Request, int]], restore: list[tuple[int, int]]) -> None:
        """Move waiting requests to running while seats, token budget and pages last; stop at the
        first one that does not fit (no skipping ahead for size, which could starve it). `restore`
        receives the (snapshot, state slot) copies of the admitted requests' prefix hits."""
        ps = self.pool.page_size
        window = self.waiting[: self.max_num_seqs]
        admitted = []
        for req in self._admission_order(window):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if self.states is not None and not self.states.num_free:
                break  # no recurrent state slot free (the engine sizes one per seat: not expected)
            hit, resident = self._prefix_hit(req)
            cached = len(hit) * ps
            num_new = req.num_tokens - cached
            if num_new > budget:
                if not self.chunked_prefill:
                    break  # whole or not at all
                num_new = budget
            num_new = self._state_chunk(req, cached, num_new)
            need = self.pool.pages_needed(cached + num_new) - len(hit)
            # Touching a cached hit takes it out of num_free: count it before deciding.
            if need > self.pool.num_free - self.pool.num_cached_among(hit):
                break  # admitting never preempts; wait for pages to come back
            self.pool.touch(hit)
            req.block_table = hit + self.pool.allocate(need)
            req.num_computed = req.num_cached_tokens = cached
            req.state_cut = resident * ps if self.snapshots is not None and resident > len(hit) else 0
            req.num_registered = len(hit)
            if self.states is not None:
                req.state_slot = self.states.allocate()
                if hit:  # the state after the hit pages, kept when a chunk ended there (_prefix_hit)
                    restore.append((self.snapshots.use(req.page_hashes[len(hit) - 1]), req.state_slot))
            self.prefix_query_tokens += req.num_tokens
            self.prefix_hit_tokens += cached
            self.waiting.remove(req)
            req.state = RequestState.RUNNING
            bisect.insort(self.running, req, key=self._rank)
            prefills.append((req, num_new))
            admitted.append(req)
            budget -= num_new
        if admitted and self.prefix_caching:
            ranks = sorted(self._rank(r) for r in admitted)
            for w in window:
                if w.state is RequestState.WAITING:
                    w.passed_over += len(ranks) - bisect.bisect_right(ranks, self._rank(w))

    def _admission_order(self, window: list[Request]) -> list[Request]:
        """The window in rank order, or with prefix caching, requests whose first page is resident
        first (see the module docstring for the starvation bound)."""
        if not self.prefix_caching or len(window) < 2 or any(r.passed_over >= self.max_num_seqs for r in window):
            return window
        ps = self.pool.page_size

        def key(r: Request) -> tuple:
            first = self._hashes(r, min(1, (r.num_tokens - 1) // ps))
            cold = not self.pool.lookup(first)
            return (r.priority, cold, self._rank(r)) if self.policy == "priority" else (cold, self._rank(r))

        return sorted(window, key=key)

    def _prefix_hit(self, req: Request) -> tuple[list[int], int]:
        """The resident pages of req's leading full pages, leaving at least its last token to compute; with
        recurrent state, only up to the last of them whose state was kept (a snapshot at its end). Also how
        many leading pages were resident."""
        if not self.prefix_caching:
            return [], 0
        hit = self.pool.lookup(self._hashes(req, (req.num_tokens - 1) // self.pool.page_size))
        resident = len(hit)
        if self.snapshots is not None:
            n = len(hit)
            while n and self.snapshots.find(req.page_hashes[n - 1]) is None:
                n -= 1
            hit = hit[:n]
        return hit, resident

    def _state_chunk(self, req: Request, context: int, num_new: int) -> int:
        """A prompt chunk's length with kept states (snapshots, chunked prefill): cut at the end of the
        resident pages it found past its kept state (`state_cut`: a prefix another request shares), then at
        its last page boundary before its final token (the state a later request with this prompt restores),
        else down to a page boundary where one lies past `context` (a state that a shorter shared prefix may
        restore); otherwise as given."""
        if self.snapshots is None or not self.chunked_prefill or num_new <= 1:
            return num_new
        ps = self.pool.page_size
        last = (req.num_tokens - 1) // ps * ps
        end = context + num_new
        for cut in (req.state_cut, last):
            if context < cut < end:
                return cut - context
        if end < last and end // ps * ps > context:
            return end // ps * ps - context
        return num_new

    def _hashes(self, req: Request, n: int) -> list[bytes]:
        """The hashes of req's first n full pages (computed once per page, kept on the request)."""
        have = len(req.page_hashes)
        if have < n:
            ps = self.pool.page_size
            if have:
                parent = req.page_hashes[-1]
            else:
                parent = self._roots.get(req.cache_salt)
                if parent is None:
                    parent = self._roots[req.cache_salt] = namespace_hash(self.namespace, req.cache_salt)
            req.page_hashes.extend(page_hashes(parent, req.token_slice(have * ps, n * ps), ps))
        return req.page_hashes[:n]

    def _register_full_pages(self, req: Request) -> None:
        """Register the pages the last step filled (their K/V are now written and never change)."""
        full = req.num_computed // self.pool.page_size
        if full > req.num_registered:
            hashes = self._hashes(req, full)
            for i in range(req.num_registered, full):
                self.pool.register(req.block_table[i], hashes[i])
            req.num_registered = full

    def update(self, step: ScheduledStep, sampled: list[int]) -> list[Request]:
        """Record a step's results: `sampled` holds one token per slice with sample=True (for a
        slice with drafts, a list: the drafts kept plus the target's next token).

        Returns the requests that received a token (in slice order); those that finished
        are also queued for `take_finished`. Requests finished or preempted since
        `schedule()` (e.g. cancelled) are skipped. A request that finishes partway through a
        list (eos, a stop token, max_tokens) keeps the tokens up to that one only."""
        rows = step.sampled_requests
        if len(sampled) != len(rows):
            raise SchedulerError(f"update got {len(sampled)} sampled tokens for {len(rows)} sampled slices")
        tokens = iter(sampled)
        got = []
        for req, s in zip(step.requests, step.batch.seqs):
            item = next(tokens) if s.sample else None
            if req.state is not RequestState.RUNNING or req.num_computed != s.context:
                continue
            new = [] if item is None else [int(t) for t in item] if isinstance(item, (list, tuple)) else [int(item)]
            if len(new) > s.logits:
                raise SchedulerError(f"update got {len(new)} tokens for request {req.request_id!r}, "
                                     f"whose slice verified {s.logits}")
            # Up to the first token that ends the request (eos, a stop token, max_tokens).
            end = None
            for i, token in enumerate(new):
                req.output_token_ids.append(token)
                p = req.params
                if not p.ignore_eos and token in self.eos_token_ids:
                    end = ("stop", None)
                elif token in p.stop_token_ids:
                    end = ("stop", token)
                elif len(req.output_token_ids) >= p.max_tokens:
                    end = ("length", None)
                if end:
                    new = new[:i + 1]
                    break
            # The cache holds the tokens before the verified rows, then one per token kept (a
            # rejected draft's K/V stays in its slot, to be overwritten: the length is what counts).
            req.num_computed = s.context + s.length - (s.logits if new else 0) + len(new)
            if s.logits > 1:  # speculation: give back the lookahead pages beyond the length
                need = self.pool.pages_needed(req.num_computed)
                extra = req.block_table[need:]
                if extra:
                    del req.block_table[need:]
                    self.pool.free(reversed(extra))
            if self.prefix_caching:
                self._register_full_pages(req)
            if new:
                got.append(req)
            if end:
                self.finish(req.request_id, end[0], stop_reason=end[1])
        return got

    def schedule_ahead(self, prev: ScheduledStep, source: torch.Tensor,
                       fast: Callable[[Request], bool] | None = None, chunks: bool = True) -> ScheduledStep | None:
        """The step after `prev` (scheduled, launched, not yet updated) before prev's tokens are
        known, or None when that cannot be done exactly (module docstring, Overlap). `source`: prev's
        sampled tokens on the device, one per sampled slice; `fast(req)`: False for a request whose
        next step needs its new token on the host (guided decoding, penalties), which also gives None;
        `chunks` False: a prompt chunk with more to go gives None too (the engine's KILN_OVERLAP_CHUNKS=0,
        for a benchmark's same-run baseline). Waiting requests are admitted as `schedule` would with what
        is left."""
        if prev.drafts:
            return None
        slices = {id(r): s for r, s in zip(prev.requests, prev.batch.seqs)}
        row = {id(r): j for j, r in enumerate(prev.sampled_requests)}
        cont: list[tuple[Request, int, int]] = []  # (request, its context after prev, its row of source)
        resume: list[tuple[Request, int]] = []  # (request, its context after prev): a prompt chunk to go
        pages = 0
        for req in self.running:
            s = slices.get(id(req))
            if s is None or req.num_computed != s.context or (fast is not None and not fast(req)):
                return None  # not in prev, or its token is needed on the host
            if not s.sample:  # prev ran a prompt chunk with more to go: the next one is on the host
                if not chunks:
                    return None
                resume.append((req, s.context + s.length))
                continue
            if len(req.output_token_ids) + 1 >= req.params.max_tokens:
                continue  # prev samples its last token: no row (it finishes when prev is updated)
            context = s.context + s.length
            pages += max(0, self.pool.pages_needed(context + 1) - len(req.block_table))
            cont.append((req, context, row[id(req)]))
        if len(cont) > self.max_tokens_per_step or pages > self.pool.num_free:
            return None  # the budget or the pages are short: `schedule` decides (it may preempt)
        # The chunks as `schedule` sizes them (running order, then shrunk to the free pages), counted
        # before anything is allocated: a chunk that would need a preemption leaves it to `schedule`.
        budget, free, ps = self.max_tokens_per_step - len(cont), self.pool.num_free - pages, self.pool.page_size
        resumed: list[tuple[Request, int, int]] = []  # (request, its context after prev, its chunk's tokens)
        for req, context in resume:
            if budget == 0:
                break
            room = (len(req.block_table) + free) * ps - context
            if room <= 0:
                return None
            num_new = self._state_chunk(req, context, min(req.num_tokens - context, budget, room))
            free -= max(0, self.pool.pages_needed(context + num_new) - len(req.block_table))
            resumed.append((req, context, num_new))
            budget -= num_new
        for req, context, _ in cont:
            self.pool.ensure(req.block_table, context + 1)
        for req, context, num_new in resumed:
            self.pool.ensure(req.block_table, context + num_new)
        prefills: list[tuple[Request, int]] = []
        restore: list[tuple[int, int]] = []
        if self.waiting and budget > 0:
            self._admit(budget, prefills, restore)
        step = self._build([(r, 1) for r, _, _ in cont] + [(r, n) for r, _, n in resumed] + prefills,
                           ahead={id(r): c for r, c, _ in cont}, resume={id(r): c for r, c, _ in resumed},
                           restore=restore)
        if cont:  # they are its first rows, one token each
            step.batch.pending = PendingTokens(source, tuple(range(len(cont))), tuple(j for _, _, j in cont))
        return step

    # -- internals --------------------------------------------------------------------------
    def _rank(self, req: Request) -> tuple[int, ...]:
        return (req.priority, req.arrival) if self.policy == "priority" else (req.arrival,)

    def _release_state(self, req: Request) -> None:
        if req.state_slot is not None:
            self.states.free(req.state_slot)
            req.state_slot = None

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.block_table)
        self._release_state(req)
        req.num_computed = req.num_registered = 0
        req.state = RequestState.WAITING
        bisect.insort(self.waiting, req, key=self._rank)
        self.num_preemptions += 1

    def _finish(self, req: Request, reason: str) -> None:
        self.pool.release(req.block_table)
        self._release_state(req)
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        self._live.pop(req.request_id, None)
        self._finished.append(req)

    def _build(self, work: list[tuple[Request, int]], drafts: dict[str, list[int]] | None = None,
               ahead: dict[int, int] | None = None, resume: dict[int, int] | None = None,
               restore: list[tuple[int, int]] | None = None) -> ScheduledStep:
        """`ahead`: id(request) -> context of an optimistic decode row (schedule_ahead), whose token
        is not known yet: a placeholder 0 here, the device's token in its place (StepBatch.pending).
        `resume`: id(request) -> context of a prompt chunk scheduled ahead (its tokens are known).
        `restore`: the admitted requests' snapshot copies (_admit); the step's saves are added here."""
        tokens: list[int] = []
        seqs: list[SeqSlice] = []
        drafts = drafts or {}
        ahead = ahead or {}
        resume = resume or {}
        save: list[tuple[int, int]] = []
        ps = self.pool.page_size
        for req, num_new in work:
            start = ahead.get(id(req), resume.get(id(req), req.num_computed))
            end = start + num_new
            if self.snapshots is not None and end % ps == 0 and end < req.num_tokens:
                # a prompt chunk that ends on a page boundary: keep the state there (named as its pages are)
                key = self._hashes(req, end // ps)[-1]
                if self.snapshots.find(key) is None:
                    save.append((req.state_slot, self.snapshots.put(key)))
            d = drafts.get(req.request_id)
            if d:  # the last token, then the drafts: logits for all of them
                tokens.extend(req.token_slice(start, start + 1) + d)
            elif id(req) in ahead:
                tokens.append(0)
            else:
                tokens.extend(req.token_slice(start, start + num_new))
            seqs.append(
                SeqSlice(
                    start=len(tokens) - num_new,
                    length=num_new,
                    context=start,
                    block_table=tuple(req.block_table),
                    sample=bool(d) or id(req) in ahead or start + num_new == req.num_tokens,
                    logits=1 + len(d) if d else 1,
                    adapter=req.adapter,
                    state_slot=req.state_slot or 0,
                )
            )
        batch = StepBatch(tokens=torch.tensor(tokens, dtype=torch.long), seqs=seqs)
        return ScheduledStep(batch=batch, requests=[r for r, _ in work],
                             drafts={r.request_id: drafts[r.request_id] for r, _ in work if r.request_id in drafts},
                             restore=restore or [], save=save)
