"""ALiBi (`attention(..., alibi=true)`): the slope rule against the three transformers
implementations, Falcon's ALiBi layouts against transformers, and the lowering to kernel specs.

transformers' eager Falcon adds the ALiBi bias twice (once in FalconAttention, once more through
the causal mask FalconModel builds with the bias folded in for sdpa), so the Falcon ALiBi configs
are checked here against the sdpa path, which adds it once, as Falcon's original code does
(tests/test_architectures.py always builds transformers models with eager attention).
"""

from __future__ import annotations

import kiln.runtime.verify as verify_mod
import pytest
import torch
from kiln.codegen.fuse import Exec, fuse
from kiln.dsl import check, load_spec
from kiln.dsl.ops.attention import alibi_slopes
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from tests.configs import FAMILY_CONFIGS, cfg


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 40, 64, 71, 112])
def test_slopes_match_transformers(heads):
    ours = alibi_slopes(heads, 8.0)
    assert torch.allclose(ours, _get_alibi_slopes(heads, torch.device("cpu")), rtol=1e-6, atol=0)
    # MPT's table is slope * (key - (len - 1)); its last column but one is -slope
    mpt = build_mpt_alibi_tensor(heads, 4)[:, 0, -2]
    assert torch.allclose(ours, -mpt, rtol=1e-6, atol=0)
    # Falcon rounds the slopes to bfloat16 (exact for power-of-2 head counts)
    fal = falcon_alibi(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)[:, 0, 1]
    assert torch.allclose(ours.bfloat16().float(), fal, rtol=0, atol=0)


@pytest.mark.parametrize("alibi_max", [4, 8, 16])
def test_slopes_follow_alibi_bias_max(alibi_max):
    for heads in (4, 6, 32):
        mpt = build_mpt_alibi_tensor(heads, 4, alibi_bias_max=alibi_max)[:, 0, -2]
        assert torch.allclose(alibi_slopes(heads, float(alibi_max)), -mpt, rtol=1e-6, atol=0)


_REAL_HF = verify_mod.hf_random_model


def _sdpa_model(config, seed=0):
    model = _REAL_HF(config, seed)
    model.config._attn_implementation = "sdpa"  # FalconAttention reads it at each call
    return model


FALCON_ALIBI = {
    # falcon-rw-1b/7b: ALiBi, per-head QKV, sequential block, biases
    "falcon-rw": cfg("falcon", "FalconForCausalLM", alibi=True, multi_query=False, parallel_attn=False, bias=True),
    # ALiBi with multi_query + parallel_attn, 8 heads (Falcon rounds slopes to bfloat16, which is
    # exact only for power-of-2 head counts: every Falcon ALiBi checkpoint has one)
    "falcon-alibi-mq": cfg("falcon", "FalconForCausalLM", alibi=True, multi_query=True, parallel_attn=True,
                           num_attention_heads=8),
    # ALiBi with new_decoder_architecture (GQA, two LayerNorms)
    "falcon-alibi-new-arch": cfg("falcon", "FalconForCausalLM", alibi=True, new_decoder_architecture=True,
                                 num_kv_heads=2, num_attention_heads=8, bias=True),
}


@pytest.mark.parametrize("name", list(FALCON_ALIBI))
def test_falcon_alibi_matches_transformers_sdpa(name, monkeypatch):
    monkeypatch.setattr(verify_mod, "hf_random_model", _sdpa_model)
    report = verify_mod.verify(FALCON_ALIBI[name], steps=32)
    assert report.spec.endswith("falcon.kiln")
    assert report.ok(1e-4), f"{name}: max rel {report.max_rel}, tokens agree {report.tokens_agree}/33"


def test_falcon_eager_adds_alibi_twice():
    """Why the Falcon ALiBi configs are not in FAMILY_CONFIGS: eager differs from sdpa (and from us)."""
    report = verify_mod.verify(FALCON_ALIBI["falcon-rw"], steps=2)
    assert report.max_rel > 1e-3


@pytest.mark.parametrize("name", ["bloom", "mpt-6-heads", "falcon"])
def test_kernel_specs_carry_alibi(name):
    config = FAMILY_CONFIGS[name]
    plan = check(load_spec(name.split("-")[0]), config)
    attn = [op for op in fuse(plan, torch.float32, 16) if op.kind is Exec.ATTENTION]
    assert attn
    for op in attn:
        _, dspec, pspec = op.spec
        want = 0.0 if name == "falcon" else 8.0  # the FAMILY_CONFIGS falcon is the rotary one
        assert dspec.alibi_max == pspec.alibi_max == want
    falcon = check(load_spec("falcon"), FALCON_ALIBI["falcon-rw"])
    (_, d, _) = next(op for op in fuse(falcon, torch.float32, 16) if op.kind is Exec.ATTENTION).spec
    assert d.alibi_max == 8.0 and d.alibi_scale == pytest.approx(16 ** -0.5)
