"""Issue #13 on a GPU: the one-row fp8 GEMV's tensor-core variant with its weights streamed through a ring in
shared memory (codegen/gemv_fp8.py `stages`, templates/gemv_fp8_mma.cu.j2: cp.async copies instead of register
loads). It sums the same products in the same order as the register ring, so its outputs must be the same
bits: at Llama-3-8B's decode shapes and odd ones (K slices, a K tail, rows past the last tile), every
(rows, ksplit) at an odd shape, both epilogues (the gated activation, the rotary + KV write: through a whole
model's decode with KILN_FP8_GEMV_STAGES), and against QWeight.linear."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv_fp8 as G  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.runtime import cuda_quant  # noqa: E402
from kiln.runtime.model import random_model  # noqa: E402

from tests.gpu.test_gemv_fp8 import LLAMA, ODD, _decode, _weight, _x  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] + ODD + [(10576, 2560)]
# (stages, ring steps issued before the wait: 0 = all)
RINGS = [(3, 0), (4, 1), (6, 2), (8, 0), (8, 2), (12, 1), (12, 4)]


def _run(spec, w, x, b):
    out = torch.full((1, spec.n), float("nan"), device="cuda", dtype=x.dtype)
    G.gemv_fp8(spec, x, w.q, w.scale.reshape(-1) if spec.per_channel else w.scale.reshape(()), out, b,
               w.input_scale.float().reshape(()) if spec.static else None)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    return out


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("stages, pre", RINGS)
@pytest.mark.parametrize("layout, act, static", [("per_tensor", "fp8_tensor", False),
                                                 ("per_channel", "fp8_token", False),
                                                 ("per_tensor", "fp8_tensor", True)])
def test_ring_in_shared_memory_equals_the_register_ring(n, k, stages, pre, layout, act, static):
    w = _weight(n, k, layout, act, static)
    x = _x(k, torch.bfloat16)
    b = torch.randn(n, device="cuda").bfloat16()
    base = G.spec_for(n, k, "bf16", True, layout == "per_channel", static, "test",
                      torch.cuda.get_device_properties(0).multi_processor_count, "mma")
    spec = dataclasses.replace(base, stages=stages, pre=pre)
    if spec.smem > G.SMEM_MAX:
        pytest.skip("does not fit in shared memory (the spec refuses it)")
    out = _run(spec, w, x, b)
    assert torch.equal(out, _run(dataclasses.replace(base, stages=0), w, x, b))
    want = w.linear(x, b).float()
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("stages, pre", RINGS)
def test_every_rows_and_ksplit_with_the_ring(stages, pre):
    n, k = 203, 2064
    w = _weight(n, k, "per_channel", "fp8_token", False)
    x = _x(k, torch.bfloat16)
    b = torch.randn(n, device="cuda").bfloat16()
    for rows in G.MMA_ROWS:
        for ks in G.KSPLITS:
            base = G.Fp8GemvSpec(n, k, True, "bf16", "test", True, False, rows, ks, decode="mma")
            if dataclasses.replace(base, stages=0).smem + G.WARPS * stages * rows // 16 * 1024 > G.SMEM_MAX:
                continue
            out = _run(dataclasses.replace(base, stages=stages, pre=pre), w, x, b)
            assert torch.equal(out, _run(base, w, x, b)), (rows, ks)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("epilogue", ["0", "1"])
def test_decode_logits_with_the_ring_equal_without(scheme, epilogue, monkeypatch):
    """bf16 decode of one sequence (CUDA graph replays; the qkv GEMV's rotary epilogue on, the gate+up GEMV's
    gated one as `epilogue`): the same logits, bit for bit, with the ring of 8 steps (2 before the wait), and with x read
    once, as with the register ring."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization=scheme)
    monkeypatch.setattr(cuda_quant, "FP8_GEMV", "pdl")
    monkeypatch.setattr(cuda_quant, "FP8_GEMV_DECODE", "mma")
    monkeypatch.setattr(cuda_quant, "FP8_GEMV_EPILOGUE", epilogue)
    outs = {}
    for stages in ("0", "8", "x"):
        monkeypatch.setenv("KILN_FP8_GEMV_STAGES", "8" if stages == "8" else "0")
        monkeypatch.setenv("KILN_FP8_GEMV_PRE", "2" if stages == "8" else "0")
        monkeypatch.setenv("KILN_FP8_GEMV_XONCE", "1" if stages == "x" else "0")
        outs[stages] = _decode(ref)
    for (_, a), (_, b), (_, c) in zip(outs["0"], outs["8"], outs["x"]):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(isinstance(spec, G.Fp8GemvSpec) and spec.stages == 8 and spec.origin != "test" for spec, _ in _loaded)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("layout, act, static", [("per_tensor", "fp8_tensor", False),
                                                 ("per_channel", "fp8_token", False),
                                                 ("per_tensor", "fp8_tensor", True)])
def test_x_read_once_equals_twice(n, k, layout, act, static):
    """x_once (x's amax and quantization from one read into registers) against the two reads of the default."""
    w = _weight(n, k, layout, act, static)
    x = _x(k, torch.bfloat16)
    base = G.spec_for(n, k, "bf16", False, layout == "per_channel", static, "test",
                      torch.cuda.get_device_properties(0).multi_processor_count, "mma")
    out = _run(dataclasses.replace(base, x_once=True), w, x, None)
    assert torch.equal(out, _run(dataclasses.replace(base, x_once=False), w, x, None))
