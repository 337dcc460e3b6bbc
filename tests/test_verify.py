"""Issue 2 acceptance: Llama and GPT-2 specs against Hugging Face transformers (fp32, CPU)."""

from __future__ import annotations

import json

from kiln.cli import main
from kiln.runtime.verify import verify

LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
    max_position_embeddings=128,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
)
GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=128, n_layer=3, n_head=4,
            vocab_size=500, n_positions=128, bos_token_id=0, eos_token_id=0)


def _check(report):
    assert len(report.steps) == 33  # prefill + 32 decode steps
    for s in report.steps:
        assert s.max_rel <= 1e-4, s
        assert s.same_token, s


def test_llama_llama3_rope_matches_transformers():
    _check(verify(LLAMA, steps=32))


def test_gpt2_matches_transformers():
    _check(verify(GPT2, steps=32))


def test_llama_variants_matches_transformers():
    # Llama 2 style: MHA, tied head, linear rope scaling, biases, dynamic NTK on another layer count.
    cfg = dict(LLAMA, num_key_value_heads=8, tie_word_embeddings=True, attention_bias=True,
               rope_scaling={"rope_type": "linear", "factor": 2.0}, num_hidden_layers=2)
    _check(verify(cfg, steps=32))
    cfg = dict(LLAMA, num_key_value_heads=1, max_position_embeddings=16,
               rope_scaling={"rope_type": "dynamic", "factor": 2.0}, num_hidden_layers=2)
    _check(verify(cfg, steps=32))


def test_verify_cli_passes_and_fails(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(LLAMA, num_hidden_layers=2)))
    assert main(["verify", "--config", str(cfg), "--steps", "4"]) == 0
    assert "PASS" in capsys.readouterr().out
    # A spec that differs from the model (a wrong norm epsilon) must fail.
    bad = tmp_path / "bad.kiln"
    bad.write_text("spec bad extends llama\narchitectures \"LlamaForCausalLM\"\n"
                   "param eps: float = 0.5\n")
    assert main(["verify", str(bad), "--config", str(cfg), "--steps", "2"]) == 1
    assert "FAIL" in capsys.readouterr().out
