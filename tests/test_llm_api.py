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


def test_outputs_have_vllm_shapes(llm):
    """`prompt` filled in for chat (the rendered template) and token ids (their decoding);
    logprobs are Logprob objects with a rank and the decoded token."""
    conv = [{"role": "user", "content": "Name a colour."}]
    out = llm.chat(conv, SamplingParams(temperature=0.0, max_tokens=6, logprobs=2))[0]
    assert out.prompt == llm.tokenizer.apply_chat_template(conv)
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    c = out.outputs[0]
    for token, entry in zip(c.token_ids, c.logprobs):
        lp = entry[token]
        assert lp.rank == 1  # greedy: the sampled token is the most likely one
        assert lp.decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)
        assert {e.rank for e in entry.values()} == {1, 2} and lp.logprob == float(lp) <= 0
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    ids = llm.tokenizer.encode("The capital of France is")
    by_ids = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert by_ids.prompt == "The capital of France is" and by_ids.prompt_token_ids == ids
    assert by_ids.outputs[0].logprobs is None and by_ids.outputs[0].cumulative_logprob is None


def test_engine_directory_of_the_default_model(llm, tmp_path):
    """`kiln build` of the embedded GGUF carries its tokenizer and chat template: the engine
    directory chats exactly as the GGUF does (fp32 weights on both sides)."""
    from kiln.cli import main

    engine = tmp_path / "smol"
    assert main(["build", "--checkpoint", "default", "--backend", "cuda", "--dtype", "fp32", "--out", str(engine)]) == 0
    from_engine = LLM(str(engine), max_num_seqs=4, max_model_len=256)
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    a, b = llm.chat(conv, params)[0], from_engine.chat(conv, params)[0]
    assert a.prompt == b.prompt and a.prompt_token_ids == b.prompt_token_ids
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and "Paris" in b.outputs[0].text
    assert from_engine.tokenizer.eos_token_ids == llm.tokenizer.eos_token_ids
