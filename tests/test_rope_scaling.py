"""Rope scaling `yarn` and `longrope` against transformers, op by op: how the specs read
Phi-3 / Qwen2 style configs, the frequencies and attention factor every backend bakes (reference,
cuda kernel constants, TensorRT tables), longrope's short/long choice by the step's longest
sequence, and what the TensorRT backend refuses. Whole models: tests/configs.py's phi3-longrope
and qwen2-yarn in tests/test_architectures.py; kernel tables: tests/test_kernels_compile.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from kiln.codegen import rope as kernel_rope
from kiln.codegen.specs import RopeCacheSpec
from kiln.dsl import check, load_spec
from kiln.dsl import rope as dsl_rope
from kiln.dsl.errors import SpecError
from kiln.dsl.ops import OpKind, trt_unsupported
from kiln.dsl.ops.rope import ROPE, kernel_constants
from kiln.dsl.ops.rope import _scaling as resolved

from tests.configs import FAMILY_CONFIGS, cfg

SHORT = [1.0 + 0.013 * i for i in range(48)]
LONG = [1.0 + 0.71 * i for i in range(48)]


def phi3_128k(**over) -> dict:
    """Phi-3-mini-128k's rope layout: head_dim 96, original_max_position_embeddings at the top level."""
    base = dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})
    return cfg("phi3", "Phi3ForCausalLM", **{**base, **over})


def ropes(spec: str, config: dict, via_hf: bool = False):
    """The plan's rope instructions for a hub-style config.json (via_hf: as transformers saves it)."""
    if via_hf:
        config = transformers.AutoConfig.for_model(**config).to_dict()
    plan = check(load_spec(spec), config)
    return [i for i in plan.program.instrs if i.kind == OpKind.ROPE]


def hf_rotary(config: dict):
    """transformers' rotary module of the config's model class, as its model builds it."""
    hf_cfg = transformers.AutoConfig.for_model(**config)
    model_cls = getattr(transformers, config["architectures"][0])
    module = __import__(model_cls.__module__, fromlist=["x"])
    name = next(n for n in dir(module) if n.endswith("RotaryEmbedding"))
    return getattr(module, name)(hf_cfg)


def kernel_spec(ins) -> RopeCacheSpec:
    return RopeCacheSpec(32, 32, ins.attrs.head_dim, page_size=16, **kernel_constants(ins.attrs))


@pytest.mark.parametrize("config", [phi3_128k(), phi3_128k(rope_theta=250000.0, partial_rotary_factor=0.75)],
                         ids=["phi3-128k", "partial"])
def test_phi3_longrope_matches_hf_rotary(config):
    if config.get("partial_rotary_factor"):
        n = int(96 * 0.75) // 2
        config["rope_scaling"] = dict(config["rope_scaling"], short_factor=SHORT[:n], long_factor=LONG[:n])
    ins = ropes("phi3", config)[0]
    spec = kernel_spec(ins)
    rot = hf_rotary(config)
    assert spec.scaling == "longrope" and spec.original_max_position == 4096 and spec.factor == 32.0
    assert spec.attention_factor == rot.attention_scaling  # sqrt(1 + ln 32 / ln 4096)
    x = torch.zeros(1, 1, 96)
    for last, long in ((4095, False), (4096, True), (100000, True)):
        cos, _ = rot(x, torch.tensor([[0, last]]))  # transformers: max(position_ids) + 1 picks the table
        ours = kernel_rope.step_inv_freq(spec, last + 1)
        assert torch.equal(ours, rot.inv_freq)  # transformers' choice for this forward
        assert torch.equal(ours, dsl_rope.inv_freq(spec.rotary_dim, spec.theta, resolved(ins.attrs), last + 1))
        assert torch.equal(ours, kernel_rope.long_inv_freq(spec) if long else kernel_rope.inv_freq(spec))
        want = torch.cat([last * ours, last * ours]).cos() * rot.attention_scaling
        assert torch.equal(cos[0, 1], want)


def test_top_level_original_wins_and_su_is_longrope():
    """Phi-3 keeps original_max_position_embeddings outside rope_scaling; transformers prefers it."""
    config = phi3_128k(rope_scaling={"type": "su", "short_factor": SHORT, "long_factor": LONG,
                                     "original_max_position_embeddings": 999})
    spec = kernel_spec(ropes("phi3", config)[0])
    assert spec.scaling == "longrope" and spec.original_max_position == 4096
    # Phi3Config's default when config.json has none: 4096
    del config["original_max_position_embeddings"]
    assert kernel_spec(ropes("phi3", config)[0]).original_max_position == 4096


@pytest.mark.parametrize("rope_scaling, match", [
    ({"rope_type": "longrope", "short_factor": SHORT}, "needs 'long_factor'"),
    ({"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG[:-1]}, "differ in length"),
    ({"rope_type": "longrope", "short_factor": SHORT[:8], "long_factor": LONG[:8]}, "rotary_dim / 2 = 48"),
    ({"rope_type": "yarn", "factor": "4"}, "'factor' is '4'"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, "'truncate'"),
])
def test_bad_rope_scaling_is_a_spec_error(rope_scaling, match):
    with pytest.raises(SpecError, match=match):
        ropes("phi3" if rope_scaling["rope_type"] == "longrope" else "qwen2",
              phi3_128k(rope_scaling=rope_scaling) if rope_scaling["rope_type"] == "longrope"
              else cfg("qwen2", "Qwen2ForCausalLM", rope_scaling=rope_scaling))


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "truncate": False},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0,
     "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.75},  # original: max_position_embeddings
])
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_yarn_matches_hf_rotary(family, rope_scaling):
    config = cfg(family, FAMILY_CONFIGS[family]["architectures"][0], rope_theta=1e6, rope_scaling=rope_scaling)
    ins = ropes(family, config)[0]
    spec = kernel_spec(ins)
    rot = hf_rotary(config)
    assert spec.scaling == "yarn" and spec.attention_factor == rot.attention_scaling
    assert torch.equal(kernel_rope.inv_freq(spec), rot.inv_freq)
    # the reference op: cos / sin scaled by the attention factor in float32, like transformers
    x = torch.randn(5, 64)
    pos = torch.tensor([0, 1, 7, 40, 127])
    ctx = SimpleNamespace(positions=pos, seq_len=torch.full((5,), 128))
    got = ROPE.reference(ctx, SimpleNamespace(attrs=ins.attrs), [x])
    cos, sin = rot(x, pos[None])
    mod = __import__(type(rot).__module__, fromlist=["x"])
    q = x.view(1, 5, 4, 16).transpose(1, 2)
    want, _ = mod.apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(got, want.transpose(1, 2).reshape(5, 64))


def test_longrope_reference_picks_by_the_steps_longest_sequence():
    """A packed step of a 3-token and a 20-token sequence (original 16): one table for the step, the
    long one, as transformers (max(position_ids) + 1) and the cuda kernel (its seq_len) choose."""
    config = FAMILY_CONFIGS["phi3-longrope"]
    ins = ropes("phi3", config, via_hf=True)[0]
    rot = hf_rotary(config)
    pos = torch.cat([torch.arange(3), torch.arange(20)])
    x = torch.randn(23, 64)
    ctx = SimpleNamespace(positions=pos, seq_len=torch.tensor([3] * 3 + [20] * 20))
    got = ROPE.reference(ctx, SimpleNamespace(attrs=ins.attrs), [x])
    cos, sin = rot(x, pos[None])
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    q = x.view(1, 23, 4, 16).transpose(1, 2)
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)
    assert torch.equal(got, want.transpose(1, 2).reshape(23, 64))
    spec = kernel_spec(ins)
    assert torch.equal(rot.inv_freq, kernel_rope.step_inv_freq(spec, 20))


def test_tensorrt_refuses_longrope_takes_yarn():
    (lr,) = {trt_unsupported(i) for i in ropes("phi3", FAMILY_CONFIGS["phi3-longrope"], via_hf=True)}
    assert "longrope" in lr and "original_max_position_embeddings" in lr
    assert {trt_unsupported(i) for i in ropes("qwen2", FAMILY_CONFIGS["qwen2-yarn"], via_hf=True)} == {None}


def test_yarn_tensorrt_network_matches_reference(tmp_path):
    """A yarn engine's network (its cos/sin table carries the attention factor) against the reference."""
    tb = pytest.importorskip("tests.test_trt_build")  # skips without TensorRT
    from kiln.dsl.loader import MODELS_DIR
    from kiln.runtime.build import build
    from kiln.runtime.kv_store import KVStore
    from kiln.runtime.model import load_model
    from kiln.runtime.trt_backend import step_inputs

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    config = transformers.AutoConfig.for_model(**FAMILY_CONFIGS["qwen2-yarn"])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(ckpt)
    out = build(MODELS_DIR / "qwen2.kiln", ckpt, tmp_path / "engine", dtype="fp32", **tb.SMALL)
    ref = load_model(ckpt, MODELS_DIR / "qwen2.kiln")
    _, net, _ = tb._network(out, tb._engine_weights(out, ref.plan))
    pages = 2 * 64 // 4
    kv_ref = KVStore(ref.plan.sites, pages, 4, torch.float32)
    kv_trt = KVStore(ref.plan.sites, pages, 4, torch.float32)
    tables = [(3, 7, 1, 20, 11, 5), (2, 9, 0, 14, 22, 8)]
    for batch in tb._steps(ref.plan.vocab_size, tables):
        want = ref.model.forward(batch, kv_ref, all_logits=True)
        feed = step_inputs(batch, 4, pages, bool(ref.plan.sites), all_logits=True)
        for i in range(len(ref.plan.sites)):
            feed[f"k_cache.{i}"], feed[f"v_cache.{i}"] = kv_trt.k[i], kv_trt.v[i]
        got = tb.run_network(tb.T, net, feed)["logits"]
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4
    # the network's table, as written: the attention factor is in it
    text = (out / "network.py").read_text()
    assert "'yarn'" in text and "attention_factor=1.1386294361" in text
