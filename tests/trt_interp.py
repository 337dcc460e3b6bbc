"""A torch interpreter of a real TensorRT `INetworkDefinition` (test helper, CPU).

No machine here can execute a TensorRT-RTX engine (no GPU on CI; RTX refuses the H100), so
the tests check Kiln's lowering by running the network *definition* TensorRT built, layer
by layer, with torch ops that follow TensorRT's documented semantics of each layer. This
checks our shapes, layouts, index inputs and masks against the reference executor; it
does not check TensorRT's kernels (tests/gpu/test_trt_run.py does, where an engine runs).
The KV-cache-update layer writes its cache input in place, as TensorRT does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dtypes(t):
    return {t.float32: torch.float32, t.float16: torch.float16, t.bfloat16: torch.bfloat16, t.int32: torch.int32,
            t.int64: torch.int64, t.bool: torch.bool}


def _axes(mask: int, rank: int) -> list[int]:
    return [i for i in range(rank) if mask >> i & 1]


def run_network(t, net, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluate every layer of `net` (module `t`) on `inputs`; returns the marked outputs."""
    env: dict[str, torch.Tensor] = {}
    for i in range(net.num_inputs):
        x = net.get_input(i)
        env[x.name] = inputs[x.name]
    dt = _dtypes(t)
    L = t.LayerType
    pending = [net.get_layer(n) for n in range(net.num_layers)]
    while pending:  # layers are listed in creation order, not always topologically (set_input)
        waiting = []
        for layer in pending:
            names = [layer.get_input(j).name if layer.get_input(j) is not None else None
                     for j in range(layer.num_inputs)]
            if any(x is not None and x not in env for x in names):
                waiting.append(layer)
                continue
            kind = layer.type
            cls = {L.CONSTANT: t.IConstantLayer, L.GATHER: t.IGatherLayer, L.MATRIX_MULTIPLY: t.IMatrixMultiplyLayer,
                   L.ELEMENTWISE: t.IElementWiseLayer, L.UNARY: t.IUnaryLayer, L.ACTIVATION: t.IActivationLayer,
                   L.REDUCE: t.IReduceLayer, L.CAST: t.ICastLayer, L.SHUFFLE: t.IShuffleLayer,
                   L.NORMALIZATION: t.INormalizationLayer, L.SOFTMAX: t.ISoftMaxLayer, L.TOPK: t.ITopKLayer,
                   L.ROTARY_EMBEDDING: t.IRotaryEmbeddingLayer, L.KV_CACHE_UPDATE: t.IKVCacheUpdateLayer}.get(kind)
            if cls is not None:
                layer.__class__ = cls  # the bindings hand out the base class; attributes need the subclass
            args = [None if x is None else env[x] for x in names]
            try:
                outs = _eval(t, dt, layer, kind, args)
            except Exception as e:
                shapes = [None if a is None else tuple(a.shape) for a in args]
                raise RuntimeError(f"interpreter: {layer.name} on inputs {names} {shapes}: {e} {args}") from e
            for j, o in enumerate(outs):
                env[layer.get_output(j).name] = o
        if len(waiting) == len(pending):
            raise RuntimeError(f"interpreter: no progress; {waiting[0].name} waits for an input nothing makes")
        pending = waiting
    return {net.get_output(i).name: env[net.get_output(i).name] for i in range(net.num_outputs)}


def _eval(t, dt, layer, kind, ins):
    L = t.LayerType
    if kind == L.CONSTANT:
        w = torch.from_numpy(layer.weights.copy())  # the bindings return a numpy array
        return [w.reshape(tuple(layer.shape))]
    if kind == L.GATHER:
        data, idx = ins
        ax = layer.axis
        out = data.index_select(ax, idx.reshape(-1).long())
        return [out.reshape(data.shape[:ax] + idx.shape + data.shape[ax + 1:])]
    if kind == L.MATRIX_MULTIPLY:
        a, b = ins
        if layer.op0 == t.MatrixOperation.TRANSPOSE:
            a = a.transpose(-1, -2)
        if layer.op1 == t.MatrixOperation.TRANSPOSE:
            b = b.transpose(-1, -2)
        return [torch.matmul(a, b)]
    if kind == L.ELEMENTWISE:
        a, b = ins
        op = layer.op.name
        fn = {"SUM": torch.add, "SUB": torch.sub, "PROD": torch.mul, "DIV": torch.div, "MAX": torch.maximum,
              "MIN": torch.minimum, "EQUAL": torch.eq, "GREATER": torch.gt, "LESS": torch.lt,
              "AND": torch.logical_and, "OR": torch.logical_or, "POW": torch.pow}[op]
        return [fn(a, b)]
    if kind == L.UNARY:
        x = ins[0]
        fn = {"SQRT": torch.sqrt, "RECIP": torch.reciprocal, "NOT": torch.logical_not, "EXP": torch.exp,
              "NEG": torch.neg, "ABS": torch.abs}[layer.op.name]
        return [fn(x)]
    if kind == L.ACTIVATION:
        x = ins[0]
        fn = {"SIGMOID": torch.sigmoid, "TANH": torch.tanh, "RELU": F.relu, "GELU_ERF": F.gelu,
              "GELU_TANH": lambda v: F.gelu(v, approximate="tanh")}[layer.type.name]
        return [fn(x)]
    if kind == L.REDUCE:
        x = ins[0]
        dims = _axes(layer.axes, x.dim())
        fn = {"SUM": torch.sum, "AVG": torch.mean, "MAX": torch.amax, "MIN": torch.amin}[layer.op.name]
        return [fn(x, dim=dims, keepdim=layer.keep_dims)]
    if kind == L.CAST:
        return [ins[0].to(dt[layer.to_type])]
    if kind == L.SHUFFLE:
        x = ins[0]
        first = list(layer.first_transpose)[:x.dim()]
        if first != list(range(x.dim())):
            x = x.permute(*first)
        if layer.reshape_dims is not None:  # None: no reshape was set
            x = x.reshape(tuple(layer.reshape_dims))
        second = list(layer.second_transpose)[:x.dim()]
        if second != list(range(x.dim())):
            x = x.permute(*second)
        return [x]
    if kind == L.NORMALIZATION:
        x, scale, bias = ins
        dims = _axes(layer.axes, x.dim())
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        return [(x - mean) / torch.sqrt(var + layer.epsilon) * scale + bias]
    if kind == L.SOFTMAX:
        (d,) = _axes(layer.axes, ins[0].dim())
        return [torch.softmax(ins[0], d)]
    if kind == L.TOPK:
        (d,) = _axes(layer.axes, ins[0].dim())
        v, i = torch.topk(ins[0], layer.k, dim=d, largest=layer.op == t.TopKOperation.MAX)
        return [v, i.to(torch.int32)]
    if kind == L.SELECT:
        return [torch.where(*ins)]
    if kind == L.ROTARY_EMBEDDING:
        return [_rotary(layer, *ins)]
    if kind == L.KV_CACHE_UPDATE:
        cache, update, start, cu = ins  # packed form: rows cu[b]:cu[b+1] go to cache[b, :, start[b]:]
        for b in range(cache.shape[0]):
            lo, hi = int(cu[b]), int(cu[b + 1])
            if hi > lo:
                s = int(start[b])
                cache[b, :, s:s + hi - lo] = update[lo:hi].transpose(0, 1)
        return [cache]
    if kind == L.ATTENTION_INPUT:  # IAttention (softmax, no causal kind: Kiln always passes a mask)
        q, k, v, mask = ins
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)).masked_fill(~mask, -math.inf)
        return [torch.matmul(torch.softmax(s, -1), v.float()).to(q.dtype)]
    if kind == L.ATTENTION_OUTPUT:
        return [ins[0]]
    raise NotImplementedError(f"interpreter: layer type {kind} ({layer.name})")


def _rotary(layer, x, cos, sin, pos):
    """x [B, H, S, D]; cos/sin [max_pos, R/2] indexed by pos [B, S]; the first R dims rotate."""
    r = layer.rotary_embedding_dim or x.shape[-1]
    c, s = cos[pos.long()][:, None], sin[pos.long()][:, None]  # [B, 1, S, R/2]
    rot, rest = x[..., :r], x[..., r:]
    if layer.interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2)
    else:
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = torch.cat([a * c - b * s, b * c + a * s], -1)
    return torch.cat([out, rest], -1)


def plan_logits(trt, plan, weights, batch, folder, pages: int = 1, page_size: int = 16):
    """Logits of every token of `batch` (one step, no attention sites' cache needed beyond `pages`)
    from the TensorRT network Kiln generates for `plan`, defined with `trt` and interpreted here."""
    import importlib.util

    from kiln.codegen.trt_network import Limits, render_network
    from kiln.runtime.trt_backend import step_inputs

    path = folder / "network.py"
    path.write_text(render_network(plan, "fp32", Limits(1, 16, 16, page_size)))
    spec = importlib.util.spec_from_file_location(f"network_{plan.spec.name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = trt.module
    net = t.Builder(t.Logger(t.Logger.ERROR)).create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    owner = mod.build_network(t, net, weights)  # noqa: F841  (holds the constants' memory until the run)
    return run_network(t, net, step_inputs(batch, page_size, pages, bool(plan.sites), all_logits=True))["logits"]
