"""The network helper generated `network.py` modules are written with: TensorRT plumbing (casts,
elementwise, reductions, shuffles, constants, the paged KV-cache machinery) and `op`, which
defines one Kiln op through its definition's TensorRT lowering (dsl/ops: `OpDef.trt`).

Tensors are 2-D `[T, features]` over the flattened token batch, in the run dtype; the
network is strongly typed, so every cast is explicit (norms, softmax and attention
scores run in float32 as the reference does). Weights are named constants (their Kiln
names, so an engine built with refit can be refitted from `weights.safetensors`).

Attention reads and writes the shared paged KV cache `[pages, kv_heads, page_size, head_dim]`:
new K/V rows are written in place by the KV-cache-update layer (packed form, one "sequence"
per page), then each sequence's keys are gathered from the pages of its block table and
attended through `IAttention` with a mask (same sequence, causal, window). The host side of
this contract (the index inputs) is `runtime.trt_backend.step_inputs`.
"""

from __future__ import annotations

import torch
from kiln.dsl.dtypes import RUN_DTYPES
from kiln.dsl.ops import OPS, OpKind


class TrtLoweringError(Exception):
    """An op this TensorRT cannot express; the message names the op and its spec line."""


class Network:
    def __init__(self, trt, network, weights, *, dtype: str, max_seq_len: int, page_size: int):
        self.trt, self.net, self.weights = trt, network, weights
        self.dtype_name = dtype
        self.dtype = getattr(trt, RUN_DTYPES[dtype].trt)
        self.torch_dtype = RUN_DTYPES[dtype].torch
        self.max_seq_len, self.page_size = max_seq_len, page_size
        self._keep: list = []  # host buffers must outlive the build (TensorRT holds pointers)
        self._consts: dict[str, object] = {}
        self.cache: dict[tuple, object] = {}  # derived tensors shared by several ops (masks, tables)
        self.inputs: dict[str, object] = {}

    # ---------------------------------------------------------------- plumbing
    def input(self, name: str, dtype, shape: tuple[int, ...]):
        t = self.net.add_input(name, dtype, shape)
        self.inputs[name] = t
        return t

    def _out(self, layer, name: str | None = None):
        if name:
            layer.name = name
        return layer.get_output(0)

    def const(self, value: torch.Tensor, name: str | None = None):
        """A constant from a host tensor; `name` makes it a named (refittable) weight."""
        t = value.detach().to("cpu").contiguous()
        self._keep.append(t)
        kind = {torch.float32: self.trt.float32, torch.float16: self.trt.float16,
                torch.bfloat16: self.trt.bfloat16, torch.int32: self.trt.int32,
                torch.int64: self.trt.int64, torch.bool: self.trt.bool}[t.dtype]
        w = self.trt.Weights(kind, t.data_ptr(), t.numel())
        layer = self.net.add_constant(tuple(t.shape), w)
        if name is not None:
            self.net.set_weights_name(w, name)
            layer.name = name
        return layer.get_output(0)

    def weight(self, name: str):
        """The weight `name` ([out, in] etc., in the run dtype), one constant per name."""
        if name not in self._consts:
            self._consts[name] = self.const(self.weights[name].to(self.torch_dtype), name)
        return self._consts[name]

    def scalar(self, value: float, dtype=torch.float32, rank: int = 2):
        return self.const(torch.full((1,) * rank, value, dtype=dtype))

    def cast(self, x, to):
        return x if x.dtype == to else self.net.add_cast(x, to).get_output(0)

    def f32(self, x):
        return self.cast(x, self.trt.float32)

    def run_dtype(self, x):
        return self.cast(x, self.dtype)

    def ew(self, a, b, op: str):
        return self.net.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op)).get_output(0)

    def unary(self, x, op: str):
        return self.net.add_unary(x, getattr(self.trt.UnaryOperation, op)).get_output(0)

    def activation(self, x, kind: str):
        return self.net.add_activation(x, getattr(self.trt.ActivationType, kind)).get_output(0)

    def shuffle(self, x, reshape=None, first=None, second=None):
        layer = self.net.add_shuffle(x)
        layer.zero_is_placeholder = False
        if first is not None:
            layer.first_transpose = first
        if reshape is not None:
            layer.reshape_dims = reshape
        if second is not None:
            layer.second_transpose = second
        return layer.get_output(0)

    def row(self, v):
        """[n] -> [1, n], to broadcast over tokens."""
        return self.shuffle(v, reshape=(1, -1))

    def column(self, v):
        """[n] -> [n, 1]."""
        return self.shuffle(v, reshape=(-1, 1))

    def reduce(self, x, op: str, axis: int):
        return self.net.add_reduce(x, getattr(self.trt.ReduceOperation, op), 1 << axis, True).get_output(0)

    def gather(self, data, indices, axis: int):
        return self.net.add_gather(data, indices, axis).get_output(0)

    def op(self, kind: OpKind, *operands, **kwargs):
        """The op `kind` on these operands, as its definition spells it in TensorRT layers."""
        low = OPS[kind].trt
        if isinstance(low, str):
            raise TrtLoweringError(f"op '{kind.value}' has no TensorRT lowering: {low}")
        return low.build(self, *operands, **kwargs)

    # ---------------------------------------------------------------- rotary and attention plumbing
    def position_ids(self):
        if "position_ids" not in self.cache:  # [1, T] int64, as the rotary layer wants
            self.cache["position_ids"] = self.shuffle(self.cast(self.inputs["positions"], self.trt.int64),
                                                       reshape=(1, -1))
        return self.cache["position_ids"]

    def to_heads(self, x, heads: int, head_dim: int):
        """[T, H * D] -> [1, H, T, D]."""
        return self.shuffle(x, reshape=(1, -1, heads, head_dim), second=(0, 2, 1, 3))

    def from_heads(self, x, heads: int, head_dim: int):
        """[1, H, T, D] -> [T, H * D]."""
        return self.shuffle(x, first=(0, 2, 1, 3), reshape=(-1, heads * head_dim))

    def attention_mask(self, causal: bool, window: int | None):
        """bool [1, 1, T, N]: token t may attend to gathered key n (same sequence, causal, window)."""
        key = ("mask", causal, window)
        if key not in self.cache:
            def q_side(t):  # [T] -> [1, 1, T, 1]
                return self.shuffle(self.inputs[t], reshape=(1, 1, -1, 1))

            def k_side(t):  # [N] -> [1, 1, 1, N]
                return self.shuffle(self.inputs[t], reshape=(1, 1, 1, -1))

            q_pos, k_pos = q_side("positions"), k_side("kv_pos")
            ok = self.ew(q_side("token_seq"), k_side("kv_seq"), "EQUAL")
            if causal:
                ok = self.ew(ok, self.unary(self.ew(k_pos, q_pos, "GREATER"), "NOT"), "AND")
            if window is not None:
                lo = self.ew(q_pos, self.scalar(window, torch.int32, rank=4), "SUB")
                ok = self.ew(ok, self.ew(k_pos, lo, "GREATER"), "AND")
            self.cache[key] = ok
        return self.cache[key]

    def kv_rows(self, kv_heads: int):
        """int32 [N, Hk]: row of each gathered key and head in a cache viewed as [pages * Hk * S, D]."""
        key = ("kv_rows", kv_heads)
        if key not in self.cache:
            s = self.page_size
            base = self.ew(self.ew(self.column(self.inputs["kv_page"]), self.scalar(kv_heads * s, torch.int32),
                                   "PROD"), self.column(self.inputs["kv_slot"]), "SUM")  # [N, 1]
            heads = self.const((torch.arange(kv_heads, dtype=torch.int32) * s)[None, :])  # [1, Hk]
            self.cache[key] = self.ew(base, heads, "SUM")
        return self.cache[key]

    def cache_update(self, cache, new, kv_heads: int, head_dim: int):
        """Write the step's rows into the paged cache in place; returns the updated cache."""
        rows = self.gather(self.shuffle(new, reshape=(-1, kv_heads, head_dim)), self.inputs["write_order"], 0)
        layer = self.net.add_kv_cache_update(cache, rows, self.inputs["page_write_start"],
                                             self.trt.KVCacheMode.LINEAR)
        layer.update_form = self.trt.AttentionIOForm.PACKED_NHD  # [tokens sorted by page, Hk, D]
        layer.update_lengths = self.inputs["page_write_cu"]
        return layer.get_output(0)

    def gather_keys(self, cache, kv_heads: int, head_dim: int):
        """[P, Hk, S, D] -> [1, Hk, N, D]: every key the step's sequences attend to."""
        flat = self.shuffle(cache, reshape=(-1, head_dim))
        keys = self.gather(flat, self.kv_rows(kv_heads), 0)  # [N, Hk, D]
        return self.shuffle(keys, reshape=(1, -1, kv_heads, head_dim), second=(0, 2, 1, 3))

    # ---------------------------------------------------------------- outputs
    def logits(self, x):
        """float32 [R, V]: the rows of x named by the `logit_rows` input."""
        out = self.f32(self.gather(x, self.inputs["logit_rows"], 0))
        out.name = "logits"
        self.net.mark_output(out)
        return out
