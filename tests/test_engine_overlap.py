"""Overlap (EngineConfig.overlap, runtime/engine.py): launching step N + 1 before step N is read
back must not change what any request generates. Each workload runs twice through the reference
backend (CPU, fp32), overlap off and on, driven the same way (the same requests added and aborted
at the same points of their streams); token ids, text, finish and stop reasons, logprobs and
seeded samples must agree, and the on run must really have overlapped (or, where the fast path
does not apply, fallen back)."""

from __future__ import annotations

import random

import pytest
import torch
from kiln.runtime.batch import PendingTokens, SeqSlice, StepBatch
from kiln.runtime.checkpoint import open_checkpoint
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import Tokenizer

CONFIG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return random_model("llama", CONFIG, seed=1)


@pytest.fixture(scope="module")
def with_text():
    """A tiny random Llama over the default model's vocabulary, and its tokenizer (text, stop strings)."""
    tok = Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))
    return random_model("llama", dict(CONFIG, vocab_size=tok.vocab_size), seed=2), tok


def drive(model, cfg: EngineConfig, arrivals, tokenizer=None, abort_at=None, eos=None):
    """Run `arrivals` [(call index, prompt, params)] to the end; `abort_at` {arrival index: k}
    aborts that request in the call after its stream first shows >= k tokens. Returns the final
    outputs in arrival order, and the engine."""
    engine = LLMEngine(model, tokenizer, cfg)
    if eos is not None:
        engine.scheduler.eos_token_ids = frozenset(eos)
    ids: list[str] = []
    final = {}
    abort_at = dict(abort_at or {})
    pending = sorted(arrivals, key=lambda a: a[0])
    call = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= call:
            _, prompt, params = pending.pop(0)
            ids.append(engine.add_request(prompt, params))
        outs = engine.step() if engine.has_unfinished() else []
        for out in outs:
            if out.finished:
                final[out.request_id] = out
            i = ids.index(out.request_id)
            if i in abort_at and not out.finished and len(out.outputs[0].token_ids) >= abort_at[i]:
                del abort_at[i]
                engine.abort(out.request_id)
        call += 1
    engine.pool.check()
    assert engine.pool.num_used == 0  # every page free or cached
    return [final[i] for i in ids], engine


def summary(out):
    return [(c.index, list(c.token_ids), c.text, c.finish_reason, c.stop_reason) for c in out.outputs]


def same(a, b, logprobs=False):
    assert [summary(o) for o in a] == [summary(o) for o in b]
    if logprobs:
        for oa, ob in zip(a, b):
            for ca, cb in zip(oa.outputs, ob.outputs):
                assert len(ca.logprobs) == len(cb.logprobs)
                for ea, eb in zip(ca.logprobs, cb.logprobs):
                    assert sorted(ea) == sorted(eb)
                    for t in ea:
                        assert ea[t].rank == eb[t].rank
                        assert ea[t].logprob == pytest.approx(eb[t].logprob, abs=1e-5)
                assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-4)


def both(model, arrivals, tokenizer=None, logprobs=False, **kw):
    cfg = dict(page_size=4, max_num_seqs=4, max_tokens_per_step=64)
    cfg.update(kw.pop("cfg", {}))
    off, e_off = drive(model, EngineConfig(overlap=False, **cfg), arrivals, tokenizer, **kw)
    on, e_on = drive(model, EngineConfig(overlap=True, **cfg), arrivals, tokenizer, **kw)
    assert e_off.num_overlapped == e_off.num_dropped_rows == 0
    same(off, on, logprobs)
    return off, e_off, e_on


def arrivals_over_time(count=14, seed=0, vocab=97, **params):
    rng = random.Random(seed)
    return [(rng.randrange(0, 3 * count), [rng.randrange(vocab) for _ in range(rng.randint(1, 30))],
             SamplingParams(**{"temperature": 0.0, "max_tokens": rng.randint(1, 20), "ignore_eos": True, **params}))
            for _ in range(count)]


def test_pending_tokens_equal_host_tokens(model):
    """A batch whose decode tokens come from a device tensor (StepBatch.pending) computes what the
    same batch with those tokens on the host does."""
    kv = KVStore(model.plan.sites, 16, 4, torch.float32, "cpu")
    prompt = StepBatch(torch.tensor([5, 6, 7, 8, 9, 10, 11]), [SeqSlice(0, 4, 0, (0,)), SeqSlice(4, 3, 0, (1,))])
    model.model.forward(prompt, kv)
    source = torch.tensor([3, 40, 91])  # rows 2 and 0 feed the two sequences, in swapped order
    seqs = [SeqSlice(0, 1, 4, (0, 2)), SeqSlice(1, 1, 3, (1,))]
    kv2 = KVStore(model.plan.sites, 16, 4, torch.float32, "cpu")
    for store in (kv, kv2):
        for a, b in zip(store.k + store.v, kv.k + kv.v):
            a.copy_(b)
    host = model.model.forward(StepBatch(torch.tensor([91, 3]), seqs), kv)
    dev = model.model.forward(StepBatch(torch.tensor([0, 0]), seqs, PendingTokens(source, (0, 1), (2, 0))), kv2)
    assert torch.equal(host, dev)
    with pytest.raises(ValueError, match="pending tokens"):
        StepBatch(torch.tensor([0, 0]), seqs, PendingTokens(source, (0, 2), (2, 0))).validate(4)


def test_greedy_arrivals_over_time(model):
    """Requests of different lengths arriving while others run: the same tokens, and most steps
    were launched ahead."""
    off, e_off, e_on = both(model, arrivals_over_time())
    assert e_on.num_overlapped > 20


def test_long_prompts_in_chunks(model, monkeypatch):
    """Prompts several times the token budget, arriving while others decode: the steps after a prompt
    chunk are launched ahead too (Scheduler.schedule_ahead continues the chunk), with the same tokens.
    KILN_OVERLAP_CHUNKS=0 (a benchmark's baseline) waits for the read-back after such a chunk, as before."""
    rng = random.Random(6)
    arrivals = [(2 * i, [rng.randrange(97) for _ in range(rng.randint(20, 90))],
                 SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 12), ignore_eos=True)) for i in range(8)]
    cfg = dict(max_tokens_per_step=16, num_pages=128)
    off, _, e_on = both(model, arrivals, cfg=cfg)
    chunk_steps = sum(-(-len(p) // 16) for _, p, _ in arrivals)
    assert e_on.num_overlapped > chunk_steps
    monkeypatch.setenv("KILN_OVERLAP_CHUNKS", "0")
    base, e_base = drive(model, EngineConfig(overlap=True, page_size=4, max_num_seqs=4, **cfg), arrivals)
    same(off, base)
    assert 0 < e_base.num_overlapped < e_on.num_overlapped - chunk_steps // 2


def test_overlap_on_by_default_for_cuda_only(model):
    assert not LLMEngine(model, None, EngineConfig(page_size=4)).overlap  # the reference backend
    assert not LLMEngine(model, None, EngineConfig(page_size=4, overlap=True, speculative="ngram")).overlap
    with pytest.raises(ValueError, match="overlap"):
        EngineConfig(overlap="yes")


def test_seeded_sampling_and_logprobs(model):
    arrivals = arrivals_over_time(seed=1, temperature=0.9, top_k=20, top_p=0.9, logprobs=3)
    arrivals = [(t, p, SamplingParams(**{**vars(s), "seed": 100 + i, "stop": []})) for i, (t, p, s) in enumerate(arrivals)]
    _, _, e_on = both(model, arrivals, logprobs=True)
    assert e_on.num_overlapped > 0


def test_n_children_seeded(model):
    arrivals = [(i, [i + 1, 2 * i + 3, 7], SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=9 + i,
                                                          ignore_eos=True, logprobs=1)) for i in range(4)]
    off, _, e_on = both(model, arrivals, logprobs=True, cfg=dict(max_num_seqs=8))
    assert all(len(o.outputs) == 3 for o in off)
    assert e_on.num_overlapped > 0


def test_penalties_fall_back(model):
    """Penalised requests need their tokens on the host to build the next step: no overlap while one
    runs, and still the same tokens."""
    arrivals = arrivals_over_time(seed=2)
    arrivals = [(t, p, SamplingParams(**{**vars(s), "stop": [], "repetition_penalty": 1.5,
                                         "presence_penalty": 0.5, "frequency_penalty": 0.3}))
                for t, p, s in arrivals]
    _, _, e_on = both(model, arrivals)
    assert e_on.num_overlapped == 0
    mixed = arrivals_over_time(seed=2)[:7] + arrivals[7:]
    both(model, mixed)


def test_abort_mid_stream(model):
    """A request aborted once it has streamed k tokens ends with exactly those k, in both modes."""
    arrivals = [(0, [3, 1, 4, 1, 5], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)),
                (0, [9, 2, 6], SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True)),
                (2, [5, 3, 5, 8], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))]
    off, _, e_on = both(model, arrivals, abort_at={0: 6, 2: 3})
    full, _ = drive(model, EngineConfig(page_size=4, overlap=False), arrivals)
    for i, k in ((0, 6), (2, 3)):
        c = off[i].outputs[0]
        assert c.finish_reason == "abort" and list(c.token_ids) == list(full[i].outputs[0].token_ids[:k])
    assert off[1].outputs[0].finish_reason == "length"
    assert e_on.num_overlapped > 0 and e_on.num_dropped_rows > 0


def test_preemption_tiny_cache(model):
    """A KV cache that holds barely one request: preemption (which overlap never does ahead) happens."""
    rng = random.Random(3)
    arrivals = [(0, [rng.randrange(97) for _ in range(rng.randint(10, 20))],
                 SamplingParams(temperature=0.0, max_tokens=rng.randint(10, 20), ignore_eos=True)) for _ in range(6)]
    _, e_off, e_on = both(model, arrivals, cfg=dict(num_pages=12, max_tokens_per_step=16))
    assert e_off.scheduler.num_preemptions > 0 and e_on.scheduler.num_preemptions > 0
    assert e_on.num_overlapped > 0


def test_prefix_caching(model):
    """Shared prefixes, registered and hit while steps are launched ahead."""
    rng = random.Random(4)
    shared = [rng.randrange(97) for _ in range(13)]
    arrivals = [(2 * i, shared + [rng.randrange(97) for _ in range(rng.randint(1, 9))],
                 SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 15), ignore_eos=True)) for i in range(8)]
    _, e_off, e_on = both(model, arrivals, cfg=dict(enable_prefix_caching=True))
    assert e_on.scheduler.prefix_hit_tokens > 0 and e_on.num_overlapped > 0


def test_eos_stop_tokens_and_stop_strings(with_text):
    """Requests that end at a step already followed by a launched one: their extra row is dropped.
    The ending tokens and strings are taken from the plain run's own output."""
    m, tok = with_text
    rng = random.Random(5)
    prompts = [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(2, 12))] for _ in range(6)]
    base = [(i, p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)) for i, p in enumerate(prompts)]
    plain, _ = drive(m, EngineConfig(page_size=4, max_num_seqs=4, overlap=False), base, tok)
    streams = [list(o.outputs[0].token_ids) for o in plain]
    eos = {streams[0][5]}  # ends request 0 (at least) early
    arrivals = [(i, p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=i != 0 and i != 3,
                                      stop_token_ids=[streams[1][7]] if i == 1 else [],
                                      stop=[plain[i].outputs[0].text[4:7]] if i in (2, 4) and
                                      len(plain[i].outputs[0].text) > 8 else []))
                for i, p in enumerate(prompts)]
    off, _, e_on = both(m, arrivals, tok, eos=eos)
    assert off[0].outputs[0].finish_reason == "stop" and len(off[0].outputs[0].token_ids) <= 6
    assert off[1].outputs[0].stop_reason == streams[1][7]
    assert any(isinstance(o.outputs[0].stop_reason, str) for o in off)
    assert e_on.num_overlapped > 0 and e_on.num_dropped_rows > 0
