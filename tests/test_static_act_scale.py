"""random_model's act_scale (`bench throughput --fp8-act-scale`): an fp8 scheme's activations quantized with one
static per-tensor scale, as a checkpoint's calibrated input_scale would have them (the path the cuda backend's
KILN_FP8_OUT_FUSE speeds up), on the reference backend: every quantized linear carries it, its logits are those of
dsl/quant.py's static arithmetic, and other schemes or bad scales are refused by name."""

from __future__ import annotations

import pytest
import torch
from kiln.dsl.quant import QWeight
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model

from tests.configs import FAMILY_CONFIGS

LLAMA = FAMILY_CONFIGS["llama"]


def _logits(m) -> torch.Tensor:
    tokens = torch.arange(3, 40) % LLAMA["vocab_size"]
    batch = StepBatch(tokens, [SeqSlice(0, len(tokens), 0, (0, 1, 2))])
    with torch.no_grad():
        return m.model.forward(batch, KVStore(m.plan.sites, 4, 16, m.dtype), all_logits=True)


def test_every_fp8_linear_takes_the_static_scale():
    m = random_model("llama", LLAMA, quantization="fp8", act_scale=0.05)
    quantized = [w for w in m.model.weights.values() if isinstance(w, QWeight)]
    assert len(quantized) == 7 * LLAMA["num_hidden_layers"]
    assert all(w.desc.act_static and float(w.input_scale) == pytest.approx(0.05) for w in quantized)
    assert all(s.quant.act_static for s in m.plan.weights.values() if s.quant.quantized)
    dynamic = random_model("llama", LLAMA, quantization="fp8")
    # the same weights, their activations scaled otherwise: close, not equal
    a, b = _logits(m), _logits(dynamic)
    assert not torch.equal(a, b) and float((a - b).norm() / b.norm()) < 0.1
    # a scale so large every activation rounds to zero: the linears' outputs vanish, the logits change
    assert not torch.allclose(_logits(random_model("llama", LLAMA, quantization="fp8", act_scale=1e30)), a)


@pytest.mark.parametrize("quantization, scale, match", [("int8-wo", 0.05, "fp8 weights with per-tensor"),
                                                        ("fp8-channel", 0.05, "fp8 weights with per-tensor"),
                                                        ("none", 0.05, "fp8 weights with per-tensor"),
                                                        ("fp8", 0.0, "positive finite"),
                                                        ("fp8", float("nan"), "positive finite")])
def test_other_schemes_and_bad_scales_are_refused(quantization, scale, match):
    with pytest.raises(ValueError, match=match):
        random_model("llama", LLAMA, quantization=quantization, act_scale=scale)
