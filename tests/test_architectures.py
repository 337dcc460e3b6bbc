"""Issue 3 acceptance: every family's spec against its transformers class (fp32, CPU).

Each case builds the transformers model of a small config with random weights, lets
`verify` pick the spec from `architectures`, and compares logits at the prefill (11
tokens) and at each of 32 greedy decode steps: max relative error <= 1e-4 and the same
greedy token at every step. Configs turn on what makes each family differ (a sliding
window shorter than the 43-token sequence, partial rotary, softcaps, ...).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.dsl import check, load_spec
from kiln.runtime.verify import verify

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # ids inside the small vocab
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, max_position_embeddings=128, **TOKENS)


def cfg(model_type: str, arch: str, **over) -> dict:
    return dict(SMALL, model_type=model_type, architectures=[arch], **over)


CASES = {
    "llama": cfg("llama", "LlamaForCausalLM"),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4,
                 vocab_size=256, n_positions=128, bos_token_id=1, eos_token_id=2),
    "mistral": cfg("mistral", "MistralForCausalLM", sliding_window=8),
    "qwen2": cfg("qwen2", "Qwen2ForCausalLM"),
    # Sliding window switched on for layers >= max_window_layers only (layer_types).
    "qwen2-sliding": cfg("qwen2", "Qwen2ForCausalLM", num_hidden_layers=3, use_sliding_window=True,
                         sliding_window=8, max_window_layers=1),
    # head_dim != hidden / heads; "gelu" is the legacy value transformers runs as tanh-GELU.
    "gemma": cfg("gemma", "GemmaForCausalLM", head_dim=32, hidden_act="gelu"),
    "phi3": cfg("phi3", "Phi3ForCausalLM"),
    "phi3-partial-rotary": cfg("phi3", "Phi3ForCausalLM", partial_rotary_factor=0.5, sliding_window=8),
    "gpt_neox": cfg("gpt_neox", "GPTNeoXForCausalLM", rotary_pct=0.25),
    "gpt_neox-sequential": cfg("gpt_neox", "GPTNeoXForCausalLM", rotary_pct=0.5,
                               use_parallel_residual=False),
    "mixtral": cfg("mixtral", "MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2),
    # head_dim != hidden / heads, so the per-head q/k norms have their own width.
    "qwen3": cfg("qwen3", "Qwen3ForCausalLM", head_dim=32),
    "qwen3-sliding": cfg("qwen3", "Qwen3ForCausalLM", num_hidden_layers=3, use_sliding_window=True,
                         sliding_window=8, max_window_layers=1, attention_bias=True),
    # Local layers (window 8, rotary base 10,000) and a global one (base 1e6, linear scaling x8).
    "gemma3": cfg("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=3, head_dim=16, sliding_window=8,
                  query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}}),
    "gemma3-softcap": cfg("gemma3_text", "Gemma3ForCausalLM", num_hidden_layers=2, head_dim=16, sliding_window=8,
                          final_logit_softcapping=1.5, attn_logit_softcapping=2.0),
    # Layer 1 dense (mlp_only_layers), layers 0 and 2 sparse; top-2 of 4 experts, renormalised.
    "qwen3_moe": cfg("qwen3_moe", "Qwen3MoeForCausalLM", num_hidden_layers=3, head_dim=16, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3_moe-step2": cfg("qwen3_moe", "Qwen3MoeForCausalLM", num_hidden_layers=2, head_dim=16, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2),
    # Layers 1 and 3 without rotary (NoPE); layer 2 with a sliding window.
    "smollm3": cfg("smollm3", "SmolLM3ForCausalLM", num_hidden_layers=4, no_rope_layer_interval=2,
                   use_sliding_window=True, sliding_window=8,
                   layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"]),
    "gptj": dict(model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=64, n_layer=2, n_head=4,
                 rotary_dim=8, vocab_size=256, n_positions=128, bos_token_id=1, eos_token_id=2),
    "cohere": cfg("cohere", "CohereForCausalLM", logit_scale=0.25, attention_bias=True),
    "olmo2": cfg("olmo2", "Olmo2ForCausalLM"),
    # Multipliers far from 1, so that each one shows.
    "granite": cfg("granite", "GraniteForCausalLM", embedding_multiplier=12.0, residual_multiplier=0.22,
                   attention_multiplier=0.05, logits_scaling=8.0),
    "starcoder2": cfg("starcoder2", "Starcoder2ForCausalLM", sliding_window=8),
    "starcoder2-no-bias": cfg("starcoder2", "Starcoder2ForCausalLM", use_bias=False, hidden_act="gelu"),
    "phi": cfg("phi", "PhiForCausalLM", num_key_value_heads=4, partial_rotary_factor=0.4),
    # Small caps so that both softcaps bend the values they cap.
    "gemma2": cfg("gemma2", "Gemma2ForCausalLM", num_hidden_layers=3, head_dim=16, sliding_window=8,
                  query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_family_matches_transformers(name):
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
    return [i.attrs["window"] for i in plan.program.instrs if i.kind == "attention"]


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
