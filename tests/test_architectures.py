"""Every family's spec against its transformers class (fp32, CPU).

Each case builds the transformers model of a small config (tests/configs.py) with random
weights, lets `verify` pick the spec from `architectures`, and compares logits at the prefill
(11 tokens) and at each of 32 greedy decode steps: max relative error <= 1e-4 and the same
greedy token at every step. Configs turn on what makes each family differ (a sliding
window shorter than the 43-token sequence, partial rotary, softcaps, ...). transformers builds
them with eager attention, or the implementation tests/configs.py HF_ATTENTION names.
"""

from __future__ import annotations

import kiln.runtime.verify as verify_mod
import pytest
import torch
import transformers
from kiln.dsl import check, load_spec
from kiln.runtime.verify import verify

from tests.configs import FAMILY_CONFIGS as CASES
from tests.configs import HF_ATTENTION


def with_attention(monkeypatch, implementation: str) -> None:
    """Build the transformers models of the next verify() calls with `implementation` attention
    (sdpa, ...) instead of eager."""
    build = verify_mod.hf_random_model

    def hf_random_model(config, seed=0):
        model = build(config, seed)
        model.config._attn_implementation = implementation  # attention modules read it at each call
        return model

    monkeypatch.setattr(verify_mod, "hf_random_model", hf_random_model)


@pytest.mark.parametrize("name", list(CASES))
def test_family_matches_transformers(name, monkeypatch):
    if name in HF_ATTENTION:
        with_attention(monkeypatch, HF_ATTENTION[name])
    report = verify(CASES[name], steps=32)
    assert report.spec.endswith(f"{name.split('-')[0]}.kiln")  # picked by `architectures`
    assert len(report.steps) == 33
    worst = max(report.steps, key=lambda s: s.max_rel)
    assert report.ok(1e-4), f"{name}: worst step {worst}, tokens agree {report.tokens_agree}/33"


def test_wrong_spec_fails(tmp_path):
    """The comparison can fail: Mistral without its sliding window diverges."""
    spec = tmp_path / "no_window.kiln"
    spec.write_text('spec no_window extends llama\narchitectures "MistralForCausalLM"\n'
                    "param window: int? = none\n")
    report = verify(CASES["mistral"], spec=spec, steps=4)
    assert not report.ok(1e-4)
    assert report.max_rel > 1e-2


def test_neox_plain_qkv_split_fails(tmp_path):
    """GPT-NeoX's fused rows are per head; slicing them as [q; k; v] must not pass."""
    spec = tmp_path / "neox_flat.kiln"
    spec.write_text(
        "spec neox_flat extends gpt_neox\narchitectures \"GPTNeoXForCausalLM\"\n"
        "block layer {\n  weights \"gpt_neox.layers.{layer}.\" {\n"
        "    wq: [hidden, hidden] <- \"attention.query_key_value.weight\"[0:hidden]\n"
        "    wk: [hidden, hidden] <- \"attention.query_key_value.weight\"[hidden:2 * hidden]\n"
        "    wv: [hidden, hidden] <- \"attention.query_key_value.weight\"[2 * hidden:]\n"
        "  }\n}\n")
    report = verify(CASES["gpt_neox"], spec=spec, steps=2)
    assert report.max_rel > 1e-2


def _windows(spec: str, config: dict) -> list:
    plan = check(load_spec(spec), config)
    return [i.attrs.window for i in plan.program.instrs if i.kind.value == "attention"]


def _hf_windows(config_class, config: dict) -> list:
    hf = config_class(**{k: v for k, v in config.items() if k != "architectures"})
    return [hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types]


@pytest.mark.parametrize("use_sliding", [False, True])
def test_qwen2_hub_config_windows(use_sliding):
    """Hub configs carry sliding_window even when use_sliding_window is off, and no
    layer_types: the spec must place windows exactly where transformers does."""
    config = dict(CASES["qwen2"], num_hidden_layers=4, use_sliding_window=use_sliding,
                  sliding_window=8, max_window_layers=2)
    windows = _windows("qwen2", config)
    assert windows == _hf_windows(transformers.Qwen2Config, config)
    assert windows == ([None, None, 8, 8] if use_sliding else [None] * 4)


@pytest.mark.parametrize("layers", [3, 4])
def test_gemma2_default_layer_pattern(layers):
    """Without layer_types in config.json the spec alternates like transformers' default."""
    config = {k: v for k, v in CASES["gemma2"].items() if k != "layer_types"}
    config["num_hidden_layers"] = layers
    assert _windows("gemma2", config) == _hf_windows(transformers.Gemma2Config, config)


# ---- the two constructs these families added to the language

RESHAPE_SPEC = """spec fused
param heads: int = 2
param hd: int = 3
param hidden: int = heads * hd
weights {
  wq: [hidden, 4] <- reshape(reshape("qkv.weight", [heads, 3, -1])[:, 0:1], [hidden, 4])
  wv: [hidden, 4] <- reshape(reshape("qkv.weight", [heads, 3, -1])[:, 2:3], [hidden, 4])
}
forward(tokens) {
  return linear(embedding(tokens, wq), wv)
}
"""


def _ckpt(tmp_path, tensors):
    from kiln.runtime.checkpoint import open_checkpoint, save_safetensors_checkpoint

    save_safetensors_checkpoint(tmp_path, tensors, {})
    return open_checkpoint(tmp_path)


def test_reshape_weight_transform_picks_rows_per_head(tmp_path):
    from kiln.dsl.loader import parse_spec
    from kiln.runtime.weights import load_weights

    spec = parse_spec(RESHAPE_SPEC)
    qkv = torch.arange(18 * 4, dtype=torch.float32).view(18, 4)  # rows: [heads=2, (q, k, v), hd=3]
    w = load_weights(check(spec, {}), _ckpt(tmp_path, {"qkv.weight": qkv}))
    assert torch.equal(w["wq"], torch.cat([qkv[0:3], qkv[9:12]]))
    assert torch.equal(w["wv"], torch.cat([qkv[6:9], qkv[15:18]]))


def test_reshape_errors_name_the_weight(tmp_path):
    from kiln.dsl.errors import SpecError
    from kiln.dsl.loader import parse_spec
    from kiln.runtime.checkpoint import CheckpointError
    from kiln.runtime.weights import load_weights

    bad_dims = RESHAPE_SPEC.replace("[heads, 3, -1])[:, 0:1]", "[heads, -1, -1])[:, 0:1]")
    with pytest.raises(SpecError, match="reshape"):
        check(parse_spec(bad_dims), {})
    spec = parse_spec(RESHAPE_SPEC)
    with pytest.raises(CheckpointError, match=r"weight 'wq'.*cannot reshape 'qkv.weight'"):
        load_weights(check(spec, {}), _ckpt(tmp_path, {"qkv.weight": torch.zeros(17, 4)}))


def test_scale_round_factor_rounds_to_the_run_dtype():
    """bf16: transformers multiplies by sqrt(hidden) held as a bf16 tensor (55.5, not 55.4256)."""
    from kiln.dsl.loader import parse_spec
    from kiln.runtime.batch import SeqSlice, StepBatch
    from kiln.runtime.kv_store import KVStore
    from kiln.runtime.reference import ReferenceModel

    text = ("spec s\nweights { embed: [8, 16] <- \"e\" }\nforward(tokens) {\n"
            "  return scale(embedding(tokens, embed), factor=sqrt(3072), round_factor=ROUND)\n}\n")
    table = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tokens = torch.arange(8)
    out = {}
    for rnd in ("true", "false"):
        plan = check(parse_spec(text.replace("ROUND", rnd)), {})
        model = ReferenceModel(plan, {"embed": table})
        batch = StepBatch(tokens, [SeqSlice(0, 8, 0, (0,))])
        out[rnd] = model.forward(batch, KVStore(plan.sites, 1, 16, torch.bfloat16), all_logits=True)
    hf = table * torch.tensor(3072 ** 0.5).to(torch.bfloat16)
    assert torch.equal(out["true"], hf.float())
    assert not torch.equal(out["false"], hf.float())
