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

Invariants:
- a request holds pages iff it is RUNNING; len(block_table) == pages_needed(num_computed)
  between steps (pages are allocated for a step's tokens when it is scheduled);
- every request accepted by `add` fits the pool on its own (prompt + max_tokens - 1 cached tokens,
  and with chunked prefill off also the token budget), so the most important running request can
  always make progress by preempting the others: no livelock;
- once every request is finished or cancelled, every page is free.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .batch import SeqSlice, StepBatch
from .kv_cache import BlockPool, OutOfPages
from .sampling_params import SamplingParams


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
    # Set by the scheduler:
    arrival: int = -1
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of all_token_ids already in the KV cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    error: str | None = None  # why, when finish_reason == "error"

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
    ):
        if max_num_seqs < 1:
            raise SchedulerError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_tokens_per_step < 1:
            raise SchedulerError(f"max_tokens_per_step must be >= 1, got {max_tokens_per_step}")
        if policy not in ("fcfs", "priority"):
            raise SchedulerError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.chunked_prefill = chunked_prefill
        self.policy = policy
        self.eos_token_ids = frozenset(eos_token_ids)
        self.num_preemptions = 0
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
    def schedule(self) -> ScheduledStep:
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
                reserve(req, min(num_new, room) if room > 0 else num_new, prefills)
        # After a preemption pages are short: admitting now would only cause more (as in vLLM).
        admit = self.num_preemptions == preemptions_before
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            num_new = req.num_tokens  # nothing of a waiting request is cached
            if num_new > budget:
                if not self.chunked_prefill:
                    break  # whole or not at all; keep FCFS order rather than skip ahead
                num_new = budget
            try:
                self.pool.ensure(req.block_table, num_new)
            except OutOfPages:
                break  # admitting never preempts; wait for pages to come back
            self.waiting.pop(0)
            req.state = RequestState.RUNNING
            bisect.insort(self.running, req, key=self._rank)
            prefills.append((req, num_new))
            budget -= num_new

        return self._build(decodes + prefills)

    def update(self, step: ScheduledStep, sampled: list[int]) -> list[Request]:
        """Record a step's results: `sampled` holds one token per slice with sample=True.

        Returns the requests that received a token (in slice order); those that finished
        are also queued for `take_finished`. Requests finished or preempted since
        `schedule()` (e.g. cancelled) are skipped."""
        rows = step.sampled_requests
        if len(sampled) != len(rows):
            raise SchedulerError(f"update got {len(sampled)} sampled tokens for {len(rows)} sampled slices")
        tokens = iter(sampled)
        got = []
        for req, s in zip(step.requests, step.batch.seqs):
            token = int(next(tokens)) if s.sample else None
            if req.state is not RequestState.RUNNING or req.num_computed != s.context:
                continue
            req.num_computed += s.length
            if token is None:
                continue
            req.output_token_ids.append(token)
            got.append(req)
            p = req.params
            if not p.ignore_eos and token in self.eos_token_ids:
                self.finish(req.request_id, "stop")
            elif token in p.stop_token_ids:
                self.finish(req.request_id, "stop", stop_reason=token)
            elif len(req.output_token_ids) >= p.max_tokens:
                self.finish(req.request_id, "length")
        return got

    # -- internals --------------------------------------------------------------------------
    def _rank(self, req: Request) -> tuple[int, ...]:
        return (req.priority, req.arrival) if self.policy == "priority" else (req.arrival,)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.block_table)
        req.num_computed = 0
        req.state = RequestState.WAITING
        bisect.insort(self.waiting, req, key=self._rank)
        self.num_preemptions += 1

    def _finish(self, req: Request, reason: str) -> None:
        self.pool.release(req.block_table)
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        self._live.pop(req.request_id, None)
        self._finished.append(req)

    def _build(self, work: list[tuple[Request, int]]) -> ScheduledStep:
        tokens: list[int] = []
        seqs: list[SeqSlice] = []
        for req, num_new in work:
            start = req.num_computed
            tokens.extend(req.token_slice(start, start + num_new))
            seqs.append(
                SeqSlice(
                    start=len(tokens) - num_new,
                    length=num_new,
                    context=start,
                    block_table=tuple(req.block_table),
                    sample=start + num_new == req.num_tokens,
                )
            )
        batch = StepBatch(tokens=torch.tensor(tokens, dtype=torch.long), seqs=seqs)
        return ScheduledStep(batch=batch, requests=[r for r, _ in work])
