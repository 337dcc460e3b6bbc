"""`verify` and `kiln verify`: the Llama (rope scaling variants) and GPT-2 specs match Hugging Face
transformers (fp32, CPU), and a spec that differs from the model fails."""

from __future__ import annotations

import json

import pytest
from kiln.cli import main
from kiln.runtime.verify import verify

from tests.configs import VERIFY_GPT2 as GPT2
from tests.configs import VERIFY_LLAMA as LLAMA


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


@pytest.mark.parametrize("change, reason", [
    (dict(model_type="nonsense"), "Unrecognized model identifier: nonsense"),
    (dict(hidden_size=65), "not a multiple of the number of attention heads"),
])
def test_a_config_transformers_rejects_is_one_message(tmp_path, capsys, change, reason):
    path = tmp_path / "my_config.json"
    path.write_text(json.dumps(dict(LLAMA, **change)))
    assert main(["verify", "--config", str(path), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and reason in err and "Traceback" not in err
