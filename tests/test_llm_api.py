"""`from kiln import LLM, SamplingParams` on the embedded SmolLM2: batched generation equals
one-at-a-time generation, and streamed deltas add up to the final text."""

from __future__ import annotations

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.generate import generate


@pytest.fixture(scope="module")
def llm():
    return LLM(max_num_seqs=4, max_model_len=256)


def test_generate_batch_equals_single(llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        single = generate(llm.engine.loaded, llm.tokenizer, ids, params)
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids[: len(single.token_ids)] == single.token_ids
        assert out.outputs[0].text == single.text


def test_stream_deltas_add_up(llm):
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=16)
    pieces, last = [], None
    for out in llm.stream("Once upon a time", params):
        pieces.append(out.outputs[0].delta)
        last = out
    assert last.finished and "".join(pieces) == last.outputs[0].text
    again = llm.generate("Once upon a time", params)[0]
    assert again.outputs[0].text == last.outputs[0].text  # same seed, same text


def test_chat_and_stop_string(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=32, stop=["Paris"]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "Paris" and "Paris" not in c.text
