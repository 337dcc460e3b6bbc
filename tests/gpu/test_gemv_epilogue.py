"""Issues #12 item 2 / #13 on a GPU: the decode GEMV with the gated activation after it in its epilogue
(codegen/gemv.py GemvSpec.epilogue: each warp's rows are (gate, up) pairs, it writes act(g) * u; fp8 weights:
codegen/gemv_fp8.py's "mma" kernel, 8 pairs a 16-row tile) against the plain GEMV of the whole fused weight
then the activation kernel, bit for bit (the same sums, the same roundings); and the cuda backend's decode
logits (CUDA graphs, llama, fp32, bf16 and fp8 weights, 1-4 sequences) with the fusion on
(runtime/cuda_backend.GEMV_EPILOGUE, KILN_GEMV_EPILOGUE; fp8 also cuda_quant.FP8_GEMV_EPILOGUE) against it
off, bit for bit. Outputs are poisoned
(NaN) first so an unwritten element fails."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("cuda.bindings")

from kiln.codegen import gemv as G  # noqa: E402
from kiln.codegen import gemv_fp8 as F8  # noqa: E402
from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.codegen.specs import ActSpec, KernelSpecError  # noqa: E402
from kiln.dsl.quant import QuantDesc, quantize_weight  # noqa: E402
from kiln.runtime import cuda_backend, cuda_quant  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend, random_model  # noqa: E402

from tests.gpu.test_cuda_backend import LLAMA, pair  # noqa: E402
from tests.gpu.test_gemv_prologue import _decode_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_seed")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (pairs n, k, gate_row, up_row, W's rows, bias, act): Llama-3-8B's gate+up; a few pairs with K split over
# a block's warps; the up rows first, padding rows between, a bias; pairs that end inside a warp
SHAPES = [(14336, 4096, 0, 14336, 28672, False, "silu"), (64, 4096, 0, 64, 128, False, "silu"),
          (100, 256, 104, 0, 204, True, "gelu_tanh"), (33, 1000, 0, 40, 73, True, "gelu")]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}_k{s[1]}_{s[6]}")
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_epilogue_equals_gemv_then_act_kernel(shape, T, dtype):
    n, k, g0, u0, rows, has_bias, act = shape
    dt = DT[dtype]
    epi = ActSpec(act, True, n, dtype=dtype)
    spec = G.spec_for(rows, k, dtype, has_bias, "test", epilogue=epi, halves=(g0, u0))
    w = (torch.randn(rows, k, device="cuda") / k**0.5).to(dt)
    b = torch.randn(rows, device="cuda").to(dt) if has_bias else None
    x = torch.randn(T, k, device="cuda").to(dt)
    y = torch.empty(T, rows, device="cuda", dtype=dt)
    G.gemv(G.spec_for(rows, k, dtype, has_bias, "test"), x, w, y, b)
    want = torch.empty(T, n, device="cuda", dtype=dt)
    K.activation(epi, want, gate=y[:, g0:g0 + n], up=y[:, u0:u0 + n])
    out = torch.full((T, n), float("nan"), device="cuda", dtype=dt)
    G.gemv(spec, x, w, out, b)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    # the same per-row sums as the plain GEMV with the same rows a warp and K slices, then act.cu.j2's roundings
    if (spec.rows, spec.ksplit) == G.choose(rows, k, dtype):
        assert torch.equal(out, want)
    else:  # rows a warp raised to 2 for the pairs: the same math, another fp32 summation order
        tol = 1e-5 if dtype == "fp32" else 2e-2
        assert float((out.float() - want.float()).norm() / want.float().norm()) < tol


# fp8: (pairs, k, gate_row, up_row, W's rows, bias); weight scale per tensor / per channel, activation
# scale measured or the checkpoint's
FP8_SHAPES = [(14336, 4096, 0, 14336, 28672, False), (40, 256, 48, 0, 96, True), (100, 1008, 0, 104, 204, True)]
FP8_MODES = [("per_tensor", "fp8_tensor", False), ("per_channel", "fp8_token", False),
             ("per_tensor", "fp8_tensor", True)]


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: f"n{s[0]}_k{s[1]}")
@pytest.mark.parametrize("layout, act, static", FP8_MODES)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fp8_epilogue_equals_gemv_then_act_kernel(shape, layout, act, static, dtype):
    n, k, g0, u0, rows, has_bias = shape
    dt = DT[dtype]
    w = quantize_weight(torch.randn(rows, k, device="cuda") / k**0.5, QuantDesc("fp8", layout, act=act,
                                                                                act_static=static))
    xs = torch.tensor(0.011, device="cuda") if static else None
    ws = w.scale.reshape(-1) if layout == "per_channel" else w.scale.reshape(())
    b = torch.randn(rows, device="cuda").to(dt) if has_bias else None
    x = (torch.randn(1, k, device="cuda") * 2).to(dt)
    plain = F8.spec_for(rows, k, dtype, has_bias, layout == "per_channel", static, "test", decode="mma")
    y = torch.empty(1, rows, device="cuda", dtype=dt)
    F8.gemv_fp8(plain, x, w.q, ws, y, b, xs)
    epi = ActSpec("silu", True, n, dtype=dtype)
    want = torch.empty(1, n, device="cuda", dtype=dt)
    K.activation(epi, want, gate=y[:, g0:g0 + n], up=y[:, u0:u0 + n])
    spec = F8.spec_for(rows, k, dtype, has_bias, layout == "per_channel", static, "test", decode="mma", epilogue=epi,
                       halves=(g0, u0))
    out = torch.full((1, n), float("nan"), device="cuda", dtype=dt)
    F8.gemv_fp8(spec, x, w.q, ws, out, b, xs)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    assert torch.equal(out, want)


def _epilogue_kernels():
    return [k for (spec, _), k in list(_loaded.items()) if isinstance(spec, G.GemvSpec) and spec.epilogue is not None]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_logits_with_the_epilogue_equal_without(dtype, monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)  # every decode step of <= 4 sequences, not only 1
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_backend, "GEMV_EPILOGUE", switch)
        _, cuda = pair("llama", LLAMA, dtype)
        outs[switch] = _decode_logits(cuda, "llama", dtype)
    assert _epilogue_kernels(), "the fused GEMV never ran"
    for off, on in zip(outs["0"], outs["1"]):
        assert torch.equal(on, off)


def test_fp8_decode_logits_with_the_epilogue_equal_without(monkeypatch):
    """fp8 weights (per-tensor, measured activation scale): one sequence's decode step through the fp8 "mma"
    GEMV with the epilogue; more sequences through cuBLASLt and the activation kernel either way."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization="fp8")
    monkeypatch.setattr(cuda_quant, "FP8_GEMV_EPILOGUE", "1")  # opt-in (slower on the H200: BENCHMARKS.md)
    launched = []
    real = F8.gemv_fp8

    def recording(spec, *args, **kw):  # the real launch, its spec noted
        launched.append(spec)
        return real(spec, *args, **kw)

    monkeypatch.setattr(F8, "gemv_fp8", recording)
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_backend, "GEMV_EPILOGUE", switch)
        cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                           ref.device)
        outs[switch] = _decode_logits(cuda, "llama", "bf16")
    assert any(s.epilogue is not None for s in launched), "the fused fp8 GEMV never ran"
    assert torch.equal(outs["1"][0], outs["0"][0])  # one sequence: the fused kernel against the two launches
    for off, on in zip(outs["0"][1:], outs["1"][1:]):  # cuBLASLt both ways (its algorithm may differ per instance)
        assert float((on - off).norm() / off.norm()) < 1e-2


def test_a_bad_epilogue_switch_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(cuda_backend, "GEMV_EPILOGUE", "yes")
    _, cuda = pair("llama", LLAMA, "bf16")
    with pytest.raises(KernelSpecError, match="KILN_GEMV_EPILOGUE='yes'"):
        _decode_logits(cuda, "llama", "bf16")
