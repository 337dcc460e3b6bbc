"""Norm and activation kernels that write an fp8 GEMM's input themselves (NormSpec / ActSpec `fp8_out`, the cuda
backend's KILN_FP8_OUT_FUSE): for a GEMM with a static per-tensor activation scale, the kernel stores each value
divided by that scale as e4m3 instead of the run dtype. The bytes equal storing the run dtype, then quantizing it
as the GEMM would (dsl/quant.py's arithmetic); through a whole model, the logits equal those without the fusion."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kiln.codegen import kernels as K
from kiln.codegen.kernels import KernelArgError
from kiln.codegen.specs import ActSpec, NormSpec
from kiln.dsl.quant import QWeight
from kiln.runtime import cuda_quant
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend, random_model

from tests.gpu.test_cuda_backend import LLAMA, rel

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# scales: ordinary, one that saturates most values (+-448), one that sends most to subnormals or zero
SCALES = [0.037, 1e-4, 30.0]


def _quantized(out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """out as the GEMM quantizes it with a static scale (QGemm.quantize_act_torch), as bytes."""
    return (out.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("hidden, residual, kind", [(4096, True, "rms"), (576, False, "rms"), (1024, True, "layer")])
@pytest.mark.parametrize("T", [2, 7, 300])
def test_norm_fp8_out_is_the_quantized_norm(dtype, hidden, residual, kind, T):
    dt = DT[dtype]
    plain = NormSpec(kind, hidden, 1e-5, has_bias=kind == "layer", has_residual=residual, dtype=dtype, origin="test")
    fused = dataclasses.replace(plain, fp8_out=True)
    x = (torch.randn(T, hidden, device="cuda") * 3).to(dt)
    r = torch.randn(T, hidden, device="cuda").to(dt) if residual else None
    w = torch.randn(hidden, device="cuda").to(dt)
    b = torch.randn(hidden, device="cuda").to(dt) if kind == "layer" else None
    want = torch.empty(T, hidden, device="cuda", dtype=dt)
    res = dict(residual=r, residual_out=torch.empty_like(x)) if residual else {}
    K.norm(plain, x, w, want, bias=b, **res)
    for s in SCALES:
        scale = torch.tensor(s, device="cuda")
        got = torch.empty(T, hidden, device="cuda", dtype=torch.float8_e4m3fn)
        res2 = dict(residual=r, residual_out=torch.empty_like(x)) if residual else {}
        K.norm(fused, x, w, got, bias=b, out_scale=scale, **res2)
        assert torch.equal(got.view(torch.uint8), _quantized(want, scale)), f"scale {s}"
        if residual:
            assert torch.equal(res2["residual_out"], res["residual_out"])
    with pytest.raises(KernelArgError, match="out_scale"):
        K.norm(fused, x, w, got, bias=b, **res)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("kind, gated, features", [("silu", True, 14336), ("silu", True, 1536), ("gelu", False, 5120)])
@pytest.mark.parametrize("variant", ["rows", "rows_stream"])
@pytest.mark.parametrize("T", [2, 9, 300])
def test_activation_fp8_out_is_the_quantized_activation(dtype, kind, gated, features, variant, T):
    dt = DT[dtype]
    plain = ActSpec(kind, gated, features, dtype=dtype, variant=variant, origin="test")
    fused = dataclasses.replace(plain, fp8_out=True)
    x = (torch.randn(T, 2 * features if gated else features, device="cuda") * 4).to(dt)
    want = torch.empty(T, features, device="cuda", dtype=dt)
    K.activation(plain, want, x=x)
    for s in SCALES:
        scale = torch.tensor(s, device="cuda")
        got = torch.empty(T, features, device="cuda", dtype=torch.float8_e4m3fn)
        K.activation(fused, got, x=x, out_scale=scale)
        assert torch.equal(got.view(torch.uint8), _quantized(want, scale)), f"scale {s}"


def _static_fp8(scale: float = 0.05):
    """The small Llama with fp8 weights quantized on load, made static: every linear's activations quantized
    with one given scale (as a ModelOpt or compressed-tensors static checkpoint's input_scale)."""
    ref = random_model("models/llama.kiln", dict(LLAMA), dtype="bf16", device="cuda", seed=0, quantization="fp8")
    for w in ref.model.weights.values():
        if isinstance(w, QWeight) and w.desc.dtype == "fp8":
            w.desc = dataclasses.replace(w.desc, act_static=True)
            w.input_scale = torch.tensor(scale, device="cuda")
    return ref


def test_static_fp8_model_logits_equal_without_the_fusion(monkeypatch):
    monkeypatch.setattr(cuda_quant, "FP8_OUT_FUSE", "1")
    ref = _static_fp8()
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    # every layer's attention norm -> qkv, residual norm -> gate_up, SwiGLU -> down (the LM head stays bf16)
    assert len(cuda.model._fp8_out) == 3 * LLAMA["num_hidden_layers"]
    lens = [37, 5, 64, 2]
    seqs, start = [], 0
    for i, n in enumerate(lens):
        seqs.append(SeqSlice(start, n, 0, tuple(range(i * 5, i * 5 + 5))))
        start += n
    batch = StepBatch(torch.randint(0, LLAMA["vocab_size"], (start,)), seqs)
    kv = KVStore(cuda.plan.sites, 24, 16, cuda.dtype, "cuda")
    with torch.no_grad():
        fused = cuda.model.forward(batch, kv, all_logits=True)
        monkeypatch.setattr(cuda_quant, "FP8_OUT_FUSE", "0")
        plain = cuda.model.forward(batch, kv, all_logits=True)
        want = ref.model.forward(batch, KVStore(ref.plan.sites, 24, 16, ref.dtype, "cuda"), all_logits=True)
    assert torch.equal(fused, plain)
    assert rel(fused, want) <= 5e-2
