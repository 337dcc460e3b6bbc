"""`kiln eval perplexity`'s computation on the cuda backend: the same windows through the
generated kernels give the reference backend's perplexity, and a tiny KL divergence from it."""

from __future__ import annotations

import pytest
import torch
from kiln.dsl.loader import MODELS_DIR
from kiln.runtime.eval import evaluate
from kiln.runtime.model import random_model

from tests.configs import FAMILY_CONFIGS


@pytest.mark.parametrize("stride", [None, 16])
def test_cuda_perplexity_matches_reference(stride):
    spec, config = MODELS_DIR / "llama.kiln", FAMILY_CONFIGS["llama"]
    ref = random_model(spec, config, device="cuda", backend="reference")
    cuda = random_model(spec, config, device="cuda", backend="cuda")
    tokens = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    want = evaluate(ref, tokens, context=64, stride=stride)
    got = evaluate(cuda, tokens, context=64, stride=stride, base=ref)
    assert got.tokens == want.tokens
    assert got.ppl == pytest.approx(want.ppl, rel=1e-4)
    assert got.summary()["kl_max"] < 1e-5 and got.summary()["same_top"] == 1.0
