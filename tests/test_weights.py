"""Bad checkpoints through the spec's mapping: each error names the tensor (or key) and file."""

from __future__ import annotations

import json

import pytest
import torch
from kiln.dsl import SpecError
from kiln.runtime.checkpoint import CheckpointError, save_safetensors_checkpoint
from kiln.runtime.model import load_model

CONFIG = dict(architectures=["LlamaForCausalLM"], hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=100,
              rms_norm_eps=1e-5)


def llama_tensors(cfg=CONFIG, dtype=torch.float32):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    t = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                  p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                  p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                  p + "mlp.down_proj.weight": (h, f)})
    return {k: torch.randn(s, dtype=dtype) for k, s in t.items()}


def test_good_checkpoint_loads_sharded(tmp_path):
    t = llama_tensors()
    save_safetensors_checkpoint(tmp_path, t, CONFIG, shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = load_model(tmp_path)
    assert m.plan.params["kv_heads"] == 2
    assert torch.equal(m.model.weights["layer.1.wk"], t["model.layers.1.self_attn.k_proj.weight"])
    assert set(m.model.weights) == {s.name for s in m.plan.weights.values() if s.source is not None}


def _error(tmp_path, tensors, config=CONFIG, exc=CheckpointError) -> str:
    save_safetensors_checkpoint(tmp_path, tensors, config)
    with pytest.raises(exc) as info:
        load_model(tmp_path)
    return str(info.value)


def test_missing_tensor(tmp_path):
    t = llama_tensors()
    del t["model.layers.1.mlp.up_proj.weight"]
    msg = _error(tmp_path, t)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in msg and str(tmp_path) in msg
    assert "layer.1.w_up" in msg


def test_wrong_shape(tmp_path):
    t = llama_tensors()
    t["model.layers.0.self_attn.k_proj.weight"] = torch.randn(32, 32)
    msg = _error(tmp_path, t)
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "model.safetensors" in msg
    assert "[32, 32]" in msg and "[16, 32]" in msg


def test_wrong_dtype(tmp_path):
    t = llama_tensors()
    t["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    msg = _error(tmp_path, t)
    assert "'model.norm.weight'" in msg and "int32" in msg and "model.safetensors" in msg


def test_unexpected_tensor(tmp_path):
    t = llama_tensors()
    t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    msg = _error(tmp_path, t)
    assert "unexpected tensor(s) 'model.layers.0.self_attn.q_norm.weight'" in msg


def test_truncated_file(tmp_path):
    save_safetensors_checkpoint(tmp_path, llama_tensors(), CONFIG)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert "model.safetensors" in str(info.value) and "truncated" in str(info.value).lower()


def test_config_key_missing(tmp_path):
    cfg = {k: v for k, v in CONFIG.items() if k != "intermediate_size"}
    msg = _error(tmp_path, llama_tensors(), cfg, exc=SpecError)
    assert "config.json: missing config key 'intermediate_size'" in msg
    assert str(tmp_path) in msg


def test_bad_config_json(tmp_path):
    save_safetensors_checkpoint(tmp_path, llama_tensors(), CONFIG)
    (tmp_path / "config.json").write_text('{"hidden_size": 32,\n "vocab_size": }')
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert "config.json" in str(info.value) and ":2:" in str(info.value)


def test_bf16_checkpoint_loads_in_fp32(tmp_path):
    t = llama_tensors(dtype=torch.bfloat16)
    save_safetensors_checkpoint(tmp_path, t, CONFIG)
    m = load_model(tmp_path, dtype="fp32")
    assert m.model.weights["embed"].dtype == torch.float32
    assert torch.equal(m.model.weights["embed"], t["model.embed_tokens.weight"].float())
    json.dumps(m.plan.params, default=str)
