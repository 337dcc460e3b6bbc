import math

import pytest
import torch
from kiln.runtime.sampler import Sampler, SamplerError, SamplingRow, make_generator
from kiln.runtime.sampling_params import SamplingParams
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def rows_for(params_list, prompts=None, outputs=None):
    n = len(params_list)
    prompts = prompts or [[] for _ in range(n)]
    outputs = outputs or [[] for _ in range(n)]
    return [SamplingRow(p, prompts[i], outputs[i], make_generator(p)) for i, p in enumerate(params_list)]


def test_greedy_is_exact_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g).to(torch.bfloat16)
    out = Sampler().sample(logits, rows_for([SamplingParams(temperature=0.0)] * 6))
    assert torch.equal(out.tokens, logits.argmax(dim=-1))
    assert out.topk_logprobs is None


def test_top_k_one_equals_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    params = [SamplingParams(temperature=t, top_k=1, top_p=0.9) for t in (0.3, 1.0, 1.7, 5.0, 0.01)]
    for _ in range(3):
        assert torch.equal(Sampler().sample(logits, rows_for(params)).tokens, logits.argmax(dim=-1))


HF_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=-1, top_p=0.3, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, repetition_penalty=0.7, top_k=50),
]


def hf_processed(p: SamplingParams, prompt, output, row: torch.Tensor) -> torch.Tensor:
    scores = row[None].clone()  # [1, V]
    ids = torch.tensor([list(prompt) + list(output)], dtype=torch.long)
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


def test_processed_logits_match_hf_processors():
    g = torch.Generator().manual_seed(2)
    vocab = 200
    logits = torch.randn(len(HF_CASES), vocab, generator=g) * 3
    prompts = [torch.randint(0, vocab, (12,), generator=g).tolist() for _ in HF_CASES]
    outputs = [torch.randint(0, vocab, (7,), generator=g).tolist() for _ in HF_CASES]
    got = Sampler().process(logits, rows_for(HF_CASES, prompts, outputs))
    for i, p in enumerate(HF_CASES):
        want = hf_processed(p, prompts[i], outputs[i], logits[i])
        torch.testing.assert_close(got[i], want, msg=f"row {i}: {p}")
        assert (want == float("-inf")).any() == (p.top_k > 0 or p.top_p < 1 or p.min_p > 0)


def test_penalties_match_per_row_loop():
    g = torch.Generator().manual_seed(3)
    vocab = 50
    params = [
        SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, presence_penalty=-1.0),
        SamplingParams(temperature=1.0, frequency_penalty=2.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, repetition_penalty=0.5, frequency_penalty=-0.4),
    ]
    logits = torch.randn(len(params), vocab, generator=g)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 0, 9, 3, 11)]
    outputs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (8, 6, 0, 4, 13)]
    got = Sampler().process(logits, rows_for(params, prompts, outputs))
    for i, p in enumerate(params):
        want = logits[i].clone()
        for t in set(prompts[i] + outputs[i]):
            x = want[t]
            want[t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[i]):
            want[t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
        torch.testing.assert_close(got[i], want / max(p.temperature, 1.0))
    out = Sampler().sample(logits, rows_for(params, prompts, outputs))
    assert out.tokens[0] == got[0].argmax() and out.tokens[4] == got[4].argmax()


def reference_distribution(logits: torch.Tensor, p: SamplingParams) -> list[float]:
    """Straightforward per-row filtering: the probabilities the sampler should draw from."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep = set(order[: p.top_k] if p.top_k > 0 else order)
    if p.top_p < 1:
        total = sum(probs[t] for t in keep)
        kept, mass = set(), 0.0
        for t in (t for t in order if t in keep):
            if mass >= p.top_p:
                break
            kept.add(t)
            mass += probs[t] / total
        keep = kept
    if p.min_p > 0:
        top = max(probs[t] for t in keep)
        keep = {t for t in keep if probs[t] >= p.min_p * top}
    total = sum(probs[t] for t in keep)
    return [probs[t] / total if t in keep else 0.0 for t in range(len(probs))]


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=3),
        SamplingParams(temperature=1.2, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=1.5, top_k=6, top_p=0.85, min_p=0.05),
    ],
)
def test_draws_stay_in_allowed_set_and_follow_distribution(p):
    torch.manual_seed(0)
    vocab, draws = 10, 20_000
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.4, 0.3, 0.0, -0.5, -1.0, -3.0])
    want = reference_distribution(logits, p)
    out = Sampler().sample(logits.expand(draws, vocab), [SamplingRow(p, [], [], None)] * draws)
    freq = torch.bincount(out.tokens, minlength=vocab).double() / draws
    for t in range(vocab):
        if want[t] == 0:
            assert freq[t] == 0, f"token {t} is outside the allowed set"
        else:
            tol = 5 * math.sqrt(want[t] * (1 - want[t]) / draws) + 1e-3
            assert abs(freq[t] - want[t]) < tol, (t, float(freq[t]), want[t])


def test_seed_reproducible_across_batch_composition():
    vocab, steps = 1000, 12
    g = torch.Generator().manual_seed(4)
    step_logits = [torch.randn(3, vocab, generator=g) for _ in range(steps)]
    x = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    others = [SamplingParams(temperature=0.9), SamplingParams(temperature=1.1, seed=7)]

    def run(batch_params, x_row):
        gens = [make_generator(p) for p in batch_params]
        seq = []
        for lg in step_logits:
            rows = [SamplingRow(p, [], [], gen) for p, gen in zip(batch_params, gens)]
            logits = torch.stack([lg[0] if i == x_row else lg[1 + (i > x_row)] for i in range(len(rows))])
            seq.append(int(Sampler().sample(logits, rows).tokens[x_row]))
        return seq

    alone = run([x], 0)
    assert run([others[0], x, others[1]], 1) == alone
    assert run([x, others[1]], 0) == alone
    assert run([SamplingParams(temperature=1.0, top_p=0.95, seed=43)], 0) != alone


def test_logprobs_of_processed_distribution():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 64, generator=g)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, top_k=4, logprobs=5),
        SamplingParams(temperature=1.0),
    ]
    s = Sampler()
    out = s.sample(logits, rows_for(params))
    ref = s.process(logits, rows_for(params)).log_softmax(dim=-1)
    top = ref.topk(5, dim=-1)
    torch.testing.assert_close(out.topk_logprobs, top.values)
    assert torch.equal(out.topk_token_ids[:, :3], top.indices[:, :3])
    torch.testing.assert_close(out.sampled_logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    torch.testing.assert_close(out.topk_logprobs[0], logits[0].log_softmax(-1).topk(5).values)  # greedy: raw
    assert torch.isinf(out.topk_logprobs[1, 4])  # only 4 tokens survive top-k
    assert out.tokens[1] in out.topk_token_ids[1, :4]


def test_bad_sampler_input():
    with pytest.raises(SamplerError, match=r"logits must be \[N, V\]"):
        Sampler().sample(torch.zeros(4), [])
    with pytest.raises(SamplerError, match="2 rows but 1 requests"):
        Sampler().sample(torch.zeros(2, 4), rows_for([SamplingParams()]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=0), "n must be"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(seed=1.5), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(top_k=True), "top_k"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=None, temperature=0)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.greedy
    d = SamplingParams()
    assert (d.n, d.temperature, d.top_p, d.top_k, d.min_p, d.max_tokens, d.logprobs) == (1, 1.0, 1.0, 0, 0.0, 16, None)
    assert not d.greedy
