"""Issue #13 on a GPU: the one-row fp8 GEMV's tensor-core variant with x read once into registers (codegen/gemv_fp8.py
`x_once`, KILN_FP8_GEMV_XONCE; templates/gemv_fp8_mma.cu.j2): its amax and quantization from that one read
instead of two. Same arithmetic, so the same bits as the default: at Llama-3-8B's and Mamba-2's decode shapes and
odd ones (K slices, K not a whole number of steps, rows past the last tile), per-tensor, per-channel and static
scales, and through a whole model's decode with both epilogues (the rotary + KV write, the gated activation)."""

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
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)] + ODD + [(10576, 2560), (2560, 5120)]


def _run(spec, w, x, b):
    out = torch.full((1, spec.n), float("nan"), device="cuda", dtype=x.dtype)
    G.gemv_fp8(spec, x, w.q, w.scale.reshape(-1) if spec.per_channel else w.scale.reshape(()), out, b,
               w.input_scale.float().reshape(()) if spec.static else None)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "output has NaNs: an element was never written"
    return out


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("layout, act, static", [("per_tensor", "fp8_tensor", False),
                                                 ("per_channel", "fp8_token", False),
                                                 ("per_tensor", "fp8_tensor", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_x_read_once_equals_twice_and_the_reference(n, k, layout, act, static, dtype):
    w = _weight(n, k, layout, act, static)
    x = _x(k, dtype)
    b = torch.randn(n, device="cuda").to(dtype)
    base = G.spec_for(n, k, "bf16" if dtype == torch.bfloat16 else "fp16", True, layout == "per_channel", static,
                      "test", torch.cuda.get_device_properties(0).multi_processor_count, "mma")
    out = _run(dataclasses.replace(base, x_once=True), w, x, b)
    assert torch.equal(out, _run(dataclasses.replace(base, x_once=False), w, x, b))
    want = w.linear(x, b).float()
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


def test_every_rows_and_ksplit_with_x_once():
    n, k = 203, 2064
    w = _weight(n, k, "per_channel", "fp8_token", False)
    x = _x(k, torch.bfloat16)
    b = torch.randn(n, device="cuda").bfloat16()
    for rows in G.MMA_ROWS:
        for ks in G.KSPLITS:
            base = G.Fp8GemvSpec(n, k, True, "bf16", "test", True, False, rows, ks, decode="mma")
            assert torch.equal(_run(dataclasses.replace(base, x_once=True), w, x, b), _run(base, w, x, b)), (rows, ks)


@pytest.mark.parametrize("scheme", ["fp8", "fp8-channel"])
@pytest.mark.parametrize("epilogue", ["0", "1"])
def test_decode_logits_with_x_once_equal_without(scheme, epilogue, monkeypatch):
    """bf16 decode of one sequence (CUDA graph replays; the qkv GEMV's rotary epilogue on, the gate+up GEMV's
    gated one as `epilogue`): the same logits, bit for bit, with KILN_FP8_GEMV_XONCE=1 as with 0."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization=scheme)
    monkeypatch.setattr(cuda_quant, "FP8_GEMV", "pdl")
    monkeypatch.setattr(cuda_quant, "FP8_GEMV_DECODE", "mma")
    monkeypatch.setattr(cuda_quant, "FP8_GEMV_EPILOGUE", epilogue)
    outs = {}
    for once in ("0", "1"):
        monkeypatch.setenv("KILN_FP8_GEMV_XONCE", once)
        outs[once] = _decode(ref)
    for (_, a), (_, b) in zip(outs["0"], outs["1"]):
        assert torch.equal(a, b)
    assert any(isinstance(spec, G.Fp8GemvSpec) and spec.x_once and spec.origin != "test" for spec, _ in _loaded)
