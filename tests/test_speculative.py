"""Speculative decoding (runtime/speculative.py) through the reference backend, CPU, fp32:
greedy outputs are token for token the outputs without speculation (n-gram and draft model,
a dense and a MoE family), the rejection sampler keeps the target's distribution (chi-square,
seeded), and speculation lives inside in-flight batching (mixed batches, preemption)."""

from __future__ import annotations

import random

import pytest
import torch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.model import random_model
from kiln.runtime.sampler import Sampler, SamplingRow
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.speculative import ngram_propose, truncated_copy, verify

from tests.configs import FAMILY_CONFIGS

# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one
# seeded run in a thousand seeds; these seeds are fixed, so the tests are deterministic.
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26,
            12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}


def chi_square(samples: list[int], probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of `samples` against `probs`, cells with expected count < 5
    merged into one."""
    n = len(samples)
    counts = torch.bincount(torch.tensor(samples), minlength=probs.shape[0]).double()
    expected = probs.double() * n
    big = expected >= 5
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def rand_dist(gen: torch.Generator, vocab: int, zeros: int = 0) -> torch.Tensor:
    p = torch.rand(vocab, generator=gen) ** 2
    p[torch.randperm(vocab, generator=gen)[:zeros]] = 0
    return p / p.sum()


# -- the rejection sampler on constructed distributions ----------------------------------------------
@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampler_keeps_target_distribution(point_mass):
    """Two drafts per request over an 8-token vocabulary: the first emitted token is distributed
    as p0, the second (when the first draft was kept) as p1, for a draft q far from p."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    V, N = 8, 20000
    p = torch.stack([rand_dist(gen, V, zeros=2), rand_dist(gen, V), rand_dist(gen, V)])  # [3, V]
    q = torch.stack([rand_dist(gen, V), rand_dist(gen, V, zeros=3)])  # [2, V]
    drafts = torch.stack([torch.multinomial(q[j], N, replacement=True, generator=gen) for j in range(2)], 1)
    if point_mass:  # n-gram: any proposal, q a point mass on it
        drafts = torch.randint(0, V, (N, 2), generator=gen)
    processed = p.log().repeat(N, 1)  # the target rows of each request: log p0, log p1, log p2
    v = verify(processed, drafts.tolist(), [None if point_mass else q] * N, [False] * N, [None] * N)
    first = [t[0] for t in v.tokens]
    second = [t[1] for t in v.tokens if len(t) > 1]
    assert 0 < len(second) < N  # some drafts kept, some rejected
    for samples, dist in ((first, p[0]), (second, p[1])):
        stat, df = chi_square(samples, dist)
        assert stat < CHI2_999[df], (stat, df)


def test_greedy_verification_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    v = verify(logits, [[1, 2]], [None], [True], [None])
    assert v.tokens == [[1, 0]]  # draft 1 kept (argmax of row 0), draft 2 replaced by row 1's argmax
    v = verify(logits, [[1, 0]], [None], [True], [None])
    assert v.tokens == [[1, 0, 2]]  # all kept: row 2's argmax as the bonus token


def test_ngram_proposals():
    assert ngram_propose([5, 6, 7, 8, 5, 6], 3) == [7, 8, 5]  # the last 2 tokens occurred at 0
    assert ngram_propose([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2) == [9, 2]  # the longest suffix first: [1, 2, 3]
    assert ngram_propose([2, 3, 9, 2, 3, 4, 1, 3], 2) == [4, 1]  # [1, 3] nowhere: the latest 3
    assert ngram_propose([1, 2, 3], 4) == []


# -- the engine --------------------------------------------------------------------------------------
FAMILIES = ["llama", "qwen3_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    cfg = FAMILY_CONFIGS[name]
    target = random_model(name, cfg, seed=1)
    # The draft: the target without its last layer (its other weights shared): partial acceptance.
    return name, target, truncated_copy(target, name, cfg, cfg["num_hidden_layers"] - 1)


def workload(count=8, seed=0):
    """Prompts that repeat themselves (so that n-gram lookup finds matches), varied lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        base = [rng.randrange(3, 256) for _ in range(rng.randint(2, 8))]
        out.append((base * rng.randint(1, 4), rng.randint(1, 30)))
    return out


def run(target, reqs, spec=None, draft=None, params=None, speculate=None, **cfg):
    cfg = dict(dict(page_size=4, num_pages=400, max_num_seqs=8), **cfg)
    engine = LLMEngine(target, None, EngineConfig(speculative=spec, num_speculative_tokens=4, **cfg), draft=draft)
    ids = [engine.add_request(p, (params[i] if params else SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)),
                              speculate=True if speculate is None else speculate[i])
           for i, (p, n) in enumerate(reqs)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert engine.pool.num_free == engine.pool.num_pages  # every page back (lookahead pages included)
    if engine._drafter is not None:
        assert engine._drafter.pool.num_free == engine._drafter.pool.num_pages
    return [done[i] for i in ids], engine


@pytest.fixture(scope="module")
def plain(family):
    return run(family[1], workload())[0]


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_equals_plain(family, plain, method):
    _, target, draft = family
    got, engine = run(target, workload(), method, draft if method == "draft" else None)
    assert got == plain
    s = engine.spec_stats
    assert 0 < s.accepted < s.drafted  # speculation happened, and was partly rejected
    assert s.acceptance_length > 1


def test_mixed_batch_and_seeded_plain_requests(family, plain):
    """Speculating and plain requests in one batch: greedy ones equal the plain run, and seeded
    sampled requests that do not speculate draw exactly what they draw without speculation."""
    _, target, draft = family
    reqs = workload()
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) if i % 2 == 0 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=n, ignore_eos=True)
              for i, (_, n) in enumerate(reqs)]
    speculate = [i % 4 != 1 for i in range(len(reqs))]  # sampled: half speculate, half do not
    base, _ = run(target, reqs, params=params)
    got, engine = run(target, reqs, "draft", draft, params=params, speculate=speculate)
    for i in range(len(reqs)):
        if params[i].greedy:
            assert got[i] == plain[i] == base[i]
        elif not speculate[i]:
            assert got[i] == base[i]
        assert len(got[i]) == reqs[i][1]
    assert engine.spec_stats.verifications > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_preemption_during_speculation(family, plain, method):
    _, target, draft = family
    got, engine = run(target, workload(), method, draft if method == "draft" else None, num_pages=24,
                      max_tokens_per_step=40)
    assert engine.scheduler.num_preemptions > 0
    assert engine.spec_stats.verifications > 0
    assert got == plain


def test_stop_tokens_inside_accepted_drafts(family):
    """A stop token among the accepted drafts ends the request there, as without speculation."""
    _, target, _ = family
    reqs = workload()
    plain_out = run(target, reqs)[0]
    # Stop at the 3rd generated token of every request long enough: later tokens must be dropped.
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                             stop_token_ids=[out[2]] if len(out) > 3 else []) for (_, n), out in zip(reqs, plain_out)]
    base = run(target, reqs, params=params)[0]
    got = run(target, reqs, "ngram", params=params)[0]
    assert got == base


def test_sampled_end_to_end_distribution():
    """The engine with a draft model, temperature 1 and top-k 5: the second generated token (which
    always comes out of a verification) is distributed as the target's marginal, computed exactly."""
    name = "llama"
    cfg = dict(FAMILY_CONFIGS[name], vocab_size=32)
    target = random_model(name, cfg, seed=3)
    draft = truncated_copy(target, name, cfg, 1)
    prompt = [5, 9, 5, 9, 5]
    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True)
    sampler = Sampler()

    def dist(tokens):
        from kiln.runtime.model import SingleSequence
        logits = SingleSequence(target, len(tokens) + 1).step(tokens)
        return sampler.process(logits, [SamplingRow(params, prompt, tokens[len(prompt):])]).softmax(-1)[0]

    p1 = dist(prompt)
    marginal = sum(p1[t] * dist(prompt + [t]) for t in torch.nonzero(p1).flatten().tolist())
    N = 1500  # 5 categories (top-k 5): enough for the chi-square test at p = 0.001
    engine = LLMEngine(target, None, EngineConfig(page_size=4, num_pages=N * 2 + 64, max_num_seqs=512,
                                                  speculative="draft", num_speculative_tokens=2), draft=draft)
    torch.manual_seed(0)
    for i in range(N):
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True, seed=i))
    second = []
    while engine.has_unfinished():
        second += [o.outputs[0].token_ids[1] for o in engine.step() if o.finished]
    assert engine.spec_stats.verifications >= N and engine.spec_stats.accepted > 0
    stat, df = chi_square(second, marginal)
    assert stat < CHI2_999[df], (stat, df)


def test_forced_acceptance_bench_accepts_every_draft():
    """`kiln bench latency --speculative draft --forced-acceptance`: with the target's layers past the
    draft's zeroed, the draft is the target (every proposal accepted) and the tokens are unchanged."""
    from kiln.runtime.bench import speculative_decode

    cfg = dict(FAMILY_CONFIGS["llama"], num_hidden_layers=4)
    r = speculative_decode("llama", cfg, "draft", 3, 1, 24, backend="reference", device="cpu", prompt_len=32,
                           forced=True)
    assert r["spec_same_tokens"] and r["spec_forced_acceptance"]
    assert r["spec_acceptance_rate"] == 1.0 and r["spec_acceptance_length"] > 3.5
    free = speculative_decode("llama", cfg, "draft", 3, 1, 24, backend="reference", device="cpu", prompt_len=32)
    assert free["spec_acceptance_rate"] < 1.0  # without forcing, a random 1-layer draft misses
