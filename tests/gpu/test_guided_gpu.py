"""Constrained decoding on the GPU: the bitmask is applied on the device exactly as on the host, and
the real SmolLM2 on the cuda backend returns schema-valid JSON for constrained requests that share
batches with free ones (whose tokens equal those they get alone)."""

from __future__ import annotations

import json

import jsonschema
import torch
from kiln.llm import LLM
from kiln.runtime.guided import apply_token_bitmask
from kiln.runtime.sampling_params import SamplingParams

from tests.test_structured_output import schemas


def test_bitmask_on_device_equals_host(fresh_seed):
    logits = torch.randn(64, 49157)
    bits = torch.randint(-(2**31), 2**31 - 1, (20, (49157 + 31) // 32), dtype=torch.int32)
    rows = torch.randperm(64)[:20]
    host = logits.clone()
    apply_token_bitmask(host, rows, bits)
    dev = logits.cuda()
    apply_token_bitmask(dev, rows.cuda(), bits.cuda())
    assert torch.equal(dev.cpu(), host)


def test_guided_json_on_cuda_backend():
    llm = LLM("default", device="cuda", backend="cuda", max_num_seqs=64)
    free = SamplingParams(max_tokens=16, temperature=0.0)
    alone = llm.generate("Hello, my name is", free)[0].outputs[0].token_ids
    all_schemas = schemas(64, seed=3)
    params = [free] + [SamplingParams(max_tokens=64, temperature=0.0 if i % 2 else 0.8, seed=i,
                                      guided={"json": s}) for i, s in enumerate(all_schemas)]
    outs = llm.generate(["Hello, my name is"] + ["JSON:"] * len(all_schemas), params)
    assert outs[0].outputs[0].token_ids == alone
    for s, out in zip(all_schemas, outs[1:]):
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        jsonschema.validate(json.loads(out.outputs[0].text), s)
