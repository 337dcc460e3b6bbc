"""Calibrated fp8 KV cache scales on the cuda backend: a `kiln quantize --scheme fp8-kv`
checkpoint (tests/test_kv_scales.py builds it) run with --kv-cache-dtype fp8 gives the cuda
backend's KV store the checkpoint's per-site scales, and its logits match the reference
backend's with the same scales (both closer to the float cache than scale 1.0 is)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_applies_checkpoint_scales(tmp_path):
    from kiln.runtime.model import SingleSequence, load_model

    from tests.test_kv_scales import SEQ, build, err

    _, folder, _, ids, out = build(tmp_path)
    ids = ids[:SEQ]

    def run(path, backend, kv):
        loaded = load_model(path, backend=backend, device="cuda", kv_cache_dtype=kv)
        seq = SingleSequence(loaded, len(ids) + 1)
        logits = seq.step(ids, all_logits=True).float().cpu()
        return loaded, seq, logits

    _, _, ref = run(folder, "reference", "auto")
    loaded, seq, cuda = run(out, "cuda", "fp8")
    assert seq.kv.k_scale == [s.k_scale for s in loaded.plan.sites] != [1.0] * len(loaded.plan.sites)
    _, _, ref_fp8 = run(out, "reference", "fp8")
    _, _, cuda_unit = run(folder, "cuda", "fp8")
    # the same rounding as the reference's, up to values on a rounding boundary: far below the rounding's own error
    assert err(cuda, ref_fp8) < err(ref_fp8, ref) / 4, (err(cuda, ref_fp8), err(ref_fp8, ref))
    assert err(cuda, ref) < err(cuda_unit, ref) / 2
