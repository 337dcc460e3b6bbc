"""Quantized GEMMs of the cuda backend: one `QGemm` per GEMM step whose weights are quantized.

A step may fuse sibling linears (codegen/fuse.py: their rows at 16-byte aligned slices, zeros
between); `prepare` builds the fused storage from the siblings' `QWeight`s, and `QGemm.__call__`
computes what `QWeight.linear` (dsl/quant.py, the reference) computes for each sibling (fp8 at one
row of x: codegen/gemv_fp8.py's GEMV instead, which quantizes x itself; FP8_GEMV below):
  fp8 activations quantized by a generated kernel (templates/quant_act.cu.j2: amax, scale and fp8
                  values in one or two launches, bit-equal to the torch ops that `ACT_KERNEL =
                  False` uses instead), then
  fp8 per-tensor  activations scaled per tensor on the GPU (no host sync), cuBLASLt's fp8 GEMM
                  (`torch._scaled_mm`); siblings with different scales are requantized to the
                  largest (as vLLM does for fused QKV: a rounding step the reference does not take)
  fp8 per-channel activations scaled per token, `_scaled_mm` in fp32 with unit scales, then both
  int4 / int8 weight-only, ggml q4_0 / q4_1 / q8_0 / q4_k / q5_k / q6_k
                  generated kernels (codegen/quant_kernels.py, templates/gemv_wq.cu.j2) on a layout
                  `repack` builds once at load: T <= GEMV_MAX_T rows through the GEMV (tensor cores,
                  weights streamed once per 16 rows), more rows dequantize the weight into a
                  transient run-dtype buffer (one generated kernel) and call cuBLAS. GPTQ act-order:
                  the weight's columns are permuted at load so groups are contiguous, and x's
                  columns are gathered to match (torch `index_select`, one small launch per call)
  other formats   (other group sizes) dequantized to the run dtype in the step, then
                  cuBLAS; int8 W8A8 multiplies the quantized operands exactly in bf16 (|q| <= 127 is exact)
Every path runs inside a CUDA graph: no host sync, no data-dependent shapes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from kiln.codegen import gemv_fp8
from kiln.codegen.quant_kernels import (  # noqa: F401
    ACT_UNROLL,
    GEMV_MAX_T,
    GGML_PACKED,
    ActQuantSpec,
    Packed,
    act_partials,
    act_quant_fp8,
    act_quant_fp8_folded,
    pack,
    repack,
)
from kiln.codegen.specs import KernelSpecError
from kiln.dsl.quant import FP8_MAX, QuantDesc, QWeight, quantize_rows, scale_of

from .cuda_lt import LtPlans

# fp8 activations through the generated kernel (templates/quant_act.cu.j2) or the torch ops: the
# kernel is bit-equal to them (tests/gpu/test_quant_kernels.py, passed on the H200) and 3.7-15x
# faster (BENCHMARKS.md); False keeps the torch ops, for comparison.
ACT_KERNEL = True

# fp8 W8A8 at one row of x through codegen/gemv_fp8.py (issue #13): x's amax, scale and fp8 values
# computed inside the GEMV's blocks, no activation-quantization launches, the same result as below up to
# fp32 summation order (tests/gpu/test_gemv_fp8.py, passed on the H200). "pdl" (programmatic dependent
# launches, the default): fp8 W8A8 batch-1 decode of the 8B-model shape 3.607 against 3.805 ms without it
# (benchmarks/2026-12-02-03.md, session 8); "1" plain launches; "0" off (KILN_FP8_GEMV=0). FP8_GEMV_DECODE: how the
# kernel multiplies, "int" (weight bytes to fp32 with integer ops, CUDA-core FMAs), "cvt" (the same with
# conversion instructions) or "mma" (templates/gemv_fp8_mma.cu.j2: fp16 tensor-core MMAs of the same
# exact values, 16-bit runs; fp32 runs take "int"). "mma" is the default since session 13: fp8 batch-1
# decode of the 8B-model shape 3.28 against 3.52 ms for "int" in three device calls of that session (its
# kernels faster at all four decode shapes; BENCHMARKS.md). Read at each call (and so at graph capture).
FP8_GEMV = os.environ.get("KILN_FP8_GEMV", "pdl")
FP8_GEMV_DECODE = os.environ.get("KILN_FP8_GEMV_DECODE", "mma")
# The gate+up fp8 GEMV at one row with the gated activation in its epilogue (QGemm.gemv_epilogue, where the
# cuda backend's KILN_GEMV_EPILOGUE fuses it): "1", the default since session 18; "0" off. On the H200 the 8B
# fp8 batch-1 step on the GPU (bench latency's decode_back_to_back_ms, benchmarks/2026-12-04-05.md session 18)
# took 2.831 / 2.825 ms with it against 2.980 / 2.979 without, alternating in one call. Session 14's per-step
# events (the host's jitter included) had not shown it faster. Read when a step runs (and is captured).
FP8_GEMV_EPILOGUE = os.environ.get("KILN_FP8_GEMV_EPILOGUE", "1")
# The qkv fp8 GEMV at one row with the rotary + paged KV write in its epilogue (QGemm.gemv_rope, where the
# cuda backend's KILN_GEMV_ROPE links the qkv GEMM to its attention): "1", the default. On the H200 (session
# 16, benchmarks/2026-12-04.md) the 8B fp8 decode step took 3.251 / 3.233 ms with it against 3.288 / 3.287 without,
# alternating in one call, after its GPU tests passed; KILN_FP8_GEMV_ROPE=0 turns it off. Read when a step runs.
FP8_GEMV_ROPE = os.environ.get("KILN_FP8_GEMV_ROPE", "1")
# The int4 gate+up GEMV at up to 8 rows with the gated activation in its epilogue (QGemm.paired: the weight's
# halves packed in (gate, up) pairs at load; Packed.gated): "1", the default since session 18; "0" off. Its GPU
# tests pass, bit-equal (session 16). On the H200 the 8B int4-wo batch-1 step on the GPU (bench latency's
# decode_back_to_back_ms, benchmarks/2026-12-04-05.md session 18) took 2.291 / 2.287 ms with it against
# 2.387 / 2.384 without, alternating in one call (sessions 16-17's per-step events had spread too much to
# tell). Read when the backend is built (the pairing) and when a step runs.
INT4_GEMV_EPILOGUE = os.environ.get("KILN_INT4_GEMV_EPILOGUE", "1")
# The int4 qkv GEMV at up to 8 rows with the rotary + paged KV write in its epilogue (QGemm.rope_paired: the weight's
# rows packed in the rotary pairs at load; Packed.rope_gemv): "1", the default since session 19; "0" off. Its GPU
# tests pass, bit-equal (session 19). On the H200 the 8B int4-wo+lm-head batch-1 step on the GPU (bench latency's
# decode_back_to_back_ms, benchmarks/2026-12-04-05.md session 19) took 2.054 / 2.054 ms with it against
# 2.145 / 2.134 without, alternating in one call. Read when the backend is built (the pairing) and when a step runs.
INT4_GEMV_ROPE = os.environ.get("KILN_INT4_GEMV_ROPE", "1")
# cuBLASLt's fp8 GEMMs (torch._scaled_mm: more than one row) with fast accumulation ("1": use_fast_accum, products
# summed in the tensor cores' accumulator without cuBLASLt's periodic promotion to fp32, as vLLM's CUTLASS fp8
# kernels for Hopper do (their FP8FastAccum schedules), the default) or without ("0"). Written in session 21
# without device time; on since session 24 (H100, one call): fp8 2048/128 2,860 -> 2,974 output tok/s beside
# session 23's switches, its mixed step 39.9 -> 38.2 ms; tests/gpu/test_quant_kernels.py bounds its difference
# from the reference (within bf16 rounding). Read when a step runs (and is captured).
FP8_FAST_ACCUM = os.environ.get("KILN_FP8_FAST_ACCUM", "1")
# fp8 activations with a dynamic per-tensor scale whose amax pass is done by the kernel that wrote them: the cuda
# backend renders the RMS / layer norm and the activation (SwiGLU, ...) before such a GEMM with each row's (block's)
# max |out| as a second output (NormSpec.amax / ActSpec.amax), and `quantize_act` then folds those partials into
# the scale in its one quantize launch instead of two launches (the amax one reading x from DRAM again). The same
# bits (the same maxima of the same stored values). In session 22's fp8 mixed step (256 decode rows + a 1,792-token
# chunk) the activation quantization was 2.4 of 38.4 ms of kernels and 256 of 717 launches; this removes 96 of
# those launches (the o projection's input keeps both). "1" (the default) on; "0" off. Written in session 23
# without device time; its GPU tests passed in session 24 (`.ci/device_check.sh s23all`). Read when the backend
# is built and when a step runs.
AMAX_FUSE = os.environ.get("KILN_FP8_AMAX_FUSE", "1")
# A norm or activation kernel before an fp8 GEMM with a static per-tensor activation scale (a checkpoint's
# input_scale: ModelOpt FP8, compressed-tensors static) writes its output as that GEMM's fp8 input itself
# (NormSpec / ActSpec fp8_out), the same bytes as writing it in the run dtype and quantizing it after, without
# the quantization's launch and its read and write of the activations (TensorRT-LLM's FP8 recipe fuses its norm
# and SwiGLU with the quantization likewise). Two rows and more (one row: the fp8 GEMV quantizes x itself), no LoRA
# on the GEMM. "1" (the default) on; "0" off. Session 28, H200, fp8 weights + KV at 1,000 requests with static
# scales: 2048/128 3,207 -> 3,260 tok/s, 128/128 23,724 -> 24,276 (BENCHMARKS.md). Read when the backend is built and
# when a step runs.
FP8_OUT_FUSE = os.environ.get("KILN_FP8_OUT_FUSE", "1")
# Per-tensor fp8 GEMMs of 16 to KILN_FP8_LT rows, inside CUDA graphs, through cuBLASLt's algorithm measured fastest
# for the shape (runtime/cuda_lt.py: nvmath-python's Matmul, autotuned in the captures' warm-ups) instead of the
# first of its heuristic (`_scaled_mm`). "0" (the default): never. Written in session 28 without device time (the
# device was withdrawn before `.ci/lt_probe.py` ran). Read when the backend is built.
FP8_LT = os.environ.get("KILN_FP8_LT", "0")


def _on(name: str, value: str) -> bool:
    """A "0" / "1" switch's value (name: its environment variable); anything else is refused naming it."""
    if value not in ("0", "1"):
        raise KernelSpecError(f"{name}={value!r}: must be 0 or 1")
    return value == "1"


def runs(desc: QuantDesc) -> bool:
    """Whether the cuda backend runs weights stored as `desc`."""
    # GGUF: the block types the generated kernels read as they are (quant_kernels.GGML_PACKED); another would
    # dequantize on the host in every step (no CUDA graph could hold that), so it is refused, by name.
    return desc.dtype in ("fp8", "int8", "int4") or desc.dtype.removeprefix("gguf_") in GGML_PACKED


@dataclass
class QGemm:
    desc: QuantDesc
    out_features: int
    q: torch.Tensor  # fp8: [out rounded up to 16, in] (row-major: `q.t()` is the column-major operand cuBLASLt wants)
    scale: torch.Tensor  # fp8 per-tensor: [] ; per-channel: [1, out rounded up to 16] (1 past out)
    weight: QWeight | None = None  # formats without a fused kernel yet: the (fused) stored weight
    input_scale: torch.Tensor | None = None
    origin: str = "linear"
    packed: "Packed | None" = None  # weight-only formats with a generated kernel
    partial: torch.Tensor | None = None  # fp8 dynamic per-tensor: the amax launch's block maxima
    lt: "LtPlans | None" = None  # fp8 per-tensor: the model's tuned cuBLASLt plans (FP8_LT), used in captures

    def quantize_act(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                     amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (fp8 values, fp32 scale) through the generated kernel (templates/quant_act.cu.j2): the
        same bits as the torch ops below, in one launch (per token, static) or two (dynamic per tensor).
        amax: x's partial maxima from the kernel that wrote it (`takes_amax`): one launch, the same bits."""
        from kiln.codegen.specs import dtype_name

        d = self.desc
        x = x.contiguous()
        T = x.shape[0]
        mode = "tensor" if d.act == "fp8_tensor" else "token"
        spec = ActQuantSpec(mode, x.shape[1], mode == "tensor" and d.act_static, dtype_name(x.dtype), self.origin,
                            ACT_UNROLL if mode == "tensor" else 1)
        xq = torch.empty(T, x.shape[1], dtype=torch.float8_e4m3fn, device=x.device)
        if spec.static:
            sx = self.input_scale.float().reshape(())
        else:
            sx = torch.empty((T, 1) if mode == "token" else (), dtype=torch.float32, device=x.device)
        if amax is not None:
            act_quant_fp8_folded(spec, x, xq, sx, amax)
            return xq, sx
        if mode == "tensor" and not spec.static and (self.partial is None or self.partial.device != x.device):
            self.partial = act_partials(x.device)
        act_quant_fp8(spec, x, xq, sx, self.partial, valid_rows=valid if mode == "tensor" else None)
        return xq, sx

    def takes_fp8(self) -> bool:
        """Whether this GEMM quantizes x with a static per-tensor scale (the checkpoint's input_scale), so that the
        kernel that writes x can write it quantized (FP8_OUT_FUSE; __call__ then takes fp8 x as it is)."""
        d = self.desc
        return (_on("KILN_FP8_OUT_FUSE", FP8_OUT_FUSE) and ACT_KERNEL and self.packed is None and d.dtype == "fp8"
                and d.act == "fp8_tensor" and d.act_static and self.input_scale is not None
                and self.input_scale.numel() == 1 and self.input_scale.dtype == torch.float32)

    def takes_amax(self) -> bool:
        """Whether this GEMM quantizes x (more than one row) with a dynamic per-tensor scale through the generated
        kernel, and so can take x's partial maxima from the kernel that wrote x (AMAX_FUSE)."""
        d = self.desc
        return (_on("KILN_FP8_AMAX_FUSE", AMAX_FUSE) and ACT_KERNEL and self.packed is None and d.dtype == "fp8"
                and d.act == "fp8_tensor" and not d.act_static)

    def quantize_act_torch(self, x: torch.Tensor,
                           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as `quantize_act` with torch ops (dsl/quant.py's reference arithmetic)."""
        d = self.desc
        xf = x.float()
        if d.act == "fp8_tensor":
            a = xf.abs()
            if valid is not None:  # padding rows of a graph step: no say in the scale (no host sync)
                a = torch.where(torch.arange(x.shape[0], device=x.device)[:, None] < valid, a, 0.0)
            sx = self.input_scale.float() if d.act_static else scale_of(a.amax(), FP8_MAX)
            return (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), sx.reshape(())
        xqf, sx = quantize_rows(xf, "fp8")
        return xqf.to(torch.float8_e4m3fn), sx.float()

    def gemv_epilogue(self, x: torch.Tensor, bias: torch.Tensor | None, epilogue, halves: tuple[int, int],
                      origin: str) -> torch.Tensor | None:
        """act(g) * u [1, epilogue.features] of x's one row, g and u this GEMM's rows at `halves` (gate_row,
        up_row), through the fp8 GEMV with the gated activation in its epilogue (codegen/gemv_fp8.py,
        "mma"); None where that kernel does not run this call (`_fused_takes`, or KILN_FP8_GEMV_EPILOGUE=0):
        the caller runs this GEMM, then the activation's kernel. origin: both spec ops.
        An int4 weight paired at load (`paired`): x's rows (up to 8) through the warp GEMV with the same
        epilogue (Packed.gated), where KILN_INT4_GEMV_EPILOGUE=1."""
        if self.packed is not None:
            if not _on("KILN_INT4_GEMV_EPILOGUE", INT4_GEMV_EPILOGUE) or self.packed.pairs != tuple(halves) \
                    or not self.packed.gated_takes(x) \
                    or (bias is not None and bias.dtype != x.dtype):
                return None
            return self.packed.gated(x, bias, epilogue, origin)
        if not self._fused_takes(x, bias, "KILN_FP8_GEMV_EPILOGUE", FP8_GEMV_EPILOGUE):
            return None
        return gemv_fp8.linear(x, *self.real_rows(), bias, self.input_scale if self.desc.act_static else None,
                               pdl=FP8_GEMV == "pdl", origin=origin, decode="mma", epilogue=epilogue,
                               halves=halves)

    def paired(self, halves: tuple[int, int], dtype: torch.dtype | None = None) -> "QGemm":
        """This GEMM with its packed int4 weight's two halves (gate_row, up_row) = `halves` packed in (gate, up)
        pairs (Packed.paired) for `gemv_epilogue`'s fused activation, where KILN_INT4_GEMV_EPILOGUE=1; itself
        otherwise, or where the weight cannot pair (not int4 "post", act-order, halves not W's two halves in
        whole tiles). `dtype`: the run dtype, to build the records now (before any graph capture)."""
        if not _on("KILN_INT4_GEMV_EPILOGUE", INT4_GEMV_EPILOGUE) or self.packed is None \
                or not self.packed.can_pair(*halves):
            return self
        return self._repacked(self.packed.paired(*halves), dtype)

    def rope_paired(self, rope, qkv_rows: tuple[int, ...], dtype: torch.dtype | None = None) -> "QGemm":
        """This qkv GEMM with its packed int4 weight's rows packed in the rotary epilogue's pairs (Packed.rope_paired)
        for `gemv_rope`, where KILN_INT4_GEMV_ROPE=1; itself otherwise, or where the weight cannot pair (not int4
        "post", act-order, rows other than q's, k's and v's). rope: the attention's RopeCacheSpec. `dtype`: the run
        dtype, to build the records now (before any graph capture)."""
        from kiln.codegen.gemv import rope_epilogue_spec

        if not _on("KILN_INT4_GEMV_ROPE", INT4_GEMV_ROPE) or self.packed is None \
                or not self.packed.can_rope_pair(rope, tuple(qkv_rows)):
            return self
        return self._repacked(self.packed.rope_paired(rope_epilogue_spec(rope), tuple(qkv_rows)), dtype)

    def _repacked(self, packed: "Packed", dtype: torch.dtype | None) -> "QGemm":
        """This GEMM on `packed` (a new layout of its weight), its records for `dtype` built now (before any graph
        capture) where given."""
        if dtype is not None:
            packed.records(dtype)
        return dataclasses.replace(self, packed=packed)

    def gemv_rope(self, x: torch.Tensor, bias: torch.Tensor | None, rope, qkv_rows: tuple[int, ...], origin: str,
                  cache: tuple) -> torch.Tensor | None:
        """q [1, rope.heads * rope.head_dim] of x's one row, rotated, with k rotated and v written into the
        cache (cache: positions, slot_mapping, k_cache, v_cache, k_scale, v_scale), q, k and v this GEMM's rows
        at qkv_rows, through the fp8 GEMV with the rotary epilogue (codegen/gemv_fp8.py, "mma"); None where
        that kernel does not run this call (`_fused_takes`, or KILN_FP8_GEMV_ROPE=0): the
        caller runs this GEMM, then the rotary kernel. origin: both spec ops. An int4 weight packed in rotary pairs at
        load (`rope_paired`): x's rows (up to 8) through the warp GEMV with the same epilogue (Packed.rope_gemv), where
        KILN_INT4_GEMV_ROPE=1."""
        if self.packed is not None:
            if not _on("KILN_INT4_GEMV_ROPE", INT4_GEMV_ROPE) or not self.packed.rope_takes(x) \
                    or self.packed.qkv_rows != tuple(qkv_rows) \
                    or (bias is not None and bias.dtype != x.dtype):
                return None
            return self.packed.rope_gemv(x, bias, cache, origin)
        if not self._fused_takes(x, bias, "KILN_FP8_GEMV_ROPE", FP8_GEMV_ROPE):
            return None
        return gemv_fp8.linear(x, *self.real_rows(), bias, self.input_scale if self.desc.act_static else None,
                               pdl=FP8_GEMV == "pdl", origin=origin, decode="mma", epilogue=rope,
                               halves=qkv_rows, rope=cache)

    def real_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp8 (q, scale) without `prepare`'s padding rows, for the one-row GEMVs, which take any row count
        (views: contiguous, with q's alignment)."""
        n = self.out_features
        return self.q[:n], self.scale if self.scale.dim() == 0 else self.scale[:, :n]

    def _fused_takes(self, x: torch.Tensor, bias: torch.Tensor | None, name: str, switch: str) -> bool:
        """Whether the fp8 "mma" GEMV with an epilogue runs this call: the switch `name` (value `switch`) on,
        fp8 weights not packed, the one-row GEMV on with its "mma" decode, one 16-bit row it takes, a
        per-tensor or per-token activation scale, a bias of x's dtype or none."""
        d = self.desc
        return (_on(name, switch) and d.dtype == "fp8" and self.packed is None and FP8_GEMV in ("1", "pdl")
                and FP8_GEMV_DECODE == "mma"
                and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
                and d.act in ("fp8_tensor", "fp8_token") and gemv_fp8.takes(x, self.q)
                and (bias is None or bias.dtype == x.dtype))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor | None = None,
                 amax: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x's rows through the GEMM. valid: int32 [1] on the device, the rows of x that are real in a
        padded graph step (runtime/cuda_backend.py _Meta.valid): a measured per-tensor activation scale
        is taken over them only. None: every row. amax: x's partial maxima over those rows from the kernel
        that wrote x (`takes_amax`), used where x's quantization runs through the generated kernel.
        out_dtype: the output's (default x's); required where x is fp8, quantized already (`takes_fp8`)."""
        d = self.desc
        odt = out_dtype or x.dtype
        if odt == torch.float8_e4m3fn:
            raise ValueError(f"{self.origin}: an fp8 input needs out_dtype (the run dtype)")
        if self.packed is not None:
            return self.packed.linear(x, bias)
        if d.dtype == "fp8":
            n = self.out_features  # q's rows past n: `prepare`'s padding to a multiple of 16 (zeros)
            if (FP8_GEMV in ("1", "pdl") and x.shape[0] == 1 and d.act in ("fp8_tensor", "fp8_token")
                    and gemv_fp8.takes(x, self.q) and (bias is None or bias.dtype == x.dtype)):
                # one token: per-token and per-tensor activation scales are the same number
                return gemv_fp8.linear(x, *self.real_rows(), bias, self.input_scale if d.act_static else None,
                                       pdl=FP8_GEMV == "pdl", origin=self.origin, decode=FP8_GEMV_DECODE)
            kernel = ACT_KERNEL and x.is_cuda and x.shape[1] % (16 // x.element_size()) == 0
            if x.dtype == torch.float8_e4m3fn:  # quantized by the kernel that wrote it (takes_fp8)
                if not (d.act == "fp8_tensor" and d.act_static):
                    raise ValueError(f"{self.origin}: an fp8 input needs a static per-tensor activation scale")
                xq, sx = x, self.input_scale.reshape(())
            else:
                xq, sx = self.quantize_act(x, valid, amax if self.takes_amax() else None) if kernel \
                    else self.quantize_act_torch(x, valid)
            padded = self.q.shape[0] != n
            fast = _on("KILN_FP8_FAST_ACCUM", FP8_FAST_ACCUM)
            if self.scale.dim() == 0:
                y = self.lt.mm(xq, self.q, sx, self.scale, odt, fast) if self.lt is not None else None
                if y is not None:  # (FP8_LT, inside a capture)
                    y = y[:, :n].contiguous() if padded else y
                    return y if bias is None else y + bias
                # cuBLASLt: no bias with an fp32 output; padded rows: the bias added to the real ones after
                fused = bias if odt != torch.float32 and not padded else None
                y = torch._scaled_mm(xq, self.q.t(), scale_a=sx, scale_b=self.scale, bias=fused, out_dtype=odt,
                                     use_fast_accum=fast)
                y = y[:, :n].contiguous() if padded else y
                return y if bias is None or fused is not None else y + bias
            # Per-channel: the products with unit scales in fp32, then both scales (cuBLASLt's own
            # row-wise scaling disagreed with the reference by ~3% on the H200, so it is not used).
            one = torch.ones((), dtype=torch.float32, device=x.device)
            y = torch._scaled_mm(xq, self.q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                 use_fast_accum=fast)[:, :n] * sx \
                * self.scale[:, :n]
            return (y if bias is None else y + bias.float()).to(x.dtype)
        w = self.weight
        if d.act == "int8_token":
            xf = x.float()
            if w.smooth is not None:
                xf = xf / w.smooth
            xq, sx = quantize_rows(xf, "int8")
            y = torch.nn.functional.linear(xq.to(x.dtype), w.q.to(x.dtype)).float() * sx * w.scale.reshape(1, -1)
            return (y + bias.float() if bias is not None else y).to(x.dtype)
        return torch.nn.functional.linear(x, w.dequantize(x.dtype), bias)


def prepare(ws: list[QWeight], slices: list[tuple[int, int]], dtype: torch.dtype | None = None,
            origin: str = "linear") -> QGemm:
    """The fused GEMM of sibling quantized weights placed at `slices` (start, rows) of the output.
    `dtype`: the run dtype, to build the kernel's records now (else on the first call); `origin`:
    the spec op, for the generated kernels' comments."""
    desc = ws[0].desc
    if any(w.desc != desc for w in ws):
        raise ValueError(f"fused siblings are stored differently: {sorted({str(w.desc) for w in ws})}")
    rows = slices[-1][0] + slices[-1][1]
    n_in = ws[0].shape[1]
    if desc.dtype == "fp8":
        # cuBLASLt's fp8 GEMM (torch._scaled_mm) takes only multiples of 16 rows: others (a vocabulary of 1,000
        # or 50,257 in an LM head) are padded with zero rows here, and QGemm returns the real rows
        padded = -(-rows // 16) * 16
        if desc.scale_layout == "per_tensor":
            s = max(float(w.scale) for w in ws)
            q = torch.zeros(padded, n_in, dtype=torch.float8_e4m3fn, device=ws[0].device)
            for (start, width), w in zip(slices, ws):
                # requantize to the shared scale: exact when the sibling's scale is the largest
                q[start:start + width] = (w.q.float() * (w.scale.float() / s)).to(torch.float8_e4m3fn)
            scale = torch.tensor(s, dtype=torch.float32, device=q.device)
        else:
            q = torch.zeros(padded, n_in, dtype=torch.float8_e4m3fn, device=ws[0].device)
            scale = torch.ones(1, padded, dtype=torch.float32, device=q.device)
            for (start, width), w in zip(slices, ws):
                q[start:start + width] = w.q
                scale[0, start:start + width] = w.scale
        in_scale = None
        if desc.act_static:
            in_scale = torch.stack([w.input_scale.float() for w in ws]).amax()
        gemm = QGemm(desc, rows, q, scale, input_scale=in_scale, origin=origin)
        if desc.act == "fp8_tensor" and not desc.act_static and q.is_cuda:
            gemm.partial = act_partials(q.device)  # before any graph capture
        return gemm
    if len(ws) > 1 and not _concatenable(ws):  # e.g. GPTQ act-order siblings, each with its own g_idx
        return SplitGemm(rows, [(prepare([w], [(0, width)], dtype, origin), start, width)
                                for (start, width), w in zip(slices, ws)])
    fused = _cat_rows(ws, slices, rows)
    packed = pack(fused, origin)
    if packed is not None:
        if dtype is not None:
            packed.records(dtype)
        fused = None  # the packed layout replaces the stored weight (no second copy on the GPU)
    return QGemm(desc, rows, torch.empty(0), torch.empty(0), weight=fused, packed=packed)


@dataclass
class SplitGemm:
    """Sibling GEMMs that cannot share one weight (their input columns are ordered or scaled
    differently): each runs alone into its slice of the fused output."""

    out_features: int
    parts: list[tuple[QGemm, int, int]]  # (gemm, start, rows)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor | None = None) -> torch.Tensor:
        y = x.new_zeros(x.shape[0], self.out_features)  # the rows between slices read as zeros, as fused ones do
        for gemm, start, width in self.parts:
            y[:, start:start + width] = gemm(x, None if bias is None else bias[start:start + width], valid)
        return y


_SHARED = ("g_idx", "smooth", "input_scale")  # parts siblings must share to be concatenated


def _concatenable(ws: list[QWeight]) -> bool:
    for key in _SHARED:
        a = getattr(ws[0], key)
        if any((getattr(w, key) is None) != (a is None) or (a is not None and not torch.equal(getattr(w, key), a))
               for w in ws[1:]):
            return False
    return True


def _cat_rows(ws: list[QWeight], slices: list[tuple[int, int]], rows: int) -> QWeight:
    """The siblings' stored parts stacked along the output rows (zero rows between slices)."""
    if len(ws) == 1:
        return ws[0]
    w0 = ws[0]
    parts = {}
    for key, t in w0.tensors().items():
        if key in _SHARED or (key == "scale" and t.dim() == 0) or t.numel() == 0:
            if any(not torch.equal(w.tensors()[key], t) for w in ws[1:]):
                raise ValueError(f"fused siblings differ in their {key}: they cannot share one GEMM")
            parts[key] = t
            continue
        full = t.new_zeros((rows,) + tuple(t.shape[1:]))
        for (start, width), w in zip(slices, ws):
            full[start:start + width] = w.tensors()[key]
        parts[key] = full
    return QWeight(w0.desc, (rows, w0.shape[1]), **parts)
