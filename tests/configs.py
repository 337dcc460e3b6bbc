"""Small model configs shared by the tests: one or more per family, with random weights in the
tests (tests/test_architectures.py checks each spec against its transformers class with them,
tests/gpu/test_cuda_backend.py the cuda backend against the reference backend), and the larger
Llama and GPT-2 ones of tests/test_verify.py. FAMILY_CONFIGS keys are spec names (models/NAME.kiln),
with a "-variant" suffix for a second config of the same spec; each config turns on what makes its
family differ (a sliding window shorter than the tests' sequences, partial rotary, softcaps, ...)."""

from __future__ import annotations

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # ids inside the small vocab
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256, max_position_embeddings=128, **TOKENS)


def cfg(model_type: str, arch: str, **over) -> dict:
    return dict(SMALL, model_type=model_type, architectures=[arch], **over)


FAMILY_CONFIGS = {
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
    # Both softcaps null: off (a missing key would mean transformers' defaults, 50.0 and 30.0).
    "gemma2-no-softcap": cfg("gemma2", "Gemma2ForCausalLM", num_hidden_layers=2, head_dim=16, sliding_window=8,
                             attn_logit_softcapping=None, final_logit_softcapping=None),
    # ---- families needing norm variants, relu2, per-token scalars (olmo, nemotron, stablelm, qwen2_moe)
    # Non-parametric LayerNorms; with clip_qkv small enough that the clamp bites.
    "olmo": cfg("olmo", "OlmoForCausalLM", attention_bias=True),
    "olmo-clip": cfg("olmo", "OlmoForCausalLM", clip_qkv=0.05),
    # layernorm1p, relu2, rotary on half of each head (the default); biases everywhere in the second.
    "nemotron": cfg("nemotron", "NemotronForCausalLM", head_dim=32),
    "nemotron-bias": cfg("nemotron", "NemotronForCausalLM", attention_bias=True, mlp_bias=True,
                         partial_rotary_factor=0.25, num_key_value_heads=4),
    # Rotary on a quarter of each head (the default); q/k/v biases and the parallel residual in the second.
    "stablelm": cfg("stablelm", "StableLmForCausalLM"),
    "stablelm-parallel": cfg("stablelm", "StableLmForCausalLM", use_qkv_bias=True, use_parallel_residual=True,
                             partial_rotary_factor=0.5),
    # qk_layernorm: a LayerNorm per head of q and of k, one checkpoint tensor per head; GQA (4 q, 2 kv heads).
    "stablelm-qknorm": cfg("stablelm", "StableLmForCausalLM", qk_layernorm=True, use_qkv_bias=True),
    # Shared expert with its [T, 1] sigmoid gate; layer 1 dense (mlp_only_layers); top-2 of 4 experts,
    # not renormalised; q/k/v biases.
    "qwen2_moe": cfg("qwen2_moe", "Qwen2MoeForCausalLM", num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=[1]),
    # Renormalised top-2, experts on every second layer, no q/k/v biases, sliding window on layer 0.
    "qwen2_moe-step2": cfg("qwen2_moe", "Qwen2MoeForCausalLM", num_hidden_layers=2, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                           norm_topk_prob=True, decoder_sparse_step=2, qkv_bias=False, use_sliding_window=True,
                           sliding_window=8, max_window_layers=1),
    # ---- families needing rope scaling yarn / longrope
    # Phi-3 128k style longrope: short factors up to 16 tokens (original_max_position_embeddings at the
    # top level, as Phi-3 has it), long ones after (the switch falls in the decode steps, as transformers
    # switches per forward), cos and sin scaled by sqrt(1 + ln(128 / 16) / ln 16).
    "phi3-longrope": cfg("phi3", "Phi3ForCausalLM", original_max_position_embeddings=16,
                         rope_scaling={"rope_type": "longrope",
                                       "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.8],
                                       "long_factor": [1.0, 1.3, 1.9, 2.7, 4.0, 6.5, 9.0, 12.0]}),
    # YaRN x4 from 32 positions: frequencies blended across the correction range, attention factor
    # 0.1 ln 4 + 1 on cos and sin.
    "qwen2-yarn": cfg("qwen2", "Qwen2ForCausalLM", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 32}),
    # ---- families needing ALiBi (bloom, mpt, falcon)
    # 6 heads: not a power of 2, so the slopes interleave a second geometric series (BLOOM's rule).
    "bloom": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=96, n_layer=2, n_head=6,
                  vocab_size=256, **TOKENS),
    "bloom-post-ln-residual": dict(model_type="bloom", architectures=["BloomForCausalLM"], hidden_size=64, n_layer=2,
                                   n_head=4, vocab_size=256, apply_residual_connection_post_layernorm=True,
                                   tie_word_embeddings=False, **TOKENS),
    # clip_qkv small enough to clamp many projections; softmax_scale != head_dim^-0.5.
    "mpt": dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=64, n_layers=2, n_heads=4, vocab_size=256,
                max_seq_len=128, attn_config={"clip_qkv": 0.1}, **TOKENS),
    "mpt-6-heads": dict(model_type="mpt", architectures=["MptForCausalLM"], d_model=96, n_layers=2, n_heads=6,
                        vocab_size=256, max_seq_len=128, attn_config={"softmax_scale": 0.2}, **TOKENS),
    # Falcon with rotary: falcon-7b (multi_query, parallel_attn), falcon-40b/180b
    # (new_decoder_architecture: GQA, ln_attn + ln_mlp), the same with one LayerNorm, and falcon-rw's
    # sequential block with biases, here with rotary. The ALiBi layouts follow them.
    "falcon": cfg("falcon", "FalconForCausalLM", multi_query=True, parallel_attn=True, bias=False),
    "falcon-new-arch": cfg("falcon", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2,
                           multi_query=False, bias=False),
    "falcon-new-arch-1ln": cfg("falcon", "FalconForCausalLM", new_decoder_architecture=True, num_kv_heads=2,
                               num_ln_in_parallel_attn=1, bias=True, rope_theta=500.0, ffn_hidden_size=96),
    "falcon-sequential": cfg("falcon", "FalconForCausalLM", multi_query=False, parallel_attn=False, bias=True,
                             num_key_value_heads=4, tie_word_embeddings=False),
    # Falcon with ALiBi, checked against transformers' sdpa attention (HF_ATTENTION): its eager path adds
    # the bias twice. falcon-rw-1b/7b: per-head QKV, sequential block, biases.
    "falcon-alibi-rw": cfg("falcon", "FalconForCausalLM", alibi=True, multi_query=False, parallel_attn=False,
                           bias=True),
    # multi_query + parallel_attn, 8 heads (Falcon rounds the slopes to bfloat16, exact only for
    # power-of-2 head counts: every Falcon ALiBi checkpoint has one).
    "falcon-alibi-mq": cfg("falcon", "FalconForCausalLM", alibi=True, multi_query=True, parallel_attn=True,
                           num_attention_heads=8),
    # new_decoder_architecture (GQA, two LayerNorms).
    "falcon-alibi-new-arch": cfg("falcon", "FalconForCausalLM", alibi=True, new_decoder_architecture=True,
                                 num_kv_heads=2, num_attention_heads=8, bias=True),
    # ---- MoE routers and latent attention (deepseek_v2, deepseek_v3, phimoe)
    # MLA with q_lora_rank (v heads 12 wide, q/k heads 8 + 8: attention in Torch on the cuda backend); layer 0 dense (first_k_dense_replace);
    # 8 experts in 4 groups, top-3 of the best 2 groups by their best expert (group_limited_greedy),
    # times routed_scaling_factor; 2 shared experts.
    "deepseek_v2": cfg("deepseek_v2", "DeepseekV2ForCausalLM", num_hidden_layers=3, num_key_value_heads=4,
                       q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                       n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=2,
                       first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                       routed_scaling_factor=1.5),
    # No q_lora_rank (one q projection; v and q/k heads both 16: the attention kernels), greedy top-2, biases on the attention projections, YaRN x4
    # with mscale_all_dim (the softmax scale grows by mscale^2 too).
    "deepseek_v2-no-q-lora": cfg("deepseek_v2", "DeepseekV2ForCausalLM", num_key_value_heads=4, q_lora_rank=None,
                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                                 n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 n_shared_experts=1, attention_bias=True,
                                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 32, "mscale": 1.0,
                                                  "mscale_all_dim": 1.0}),
    # Sigmoid scores, 8 experts in 4 groups scored by their best two, top-3 of the best 2 groups
    # (noaux_tc), renormalised, times 2.5; interleaved rotary; layer 0 dense.
    "deepseek_v3": cfg("deepseek_v3", "DeepseekV3ForCausalLM", num_hidden_layers=3, num_key_value_heads=4,
                       q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                       n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    # Rotate-half rotary (rope_interleave false), not renormalised, one group, no q_lora_rank.
    "deepseek_v3-half-rope": cfg("deepseek_v3", "DeepseekV3ForCausalLM", num_key_value_heads=4, q_lora_rank=None,
                                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
                                 n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                                 norm_topk_prob=False, rope_interleave=False),
    # PhiMoE: sparsemixer top-2 of 4 experts (router_jitter_noise large enough that the softmax covers
    # several experts), LayerNorms with biases, biases on the attention projections and the LM head,
    # sliding window.
    "phimoe": cfg("phimoe", "PhimoeForCausalLM", num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3,
                  attention_bias=True, lm_head_bias=True, sliding_window=8),
    # Longrope x2 from 64 positions with short_mscale = long_mscale = 1.3 (not longrope's own attention
    # factor), the default jitter 0.01. The whole run stays within the original 64 positions, on the short
    # factors: past them transformers 5 keeps PhiMoE on the short factors, the spec (as Phi-3) switches.
    "phimoe-longrope": cfg("phimoe", "PhimoeForCausalLM", num_local_experts=4, num_experts_per_tok=2,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64,
                                            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0],
                                            "long_factor": [1.0, 1.5, 2.2, 3.1, 4.5, 6.4, 9.0, 12.0],
                                            "short_mscale": 1.3, "long_mscale": 1.3}),
    # ---- state-space models (tests/test_ssm.py runs them through the engine too)
    # Mamba-1: a head per channel, A_log [d_inner, d_state]; conv kernel 4 (a rolling state of 3 tokens).
    "mamba": dict(model_type="mamba", architectures=["MambaForCausalLM"], hidden_size=64, num_hidden_layers=2,
                  vocab_size=256, state_size=8, expand=2, conv_kernel=4, time_step_rank=8, **TOKENS),
    # Projection biases, no conv bias, an untied head, conv kernel 3.
    "mamba-bias": dict(model_type="mamba", architectures=["MambaForCausalLM"], hidden_size=64, num_hidden_layers=2,
                       vocab_size=256, state_size=4, expand=2, conv_kernel=3, use_bias=True, use_conv_bias=False,
                       tie_word_embeddings=False, **TOKENS),
    # Mamba-2 (SSD): 8 heads of 16 in 2 groups of B/C, the gated RMSNorm per group.
    "mamba2": dict(model_type="mamba2", architectures=["Mamba2ForCausalLM"], hidden_size=64, num_hidden_layers=2,
                   vocab_size=256, state_size=8, num_heads=8, head_dim=16, n_groups=2, expand=2, conv_kernel=4,
                   chunk_size=8, **TOKENS),
    # Jamba: attention on layers 1 and 3 (no rotary, GQA), Mamba on 0 and 2; top-2 of 4 experts on odd layers.
    "jamba": cfg("jamba", "JambaForCausalLM", num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                 attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                 mamba_d_state=8, mamba_dt_rank=8),
}


# The transformers attention implementation a FAMILY_CONFIGS entry is checked against where it is not
# "eager" (the default of kiln.runtime.verify): transformers' eager Falcon adds the ALiBi bias twice
# (in FalconAttention, and again through the causal mask FalconModel builds with the bias folded in
# for sdpa); its sdpa path adds it once, as Falcon's original code does (tests/test_alibi.py shows both).
HF_ATTENTION = {name: "sdpa" for name in FAMILY_CONFIGS if name.startswith("falcon-alibi")}


# tests/test_verify.py: wider and deeper than FAMILY_CONFIGS' (Llama with llama3 rope scaling).
VERIFY_LLAMA = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
    max_position_embeddings=128,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16},
)
VERIFY_GPT2 = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=128, n_layer=3, n_head=4,
                   vocab_size=500, n_positions=128, bos_token_id=0, eos_token_id=0)

# Rotary + KV write kernel cases (RopeCacheSpec fields): Llama-3's (llama3 scaling), partial rotary, interleaved with
# dynamic NTK, none, longrope, partial with an attention factor (yarn's): every rotary path the kernels have
ROPE_CASES = [
    dict(heads=32, kv_heads=8, head_dim=128, rotary_dim=128, layout="half", scaling="llama3", factor=8.0,
         original_max_position=8192, theta=500000.0),
    dict(heads=32, kv_heads=32, head_dim=80, rotary_dim=32, layout="half", scaling="none"),
    dict(heads=8, kv_heads=4, head_dim=256, rotary_dim=128, layout="interleaved", scaling="dynamic", factor=2.0,
         original_max_position=4096),
    dict(heads=12, kv_heads=12, head_dim=64, rotary_dim=0),
    dict(heads=8, kv_heads=2, head_dim=64, rotary_dim=32, layout="interleaved", scaling="longrope", factor=8.0,
         original_max_position=16, short_factor=(1.0,) * 16, long_factor=tuple(range(1, 17))),
    dict(heads=4, kv_heads=2, head_dim=128, rotary_dim=96, layout="half", attention_factor=1.25),
]
