"""The sampler on a CUDA device: same results as on the CPU, seeds reproducible on the GPU."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kiln.runtime.sampler import Sampler, SamplerError, SamplingRow, make_generator
from kiln.runtime.sampling_params import SamplingParams

PARAMS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
    SamplingParams(temperature=0.7, top_k=20, presence_penalty=1.0),
    SamplingParams(temperature=1.1, top_p=0.8, min_p=0.05, seed=3),
    SamplingParams(temperature=1.0, logprobs=4),
]


def rows(device, n_prompt=17, n_out=9, vocab=32000):
    g = torch.Generator().manual_seed(0)
    return [
        SamplingRow(p, torch.randint(0, vocab, (n_prompt,), generator=g).tolist(),
                    torch.randint(0, vocab, (n_out,), generator=g).tolist(), make_generator(p, device))
        for p in PARAMS
    ]


def test_processed_logits_match_cpu():
    logits = torch.randn(len(PARAMS), 32000, generator=torch.Generator().manual_seed(1)) * 4
    cpu = Sampler().process(logits, rows("cpu"))
    gpu = Sampler().process(logits.cuda(), rows("cuda"))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_greedy_bf16_exact_and_seed_reproducible():
    logits = torch.randn(64, 32000, device="cuda").to(torch.bfloat16)
    out = Sampler().sample(logits, [SamplingRow(SamplingParams(temperature=0), [], [])] * 64)
    assert torch.equal(out.tokens, logits.argmax(-1))
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    lg = torch.randn(10, 32000, device="cuda")

    def seq(batch_size, row):
        gen = make_generator(p, "cuda")
        toks = []
        for t in range(10):
            batch = torch.randn(batch_size, 32000, device="cuda")
            batch[row] = lg[t]
            rs = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * batch_size
            rs[row] = SamplingRow(p, [], [], gen)
            toks.append(int(Sampler().sample(batch, rs).tokens[row]))
        return toks

    assert seq(1, 0) == seq(7, 3)


def test_cpu_generator_with_cuda_logits_is_an_error():
    p = SamplingParams(seed=1)
    with pytest.raises(SamplerError, match="generator is on cpu"):
        Sampler().sample(torch.zeros(1, 8, device="cuda"), [SamplingRow(p, [], [], make_generator(p))])
