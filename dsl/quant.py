"""Quantization: the schemes, how a quantized weight is stored, and what it computes.

A scheme is a property of how a model is built and loaded, never of its spec: the `quantize`
pass (dsl/passes.py) sets the `QuantDesc` of each weight a scheme covers (the weight operands of
`linear` ops, except the LM head), and the loader hands backends a `QWeight` for each such slot.
This module is the one place that says what each storage format means: `QWeight.dequantize`
(the values it stands for) and `QWeight.linear` (what a linear op computes with it — the
reference semantics every backend's kernels must match, activation quantization included).

Storage formats (`QuantDesc.dtype`), all for a weight of logical shape [out, in]:
  fp8        q float8_e4m3fn [out, in]; scale fp32 [] (per_tensor) or [out] (per_channel)
  int8       q int8 [out, in]; scale fp32 [out] (per_channel), symmetric
  int4       q uint8 [out, in // 2], column 2j in the low nibble of byte j, 2j + 1 in the high;
             scale and zero fp32 [out, in // group] (w = (q - zero) * scale); `g_idx` [in] int32
             names each input column's group when the checkpoint reordered them (GPTQ act-order)
  gguf_<t>   q uint8 [out, bytes per row]: ggml blocks of type t (q4_0, q4_1, q8_0, q4_k, q5_k,
             q6_k) exactly as the GGUF file stores them, blocks running along `in`

Activation quantization (`QuantDesc.act`), applied to x inside the linear:
  none       weight-only: x @ dequantize(W)^T
  fp8_tensor one fp8 scale for the whole x: amax(|x|) / 448, or the checkpoint's static
             `input_scale`
  fp8_token  one fp8 scale per row (token) of x
  int8_token SmoothQuant: x / smooth (per input channel), then one int8 scale per row
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
GGUF_TYPES = ("q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k")


@dataclass(frozen=True)
class QuantDesc:
    """How a weight is stored. The default is the run dtype, unquantized; a quantization pass
    sets a storage dtype with its scales' layout (`per_tensor`, `per_channel`, `per_group`
    with `group_size`), whether zero points are kept, and how activations are quantized."""

    dtype: str = "run"  # "run" (the run dtype) or a storage format: fp8, int8, int4, gguf_<type>
    scale_layout: str = "none"  # none | per_tensor | per_channel | per_group | blocks (gguf)
    group_size: int | None = None
    zero_points: bool = False
    act: str = "none"  # activation quantization: none | fp8_tensor | fp8_token | int8_token
    act_static: bool = False  # the activation scale is the checkpoint's (`input_scale`), not measured
    act_order: bool = False  # int4: input columns reordered into groups (`g_idx`)

    @property
    def quantized(self) -> bool:
        return self.dtype != "run"

    def __str__(self) -> str:
        if not self.quantized:
            return "unquantized"
        s = f"{self.dtype} ({self.scale_layout}{f' {self.group_size}' if self.group_size else ''}"
        s += ", zero points" if self.zero_points else ""
        s += ", act-order" if self.act_order else ""
        s += ")"
        if self.act != "none":
            s += f", activations {self.act}{' static' if self.act_static else ''}"
        return s


UNQUANTIZED = QuantDesc()


@dataclass(frozen=True)
class Scheme:
    """A named quantization scheme: what the linear weights become, and whether it needs
    calibration (then only `kiln quantize` or a pre-quantized checkpoint provides it)."""

    name: str
    weight: QuantDesc
    on_load: bool  # can be applied while loading a float checkpoint, with no calibration data
    doc: str


SCHEMES = {s.name: s for s in (
    Scheme("none", UNQUANTIZED, True, "every weight in the run dtype"),
    Scheme("fp8", QuantDesc("fp8", "per_tensor", act="fp8_tensor"), True,
           "FP8 E4M3 W8A8: one scale per weight, activations scaled per tensor at run time"),
    Scheme("fp8-channel", QuantDesc("fp8", "per_channel", act="fp8_token"), True,
           "FP8 E4M3 W8A8: one scale per output channel, activations scaled per token"),
    Scheme("int8-wo", QuantDesc("int8", "per_channel"), True,
           "INT8 weight-only, one scale per output channel"),
    Scheme("int4-wo", QuantDesc("int4", "per_group", 128, zero_points=True), True,
           "INT4 weight-only, group 128 with zero points, round-to-nearest (the AWQ layout, no calibration)"),
    Scheme("smoothquant", QuantDesc("int8", "per_channel", act="int8_token"), False,
           "INT8 W8A8 SmoothQuant: activations smoothed per channel, scaled per token"),
    Scheme("awq", QuantDesc("int4", "per_group", 128, zero_points=True), False,
           "INT4 AWQ, group 128 with zero points"),
    Scheme("gptq", QuantDesc("int4", "per_group", 128, zero_points=True), False,
           "INT4 GPTQ, group 128 with zero points"),
    Scheme("gguf", QuantDesc("gguf", "blocks"), False,
           "a GGUF file's quantized blocks kept as stored (the type comes from each tensor)"),
)}


# An on-load scheme's name with this suffix quantizes the LM head too (TensorRT-LLM's --quantize_lm_head): by
# default the last linear before the logits stays in the run dtype, as most checkpoints keep it, because it
# costs the most accuracy; at batch 1 it is one eighth of an 8B model's weight bytes in fp8, a sixth in int4.
LM_HEAD = "+lm-head"
# --quantization names: every scheme, and each on-load scheme that quantizes weights with the suffix
NAMES = tuple(SCHEMES) + tuple(n + LM_HEAD for n, s in SCHEMES.items() if s.on_load and s.weight.quantized)


def split_name(name: str) -> tuple[Scheme, bool]:
    """(the scheme, whether the LM head is quantized too) of a --quantization name in NAMES."""
    if name not in NAMES:
        raise KeyError(name)
    base = name.removesuffix(LM_HEAD)
    return SCHEMES[base], base != name


class QuantError(ValueError):
    """A quantized tensor that does not fit its format; the message names the weight."""


# ---------------------------------------------------------------- the stored weight


@dataclass
class QWeight:
    """A linear weight of logical shape [out, in] stored in a quantized format (module doc)."""

    desc: QuantDesc
    shape: tuple[int, int]
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None  # fp8 static activation scale, fp32 []
    smooth: torch.Tensor | None = None  # SmoothQuant divisor of x's columns, fp32 [in]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored parts by name (q, scale, and whichever optional ones are set)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device: torch.device | str) -> "QWeight":
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] values this weight stands for."""
        out, n_in = self.shape
        kind = self.desc.dtype
        if kind == "fp8" or kind == "int8":
            s = self.scale.float()
            w = self.q.float() * (s if s.dim() == 0 else s.reshape(out, 1))
        elif kind == "int4":
            q = unpack_int4(self.q).float()  # [out, in]
            group = self.g_idx.long() if self.g_idx is not None else \
                torch.arange(n_in, device=q.device) // self.desc.group_size
            zero = self.zero.float()[:, group] if self.zero is not None else 8.0
            w = (q - zero) * self.scale.float()[:, group]
        elif kind.startswith("gguf_"):
            w = gguf_dequantize(self.q.reshape(-1), kind[5:]).reshape(out, n_in)
        else:
            raise QuantError(f"no dequantization for storage format '{kind}'")
        return w.to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] @ W^T (+ bias) with this format's activation quantization: the reference."""
        act = self.desc.act
        if act == "none":
            return F.linear(x, self.dequantize(x.dtype), bias)
        xf = x.float()
        if act == "int8_token":
            if self.smooth is not None:
                xf = xf / self.smooth.float()
            xq, sx = quantize_rows(xf, "int8")
        elif act == "fp8_tensor":
            sx = self.input_scale.float() if self.desc.act_static else \
                scale_of(xf.abs().amax(), FP8_MAX)
            xq = (xf / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        elif act == "fp8_token":
            xq, sx = quantize_rows(xf, "fp8")
        else:
            raise QuantError(f"no activation quantization '{act}'")
        # Products of two quantized operands, accumulated in fp32, then both scales: what
        # cuBLASLt's fp8 GEMM and an int8 GEMM with a scaling epilogue compute.
        wq = self.q.float()
        sw = self.scale.float()
        y = (xq @ wq.t()) * sx * (sw if sw.dim() == 0 else sw.reshape(1, -1))
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor | QWeight, bias: torch.Tensor | None = None,
           lora: Any = None, name: str | None = None) -> torch.Tensor:
    """The `linear` op's reference: a plain weight, or a quantized one through its format; then,
    given the step's LoRA (runtime/lora.py LoraStep), each row's adapter delta on weight `name`."""
    y = w.linear(x, bias) if isinstance(w, QWeight) else F.linear(x, w, bias)
    return y if lora is None else lora.apply(name, x, y)


def scale_of(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The symmetric scale of fp32 `amax` for a grid of +-top: amax times the fp32 reciprocal of
    top. A product, not a quotient, because torch divides a CUDA tensor by a Python number that
    way while the CPU divides exactly; spelled as a product, the CPU, torch on the GPU and the
    generated act-quant kernel (templates/quant_act.cu.j2) agree bit for bit."""
    return amax.clamp(min=1e-12) * (1.0 / top)


def quantize_rows(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization of fp32 x: (values as fp32, scales [rows, 1])."""
    top = FP8_MAX if kind == "fp8" else INT8_MAX
    s = scale_of(x.abs().amax(dim=1, keepdim=True), top)
    if kind == "fp8":
        return (x / s).clamp(-top, top).to(torch.float8_e4m3fn).float(), s
    return (x / s).round().clamp(-top, top), s


# ---------------------------------------------------------------- quantizing a float weight


def quantize_weight(w: torch.Tensor, desc: QuantDesc, name: str = "weight") -> QWeight:
    """Round-to-nearest quantization of a float [out, in] weight to `desc` (the on-load schemes;
    calibrated ones — SmoothQuant, AWQ, GPTQ — start from this and adjust, in `kiln quantize`)."""
    if w.dim() != 2:
        raise QuantError(f"weight '{name}': only 2-D [out, in] weights are quantized, got {list(w.shape)}")
    wf = w.float()
    out, n_in = wf.shape
    kind = desc.dtype
    if kind == "fp8":
        if desc.scale_layout == "per_tensor":
            s = scale_of(wf.abs().amax(), FP8_MAX)
            q = (wf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            qf, s = quantize_rows(wf, "fp8")
            q, s = qf.to(torch.float8_e4m3fn), s.reshape(out)
        return QWeight(desc, (out, n_in), q, s.float())
    if kind == "int8":
        qf, s = quantize_rows(wf, "int8")
        return QWeight(desc, (out, n_in), qf.to(torch.int8), s.reshape(out).float())
    if kind == "int4":
        g = desc.group_size
        if n_in % g or n_in % 2:
            raise QuantError(f"weight '{name}': {n_in} input features are not whole groups of {g}")
        wg = wf.reshape(out, n_in // g, g)
        lo, hi = wg.amin(dim=2), wg.amax(dim=2)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, 15)
        q = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).reshape(out, n_in)
        return QWeight(desc, (out, n_in), pack_int4(q.to(torch.uint8)), scale, zero)
    raise QuantError(f"weight '{name}': cannot quantize to {desc} on load")


def share_scale(ws: list[QWeight]) -> list[QWeight]:
    """Per-tensor fp8 siblings (linears of one input, which the cuda backend runs as one GEMM with
    one weight scale) requantized to their largest scale, so every backend computes with the
    same weights (as vLLM does for fused QKV). Other formats are returned as they are."""
    if len(ws) < 2 or ws[0].desc.dtype != "fp8" or ws[0].desc.scale_layout != "per_tensor":
        return ws
    s = torch.stack([w.scale.float() for w in ws]).amax()
    return [replace(w, q=(w.q.float() * (w.scale.float() / s)).to(torch.float8_e4m3fn), scale=s.clone())
            for w in ws]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] uint8 values 0..15 -> [out, in // 2] bytes, even columns in the low nibbles."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: [out, in // 2] bytes -> [out, in] uint8 values 0..15."""
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.uint8, device=p.device)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out


# ---------------------------------------------------------------- ggml blocks

# bytes per block of 32 values, offset of the quants (the simple types done in torch)
_GGML_SIMPLE = {"q8_0": (34, 2), "q4_0": (18, 2), "q4_1": (20, 4)}
GGML_BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q5_k": (256, 176),
              "q6_k": (256, 210)}  # values per block, bytes per block


def gguf_dequantize(data: torch.Tensor, kind: str) -> torch.Tensor:
    """Flat uint8 ggml blocks of `kind` -> flat float32 values, bit-identical to
    gguf.quants.dequantize. The 32-value types are whole-tensor torch ops (gguf's numpy code
    splits every tensor into groups of rows and is several times slower); the K-quants go
    through gguf."""
    if kind in _GGML_SIMPLE:
        size, head = _GGML_SIMPLE[kind]
        blocks = data.view(-1, size)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()  # [n, 1] block scale
        qs = blocks[:, head:]
        out = torch.empty(blocks.shape[0], 32, device=data.device)
        if kind == "q8_0":
            return out.copy_(qs.contiguous().view(torch.int8)).mul_(d).reshape(-1)
        # 4-bit: the low nibbles are the block's first 16 values, the high ones its last 16.
        out[:, :16].copy_(qs & 0x0F)
        out[:, 16:].copy_(qs >> 4)
        if kind == "q4_0":
            return out.sub_(8).mul_(d).reshape(-1)
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()  # q4_1: block minimum
        return out.mul_(d).add_(m).reshape(-1)
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[kind.upper()]
    values = dequantize(data.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1)).to(data.device)


def describe(w: Any) -> str:
    """A weight's storage, for messages: 'fp8 (per_tensor)' or 'float32'."""
    return str(w.desc) if isinstance(w, QWeight) else str(w.dtype).replace("torch.", "")
