"""The runtime through the reference backend (CPU, fp32): in-flight batching must not change
what a request generates. Greedy outputs of many concurrent requests equal each request run
alone; with chunked prefill on and off; with a KV cache so small that preemption happens."""

from __future__ import annotations

import random

import pytest
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model import SingleSequence, random_model
from kiln.runtime.sampling_params import SamplingParams

CONFIG = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return random_model("llama", CONFIG, seed=1)


def alone(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of one prompt, one sequence, no batching: the oracle."""
    seq = SingleSequence(model, len(prompt) + n + 1)
    logits = seq.step(prompt)
    out = []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = seq.step([out[-1]])
    return out


def requests(count=16, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(97) for _ in range(rng.randint(1, 40))], rng.randint(1, 24)) for _ in range(count)]


@pytest.fixture(scope="module")
def expected(model):
    return [alone(model, p, n) for p, n in requests()]


def run(model, cfg: EngineConfig):
    engine = LLMEngine(model, None, cfg)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
           for p, n in requests()]
    done = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert engine.pool.num_free == engine.pool.num_pages  # every page back
    return [done[i] for i in ids], engine, steps


@pytest.mark.parametrize("chunked", [True, False])
def test_batched_greedy_equals_alone(model, expected, chunked):
    got, engine, steps = run(model, EngineConfig(page_size=4, num_pages=512, max_num_seqs=16,
                                                 max_tokens_per_step=64, chunked_prefill=chunked))
    assert got == expected
    assert engine.scheduler.num_preemptions == 0
    assert steps < sum(n for _, n in requests())  # requests really shared steps


@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_keeps_outputs(model, expected, chunked):
    # 20 pages of 4 tokens cannot hold 16 sequences of up to 64 tokens: preemption must happen.
    got, engine, _ = run(model, EngineConfig(page_size=4, num_pages=20, max_num_seqs=16,
                                             max_tokens_per_step=48, chunked_prefill=chunked))
    assert engine.scheduler.num_preemptions > 0
    assert got == expected


def test_cancel_frees_pages(model):
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64))
    a = engine.add_request([1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.add_request([9, 8, 7], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    engine.step()
    engine.step()
    assert engine.pool.num_free < engine.pool.num_pages
    engine.abort(a)
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[a].outputs[0].finish_reason == "abort"
    assert outs[b].outputs[0].finish_reason == "length" and len(outs[b].outputs[0].token_ids) == 3
    assert engine.pool.num_free == engine.pool.num_pages


def test_seeded_sampling_is_reproducible_across_batches(model):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)

    def sample(extra):
        engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=256))
        rid = engine.add_request([5, 6, 7], params)
        for p in extra:
            engine.add_request(p, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))
        result = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    result = o.outputs[0].token_ids
        return result

    assert sample([]) == sample([[1, 2, 3, 4], [9] * 20])


def test_n_and_logprobs(model):
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=256))
    rid = engine.add_request([3, 1, 4, 1, 5], SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=5,
                                                           logprobs=2, ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            final = o if o.request_id == rid else final
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2]
    for c in final.outputs:
        assert len(c.token_ids) == 5 and len(c.logprobs) == 5
        for token, entry in zip(c.token_ids, c.logprobs):
            assert token in entry and all(lp <= 0 for lp in entry.values())
    # Children draw with seeds 0, 1, 2: not all identical.
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1


def test_bad_prompts(model):
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=16))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        engine.add_request([1, 500], SamplingParams())
    # A request that can never fit the KV cache finishes with an error instead of hanging.
    rid = engine.add_request(list(range(90)), SamplingParams(max_tokens=10))
    outs = engine.step()
    assert outs[0].request_id == rid and outs[0].finished and outs[0].error
    assert engine.pool.num_free == 16


def test_logprobs_are_vllm_logprobs(model):
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64))
    rid = engine.add_request([5, 6, 7], SamplingParams(temperature=1.0, seed=3, max_tokens=6, logprobs=3,
                                                       ignore_eos=True))
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            final = o if o.request_id == rid else final
    c = final.outputs[0]
    total = 0.0
    for token, entry in zip(c.token_ids, c.logprobs):
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        sampled = entry[token]
        assert [lp.rank for lp in ranked[:3]] == [1, 2, 3]  # the top 3, ranked
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
        if sampled.rank <= 3:  # one of the top 3: the same entry
            assert len(entry) == 3 and ranked[sampled.rank - 1] is sampled
        else:  # a fourth entry, ranked below them
            assert len(entry) == 4 and ranked[3] is sampled
        assert sampled.decoded_token is None and float(sampled) == sampled.logprob  # no tokenizer, no text
        total += sampled.logprob
    assert c.cumulative_logprob == pytest.approx(total)
    assert final.prompt is None  # token ids and no tokenizer: nothing to decode them with


def test_cpu_kv_cache_is_max_num_seqs_times_max_model_len(model):
    engine = LLMEngine(model, None, context_len=512)  # CPU defaults: 8 sequences of min(context, 2048) tokens
    assert (engine.config.max_num_seqs, engine.config.max_model_len) == (8, 512)
    assert engine.pool.num_pages * engine.config.page_size == 8 * 512
    engine = LLMEngine(model, None)  # a model without a checkpoint states no context length
    assert (engine.config.max_num_seqs, engine.config.max_model_len) == (8, 2048)
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=2, max_model_len=100, page_size=16))
    assert engine.pool.num_pages == -(-2 * 100 // 16)
    with pytest.raises(ValueError, match="max_model_len 600 exceeds the model's context length"):
        LLMEngine(model, None, EngineConfig(max_model_len=600), context_len=512)


@pytest.mark.parametrize("field, value", [("max_num_seqs", 0), ("max_model_len", -1), ("page_size", 0),
                                          ("num_pages", 0), ("max_tokens_per_step", 0),
                                          ("kv_memory_fraction", 0.0), ("kv_memory_fraction", 1.5),
                                          ("max_num_seqs", True)])
def test_engine_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
