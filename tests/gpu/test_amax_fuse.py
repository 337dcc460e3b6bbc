"""KILN_FP8_AMAX_FUSE=1 (runtime/cuda_quant.py AMAX_FUSE): the norm or activation kernel before an fp8 GEMM with a
dynamic per-tensor activation scale also writes the partial maxima of its output (NormSpec.amax / ActSpec.amax),
and the activation quantization folds them in one launch (quant_kernels.act_quant_fp8_folded) instead of its own
amax launch over x. Same maxima of the same stored values, so the same bits: kernel by kernel, and a random fp8
Llama's logits with the switch off and on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kiln.codegen import kernels as K  # noqa: E402
from kiln.codegen.launch import _loaded  # noqa: E402
from kiln.codegen.quant_kernels import act_quant_fp8_folded  # noqa: E402
from kiln.codegen.specs import ActSpec, KernelSpecError, NormSpec  # noqa: E402
from kiln.dsl.quant import QuantDesc, quantize_weight  # noqa: E402
from kiln.runtime import cuda_quant  # noqa: E402
from kiln.runtime.model import LoadedModel, make_backend, random_model  # noqa: E402

from tests.gpu.test_cuda_backend import LLAMA  # noqa: E402
from tests.gpu.test_quant_kernels import _decode_logits  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fp8_gemm(k: int):
    """An fp8 GEMM with a dynamic per-tensor activation scale (what takes the partial maxima)."""
    w = quantize_weight(torch.randn(64, k, device="cuda"), QuantDesc("fp8", "per_tensor", act="fp8_tensor"))
    return cuda_quant.prepare([w], [(0, 64)], dtype=torch.bfloat16)


def _produce(kind: str, dtype: str, T: int, amax, valid):
    """The producer kernel's output [T, k] (with its partial maxima into `amax` where given) and its spec."""
    dt = DT[dtype]
    if kind in ("rms_res", "layer_bias"):
        h = 4096 if kind == "rms_res" else 2048
        spec = NormSpec("rms" if kind == "rms_res" else "layer", h, 1e-5, has_bias=kind == "layer_bias",
                        has_residual=kind == "rms_res", dtype=dtype, amax=amax is not None, origin="test amax")
        x = (torch.randn(T, h, device="cuda") * 3).to(dt)
        w = (torch.rand(h, device="cuda") * 2).to(dt)
        out = torch.empty(T, h, dtype=dt, device="cuda")
        extra = dict(residual=torch.randn_like(x), residual_out=torch.empty_like(x)) if kind == "rms_res" else \
            dict(bias=torch.randn_like(w))
        if amax is not None:
            extra.update(amax=amax, valid_rows=valid)
        K.norm(spec, x, w, out, **extra)
        return out, spec
    F = 14336 if kind.startswith("swiglu") else 3072
    spec = ActSpec("silu" if kind.startswith("swiglu") else "gelu_tanh", kind.startswith("swiglu"), F, dtype=dtype,
                   variant="rows_stream" if kind.endswith("stream") else "rows", amax=amax is not None,
                   origin="test amax")
    out = torch.empty(T, F, dtype=dt, device="cuda")
    extra = dict(amax=amax, valid_rows=valid) if amax is not None else {}
    if spec.gated:
        K.activation(spec, out, x=(torch.randn(T, 2 * F, device="cuda") * 4).to(dt), **extra)
    else:
        K.activation(spec, out, x=(torch.randn(T, F, device="cuda") * 4).to(dt), **extra)
    return out, spec


@pytest.mark.parametrize("kind", ["rms_res", "layer_bias", "swiglu", "swiglu_stream", "gelu"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("T, valid", [(2, None), (37, None), (300, None), (8, 5), (8, 0)])
def test_folded_quantization_equals_its_own_amax_launch(kind, dtype, T, valid, fresh_seed):
    """The producer's partial maxima, folded, give the scale and fp8 bytes that QGemm.quantize_act's two launches
    give over the same output; rows past `valid` (a graph's padding, set to 1e30 after the producer ran) count
    in neither."""
    torch.manual_seed(T)
    n = torch.tensor([valid], dtype=torch.int32, device="cuda") if valid is not None else None
    probe, spec = _produce(kind, dtype, T, None, None)
    parts = torch.full((K.amax_parts(dataclasses.replace(spec, amax=True), T),), -1.0, device="cuda")  # all written
    torch.manual_seed(T)
    x, _ = _produce(kind, dtype, T, parts, n)
    assert torch.equal(x, probe)  # the same output with or without the maxima
    assert bool((parts >= 0).all())
    if valid is not None:
        x[valid:] = 1e30
    gemm = _fp8_gemm(x.shape[1])
    q_ref, s_ref = gemm.quantize_act(x, n)
    q = torch.empty_like(q_ref)
    s = torch.empty((), dtype=torch.float32, device="cuda")
    act_quant_fp8_folded(cuda_quant.ActQuantSpec("tensor", x.shape[1], False, dtype, "test amax",
                                                 cuda_quant.ACT_UNROLL), x, q, s, parts)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8)[:valid], q_ref.view(torch.uint8)[:valid])


def test_amax_specs_are_checked():
    with pytest.raises(KernelSpecError, match="amax"):
        NormSpec("rms", 4096, 1e-5, group=128, amax=True)
    with pytest.raises(KernelSpecError, match="amax"):
        ActSpec("silu", True, 14336, variant="flat", amax=True)
    out = torch.empty(4, 4096, dtype=torch.bfloat16, device="cuda")
    spec = NormSpec("rms", 4096, 1e-5, has_residual=False, amax=True, origin="test amax")
    w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(K.KernelArgError, match="amax"):
        K.norm(spec, torch.randn_like(out), w, out)  # no buffer for the maxima
    with pytest.raises(K.KernelArgError, match="amax"):
        K.norm(spec, torch.randn_like(out), w, out, amax=torch.empty(3, device="cuda"))  # one a row: 4


def test_fp8_logits_with_the_fused_amax_equal_without(monkeypatch):
    """One fp8 (dynamic per-tensor activations) backend, the switch off then on (the graphs dropped between): the
    same logits bit for bit, and with it on the norms and the SwiGLU run their amax kernels (two norms and one
    activation a layer feed an fp8 GEMM; the attention output does not)."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization="fp8")
    monkeypatch.setattr(cuda_quant, "AMAX_FUSE", "1")  # read when the backend is built (which steps write maxima)
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    specs = list(cuda.model._amax.values())
    layers = LLAMA["num_hidden_layers"]
    assert sum(isinstance(s, NormSpec) for s in specs) == 2 * layers
    assert sum(isinstance(s, ActSpec) for s in specs) == layers
    outs = {}
    for switch in ("0", "1"):
        monkeypatch.setattr(cuda_quant, "AMAX_FUSE", switch)
        cuda.model.drop_graphs()
        outs[switch] = _decode_logits(cuda, 3, seqs=3, steps=3)
    assert any(getattr(spec, "amax", False) for spec, _ in _loaded), "no amax kernel ran"
    for off, on in zip(outs["0"], outs["1"]):
        assert torch.equal(off, on)
