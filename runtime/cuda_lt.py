"""fp8 GEMMs through cuBLASLt with the algorithm measured fastest for each shape, for the CUDA graphs (KILN_FP8_LT).

`torch._scaled_mm` (QGemm's per-tensor fp8 path) runs the first algorithm of cuBLASLt's heuristic. At the decode
step's row counts that one fills few SMs: session 28 (H200) timed the 8B's qkv GEMM at 256 rows at 22% of the fp8
peak, a layer's four GEMMs at about 2.5x their compute floor, while at 1,024 rows and more they reach 60-90%.
TensorRT-LLM's GEMM plugin profiles cuBLASLt's candidate algorithms for each shape and keeps the fastest; so does
this, through nvmath-python's Matmul (NVIDIA's Python binding of cuBLASLt): a shape's plan is made and autotuned
the first time it runs in a capture's warm-up (`tuning`, set by the cuda backend's _capture), then used only
while a CUDA graph is being captured, where its host work per call (tens of microseconds: operand checks, the
descriptor's pointers) is paid once. Eager steps keep `_scaled_mm`. The activation scale is read through its
pointer when the GEMM runs, so a graph's dynamic per-tensor scales stay dynamic.
"""

from __future__ import annotations

import torch
from kiln.codegen.specs import KernelSpecError

# The fewest rows a plan is made for: fewer take the fp8 GEMV (one row) or are too small to gain.
MIN_ROWS = 16
# Each plan's workspace limit: split-K algorithms need M x N fp32 partials, which at 512 rows of the 8B's gate/up
# projection would be 58 MiB a split; the plans of one model hold one workspace each (up to a few dozen).
WORKSPACE_BYTES = 32 << 20
# Candidates cuBLASLt's heuristic returns per shape, each timed by nvmath's autotune that many times (each run
# after an L2 flush, a host-to-device copy of the L2's size: ~2.5 ms, so ~0.15 s a shape; a model's 16 decode
# buckets x 4 linear shapes take ~10 s once, in the graph captures ahead of serving).
CANDIDATES = 12
TUNE_ITERATIONS = 5


def rows_limit(value: str) -> int:
    """KILN_FP8_LT's value: the most rows a GEMM takes the tuned plans at ("0": never)."""
    if not value.isdigit():
        raise KernelSpecError(f"KILN_FP8_LT={value!r}: must be a row count (0: off)")
    return int(value)


class LtPlans:
    """One model's tuned cuBLASLt plans, one per (rows, stored out features, in features, out dtype, fast
    accumulation), shared by every GEMM of that shape (a plan's operands are reset at each call)."""

    def __init__(self, max_rows: int):
        try:
            import nvmath  # noqa: F401
            from nvmath.linalg.advanced import Matmul  # noqa: F401
        except ImportError as e:
            raise KernelSpecError(f"KILN_FP8_LT={max_rows} needs nvmath-python and cuda-core "
                                  f"(pip install nvmath-python cuda-core): {e}") from None
        self.max_rows = max_rows
        self.tuning = False  # True during a capture's warm-up run (cuda_backend._capture): plans are made then
        self.plans: dict[tuple, object] = {}

    def mm(self, x: torch.Tensor, w: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype,
           fast: bool) -> torch.Tensor | None:
        """x [M, K] fp8 (rows) times w [N, K] fp8 (stored rows, N a multiple of 16) with per-tensor fp32 scales
        sx, sw: y [M, N] in out_dtype, as `torch._scaled_mm(x, w.t(), ...)`. None where no plan serves the
        call: outside a capture, rows out of range, or a shape first seen inside a capture (no autotuning
        there); the caller then runs `_scaled_mm`."""
        m = x.shape[0]
        if not MIN_ROWS <= m <= self.max_rows or out_dtype not in (torch.bfloat16, torch.float16) \
                or sx.dim() != 0 or sw.dim() != 0:
            return None
        key = (m, w.shape[0], w.shape[1], out_dtype, fast)
        capturing = torch.cuda.is_current_stream_capturing()
        plan = self.plans.get(key)
        if plan is None:
            if capturing or not self.tuning:
                return None
            plan = self.plans[key] = self._plan(x, w, sx, sw, out_dtype, fast)
        if not capturing:
            return None
        stream = torch.cuda.current_stream(x.device)
        plan.reset_operands(a=x, b=w.t(), quantization_scales={"a": sx, "b": sw}, stream=stream)
        return plan.execute(stream=stream).contiguous()  # (row-major as _scaled_mm's: a no-op where nvmath's is)

    @staticmethod
    def _plan(x, w, sx, sw, out_dtype, fast):
        """A Matmul for this shape, its candidates autotuned on these operands (outside any capture)."""
        import nvmath
        from nvmath.linalg.advanced import Matmul

        result = {torch.bfloat16: nvmath.CudaDataType.CUDA_R_16BF,
                  torch.float16: nvmath.CudaDataType.CUDA_R_16F}[out_dtype]
        stream = torch.cuda.current_stream(x.device)
        plan = Matmul(x, w.t(), quantization_scales={"a": sx, "b": sw}, stream=stream,
                      options={"result_type": result, "fast_accumulation": fast, "memory_limit": WORKSPACE_BYTES})
        plan.plan(preferences={"limit": CANDIDATES}, stream=stream)
        plan.autotune(iterations=TUNE_ITERATIONS, stream=stream)
        return plan
