"""The `cuda` backend: the fused kernel program (codegen/fuse.py) on a GPU.

Generated kernels (NVRTC) for norms, rotary + paged KV writes, attention, activations and
embeddings; dense GEMMs through cuBLAS (torch); sibling GEMMs fused by concatenating their
weights once at load. Pure-decode steps replay a CUDA graph captured per bucketed batch
size: static metadata buffers are refreshed from pinned host memory, then one replay — no
host synchronisation and no allocation inside. Everything the kernels do not cover runs
through the reference backend's op implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.codegen import kernels as K
from kiln.codegen.fuse import KOp, fuse
from kiln.dsl.checker import Plan

from .batch import StepBatch, host_meta
from .kv_store import KVStore
from .reference import ReferenceModel, _Step

_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Meta:
    """Device-side step metadata, shared by every attention op of a forward."""

    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int32: page * page_size + offset (-1: padding, not written)
    block_tables: torch.Tensor  # [S, max_pages] int32
    kv_lens: torch.Tensor  # [S] int32: tokens in the cache after this step
    cu_seqlens: torch.Tensor  # [S + 1] int32
    seq_len: torch.Tensor  # [1] int32: the longest sequence (dynamic rope)
    decode: bool  # every sequence has exactly one new token
    max_q_len: int
    max_context: int
    fresh: list[tuple[int, int]] | None = None  # (start, length) of each sequence, if none has context


class CudaModel:
    backend = "cuda"

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor], page_size: int = 16,
                 max_context: int = 4096, max_batch: int = 256, use_graphs: bool = True):
        first = next(iter(weights.values()))
        self.device, self.dtype = first.device, first.dtype
        if self.device.type != "cuda":
            raise ValueError("the cuda backend needs weights on a CUDA device")
        self.plan = plan
        self.page_size = page_size
        self.max_context = max_context
        self.max_batch = max_batch
        self.ops = fuse(plan, _DT[self.dtype], page_size)
        self.weights = dict(weights)  # a copy: entries are dropped below, the caller's stay
        self.ref = ReferenceModel(plan, self.weights)  # op implementations for what no kernel covers
        canonical: dict = {}  # one compiled kernel per distinct spec (origins differ per layer)

        def canon(spec):
            return canonical.setdefault(spec.key(), spec)

        self._gemm: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._scratch: dict = {}
        for n, op in enumerate(self.ops):
            if op.kind == "gemm":
                ws = [weights[w[2:]] for w in op.extra["weights"]]
                bs = [weights[b[2:]] if b else None for b in op.extra["biases"]]
                w = torch.cat(ws) if len(ws) > 1 else ws[0]
                b = (torch.cat(bs) if len(bs) > 1 else bs[0]) if bs[0] is not None else None
                self._gemm[n] = (w.contiguous(), b)
            elif op.kind == "attn":
                op.spec = tuple(canon(s) for s in op.spec)
                dspec = op.spec[1]
                if dspec.key() not in self._scratch:
                    self._scratch[dspec.key()] = K.decode_scratch(dspec, max_batch, max_context, self.device)
            elif op.spec is not None:
                op.spec = canon(op.spec)
        # Every op but attention treats rows (tokens) independently, so after the last attention
        # only the rows whose logits are wanted need computing (a prefill samples one row).
        attn_at = [n for n, op in enumerate(self.ops) if op.kind == "attn"]
        self._rows_from = attn_at[-1] + 1 if attn_at else 0
        # Weights that only fed a fused GEMM live on in its concatenation: drop the originals.
        needed = {i[2:] for op in self.ops if op.kind != "gemm" for ins in op.instrs for i in ins.inputs
                  if i and i.startswith("w:")}
        for n, op in enumerate(self.ops):
            if op.kind == "gemm" and op.extra["fused"]:
                for w in op.extra["weights"] + op.extra["biases"]:
                    if w and w[2:] not in needed:
                        self.weights.pop(w[2:], None)
        self.use_graphs = use_graphs and not any(op.kind == "torch" and op.instrs[0].kind == "moe" for op in self.ops)
        self._graphs: dict[int, _Graph] = {}

    # -- metadata ---------------------------------------------------------------------------
    def _meta(self, batch: StepBatch) -> _Meta:
        seqs = batch.seqs
        width = max(-(-self.max_context // self.page_size), max(len(s.block_table) for s in seqs))
        h = host_meta(batch, self.page_size, width)
        dev = self.device

        def up(a):
            return torch.from_numpy(a).pin_memory().to(dev, non_blocking=True)

        return _Meta(up(h.positions), up(h.slots), up(h.block_tables), up(h.kv_lens), up(h.cu_seqlens),
                     up(h.kv_lens.max(keepdims=True)), bool((h.lengths == 1).all()), int(h.lengths.max()),
                     self.max_context,
                     [(s.start, s.length) for s in seqs] if all(s.context == 0 and s.length > 1 for s in seqs)
                     else None)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        if kv.page_size != self.page_size:
            raise ValueError(f"KV cache page size {kv.page_size} != the kernels' {self.page_size}")
        batch.validate(kv.page_size)
        tokens = batch.tokens.to(self.device, non_blocking=True)
        decode = all(s.length == 1 for s in batch.seqs)
        longest = max(s.context + s.length for s in batch.seqs)
        if self.use_graphs and decode and not all_logits and longest <= self.max_context:
            bucket = next((b for b in GRAPH_BUCKETS if b >= len(batch.seqs) and b <= self.max_batch), None)
            if bucket is not None:
                graph = self._graphs.get(bucket)
                if graph is None:
                    graph = self._graphs[bucket] = _Graph(self, kv, bucket)
                return graph.replay(batch, tokens)[: len(batch.seqs)].float()
        meta = self._meta(batch)
        rows = None if all_logits else torch.tensor(batch.sample_rows()).pin_memory().to(self.device, non_blocking=True)
        return self._run(tokens, meta, kv, batch, rows=rows).float()

    def _run(self, tokens: torch.Tensor, meta: _Meta, kv: KVStore, batch: StepBatch | None,
             trace: dict | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of all rows, or of `rows` only. `trace`, if given, receives every value by
        name (tests use it to find where two backends first differ)."""
        env: dict[str, torch.Tensor] = {"tokens": tokens, "positions": meta.positions}
        T = tokens.shape[0]
        ctx = None
        for n, op in enumerate(self.ops):
            if n == self._rows_from and rows is not None:
                env = {name: v.index_select(0, rows) if v.dim() and v.shape[0] == T else v
                       for name, v in env.items()}
                T = rows.shape[0]
            k = op.kind
            if k == "gemm":
                w, b = self._gemm[n]
                y = torch.nn.functional.linear(env[op.ins[0]], w, b)
                if op.extra["fused"]:
                    for name, (start, width) in zip(op.outs, op.extra["slices"]):
                        env[name] = y[:, start:start + width]
                else:
                    env[op.outs[0]] = y
            elif k == "norm":
                spec = op.spec
                out = torch.empty(T, spec.hidden, dtype=self.dtype, device=self.device)
                bias = self.weights[op.extra["bias"][2:]] if spec.has_bias else None
                w = self.weights[op.extra["weight"][2:]]
                if spec.has_residual:
                    res_out = torch.empty_like(out)
                    K.norm(spec, _c(env[op.ins[1]]), w, out, residual=_c(env[op.ins[0]]), residual_out=res_out,
                           bias=bias)
                    env[op.outs[1]] = res_out
                else:
                    K.norm(spec, _c(env[op.ins[0]]), w, out, bias=bias)
                env[op.outs[0]] = out
            elif k == "attn":
                env[op.outs[0]] = self._attention(op, env, meta, kv, T)
            elif k == "act":
                out = torch.empty(T, op.spec.features, dtype=self.dtype, device=self.device)
                if op.spec.gated:
                    K.activation(op.spec, out, gate=env[op.ins[0]], up=env[op.ins[1]])
                else:
                    K.activation(op.spec, out, x=env[op.ins[0]])
                env[op.outs[0]] = out
            elif k == "embed":
                out = torch.empty(T, op.spec.hidden, dtype=self.dtype, device=self.device)
                K.embed(op.spec, tokens, self.weights[op.ins[1][2:]], out)
                env[op.outs[0]] = out
            elif k == "softcap":
                out = torch.empty_like(env[op.ins[0]])
                K.softcap(op.spec, _c(env[op.ins[0]]), out)
                env[op.outs[0]] = out
            elif k == "torch":
                ins = op.instrs[0]
                if ins.kind in ("rope", "moe") and ctx is None:
                    ctx = _Step(batch, kv)
                args = [None if i is None else (self.weights[i[2:]] if i.startswith("w:") else env[i])
                        for i in ins.inputs]
                out = self.ref._op(ins, args, ctx)
                for name, value in zip(ins.outputs, out if isinstance(out, tuple) else (out,)):
                    env[name] = value
            else:
                raise NotImplementedError(f"cuda backend: unhandled kernel op '{k}' ({op.instrs[0].op.pos})")
            if trace is not None:
                trace.update((o, env[o].clone()) for o in op.outs)
        return env[self.plan.program.output]

    def _attention(self, op: KOp, env, meta: _Meta, kv: KVStore, T: int) -> torch.Tensor:
        rope, dspec, pspec = op.spec
        q, k, v = (env[i] for i in op.ins)
        kc, vc = kv.k[op.extra["site"]], kv.v[op.extra["site"]]
        K.rope_write_kv(rope, q, k, v, meta.positions, meta.slots, kc, vc,
                        seq_len=meta.seq_len if rope.scaling == "dynamic" else None)
        out = torch.empty(T, dspec.heads * dspec.head_dim, dtype=self.dtype, device=self.device)
        if meta.fresh is not None and not pspec.window and not pspec.softcap and pspec.causal:
            # Whole prompts (no cached context): torch's flash attention (SDPA) over the rotated
            # K/V just written to the cache, gathered page by page.
            hd, hq, hk, ps = dspec.head_dim, dspec.heads, dspec.kv_heads, dspec.page_size
            for i, (start, length) in enumerate(meta.fresh):
                pages = meta.block_tables[i, : -(-length // ps)].long()
                ks = kc[pages].transpose(0, 1).reshape(hk, -1, hd)[:, :length]  # [Hk, L, D]
                vs = vc[pages].transpose(0, 1).reshape(hk, -1, hd)[:, :length]
                qs = q[start:start + length].unflatten(1, (hq, hd)).transpose(0, 1)  # [H, L, D]
                o = torch.nn.functional.scaled_dot_product_attention(
                    qs[None], ks[None], vs[None], is_causal=True, scale=dspec.scale, enable_gqa=hq != hk)
                out[start:start + length] = o[0].transpose(0, 1).flatten(1)
        elif meta.decode:
            K.paged_decode_attention(dspec, q, kc, vc, meta.block_tables, meta.kv_lens, out,
                                     self._scratch[dspec.key()], meta.max_context)
        else:
            K.prefill_attention(pspec, q, kc, vc, meta.block_tables, meta.cu_seqlens, meta.kv_lens, out,
                                meta.max_q_len)
        return out


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def fill_decode_buffers(batch: StepBatch, page_size: int, host, tables) -> None:
    """Write a decode batch into a graph's host buffers (numpy views of pinned memory):
    host [5, size] int64 rows: token, position, longest sequence (in [2, 0]), slot, kv length;
    tables [size, width] int32. Rows past the batch are padding: no K/V written, length 1."""
    S = len(batch.seqs)
    meta = host_meta(batch, page_size, tables.shape[1])
    host[0, :S] = batch.tokens.cpu().numpy()
    host[1, :S] = meta.positions
    host[3, :S] = meta.slots
    host[4, :S] = meta.kv_lens
    host[0:3, S:] = 0
    host[3, S:] = -1
    host[4, S:] = 1
    host[2, 0] = host[4].max()
    tables[:S] = meta.block_tables
    tables[S:] = 0


class _Graph:
    """A decode step for `size` sequences, captured once and replayed with new metadata."""

    def __init__(self, model: CudaModel, kv: KVStore, size: int):
        self.model = model
        dev = model.device
        self.size = size
        max_pages = -(-model.max_context // model.page_size)
        self.tokens = torch.zeros(size, dtype=torch.int64, device=dev)
        self.meta = _Meta(
            positions=torch.zeros(size, dtype=torch.int64, device=dev),
            slots=torch.full((size,), -1, dtype=torch.int32, device=dev),
            block_tables=torch.zeros(size, max_pages, dtype=torch.int32, device=dev),
            kv_lens=torch.ones(size, dtype=torch.int32, device=dev),
            cu_seqlens=torch.arange(size + 1, dtype=torch.int32, device=dev),
            seq_len=torch.ones(1, dtype=torch.int32, device=dev),
            decode=True, max_q_len=1, max_context=model.max_context)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm up (first launches load modules, cuBLAS picks algorithms)
            model._run(self.tokens, self.meta, kv, None)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model._run(self.tokens, self.meta, kv, None)
        self.host = torch.empty(5, size, dtype=torch.int64).pin_memory()
        self.tables = torch.zeros(size, max_pages, dtype=torch.int32).pin_memory()
        self.host_np, self.tables_np = self.host.numpy(), self.tables.numpy()  # same memory

    def replay(self, batch: StepBatch, tokens: torch.Tensor) -> torch.Tensor:
        m = self.meta
        fill_decode_buffers(batch, self.model.page_size, self.host_np, self.tables_np)
        h = self.host
        self.tokens.copy_(h[0], non_blocking=True)
        m.positions.copy_(h[1], non_blocking=True)
        m.slots.copy_(h[3], non_blocking=True)
        m.kv_lens.copy_(h[4], non_blocking=True)
        m.seq_len.copy_(h[2, :1], non_blocking=True)
        m.block_tables.copy_(self.tables, non_blocking=True)
        self.graph.replay()
        return self.logits
