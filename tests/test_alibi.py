"""ALiBi (`attention(..., alibi=true)`): the slope rule against the three transformers
implementations, and the lowering to kernel specs.

transformers' eager Falcon adds the ALiBi bias twice (once in FalconAttention, once more through
the causal mask FalconModel builds with the bias folded in for sdpa), so the Falcon ALiBi configs
of tests/configs.py are verified (tests/test_architectures.py) against the sdpa path, which adds it
once, as Falcon's original code does (tests/configs.py HF_ATTENTION).
"""

from __future__ import annotations

import kiln.runtime.verify as verify_mod
import pytest
import torch
import transformers
from kiln.codegen.fuse import Exec, fuse
from kiln.dsl import check, load_spec
from kiln.dsl.ops.attention import alibi_slopes
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from tests.configs import FAMILY_CONFIGS, HF_ATTENTION


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


def test_falcon_alibi_configs_run_against_sdpa():
    """The Falcon ALiBi layouts are FAMILY_CONFIGS entries (tests/test_architectures.py verifies them,
    tests/gpu/test_cuda_backend.py runs them on the device), checked against transformers' sdpa path."""
    alibi = {n for n, c in FAMILY_CONFIGS.items() if c.get("model_type") == "falcon" and c.get("alibi")}
    assert alibi == {"falcon-alibi-rw", "falcon-alibi-mq", "falcon-alibi-new-arch"}
    assert all(HF_ATTENTION[n] == "sdpa" for n in alibi)


def test_falcon_eager_adds_alibi_twice_before_transformers_5_25():
    """Why the Falcon ALiBi configs are checked against sdpa: before transformers 5.25, eager added ALiBi
    twice and differed from sdpa (and from us; 5.24.0: 0.031 relative); 5.25.0 fixed it, and eager agrees."""
    from packaging.version import Version

    report = verify_mod.verify(FAMILY_CONFIGS["falcon-alibi-rw"], steps=2)
    if Version(transformers.__version__) >= Version("5.25.0"):
        assert report.max_rel < 1e-3
    else:
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
    falcon = check(load_spec("falcon"), FAMILY_CONFIGS["falcon-alibi-rw"])
    (_, d, _) = next(op for op in fuse(falcon, torch.float32, 16) if op.kind is Exec.ATTENTION).spec
    assert d.alibi_max == 8.0 and d.alibi_scale == pytest.approx(16 ** -0.5)
