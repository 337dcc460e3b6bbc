"""Automatic prefix caching (kv_cache.py BlockPool, scheduler.py): full KV pages registered under a
hash chain are reused by later requests with the same leading tokens, in the same namespace only.

What must hold: outputs are identical with caching on and off (greedy, and sampled with a seed)
for many concurrent requests sharing system prompts, also when pages run short (eviction) and
requests are preempted; at every step each page's reference count equals the number of block
tables holding it (so no page is free while referenced) and the pool's own invariants hold; at the
end every page is free or cached; hit counts are exact on a constructed case; a second model never
hits the first one's cache, through the server's /metrics."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from kiln.runtime.engine import EngineConfig, LLMEngine, cache_namespace
from kiln.runtime.kv_cache import BlockPool, OutOfPages, PageAccountingError, namespace_hash, page_hashes
from kiln.runtime.model import random_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Request, Scheduler

from tests.test_scheduler import PagedToyModel, reference, run_all

V = 97
CONFIG = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=512)


# -- the pool ---------------------------------------------------------------------------------
def test_hash_chain_depends_on_namespace_and_everything_before():
    root_a, root_b = namespace_hash("model-a"), namespace_hash("model-b")
    toks = list(range(10))
    ha = page_hashes(root_a, toks, 4)
    assert len(ha) == 2  # the partial third page has no hash
    assert page_hashes(root_a, toks[:8] + [50, 51], 4) == ha  # only full pages count
    assert page_hashes(ha[0], toks, 4, start=1) == ha[1:]  # from page 1 on, given page 0's hash
    assert page_hashes(ha[0], toks[4:8], 4) == [ha[1]]  # the chain continues from any page
    assert not set(page_hashes(root_b, toks, 4)) & set(ha)  # another namespace: no equal hash
    changed = page_hashes(root_a, [99] + toks[1:], 4)
    assert changed[0] != ha[0] and changed[1] != ha[1]  # page 1's tokens are equal, its prefix is not
    assert namespace_hash("ab", "c") != namespace_hash("a", "bc")


def test_pool_cached_pages_stay_until_evicted_lru():
    pool = BlockPool(num_pages=6, page_size=4)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    for p, h in zip(a, (b"a0", b"a1", b"a2")):
        assert pool.register(p, h)
    assert not pool.register(3, b"a0")  # the hash is taken: the duplicate page stays private
    assert pool.register(3, b"b0")
    pool.release(a)  # tail first: 2, 1, 0 join the eviction order in that order
    pool.release(b)  # 3 (registered) is cached; 4 is free
    pool.check()
    assert (pool.num_free, pool.num_used, pool.num_cached, pool.num_registered) == (6, 0, 4, 4)
    assert pool.lookup([b"a0", b"a1", b"x", b"a2"]) == [0, 1]
    assert pool.allocate(2) == [4, 5]  # free pages first, cached ones kept
    assert pool.allocate(2) == [2, 1]  # then evict: least recently released first, deepest page first
    assert pool.num_evictions == 2 and pool.lookup([b"a0", b"a1"]) == [0]
    pool.touch([0])  # a hit: the cached page is used again
    assert pool.refcount(0) == 1 and pool.num_cached == 1 and pool.num_free == 1
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    assert pool.allocate(1) == [3] and pool.lookup([b"b0"]) == []
    pool.check()
    with pytest.raises(PageAccountingError, match="not registered"):
        pool.touch([4])
    pool.free([0, 4, 5, 2, 1, 3])
    with pytest.raises(PageAccountingError, match="not in use"):
        pool.register(4, b"z")
    pool.check()
    assert (pool.num_free, pool.num_cached) == (6, 1)  # page 0 (a0) is still resident


def test_touch_counts_cached_pages_out_of_free():
    pool = BlockPool(num_pages=3, page_size=2)
    [p] = pool.allocate(1)
    pool.register(p, b"h")
    pool.free([p])
    assert pool.num_free == 3 and pool.num_cached_among([p, p]) == 1
    pool.touch([p])
    pool.incref([p])  # shared by two sequences
    pool.free([p])
    assert pool.refcount(p) == 1 and pool.num_cached == 0
    pool.free([p])
    assert pool.num_cached == 1
    pool.check()


# -- the scheduler over the toy paged model ---------------------------------------------------
def run_toy(sched: Scheduler, model: PagedToyModel, reqs: list[Request]) -> dict[str, Request]:
    for r in reqs:
        sched.add(r)
    return run_all(sched, model)


def test_scheduler_hits_are_exact_and_outputs_unchanged():
    pool = BlockPool(32, 4)
    sched = Scheduler(pool, max_num_seqs=4, max_tokens_per_step=64, prefix_caching=True, namespace="m")
    model = PagedToyModel(pool)
    a = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    cases = [("A", a, 0), ("B", a[:8] + [1, 2, 3], 8), ("C", a, 8), ("D", a[:8], 4), ("E", [3, 3, 3, 3, 3], 0)]
    queries = hits = 0
    for rid, prompt, hit in cases:  # one at a time: each sees what the earlier ones left
        done = run_toy(sched, model, [Request(rid, list(prompt), SamplingParams(max_tokens=3))])[rid]
        assert (done.output_token_ids, done.finish_reason) == reference(prompt, done.params, set())
        assert done.num_cached_tokens == hit, rid
        queries, hits = queries + len(prompt), hits + hit
        assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == (queries, hits)
    assert (queries, hits) == (44, 20)
    pool.check()
    assert pool.num_used == 0 and pool.num_cached == pool.num_registered > 0


def test_namespaces_never_share_pages_in_one_pool():
    pool = BlockPool(64, 4)
    model = PagedToyModel(pool)
    one = Scheduler(pool, max_num_seqs=4, max_tokens_per_step=64, prefix_caching=True, namespace="model one")
    two = Scheduler(pool, max_num_seqs=4, max_tokens_per_step=64, prefix_caching=True, namespace="model two")
    prompt = list(range(1, 14))
    run_toy(one, model, [Request("x", prompt, SamplingParams(max_tokens=2))])
    run_toy(two, model, [Request("y", prompt, SamplingParams(max_tokens=2))])
    assert two.prefix_hit_tokens == 0  # same tokens, same pool, another model: no hit
    run_toy(two, model, [Request("z", prompt, SamplingParams(max_tokens=2))])
    assert two.prefix_hit_tokens == 12  # its own pages: 3 full pages
    salted = Request("w", prompt, SamplingParams(max_tokens=2), cache_salt="lora:a:1")
    run_toy(two, model, [salted])
    assert salted.num_cached_tokens == 0  # an adapter is a namespace of its own
    pool.check()


def test_resident_prefix_admitted_first_with_bounded_overtaking():
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_num_seqs=2, max_tokens_per_step=64, prefix_caching=True)
    model = PagedToyModel(pool)
    hot = [7] * 8
    run_toy(sched, model, [Request("warm", hot + [1], SamplingParams(max_tokens=1))])  # 2 pages cached
    sched.add(Request("long", [1, 1], SamplingParams(max_tokens=30)))  # holds one of the 2 seats
    s = sched.schedule()
    sched.update(s, model.forward(s.batch))
    order = [r.request_id for r in s.requests]
    # cold0 ranks first; hot requests (first page resident) are admitted ahead of it, at most
    # max_num_seqs (2) times; then plain rank order admits cold0 before the remaining hot ones.
    for r in [Request("cold0", [1, 2, 3, 4, 5], SamplingParams(max_tokens=1))] + [
            Request(f"hot{i}", hot + [i], SamplingParams(max_tokens=1)) for i in range(4)]:
        sched.add(r)
    while sched.has_work():
        s = sched.schedule()
        order += [r.request_id for r in s.requests if r.request_id not in order]
        sched.update(s, model.forward(s.batch))
        sched.take_finished()
    assert order == ["long", "hot0", "hot1", "cold0", "hot2", "hot3"]
    assert [sched.prefix_hit_tokens, pool.num_used] == [32, 0]


# -- the engine (reference backend) -----------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return random_model("llama", CONFIG, seed=1)


SYSTEM_LENGTHS = (3, 9, 22, 41)  # less than a page, partial pages, several pages (page size 4)


def workload(count=64, seed=0):
    """(prompt, params): system prompts of mixed lengths + user suffixes (some empty: exact repeats);
    even requests greedy, odd ones sampled with a seed."""
    rng = random.Random(seed)
    systems = [[rng.randrange(V) for _ in range(n)] for n in SYSTEM_LENGTHS]
    out = []
    for i in range(count):
        prompt = systems[i % len(systems)] + [rng.randrange(V) for _ in range(rng.choice((0, 1, 3, 6, 10)))]
        n = rng.randint(1, 12)
        params = (SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) if i % 2 == 0 else
                  SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_tokens=n, ignore_eos=True))
        out.append((prompt, params))
    return out


def check_pages(engine: LLMEngine) -> None:
    """Every page's reference count is the number of block tables holding it; the pool's invariants."""
    pool, sched = engine.pool, engine.scheduler
    pool.check()
    held = Counter(p for r in sched.running for p in r.block_table)
    assert [pool.refcount(p) for p in range(pool.num_pages)] == [held[p] for p in range(pool.num_pages)]
    assert not any(r.block_table for r in sched.waiting)


def run(model, **cfg) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(model, None, EngineConfig(page_size=4, max_num_seqs=16, max_tokens_per_step=64, **cfg))
    ids = [engine.add_request(p, sp) for p, sp in workload()]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        check_pages(engine)
    pool = engine.pool
    assert pool.num_used == 0 and pool.num_free == pool.num_pages  # every page free or cached
    return [done[i] for i in ids], engine


@pytest.fixture(scope="module")
def uncached(model):
    got, engine = run(model, num_pages=1024, enable_prefix_caching=False)
    assert engine.scheduler.prefix_hit_tokens == 0 and engine.pool.num_registered == 0
    return got


@pytest.mark.parametrize("chunked", [True, False])
def test_outputs_identical_with_caching(model, uncached, chunked):
    got, engine = run(model, num_pages=1024, enable_prefix_caching=True, chunked_prefill=chunked)
    assert got == uncached
    sched = engine.scheduler
    assert sched.prefix_hit_tokens > 0 and sched.num_preemptions == 0
    assert sched.prefix_query_tokens == sum(len(p) for p, _ in workload())  # no preemption: prompts once each
    assert engine.pool.num_cached == engine.pool.num_registered > 0


@pytest.mark.parametrize("chunked", [True, False])
def test_outputs_identical_under_eviction_and_preemption(model, uncached, chunked):
    # 20 pages of 4 tokens; one request needs up to 16: pages run short, cached ones get evicted
    # and running requests preempted.
    got, engine = run(model, num_pages=20, enable_prefix_caching=True, chunked_prefill=chunked)
    assert got == uncached
    assert engine.scheduler.num_preemptions > 0 and engine.pool.num_evictions > 0
    assert engine.scheduler.prefix_hit_tokens > 0


def test_engine_hit_counts_exact(model):
    a = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    prompts = [a, a[:8] + [1, 2, 3], a, a[:8], [3, 3, 3, 3, 3]]
    outs = {}
    for caching in (False, True):
        engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, enable_prefix_caching=caching))
        outs[caching] = []
        for p in prompts:  # one after another: each sees the pages the earlier ones left
            engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
            while engine.has_unfinished():
                outs[caching] += [o.outputs[0].token_ids for o in engine.step() if o.finished]
        s = engine.scheduler
        assert (s.prefix_query_tokens, s.prefix_hit_tokens) == (44, 20 if caching else 0)
    assert outs[True] == outs[False]


def test_namespace_separates_models_and_storage(model):
    other = random_model("llama", CONFIG, seed=2)
    fp8_kv = random_model("llama", CONFIG, seed=1, kv_cache_dtype="fp8")
    names = {cache_namespace(m) for m in (model, other, fp8_kv)}
    assert len(names) == 3
    assert cache_namespace(model) == cache_namespace(model)


def test_switch():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching="no")
    from kiln.cli import build_parser

    p = build_parser()
    assert p.parse_args(["serve"]).prefix_caching is True
    assert p.parse_args(["serve", "--no-prefix-caching"]).prefix_caching is False
    from kiln import LLM

    assert LLM(max_num_seqs=1, max_model_len=64).engine.scheduler.prefix_caching is True
    assert LLM(max_num_seqs=1, max_model_len=64, enable_prefix_caching=False).engine.scheduler.prefix_caching is False


# -- the server: two models, their own caches, exact /metrics ---------------------------------
def test_server_models_never_share_a_cache_and_metrics_exact():
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from tests.server_harness import metric, offline_llm, running, served

    prompt = [random.Random(3).randrange(1000, 40000) for _ in range(40)]  # 2 full pages of 16, + 8
    body = dict(prompt=prompt, max_tokens=4, temperature=0)
    with running([served("a", seed=1), served("b", seed=2)]) as url:
        texts = {}
        for name in ("a", "a", "b"):
            r = httpx.post(f"{url}/v1/completions", json=dict(body, model=name), timeout=60)
            assert r.status_code == 200, r.text
            texts.setdefault(name, []).append(r.json()["choices"][0]["text"])
        got = {name: (metric(url, f'kiln_prefix_cache_queries_total{{model="{name}"}}'),
                      metric(url, f'kiln_prefix_cache_hits_total{{model="{name}"}}')) for name in ("a", "b")}
    assert got == {"a": (80.0, 32.0), "b": (40.0, 0.0)}
    b = offline_llm(seed=2, enable_prefix_caching=False)
    assert texts["b"] == [b.generate(prompt, SamplingParams(max_tokens=4, temperature=0.0))[0].outputs[0].text]
    assert texts["a"][0] == texts["a"][1]


# -- kiln bench: the prefix mode and throughput's hit rate (CPU smoke runs: counts only) -------
BENCH_TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)


def test_bench_prefix_and_shared_prefix_smoke(tmp_path, capsys):
    import json

    from kiln.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(BENCH_TINY))
    common = ["--device", "cpu", "--backend", "reference", "--config", str(config)]
    assert main(["bench", "prefix", *common, "--prefix", "40", "--suffix", "5", "--reps", "2"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[out.index("{"):out.index("\n}") + 2])
    # 3 pairs (one warm-up): each cached request reuses the 2 full pages of its 40-token system prompt
    assert r["cached_tokens_per_hit"] == 32 and r["prefix_hit_tokens"] == 3 * 32
    assert r["prefix_query_tokens"] == 6 * 45 and "cached / uncached = " in out
    # 6 requests of 24 tokens sharing their first 16 (one page). The CPU cache holds 4 x 26 tokens =
    # 7 pages, 2 a request: the first 3 compute the shared page together, the other 3 find it.
    assert main(["bench", "throughput", *common, "--requests", "6", "--input-len", "24", "--output-len", "2",
                 "--max-batch", "4", "--shared-prefix", "16"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[out.index("{"):out.index("\n}") + 2])
    assert (r["prefix_query_tokens"], r["prefix_hit_tokens"]) == (144, 48)
    assert r["prefix_hit_rate"] == 48 / 144
