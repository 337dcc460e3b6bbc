"""Scheduler tests on CPU, driven by a toy paged token source.

`PagedToyModel` is a test input generator, not a model: it writes every scheduled token into a
page store through the slice's block table, then reads each sampled sequence's whole context
back through the block table and returns a position-weighted hash of it as the next token. Any
wrong page id, position or overlap between live sequences changes the token stream, which is
compared with a plain single-sequence loop (`reference`).
"""

import random

import pytest
import torch
from kiln.runtime.batch import StepBatch
from kiln.runtime.kv_cache import BlockPool
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Request, RequestState, Scheduler, SchedulerError

V = 97


def next_token(context: list[int]) -> int:
    return sum((i + 1) * t for i, t in enumerate(context)) % V


class PagedToyModel:
    def __init__(self, pool: BlockPool):
        self.ps = pool.page_size
        self.store = torch.full((pool.num_pages, pool.page_size), -1, dtype=torch.long)

    def forward(self, batch: StepBatch) -> list[int]:
        batch.validate(self.ps)
        positions = batch.positions()
        for s in batch.seqs:
            for j in range(s.start, s.end):
                p = int(positions[j])
                self.store[s.block_table[p // self.ps], p % self.ps] = batch.tokens[j]
        out = []
        for s in batch.seqs:
            if s.sample:
                n = s.context + s.length
                ctx = [int(self.store[s.block_table[p // self.ps], p % self.ps]) for p in range(n)]
                out.append(next_token(ctx))
        return out


def reference(prompt: list[int], params: SamplingParams, eos: set[int]) -> tuple[list[int], str]:
    out: list[int] = []
    while True:
        t = next_token(prompt + out)
        out.append(t)
        if (t in eos and not params.ignore_eos) or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens:
            return out, "length"


def step(sched: Scheduler, model: PagedToyModel):
    s = sched.schedule()
    sched.update(s, model.forward(s.batch))
    return s


def run_all(sched: Scheduler, model: PagedToyModel) -> dict[str, Request]:
    done = {}
    for _ in range(10_000):
        if not sched.has_work():
            break
        step(sched, model)
        done.update({r.request_id: r for r in sched.take_finished()})
    assert not sched.has_work()
    return done


def shape(s) -> list[tuple]:
    """(request id, context, length, sample, block table) per slice."""
    return [(r.request_id, q.context, q.length, q.sample, q.block_table) for r, q in zip(s.requests, s.batch.seqs)]


def make(pages=8, ps=4, seqs=4, budget=16, **kw):
    pool = BlockPool(pages, ps)
    return pool, Scheduler(pool, max_num_seqs=seqs, max_tokens_per_step=budget, **kw), PagedToyModel(pool)


def test_scripted_page_ids_and_cancel():
    pool, sched, model = make()
    sched.add(Request("A", [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=20)))
    sched.add(Request("B", [1, 2, 3], SamplingParams(max_tokens=6)))
    s = step(sched, model)
    assert shape(s) == [("A", 0, 6, True, (0, 1)), ("B", 0, 3, True, (2,))]
    assert s.batch.tokens.tolist() == [5, 6, 7, 8, 9, 10, 1, 2, 3]
    s = step(sched, model)  # decodes: A 7 tokens, B 4 tokens: no new page
    assert shape(s) == [("A", 6, 1, True, (0, 1)), ("B", 3, 1, True, (2,))]
    s = step(sched, model)  # B's 5th token needs a page
    assert shape(s) == [("A", 7, 1, True, (0, 1)), ("B", 4, 1, True, (2, 3))]
    assert sched.cancel("A")
    assert pool.num_free == 6  # A's pages 0 and 1 are back at once
    assert [r.request_id for r in sched.take_finished()] == ["A"]
    sched.add(Request("C", list(range(9)), SamplingParams(max_tokens=3)))
    s = step(sched, model)
    assert shape(s) == [("B", 5, 1, True, (2, 3)), ("C", 0, 9, True, (0, 1, 4))]
    done = run_all(sched, model)
    for rid, prompt in (("B", [1, 2, 3]), ("C", list(range(9)))):
        assert (done[rid].output_token_ids, done[rid].finish_reason) == reference(prompt, done[rid].params, set())
    assert pool.num_free == pool.num_pages
    assert not sched.cancel("A")


def test_chunked_prefill_splits_under_budget():
    pool, sched, model = make(pages=16, budget=8)
    sched.add(Request("A", list(range(1, 21)), SamplingParams(max_tokens=3)))
    s = step(sched, model)
    assert shape(s) == [("A", 0, 8, False, (0, 1))]
    sched.add(Request("B", [4, 4, 4, 4, 4], SamplingParams(max_tokens=3)))  # joins between steps
    s = step(sched, model)
    assert shape(s) == [("A", 8, 8, False, (0, 1, 2, 3))]  # budget spent: B waits
    s = step(sched, model)
    assert shape(s) == [("A", 16, 4, True, (0, 1, 2, 3, 4)), ("B", 0, 4, False, (5,))]
    s = step(sched, model)
    assert shape(s) == [("A", 20, 1, True, (0, 1, 2, 3, 4, 6)), ("B", 4, 1, True, (5, 7))]
    assert s.batch.tokens.tolist()[1] == 4  # B's last prompt token
    done = run_all(sched, model)
    assert done["A"].output_token_ids == reference(list(range(1, 21)), SamplingParams(max_tokens=3), set())[0]
    assert pool.num_free == pool.num_pages


@pytest.mark.parametrize("chunked", [True, False])
def test_prompt_whole_or_split(chunked):
    pool, sched, model = make(budget=12, chunked_prefill=chunked)
    sched.add(Request("A", [1] * 6, SamplingParams(max_tokens=2)))
    sched.add(Request("B", [2] * 7, SamplingParams(max_tokens=2)))
    s1, s2 = step(sched, model), step(sched, model)
    if chunked:
        assert [q[:4] for q in shape(s1)] == [("A", 0, 6, True), ("B", 0, 6, False)]
        assert [q[:4] for q in shape(s2)] == [("A", 6, 1, True), ("B", 6, 1, True)]
    else:
        assert [q[:4] for q in shape(s1)] == [("A", 0, 6, True)]
        assert [q[:4] for q in shape(s2)] == [("A", 6, 1, True), ("B", 0, 7, True)]
    run_all(sched, model)
    assert pool.num_free == pool.num_pages


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_victim_and_recompute(policy):
    pool, sched, model = make(pages=4, ps=2, policy=policy)
    sched.add(Request("A", [3, 1, 4], SamplingParams(max_tokens=4), priority=1))
    sched.add(Request("B", [1, 5, 9], SamplingParams(max_tokens=4), priority=0))
    first, victim = ("A", "B") if policy == "fcfs" else ("B", "A")
    s = step(sched, model)
    assert shape(s) == [(first, 0, 3, True, (0, 1)), (victim, 0, 3, True, (2, 3))]
    step(sched, model)  # 4 tokens each: still 2 pages
    s = step(sched, model)  # `first` needs a 3rd page: `victim` is preempted
    assert sched.num_preemptions == 1
    assert shape(s) == [(first, 4, 1, True, (0, 1, 2))]
    v = next(r for r in sched.waiting if r.request_id == victim)
    assert (v.state, v.num_computed, v.block_table, len(v.output_token_ids)) == (RequestState.WAITING, 0, [], 2)
    s = step(sched, model)  # victim needs 3 pages, 1 free: waits; `first` finishes
    assert shape(s) == [(first, 5, 1, True, (0, 1, 2))]
    s = step(sched, model)  # victim re-prefills prompt + its 2 tokens, samples its 3rd
    assert shape(s) == [(victim, 0, 5, True, (0, 1, 2))]
    assert s.batch.tokens.tolist() == v.prompt_token_ids + v.output_token_ids[:2]
    done = run_all(sched, model)
    for r in done.values():
        assert r.output_token_ids == reference(r.prompt_token_ids, r.params, set())[0]
    assert pool.num_free == pool.num_pages


def random_requests(n, seed):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        params = SamplingParams(
            max_tokens=rng.randint(1, 12),
            stop_token_ids=[rng.randrange(V)] if i % 3 == 0 else [],
            ignore_eos=i % 5 == 0,
        )
        prompt = [rng.randrange(V) for _ in range(rng.randint(1, 20))]
        reqs.append(Request(f"r{i}", prompt, params, priority=rng.randint(0, 2)))
    return reqs


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("chunked", [True, False])
def test_tiny_pool_preempts_and_matches_reference(chunked, policy):
    eos = {0, 1, 2}
    pool, sched, model = make(pages=12, ps=4, seqs=8, budget=32, chunked_prefill=chunked, policy=policy,
                              eos_token_ids=eos)
    reqs = random_requests(16, seed=1)
    for r in reqs[:10]:
        sched.add(r)
    for _ in range(3):  # the rest join a running batch
        step(sched, model)
    for r in reqs[10:]:
        sched.add(r)
    done = run_all(sched, model)
    assert sched.num_preemptions > 0
    assert pool.num_free == pool.num_pages
    assert sorted(done) == sorted(r.request_id for r in reqs)
    for r in reqs:
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params, eos), r.request_id
    assert any(r.finish_reason == "stop" for r in reqs) and any(r.finish_reason == "length" for r in reqs)


def test_cancel_between_schedule_and_update_and_waiting():
    pool, sched, model = make()
    sched.add(Request("A", [1, 2, 3, 4, 5], SamplingParams(max_tokens=5)))
    sched.add(Request("B", [6, 7], SamplingParams(max_tokens=5)))
    step(sched, model)
    s = sched.schedule()
    sampled = model.forward(s.batch)
    sched.cancel("A")
    assert pool.num_free == pool.num_pages - 1  # only B's page left
    got = sched.update(s, sampled)
    assert [r.request_id for r in got] == ["B"] and len(s.requests[0].output_token_ids) == 1
    sched.add(Request("C", [1], SamplingParams(max_tokens=5)))
    sched.cancel("C")  # never scheduled
    assert [(r.request_id, r.finish_reason) for r in sched.take_finished()] == [("A", "abort"), ("C", "abort")]
    sched.finish("B", "stop", stop_reason="\n")  # a stop string seen by the detokeniser
    assert pool.num_free == pool.num_pages and not sched.has_work()


def test_priority_admits_urgent_first_and_max_num_seqs():
    pool, sched, model = make(seqs=1, policy="priority")
    sched.add(Request("low", [1, 2], SamplingParams(max_tokens=2), priority=5))
    sched.add(Request("high", [3, 4], SamplingParams(max_tokens=2), priority=0))
    order = []
    while sched.has_work():
        s = step(sched, model)
        assert len(s.requests) <= 1
        order += [r.request_id for r in s.requests]
    assert order == ["high", "high", "low", "low"]


def test_requests_that_never_fit_finish_with_error():
    pool, sched, model = make(pages=4, ps=4, budget=8, chunked_prefill=False)
    sched.add(Request("long", [1] * 10, SamplingParams(max_tokens=8)))  # 17 tokens > 16 slots
    sched.add(Request("wide", [1] * 7, SamplingParams(max_tokens=3)))  # 9 tokens > budget 8, unchunked
    sched.add(Request("ok", [1] * 7, SamplingParams(max_tokens=2)))
    fin = sched.take_finished()
    assert [(r.request_id, r.finish_reason) for r in fin] == [("long", "error"), ("wide", "error")]
    assert "KV cache pages" in fin[0].error and "max_tokens_per_step" in fin[1].error
    run_all(sched, model)
    assert pool.num_free == pool.num_pages


def test_bad_input():
    pool, sched, model = make()
    sched.add(Request("A", [1]))
    with pytest.raises(SchedulerError, match="already in flight"):
        sched.add(Request("A", [2]))
    with pytest.raises(SchedulerError, match="empty"):
        sched.add(Request("B", []))
    s = sched.schedule()
    with pytest.raises(SchedulerError, match="1 sampled slices"):
        sched.update(s, [])
    with pytest.raises(SchedulerError, match="policy"):
        Scheduler(pool, 1, 1, policy="lifo")


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_with_cancels_keeps_pages_consistent(seed):
    rng = random.Random(seed)
    pool, sched, model = make(pages=rng.randint(8, 20), ps=rng.choice([1, 2, 4]), seqs=rng.randint(1, 8),
                              budget=rng.randint(8, 40), chunked_prefill=rng.random() < 0.7,
                              policy=rng.choice(["fcfs", "priority"]))
    reqs = random_requests(24, seed=seed)
    pending, cancelled = list(reqs), set()
    while pending or sched.has_work():
        if pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        if sched.running and rng.random() < 0.05:
            victim = rng.choice(sched.running).request_id
            sched.cancel(victim)
            cancelled.add(victim)
        held = sum(len(r.block_table) for r in sched.running)
        assert pool.num_used == held  # only running requests hold pages, one reference each
        assert all(not r.block_table for r in sched.waiting)
        step(sched, model)
    assert pool.num_free == pool.num_pages
    for r in reqs:
        if r.finish_reason == "error":
            continue
        want = reference(r.prompt_token_ids, r.params, set())
        if r.request_id in cancelled:
            assert r.output_token_ids == want[0][: len(r.output_token_ids)]
        else:
            assert (r.output_token_ids, r.finish_reason) == want, r.request_id


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_schedule_ahead_continues_prompt_chunks(prefix_caching):
    """Overlap (Scheduler.schedule_ahead): after a step that ran part of a long prompt, the step after it is
    scheduled ahead with that prompt's next chunk. Its rows for the requests already running are the ones
    `schedule` gives once the first step is updated (the same slices, page counts and tokens; the decode
    rows' tokens come from the device); only admissions may differ (pages that step frees come back at
    its update). Long prompts of mixed lengths arriving over time, page shortage and finishing requests
    included; every token stream equals the single-sequence reference."""
    import copy

    rng = random.Random(7)
    pool, sched, model = make(pages=40, ps=4, seqs=5, budget=12, prefix_caching=prefix_caching)
    shared = [rng.randrange(V) for _ in range(9)]
    arrivals = {i * 3: Request(f"r{i}", (shared if i % 2 else []) + [rng.randrange(V) for _ in range(rng.randint(5, 40))],
                               SamplingParams(max_tokens=rng.randint(1, 12))) for i in range(12)}
    done, ahead_chunks, calls, prev = {}, 0, 0, None
    while arrivals or sched.has_work() or prev is not None:
        if calls in arrivals:
            sched.add(arrivals.pop(calls))
        calls += 1
        if prev is None:
            prev = sched.schedule()
            if not prev.batch.num_tokens:
                prev = None
                continue
        tokens = model.forward(prev.batch)
        twin_sched, twin_prev = copy.deepcopy((sched, prev))  # the other path: update first, then schedule
        twin_sched.update(twin_prev, tokens)
        running = {r.request_id for r in sched.running}
        ahead = sched.schedule_ahead(prev, torch.tensor(tokens))
        sched.update(prev, tokens)
        done.update({r.request_id: r for r in sched.take_finished()})
        if ahead is not None and ahead.batch.num_tokens:
            if ahead.batch.pending is not None:
                ahead.batch.pending.apply(ahead.batch.tokens)
            want = twin_sched.schedule()

            def rows(step):
                return [(r.request_id, q.context, q.length, q.sample, len(q.block_table),
                         step.batch.tokens[q.start:q.end].tolist())
                        for r, q in zip(step.requests, step.batch.seqs) if r.request_id in running]
            assert rows(ahead) == rows(want)
            ahead_chunks += sum(1 for r, q in zip(ahead.requests, ahead.batch.seqs)
                                if r.request_id in running and q.length > 1)
            prev = ahead
        else:
            prev = None
    assert not sched.has_work() and pool.num_used == 0
    assert len(done) == 12 and ahead_chunks >= 5
    for r in done.values():
        assert (r.output_token_ids, r.finish_reason) == reference(r.prompt_token_ids, r.params, set())
