"""The layer vocabulary generated `network.py` modules are written in: one method per Kiln op,
each spelled with native TensorRT layers, following runtime/reference.py op by op.

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

import math

import torch

from kiln.runtime.rope import inv_freq

from .trt_api import DTYPES

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrtLoweringError(Exception):
    """An op this TensorRT cannot express; the message names the op and its spec line."""


class Network:
    def __init__(self, trt, network, weights, *, dtype: str, max_seq_len: int, page_size: int):
        self.trt, self.net, self.weights = trt, network, weights
        self.dtype_name = dtype
        self.dtype = getattr(trt, DTYPES[dtype])
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.max_seq_len, self.page_size = max_seq_len, page_size
        self._keep: list = []  # host buffers must outlive the build (TensorRT holds pointers)
        self._consts: dict[str, object] = {}
        self._cache: dict[tuple, object] = {}  # derived tensors shared by several ops (masks, tables)
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

    def _operand(self, b):
        """A `[n]` second operand (a weight) broadcast over tokens; activations pass through."""
        return self.row(b) if len(b.shape) == 1 else b

    # ---------------------------------------------------------------- ops
    def embedding(self, ids, table):
        return self.gather(table, ids, 0)  # [T, D]

    def linear(self, x, w, b=None):
        y = self.net.add_matrix_multiply(x, self.trt.MatrixOperation.NONE,
                                          w, self.trt.MatrixOperation.TRANSPOSE).get_output(0)  # [T, out]
        return y if b is None else self.ew(y, self.row(b), "SUM")

    def rmsnorm(self, x, w, eps: float, offset: float = 0.0, group: int | None = None):
        xf = self.f32(x)  # [T, D] float32
        width = x.shape[1]
        if group:  # each run of `group` features on its own: [T, D / group, group]
            xf = self.shuffle(xf, reshape=(-1, width // group, group))
        axis = len(xf.shape) - 1
        ms = self.reduce(self.ew(xf, xf, "PROD"), "AVG", axis)  # [T, 1] or [T, D / group, 1]
        inv = self.unary(self.unary(self.ew(ms, self.scalar(eps, rank=axis + 1), "SUM"), "SQRT"), "RECIP")
        scale = self.shuffle(self.f32(w), reshape=(1,) * axis + (-1,))
        if offset:
            scale = self.ew(scale, self.scalar(offset, rank=axis + 1), "SUM")
        y = self.ew(self.ew(xf, inv, "PROD"), scale, "PROD")
        return self.run_dtype(self.shuffle(y, reshape=(-1, width)) if group else y)

    def layernorm(self, x, w, b=None, eps: float = 1e-5):
        xf = self.f32(x)
        scale = self.row(self.f32(w))
        bias = self.row(self.f32(b)) if b is not None else self.const(torch.zeros(1, x.shape[1]))
        layer = self.net.add_normalization_v2(xf, scale, bias, 1 << 1)
        layer.epsilon = eps
        return self.run_dtype(layer.get_output(0))

    def act(self, x, fn: str):
        if fn == "silu":
            return self.ew(x, self.activation(x, "SIGMOID"), "PROD")
        kinds = {"gelu": "GELU_ERF", "gelu_tanh": "GELU_TANH", "relu": "RELU", "sigmoid": "SIGMOID", "tanh": "TANH"}
        return self.activation(x, kinds[fn])

    def softcap(self, x, cap: float):
        xf = self.f32(x)
        y = self.activation(self.ew(xf, self.scalar(1.0 / cap), "PROD"), "TANH")
        return self.run_dtype(self.ew(y, self.scalar(cap), "PROD"))

    def scale(self, x, factor: float):
        """x * factor, rounded once, as torch multiplies by a Python scalar."""
        return self.run_dtype(self.ew(self.f32(x), self.scalar(factor), "PROD"))

    def add(self, a, b):
        return self.ew(a, self._operand(b), "SUM")

    def sub(self, a, b):
        return self.ew(a, self._operand(b), "SUB")

    def mul(self, a, b):
        return self.ew(a, self._operand(b), "PROD")

    def split(self, x, sizes: list[int]):
        outs, start = [], 0
        for n in sizes:
            outs.append(self.gather(x, self.const(torch.arange(start, start + n, dtype=torch.int32)), 1))
            start += n
        return tuple(outs)

    # ---------------------------------------------------------------- rotary
    def rope_table(self, rotary_dim: int, theta: float, scaling, max_pos):
        """cos, sin [max_seq_len, rotary_dim / 2] in the run dtype (angles in float32, as HF)."""
        key = ("rope", rotary_dim, theta, scaling, max_pos)
        if key not in self._cache:
            freqs = inv_freq(rotary_dim, theta, scaling, None, max_pos)  # [R/2]
            angles = torch.arange(self.max_seq_len, dtype=torch.float32)[:, None] * freqs
            self._cache[key] = (self.const(angles.cos().to(self.torch_dtype)),
                                self.const(angles.sin().to(self.torch_dtype)))
        return self._cache[key]

    def position_ids(self):
        if "position_ids" not in self._cache:  # [1, T] int64, as the rotary layer wants
            self._cache["position_ids"] = self.shuffle(self.cast(self.inputs["positions"], self.trt.int64),
                                                       reshape=(1, -1))
        return self._cache["position_ids"]

    def to_heads(self, x, heads: int, head_dim: int):
        """[T, H * D] -> [1, H, T, D]."""
        return self.shuffle(x, reshape=(1, -1, heads, head_dim), second=(0, 2, 1, 3))

    def from_heads(self, x, heads: int, head_dim: int):
        """[1, H, T, D] -> [T, H * D]."""
        return self.shuffle(x, first=(0, 2, 1, 3), reshape=(-1, heads * head_dim))

    def rope(self, x, head_dim: int, rotary_dim: int, layout: str, table):
        heads = x.shape[1] // head_dim
        cos, sin = table
        layer = self.net.add_rotary_embedding(self.to_heads(x, heads, head_dim), cos, sin,
                                              layout == "interleaved", rotary_dim)
        layer.set_input(3, self.position_ids())
        return self.from_heads(layer.get_output(0), heads, head_dim)

    # ---------------------------------------------------------------- attention
    def attention_mask(self, causal: bool, window: int | None):
        """bool [1, 1, T, N]: token t may attend to gathered key n (same sequence, causal, window)."""
        key = ("mask", causal, window)
        if key not in self._cache:
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
            self._cache[key] = ok
        return self._cache[key]

    def kv_rows(self, kv_heads: int):
        """int32 [N, Hk]: row of each gathered key and head in a cache viewed as [pages * Hk * S, D]."""
        key = ("kv_rows", kv_heads)
        if key not in self._cache:
            s = self.page_size
            base = self.ew(self.ew(self.column(self.inputs["kv_page"]), self.scalar(kv_heads * s, torch.int32),
                                   "PROD"), self.column(self.inputs["kv_slot"]), "SUM")  # [N, 1]
            heads = self.const((torch.arange(kv_heads, dtype=torch.int32) * s)[None, :])  # [1, Hk]
            self._cache[key] = self.ew(base, heads, "SUM")
        return self._cache[key]

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

    def attention(self, site: int, q, k, v, *, heads: int, kv_heads: int, head_dim: int, v_head_dim: int,
                  scale: float, causal: bool, window: int | None, softcap: float | None):
        kc = self.cache_update(self.inputs[f"k_cache.{site}"], k, kv_heads, head_dim)
        vc = self.cache_update(self.inputs[f"v_cache.{site}"], v, kv_heads, v_head_dim)
        for name, t in ((f"k_cache_out.{site}", kc), (f"v_cache_out.{site}", vc)):
            t.name = name
            self.net.mark_output(t)
        keys, vals = self.gather_keys(kc, kv_heads, head_dim), self.gather_keys(vc, kv_heads, v_head_dim)
        mask = self.attention_mask(causal, window)
        qh = self.to_heads(q, heads, head_dim)  # [1, Hq, T, D]
        if softcap is None and hasattr(self.net, "add_attention_v2"):
            qs = self.run_dtype(self.ew(self.f32(qh), self.scalar(scale, rank=4), "PROD"))  # IAttention wants q pre-scaled
            layer = self.net.add_attention_v2(qs, keys, vals, self.trt.AttentionNormalizationOp.SOFTMAX,
                                              self.trt.CausalMaskKind.NONE)
            layer.mask = mask
            layer.decomposable = True
            out = layer.get_output(0)  # [1, Hq, T, Dv]
        else:
            out = self._attention_decomposed(qh, keys, vals, mask, heads, kv_heads, head_dim, v_head_dim,
                                             scale, softcap)
        return self.from_heads(out, heads, v_head_dim)

    def _attention_decomposed(self, qh, keys, vals, mask, heads, kv_heads, head_dim, v_head_dim, scale, softcap):
        """matmul -> scale -> softcap -> mask -> softmax -> matmul in float32 (IAttention has no softcap)."""
        group = heads // kv_heads
        q = self.f32(self.shuffle(qh, reshape=(kv_heads, group, -1, head_dim)))  # [Hk, G, T, D]
        k = self.f32(self.shuffle(keys, reshape=(kv_heads, 1, -1, head_dim)))  # [Hk, 1, N, D]
        v = self.f32(self.shuffle(vals, reshape=(kv_heads, 1, -1, v_head_dim)))
        mm = self.trt.MatrixOperation
        s = self.net.add_matrix_multiply(q, mm.NONE, k, mm.TRANSPOSE).get_output(0)  # [Hk, G, T, N]
        s = self.ew(s, self.scalar(scale, rank=4), "PROD")
        if softcap is not None:
            s = self.ew(self.activation(self.ew(s, self.scalar(1.0 / softcap, rank=4), "PROD"), "TANH"),
                        self.scalar(softcap, rank=4), "PROD")
        s = self.net.add_select(mask, s, self.scalar(-math.inf, rank=4)).get_output(0)
        sm = self.net.add_softmax(s)
        sm.axes = 1 << 3
        o = self.net.add_matrix_multiply(sm.get_output(0), mm.NONE, v, mm.NONE).get_output(0)  # [Hk, G, T, Dv]
        return self.run_dtype(self.shuffle(o, reshape=(1, heads, -1, v_head_dim)))

    # ---------------------------------------------------------------- mixture of experts
    def moe_gates(self, logits, top_k: int, renormalize: bool, experts: int):
        """Per expert, [T, 1] in the run dtype: its router weight for each token (0 if not chosen)."""
        sm = self.net.add_softmax(self.f32(logits))
        sm.axes = 1 << 1
        top = self.net.add_topk(sm.get_output(0), self.trt.TopKOperation.MAX, top_k, 1 << 1)
        weights, chosen = top.get_output(0), top.get_output(1)  # [T, k] float32, [T, k] int32
        if renormalize:
            weights = self.ew(weights, self.reduce(weights, "SUM", 1), "DIV")
        gates = []
        for e in range(experts):
            hit = self.cast(self.ew(chosen, self.scalar(e, torch.int32), "EQUAL"), self.trt.float32)
            gates.append(self.run_dtype(self.reduce(self.ew(hit, weights, "PROD"), "SUM", 1)))
        return gates

    def moe_combine(self, outputs, gates):
        """sum_e outputs[e] * gates[e], experts in order (as the reference accumulates)."""
        total = None
        for y, g in zip(outputs, gates):
            part = self.ew(y, g, "PROD")
            total = part if total is None else self.ew(total, part, "SUM")
        return total

    # ---------------------------------------------------------------- outputs
    def logits(self, x):
        """float32 [R, V]: the rows of x named by the `logit_rows` input."""
        out = self.f32(self.gather(x, self.inputs["logit_rows"], 0))
        out.name = "logits"
        self.net.mark_output(out)
        return out
