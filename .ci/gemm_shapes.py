"""What .ci/gemm_probe.py and .ci/lt_probe.py share (GPU development tools): Llama-3-8B's four linear shapes, their
operands at M rows, and the fp8 GEMM both time (per-tensor unit scales, fast accumulation: the engine's default)."""

from __future__ import annotations

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
E4M3 = torch.float8_e4m3fn


def operands(m: int, n: int, k: int, dev: str = "cuda"):
    """x [m, k] and w [n, k] in bf16, and the same as e4m3: (x, w, xq, wq)."""
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
    return x, w, x.to(E4M3), w.to(E4M3)


def fp8_mm(xq: torch.Tensor, wq: torch.Tensor, one: torch.Tensor) -> torch.Tensor:
    """xq wq^T through torch._scaled_mm (the cuda backend's QGemm path), bf16 out."""
    return torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)


def peak_operands(dev: str = "cuda"):
    """An 8192^3 fp8 GEMM's operands (the peak the probes quote shares of) and a unit scale: (big, one)."""
    return torch.randn(8192, 8192, device=dev).to(E4M3), torch.ones((), device=dev)
