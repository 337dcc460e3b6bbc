"""The `cuda` backend: the fused kernel program (codegen/fuse.py) on a GPU.

Generated kernels (NVRTC) for norms, rotary + paged KV writes, attention, activations,
embeddings and elementwise maps; dense GEMMs through cuBLAS (torch); sibling GEMMs fused by
concatenating their weights once at load. Pure-decode steps replay a CUDA graph captured per
bucketed batch size: static metadata buffers are refreshed from pinned host memory, then one
replay — no host synchronisation and no allocation inside. What no kernel covers runs its op
definition's reference (dsl/ops) on the GPU. Each kind of step is one method, found through
the table `_RUN`, keyed by codegen.fuse.Exec.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from kiln.codegen import gemv as G
from kiln.codegen import kernels as K
from kiln.codegen.fuse import Exec, KOp, fuse, last_reads, step_reads
from kiln.codegen.fuse import origin as fuse_origin
from kiln.codegen.specs import KernelSpecError
from kiln.dsl.ops import OPS, OpKind
from kiln.dsl.plan import Plan, Value, WeightArg, fetch
from kiln.dsl.quant import QWeight

from . import cuda_lt, cuda_quant
from .batch import StepBatch, host_meta
from .cuda_moe import MoeStep
from .cuda_quant import QGemm, SplitGemm
from .cuda_ssm import SsmStack, SsmSteps
from .kv_store import KVStore
from .lora import CudaLora, adapter_rows
from .reference import StepContext

# GEMMs of at most GEMV_ROWS rows with a plain weight (decode) run codegen/gemv.py's kernel instead of
# cuBLAS, as programmatic dependents ("pdl", the default), plain launches ("1") or not at all ("0":
# KILN_GEMV=0). On the H200 at one row (benchmarks/2026-12-02-03.md, session 7), 8B-model shapes: qkv
# 14.4 against cuBLAS's 16.5 us, o 9.6 / 13.1, down 28.9 / 32.0, gate+up 57.8 / 57.2; Mamba-2 2.7B decode
# 3.17 -> 2.90 ms. At 4 rows cuBLAS is faster at the wide shapes (gate+up 57.5 against 73.6 us), so one row
# by default (KILN_GEMV_ROWS, at most codegen.gemv.GEMV_MAX_T). Read when a step runs (and is captured).
GEMV = os.environ.get("KILN_GEMV", "pdl")
GEMV_ROWS = int(os.environ.get("KILN_GEMV_ROWS", "1"))
# A GEMM step with a prologue (fuse.py's gemv_prologue: the rms norm or gated activation before it) runs
# as one GEMV launch that forms x itself where the GEMV runs with KILN_GEMV_PROLOGUE=1; by default
# ("0") the prologue's own kernel, then the GEMV. Off because on the H200 (benchmarks/2026-12-02-03.md, session 8)
# every warp forming x itself costs more than the launch it saves: down <- SwiGLU 61.6 against 31.1 us
# (each warp recomputes act(g) * u for its chunk), out_proj <- gated norm 26.7 against 12.5; qkv and
# gate+up <- rmsnorm + residual saved 0.3 and 0.7 us; the 8B-model decode step 5.63 against 4.57 ms.
# "norm": only the RMSNorms without a gate (plain or residual), the ones that saved time alone; end to end still
# slower (session 14: 8B bf16 TPOT 4.178 / 4.183 ms against 4.162 / 4.161 without). But then a GEMV had a prologue or
# an epilogue: the attention norm before qkv ran as its own kernel beside the rotary epilogue, and the MLP norm
# before gate+up beside the SwiGLU one, so only the final norm was fused. Since session 25 an ungated RMSNorm joins a
# GEMV with an epilogue too (the norm, the linear and the rotary + KV write, or the SwiGLU: one launch; two fewer
# launches a layer). "post": as "norm", each RMSNorm over a whole row post-scaled (GemvSpec.post_norm: no first pass
# over the norm's input for its 1 / rms; x is then not rounded to the run dtype between the norm and the linear).
# Measured (H100, session 26, batch-1
# decode_back_to_back_ms, two pairs): 8B bf16 5.414 -> norm 5.847 / post 5.709 ms (the GEMVs with an epilogue slower by
# more than the launches saved); Mamba-2 2.7B (in_proj and the LM head: no epilogue) 2.919 -> post 2.843. "lone": as
# "post", only into a GEMV without an epilogue (no rotary, no activation): 8B bf16 5.412 / 5.416 -> 5.417 / 5.419 ms;
# Mamba-2 with KILN_SSM_PDL=1 as well 2.827 / 2.825 against 2.920 / 2.924 with neither, where the scan's PDL alone
# gave 2.814 against 2.919 in the call before. So "0" stays the default. Read when a step runs.
GEMV_PROLOGUE = os.environ.get("KILN_GEMV_PROLOGUE", "0")
# A GEMM step with a gated activation after it (fuse.py's gemv_epilogue: the gate and up projections, then
# act(g) * u) runs as one GEMV launch whose warps compute (gate, up) row pairs and write act(g) * u where
# the GEMV runs ("1", the default), instead of the GEMV then the activation's own kernel ("0":
# KILN_GEMV_EPILOGUE=0). Unlike the prologue it recomputes nothing. On the H200 (benchmarks/2026-12-04.md, session
# 14) the 8B bf16 batch-1 TPOT went 4.316 -> 4.200 / 4.209 ms. fp8 and int4 weights take it with
# cuda_quant.FP8_GEMV_EPILOGUE and INT4_GEMV_EPILOGUE (both on since session 18). Read when a step runs (and is
# captured).
GEMV_EPILOGUE = os.environ.get("KILN_GEMV_EPILOGUE", "1")
# A qkv GEMM step linked to its attention step (fuse.py's gemv_rope) runs as one GEMV launch that rotates q
# and k and writes k and v into the cache in its epilogue where the GEMV runs ("1", the default), and the
# attention step then skips its rotary + KV write kernel; "0" (KILN_GEMV_ROPE=0): the GEMV, then that kernel.
# The two are bit for bit the same (tests/gpu/test_gemv_rope.py). On the H200 (benchmarks/2026-12-04.md, session 15)
# the 8B bf16 batch-1 TPOT went 4.192 / 4.191 -> 4.113 / 4.114 ms. Read when a step runs (and is captured).
GEMV_ROPE = os.environ.get("KILN_GEMV_ROPE", "1")
# In a step that mixes decode rows with prompt chunks (eager: too big for a mixed graph), the decode rows
# (the scheduler puts them first) take the decode attention kernel and only the prompt chunks the prefill
# kernel ("1", the default), instead of every row the prefill kernel ("0": KILN_MIXED_SPLIT=0). The
# prefill kernel gives a one-token query a whole 128-row tile, so such a row reads its cache at a
# fraction of the decode kernel's bandwidth. Read when a step runs.
MIXED_SPLIT = os.environ.get("KILN_MIXED_SPLIT", "1")
# Whole prompts (no cached context, no decode rows beside them) on Hopper through torch's SDPA (flash)
# instead of the wgmma prefill kernel: "1" (KILN_FRESH_SDPA=1). SDPA took 165.7 against the kernel's
# 238.2 us at 8 x 1,024 causal tokens (benchmarks/2026-12-02-03.md, session 6), but pays a gather of the sequence's
# pages and launches per sequence; not measured end to end yet, so off ("0"). Read when a step runs.
FRESH_SDPA = os.environ.get("KILN_FRESH_SDPA", "0")
# The Hopper prefill kernel on a linear grid of the q tiles that have queries (kernels.prefill_attention's
# `linear`), not a tile per bucket token for each sequence: "1". A mixed graph's grid is fixed by its bucket; at a
# 128/128 run's (32 prompts, 2,048 tokens) bucket its 3-D grid is 64 x 8 x 32 blocks a layer, 448 of them with
# queries, each empty one holding an SM while it starts and exits. Session 28, H200: that mixed step's graph spent
# 2.06 ms of its 26.6 in prefill attention on the 3-D grid, 0.97 of 25.5 on the linear one (its eager launch's 0.96);
# the engine's GPU tests pass with it. "1" (the default) on; "0" off. Read when a step runs.
PREFILL_LINEAR = os.environ.get("KILN_PREFILL_LINEAR", "1")
# Kernels launched as programmatic dependents, like the decode GEMVs: each waits for the kernel before at its
# entry, so only its launch and block scheduling overlap that kernel's drain. "auto" (the default): decode attention,
# and in a model whose every mixer is a state-space step (no attention: Mamba, Mamba-2) its norms too; "attention":
# decode attention only; "gated": decode attention and the gated norms; "norm": the norms only; "1": also the
# activation and rotary + KV write kernels; "0": none. Correct in every form (tests/gpu/test_pdl_chain.py, bit for
# bit). Measured, batch-1 decode_back_to_back_ms, alternating, twice: Mamba-2 2.7B (session 32, H200) attention
# 2.266 / 2.265, gated 2.203 / 2.214, norm 2.170 / 2.170 ms; the 8B, whose norms all follow GEMVs (session 32,
# H100), attention 5.289 / 5.291, norm 5.529 / 5.530 ms bf16 and 3.420 / 3.418 against 4.298 / 4.293 fp8 (session 15:
# 0 4.117, attention 4.071, norm 4.321 ms bf16 TPOT). Read when a step runs (and is captured).
PDL_CHAIN = os.environ.get("KILN_PDL_CHAIN", "auto")
# the step kinds each setting launches as programmatic dependents ("gated": a gated norm; "norm": any other norm);
# "auto": _chain's choice by the model
_CHAINS = {"0": (), "1": ("norm", "gated", "act", "rope", "attention"), "norm": ("norm", "gated"),
           "attention": ("attention",), "gated": ("attention", "gated"), "auto": None}


def _chain(kind: str, state_space: bool = False) -> bool:
    """Whether the `kind` step's kernels ("norm", "gated", "act", "rope", "attention") launch as programmatic
    dependents; state_space: the model's every mixer is a state-space step ("auto" chains its norms too)."""
    if PDL_CHAIN not in _CHAINS:
        raise KernelSpecError(f"KILN_PDL_CHAIN={PDL_CHAIN!r}: must be one of {', '.join(_CHAINS)}")
    kinds = _CHAINS[PDL_CHAIN]
    if kinds is None:
        kinds = ("attention", "norm", "gated") if state_space else ("attention",)
    return kind in kinds


def _gather_rows(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """v's `rows` (fp8 values, an fp8 GEMM's input written by the kernel before it, as their bytes)."""
    if v.dtype == torch.float8_e4m3fn:
        return v.view(torch.uint8).index_select(0, rows).view(v.dtype)
    return v.index_select(0, rows)


def _nothing() -> None:
    """A dead weak reference: no KV store yet."""
    return None


# Ops whose references read the step on the host (see CudaModel.use_graphs).
_HOST_READERS = (OpKind.MOE, OpKind.ATTENTION, OpKind.ROPE, OpKind.CAUSAL_CONV1D, OpKind.SELECTIVE_SCAN)

# Decode batch sizes a CUDA graph is captured for (a batch runs in the smallest that holds it).
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
# Decode steps of many short sequences on an fp8 cache through the decode kernel's short-context shape
# (DECODE_SHORT_SHAPE: two warps a block, four cp.async stages a warp, four blocks an SM), "S:C": steps of at
# least S sequences whose longest context is at most C, eager, or as a second graph of their bucket ("256:512", the
# default; "0": off). Measured (session 30, H100, the kernel alone): 512 sequences at context 200 87.9 us (83% of copy
# bandwidth) against the default shape's 119.5 (61%); at 1,100 a tie; with fewer sequences or longer contexts the
# default shape wins by 5-28%. End to end (session 31, H100, fp8 weights + KV, max batch 512): 128/128 24,318 ->
# 25,342 tok/s (decode step p50 12.44 -> 11.45 ms), 128/2048 19,042 / 18,979 (its steps mostly past 512 tokens)
# (BENCHMARKS.md). Read when a step runs.
DECODE_SHORT = os.environ.get("KILN_DECODE_SHORT", "256:512")
DECODE_SHORT_SHAPE = dict(warps=2, stages=4, min_blocks=4)


def decode_short_bounds() -> tuple[int, int] | None:
    """KILN_DECODE_SHORT's (least sequences, most context), or None: off."""
    value = os.environ.get("KILN_DECODE_SHORT", DECODE_SHORT)
    if value == "0":
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KernelSpecError(f"KILN_DECODE_SHORT={value!r}: must be 0 or S:C (at least S sequences, contexts of at "
                              f"most C tokens; e.g. 256:512)")
    return int(parts[0]), int(parts[1])


def decode_is_short(seqs: int, longest: int) -> bool:
    """Whether a decode step of `seqs` sequences, the longest `longest` tokens of context (its new token
    included), takes the short-context decode kernel (KILN_DECODE_SHORT)."""
    bounds = decode_short_bounds()
    return bounds is not None and seqs >= bounds[0] and longest <= bounds[1]


# Where the decode graphs' memory comes from. "shared" (the default): the pool the mixed graphs share (CudaModel.
# graph_pool), as vLLM's graphs share one; safe since the graphs run one at a time on one stream and none reads
# another's output (torch's docs, pytorch/pytorch#166975), and the outputs stay live (each graph keeps its own).
# "private": a pool each, as before session 27, when a max batch of 512 ran out of memory on an H100 with 18 GiB
# in graph pools (each pool holds its capture's peak: the sum over 16 buckets). KILN_GRAPH_POOL, read when a decode
# graph is captured.
GRAPH_POOL = "shared"
# Small steps that are not pure decode — a prompt after a cached prefix, a speculative verification,
# short prefill chunks — are graphs too, bucketed by sequences, new tokens and sampled rows: eager,
# such a step costs its ~400 launches on the host (more than its GPU time at these sizes).
MIXED_SEQS = (1, 2, 4, 8, 16, 32, 64)
MIXED_TOKENS = (16, 32, 64, 128, 256, 512)
MIXED_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Larger mixed steps (KILN_MIXED_GRAPHS_LARGE=1): a throughput run's steps, up to max_batch decode rows beside prompt
# chunks that fill the token budget, ~20 launches a layer each. Eager, the host issues them at ~57 us a launch
# (session 22's fp8 mixed step: 40.5 ms of host time for 38.4 ms of kernels, so the GPU waited). As graphs they are
# bucketed by decode rows, prompt sequences and tokens (below), the decode rows through the decode kernel as in an
# eager step (MIXED_SPLIT); every sequence samples at most one row. "1" (the default) on, "0": eager. Written in
# session 23 without device time; on since its GPU tests passed in session 24 (`.ci/device_check.sh s23all`: with
# the other two switches of session 23, the fp8 2048/128 mixed step 43.5 -> 39.9 ms on an H100). Read when a step
# runs.
MIXED_GRAPHS_LARGE = os.environ.get("KILN_MIXED_GRAPHS_LARGE", "1")
# Coarse buckets: the GEMMs' rows are the token bucket's whatever the others, and a padding decode row (one cached
# token) or prompt sequence (no queries) costs its kernel a block that leaves at once, so few buckets (few captures)
# cost little. Sampled rows: the decode and prompt buckets together (the LM head's rows).
LARGE_DECODE = (16, 32, 64, 128, 256, 512, 1024)
LARGE_SEQS = (2, 8, 32, 64)
LARGE_TOKENS = (1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384)


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
    # Mixed steps: the leading sequences with one new token (rows 0..decode_rows-1), which attention runs
    # through the decode kernel (MIXED_SPLIT); 0: every sequence through the prefill kernel.
    decode_rows: int = 0
    # [1] int32: in a CUDA graph captured for a bucket of rows, how many of them are the step's tokens (the
    # rest are padding: token 0, no K/V written; their values never reach a real row except through a
    # statistic over rows, which is why the fp8 per-tensor activation scale takes it: QGemm). None: eager.
    valid: torch.Tensor | None = None
    # A decode step of many short sequences (decode_is_short): an fp8 site's decode kernel in its short shape
    short: bool = False


class CudaModel:
    backend = "cuda"
    takes_pending = True  # forward fills StepBatch.pending's tokens in on the device (engine overlap)

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor], page_size: int = 16,
                 max_context: int = 4096, max_batch: int = 256, use_graphs: bool = True):
        first = next(w for w in weights.values() if isinstance(w, torch.Tensor))
        self.device, self.dtype = first.device, first.dtype
        if self.device.type != "cuda":
            raise ValueError("the cuda backend needs weights on a CUDA device")
        self.plan = plan
        self.comm = None  # runtime/distributed.py Comm of a tensor-parallel rank: the KOps' collectives
        self.page_size = page_size
        self.max_context = max_context
        self.max_batch = max_batch
        self.ops = fuse(plan, self.dtype, page_size)
        self.weights = dict(weights)  # a copy: entries are dropped below, the caller's stay
        canonical: dict = {}  # one compiled kernel per distinct spec (origins differ per layer)

        def canon(spec):
            return canonical.setdefault(spec.key(), spec)

        self._gemm: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._scratch: dict = {}  # decode split-K partials per attention spec, for max_batch sequences
        self._moe: dict[int, MoeStep] = {}
        for n, op in enumerate(self.ops):
            if op.kind is Exec.GEMM:
                self._gemm[n] = _fused_weight(op, weights, self.dtype)
                if "prologue" in op.extra:  # the norm / act step fused before it (fuse.py's gemv_prologue)
                    op.extra["prologue"].spec = canon(op.extra["prologue"].spec)
                if "epilogue" in op.extra:  # the gated act step fused after it (fuse.py's gemv_epilogue)
                    op.extra["epilogue"].spec = canon(op.extra["epilogue"].spec)
                    w, b = self._gemm[n]
                    if isinstance(w, QGemm):  # int4: its halves packed in (gate, up) pairs, where it pairs
                        self._gemm[n] = (w.paired(_epilogue_halves(op), self.dtype), b)
                att = op.extra.get("rope")  # the attention step a qkv GEMM is linked to (fuse.py's gemv_rope)
                if att is not None and isinstance(self._gemm[n][0], QGemm):  # int4: rows in rotary pairs, where so
                    w, b = self._gemm[n]
                    self._gemm[n] = (w.rope_paired(att.spec[0], _rope_qkv_rows(op, att), self.dtype), b)
            elif op.kind is Exec.ATTENTION:
                op.spec = tuple(canon(s) for s in op.spec)
            elif op.kind is Exec.MOE:  # experts' weights stacked [E, out, in] per grouped GEMM
                op.spec = tuple(canon(s) for s in op.spec)
                self._moe[n] = MoeStep(op, weights)
                for name in self._moe[n].used:
                    self.weights.pop(name, None)
            elif op.spec is not None:
                op.spec = canon(op.spec)
        # every mixer a state-space step (no attention): KILN_PDL_CHAIN=auto chains the norms too (_chain)
        self._state_space = any(op.kind is Exec.SSM for op in self.ops) and not plan.sites
        self._amax = self._amax_specs(canon)
        self._fp8_out = self._fp8_out_specs(canon)
        self._lt = self._lt_plans()
        # After the last step that mixes the rows (tokens) of a sequence (attention, the state-space
        # conv and scan: OpDef.mixes_rows), however it runs (a kernel, or the op's torch reference: e.g.
        # latent attention, ALiBi), only the rows whose logits are wanted need computing (a prefill
        # samples one row).
        attn_at = [n for n, op in enumerate(self.ops) if any(OPS[i.kind].mixes_rows for i in op.instrs)]
        self._rows_from = attn_at[-1] + 1 if attn_at else 0
        self._live_tail = {a for op in self.ops[self._rows_from:] for a in op.ins if isinstance(a, Value)}
        self._live_tail |= {a for op in self.ops[self._rows_from:] for ins in op.instrs for a in ins.inputs
                            if isinstance(a, Value)}
        # The values each step is the last to read: _run drops them after it, so that an eager step holds about a
        # layer's values at a time, not the whole step's, and a graph's capture takes as little from its pool
        # (session 27: a 4,352-token fp8 step peaked 19.8 GiB above the weights and KV cache, 238 MiB a layer's
        # gate_up output among them, every layer's kept to the end of the step).
        self._dead_after = last_reads(self.ops, self.plan.program.output)
        # Weights that only fed a fused GEMM live on in its concatenation: drop the originals.
        needed = {a.name for op in self.ops if op.kind is not Exec.GEMM for ins in op.instrs for a in ins.inputs
                  if isinstance(a, WeightArg)}
        for n, op in enumerate(self.ops):
            if op.kind is Exec.GEMM and op.extra["fused"]:
                for w in op.extra["weights"] + op.extra["biases"]:
                    if w and w.name not in needed:
                        self.weights.pop(w.name, None)
        # Torch steps whose references read the step on the host cannot be captured: a moe left to
        # its reference picks each expert's tokens on the host, attention walks the batch's
        # sequences, rope builds its tables on the host. Any of them: no graphs (Exec.MOE captures).
        self.use_graphs = use_graphs and not any(op.kind is Exec.TORCH and op.instrs[0].kind in _HOST_READERS
                                                 for op in self.ops)
        # Mixed steps in graphs: only kinds whose launches are sized from the bucket, not the step.
        self.mixed_graphs = self.use_graphs and all(op.kind in _MIXED_KINDS for op in self.ops)
        self._ssm = SsmSteps(self)  # Exec.SSM steps: conv / scan kernels on the state slots (graph-capturable)
        # Mamba-2's layer run as one persistent kernel at one token (KILN_SSM_STACK; runtime/cuda_ssm.py)
        self._ssm_stack = SsmStack(self) if self._ssm else None
        self._graphs: dict[int, _Graph] = {}
        self._short_graphs: dict[int, _Graph] = {}  # decode buckets' steps of short sequences (KILN_DECODE_SHORT)
        # Each fp8 site's decode spec key -> its short shape, where KILN_DECODE_SHORT was on at reserve (which sizes
        # their scratch); empty: no step takes the short shape
        self._short_specs: dict = {}
        self._mixed: dict[tuple[int, int, int], _MixedGraph] = {}  # (sequences, tokens, rows) buckets
        self._pool = None  # the graphs' shared memory pool (they never run at the same time): GRAPH_POOL
        self._pool_peak = 0  # the most one capture into it took (its blocks, free again after it, serve the next)
        # The captures' warm-up stream, one for the model's life: torch keeps a cuBLAS / cuBLASLt workspace for each
        # (handle, stream) a GEMM ran on, 32 MiB on Hopper, so a new stream per capture held one more each
        # (session 28: 378 MiB of a small model's twelve decode graphs, shared pool or not)
        self._warm_stream = None
        self._mixed_out = None  # the logits buffer the mixed graphs share (mixed_out)
        self._eager_mixed: set[tuple] = set()  # mixed buckets refused a capture for want of memory (_mixed_graph)
        self._graph_kv = _nothing  # the KV store the graphs write to (weak: an engine's end frees it)
        self._lora = CudaLora(self)  # LoRA adapters of `self.lora` (a runtime/lora.py LoraSet, set by the engine)
        # How forward's steps ran, counted (bench throughput reports the counts of its timed region): "decode_graph"
        # and "mixed_graph" replays, "eager" steps, and the graphs forward captured on first use ("decode_capture",
        # "mixed_capture") or could not for want of memory ("mixed_short"); captures ahead of time are not counted.
        self.step_counts: collections.Counter[str] = collections.Counter()
        self.reserve(max_batch, max_context)

    def _amax_specs(self, canon) -> dict:
        """Norm and activation steps (on their own, or a GEMM step's prologue / epilogue that runs as its own
        kernel) whose output an fp8 GEMM quantizes with a dynamic per-tensor scale (QGemm.takes_amax): id of the
        step -> its spec with `amax`, so that the kernel also writes the output's partial maxima and the GEMM skips
        its amax launch (cuda_quant.AMAX_FUSE). Empty where the switch is off or nothing is fp8."""
        wanted = set()
        for n, op in enumerate(self.ops):
            w = self._gemm.get(n, (None,))[0]
            if op.kind is Exec.GEMM and isinstance(w, QGemm) and w.takes_amax():
                wanted.add(op.extra.get("gemm", op).ins[0])
        return {id(leaf): canon(dataclasses.replace(leaf.spec, amax=True)) for leaf in self._row_producers(wanted)}

    def _row_producers(self, values):
        """The norm and activation steps (on their own, or a GEMM step's prologue / epilogue that runs as its own
        kernel) that write one of `values` a block per whole row (segment): the kernels that can also write its
        partial maxima (amax) or write it as fp8 (fp8_out)."""
        for op in self.ops:
            for leaf in (op, op.extra.get("prologue"), op.extra.get("epilogue")):
                if leaf is None or not leaf.outs or leaf.outs[0] not in values:
                    continue
                if leaf.kind is Exec.NORM and not leaf.spec.group \
                        or leaf.kind is Exec.ACT and K.render(leaf.spec).meta["variant"] in ("rows", "rows_stream"):
                    yield leaf

    def _fp8_out_specs(self, canon) -> dict:
        """Norm and activation steps (_row_producers) whose output only an fp8 GEMM with a static
        per-tensor activation scale reads (QGemm.takes_fp8): id of the step -> (its spec with `fp8_out`, the GEMM),
        so that the kernel writes the GEMM's fp8 input itself (cuda_quant.FP8_OUT_FUSE). Empty where the switch is
        off or no GEMM has a static scale."""
        reads = {}
        for n, op in enumerate(self.ops):
            for a in step_reads(op):
                reads.setdefault(a, []).append(n)
        wanted = {}
        for n, op in enumerate(self.ops):
            w = self._gemm.get(n, (None,))[0]
            x = op.extra.get("gemm", op).ins[0] if op.kind is Exec.GEMM else None
            if isinstance(w, QGemm) and w.takes_fp8() and reads.get(x) == [n]:
                wanted[x] = w
        return {id(leaf): (canon(dataclasses.replace(leaf.spec, fp8_out=True, amax=False)), wanted[leaf.outs[0]])
                for leaf in self._row_producers(wanted)}

    def _fp8_target(self, op: KOp, step: "_Run"):
        """(spec with fp8_out, the GEMM) where this norm / activation step writes its output as the fp8 GEMM's
        input (_fp8_out_specs) this step: two rows and more, no LoRA adapters, not traced; else None."""
        t = self._fp8_out.get(id(op))
        if t is None or step.T < 2 or step.lora is not None or step.traced \
                or not cuda_quant._on("KILN_FP8_OUT_FUSE", cuda_quant.FP8_OUT_FUSE):
            return None
        return t

    def reserve(self, max_seqs: int, max_context: int) -> None:
        """Size the decode scratch for `max_seqs` sequences; graphs are captured up to that batch and
        that context. Growing drops the graphs captured so far: they hold the old buffers' addresses."""
        if max_seqs < 1 or max_context < 1:
            raise ValueError(f"max_seqs and max_context must be positive, got {max_seqs}, {max_context}")
        grow = not self._scratch or max_seqs > self.max_batch or max_context > self.max_context
        self.max_batch, self.max_context = max(self.max_batch, max_seqs), max(self.max_context, max_context)
        if not grow:
            return
        self.drop_graphs()
        self._scratch = {}
        dspecs = [op.spec[1] for op in self.ops if op.kind is Exec.ATTENTION]
        shorts = [(d.key(), short_spec(d)) for d in dspecs] if decode_short_bounds() is not None else []
        self._short_specs = {key: spec for key, spec in shorts if spec is not None}
        for spec in (*dspecs, *self._short_specs.values()):
            if spec.key() not in self._scratch:
                self._scratch[spec.key()] = K.decode_scratch(spec, self.max_batch, self.max_context, self.device)

    def set_page_size(self, page_size: int) -> None:
        """Specialise the kernels that read or write the paged KV cache for `page_size`-token pages (the engine's
        EngineConfig.page_size): the attention steps' specs, which the linked qkv GEMVs read at each call, and an
        int4 qkv weight packed for the rotary epilogue, which holds its own. Drops the graphs; the decode scratch is
        sized anew."""
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        if page_size == self.page_size:
            return
        for n, op in enumerate(self.ops):
            if op.kind is Exec.ATTENTION:
                op.spec = tuple(dataclasses.replace(s, page_size=page_size) for s in op.spec)
            w = self._gemm.get(n, (None,))[0]
            if isinstance(w, QGemm) and w.packed is not None and w.packed.rope is not None:
                w.packed.rope = dataclasses.replace(w.packed.rope, page_size=page_size)
        self.page_size = page_size
        self._scratch = {}  # reserve sizes it anew (and drops the graphs)
        self.reserve(self.max_batch, self.max_context)

    def _lt_plans(self) -> "cuda_lt.LtPlans | None":
        """The tuned cuBLASLt plans the per-tensor fp8 GEMMs share (cuda_quant.FP8_LT), given to each; None where
        the switch is off or no GEMM is per-tensor fp8."""
        limit = cuda_lt.rows_limit(os.environ.get("KILN_FP8_LT", cuda_quant.FP8_LT))
        gemms = [g for w, _ in self._gemm.values()
                 for g in ([p for p, _, _ in w.parts] if isinstance(w, SplitGemm) else [w])
                 if isinstance(g, QGemm) and g.desc.dtype == "fp8" and g.scale.dim() == 0 and g.packed is None]
        if not limit or not gemms:
            return None
        plans = cuda_lt.LtPlans(limit)
        for g in gemms:
            g.lt = plans
        return plans

    def capture_decode_graphs(self, kv: KVStore, max_batch: int, tokens: int = 0, prompt_len: int | None = None) -> int:
        """Capture now the decode graph of every batch bucket a step of up to `max_batch` sequences may take,
        instead of at each bucket's first step (vLLM captures its graphs at start-up): a benchmark's timed
        region then holds no capture. With MIXED_GRAPHS_LARGE and `tokens` (a step's token budget), also the
        large mixed graphs a throughput run's steps take most (large_warm_keys, of `prompt_len`-token prompts
        where given). Returns how many were captured (0 without graphs)."""
        if not self.use_graphs:
            return 0
        if max_batch > self.max_batch:
            self.reserve(max_batch, self.max_context)  # (drops the graphs captured so far)
        if self._graph_kv() is not kv:  # as forward: graphs write to one KV store's pages
            self.drop_graphs()
            self._graph_kv = weakref.ref(kv)
        # forward's buckets: the smallest that holds the batch, within the decode scratch (max_batch); past the
        # largest bucket (a max batch over 1,024) steps run eagerly, the buckets below it as graphs
        fits = [b for b in GRAPH_BUCKETS if b <= self.max_batch]
        top = next((b for b in fits if b >= max_batch), fits[-1] if fits else None)
        made = 0
        # Largest first: in the shared pool (GRAPH_POOL) the smaller buckets' steps fit in the blocks its capture took
        for b in reversed(GRAPH_BUCKETS):
            if top is not None and b <= top and b not in self._graphs:
                self._graphs[b] = _Graph(self, kv, b)
                made += 1
        bounds = decode_short_bounds()  # and the buckets' short-context graphs (KILN_DECODE_SHORT)
        for b in reversed(GRAPH_BUCKETS) if bounds is not None and self._short_specs else ():
            if top is not None and bounds[0] <= b <= top and b not in self._short_graphs:
                self._short_graphs[b] = _Graph(self, kv, b, short=True)
                made += 1
        if self.mixed_graphs and not self._lora.ops and cuda_quant._on("KILN_MIXED_GRAPHS_LARGE", MIXED_GRAPHS_LARGE):
            for key in large_warm_keys(min(max_batch, self.max_batch), tokens, prompt_len, self.max_batch):
                if key not in self._mixed and key not in self._eager_mixed:
                    made += self._mixed_graph(kv, key) is not None
        return made

    def _mixed_graph(self, kv: KVStore, key: tuple) -> "_MixedGraph | None":
        """The mixed graph of bucket `key`, captured now; None where the device lacks the memory for it and an
        eager step of its size beside it (_capture's check): that bucket's steps then run eagerly."""
        self.graph_pool()
        try:
            graph = self._mixed[key] = _MixedGraph(self, kv, *key)
        except GraphMemoryShort:
            self._eager_mixed.add(key)
            return None
        return graph

    def graph_pool(self):
        """The memory pool the graphs capture into (made on first use; drop_graphs starts a new one)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._pool_peak = 0
        return self._pool

    def disable_graphs(self) -> None:
        """Every step eager from now on (`kiln serve --enforce-eager`): no graph captured, none kept."""
        self.use_graphs = self.mixed_graphs = False
        self.drop_graphs()

    def mixed_out(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (a mixed graph's, in its capture) copied into the rows of the buffer every mixed graph writes
        its logits to: the graph's own then is scratch, free in the shared pool for the next capture, not memory
        each graph keeps (at max batch 512 and 4,096 tokens a step, 14-30 graphs of up to 576 rows x the
        vocabulary). Safe as the pool is: one graph runs at a time, and each step's logits are read (sampled,
        or copied by forward) in stream order before the next replay. Made at the first graph's warm-up, on the
        device's default stream (where steps run), not the warm-up's side stream: the allocator frees a block to
        the stream it was made on."""
        rows = max(MIXED_ROWS[-1], self.max_batch + LARGE_SEQS[-1])  # any mixed bucket's sampled rows
        buf = self._mixed_out
        if buf is None or buf.shape[1:] != logits.shape[1:] or buf.dtype != logits.dtype:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the mixed graphs' output buffer is made in a warm-up, never in a capture")
            with torch.cuda.stream(torch.cuda.default_stream(logits.device)):
                buf = torch.empty((rows, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
            self._mixed_out = buf
        if logits.shape[0] > rows:
            raise ValueError(f"a mixed graph of {logits.shape[0]} sampled rows: its output buffer holds {rows}")
        out = buf[:logits.shape[0]]
        out.copy_(logits)
        return out

    def drop_graphs(self) -> None:
        self._graphs.clear()
        self._short_graphs.clear()
        self._mixed.clear()
        self._eager_mixed.clear()
        self._mixed_out = None  # (sized from max_batch, which a reserve that drops the graphs may have grown)
        # New mixed graphs capture into a new pool: the old one may still hold blocks that outlive its
        # graphs (a buffer first allocated during a capture and cached), and torch's allocator refuses
        # to capture into a pool whose graphs are all gone while it still has live blocks.
        self._pool = None

    # -- metadata ---------------------------------------------------------------------------
    def _meta(self, batch: StepBatch) -> _Meta:
        seqs = batch.seqs
        width = max(-(-self.max_context // self.page_size), max(len(s.block_table) for s in seqs))
        h = host_meta(batch, self.page_size, width)
        dev = self.device

        def up(a):
            return torch.from_numpy(a).pin_memory().to(dev, non_blocking=True)

        decode = bool((h.lengths == 1).all())
        lead = 0  # leading one-token sequences (decode rows) of a mixed step
        if MIXED_SPLIT == "1" and not decode:
            lead = int(np.argmax(h.lengths != 1))
            if lead and int(h.kv_lens[:lead].max()) > self.max_context:  # past the decode scratch's splits
                lead = 0
        # The attention kernels' bound on context: the capacity, or this step's longest if longer.
        return _Meta(up(h.positions), up(h.slots), up(h.block_tables), up(h.kv_lens), up(h.cu_seqlens),
                     up(h.kv_lens.max(keepdims=True)), decode, int(h.lengths.max()),
                     max(self.max_context, int(h.kv_lens.max())),
                     [(s.start, s.length) for s in seqs] if all(s.context == 0 and s.length > 1 for s in seqs)
                     else None, decode_rows=lead,
                     short=decode and bool(self._short_specs) and decode_is_short(len(seqs), int(h.kv_lens.max())))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, batch: StepBatch, kv: KVStore, all_logits: bool = False) -> torch.Tensor:
        """fp32 logits of the step's sampled rows (all rows with all_logits). A step that replays a
        CUDA graph in fp32 returns a view of the graph's output buffer, which its next replay
        overwrites: a caller that keeps logits across steps clones them."""
        if kv.page_size != self.page_size:
            raise ValueError(f"KV cache page size {kv.page_size} != the kernels' {self.page_size}")
        batch.validate(kv.page_size)
        if len(batch.seqs) > self.max_batch:  # a caller that did not reserve: size up (drops graphs)
            self.reserve(len(batch.seqs), self.max_context)
        if self._lora.sync(getattr(self, "lora", None)):
            self.drop_graphs()  # captured with the old adapters' buffers
        if self._graph_kv() is not kv:  # captured with another KV store's pages (an earlier engine)
            self.drop_graphs()
            self._graph_kv = weakref.ref(kv)
        decode = all(s.length == 1 for s in batch.seqs)
        longest = max(s.context + s.length for s in batch.seqs)
        if self.use_graphs and decode and not all_logits and longest <= self.max_context:
            bucket = next((b for b in GRAPH_BUCKETS if b >= len(batch.seqs) and b <= self.max_batch), None)
            if bucket is not None:
                short = bool(self._short_specs) and decode_is_short(len(batch.seqs), longest)  # own graph: shape fixed
                graphs = self._short_graphs if short else self._graphs
                graph = graphs.get(bucket)
                if graph is None:
                    graph = graphs[bucket] = _Graph(self, kv, bucket, short)
                    self.step_counts["decode_capture"] += 1
                self.step_counts["decode_graph"] += 1
                return graph.replay(batch)[: len(batch.seqs)].float()
        sample = batch.sample_rows()
        if self.mixed_graphs and not decode and not all_logits and longest <= self.max_context \
                and not self._lora.ops:  # adapters: eager (their row groups are per token)
            key = _mixed_key(len(batch.seqs), batch.num_tokens, len(sample))
            if key is None and cuda_quant._on("KILN_MIXED_GRAPHS_LARGE", MIXED_GRAPHS_LARGE):
                key = large_mixed_key(batch, len(sample), self.max_batch)
            if key is not None and key not in self._eager_mixed:
                graph = self._mixed.get(key)
                if graph is None:
                    graph = self._mixed_graph(kv, key)
                    self.step_counts["mixed_capture" if graph is not None else "mixed_short"] += 1
                if graph is not None:
                    self.step_counts["mixed_graph"] += 1
                    out = graph.replay(batch, sample)  # (a view of the buffer every mixed graph writes)
                    return out.clone() if out.dtype == torch.float32 else out.float()
        self.step_counts["eager"] += 1
        tokens = batch.device_tokens(self.device)
        meta = self._meta(batch)
        rows = None if all_logits else torch.tensor(sample).pin_memory().to(self.device, non_blocking=True)
        lora = None
        if self._lora.ops:  # each row's adapter, grouped; and the sampled rows' alone, past the last attention
            per_row = adapter_rows(batch).numpy()
            lora = (self._lora.rows(per_row), None if all_logits else self._lora.rows(per_row[sample]))
        return self._run(tokens, meta, kv, batch, rows=rows, lora=lora).float()

    def _run(self, tokens: torch.Tensor, meta: _Meta, kv: KVStore, batch: StepBatch | None,
             trace: dict | None = None, rows: torch.Tensor | None = None, lora: tuple | None = None) -> torch.Tensor:
        """Logits of all rows, or of `rows` only. `trace`, if given, receives every value by
        name (tests use it to find where two backends first differ)."""
        env: dict[Value, torch.Tensor] = {Value("tokens"): tokens, Value("positions"): meta.positions}
        step = _Run(self, tokens, meta, kv, batch, tokens.shape[0])
        step.lora = lora[0] if lora is not None else None  # (all rows, sampled rows) grouped by adapter
        step.traced = trace is not None
        # steps [skip_from, skip_end) replaced by the state-space stack kernel, where it takes this step
        stack = self._ssm_stack
        skip_from, skip_end = (stack.stack.first, stack.stack.end) if stack and stack.takes(step, rows) else (-1, -1)
        for n, op in enumerate(self.ops):
            if n == skip_from and not stack(env, step):  # (no pointer table while capturing: the steps run)
                skip_from = skip_end = -1
            if skip_from <= n < skip_end:
                for v in self._dead_after[n]:  # (what the kernel read: not what it wrote, which later steps read)
                    env.pop(v, None)
                continue
            if n == self._rows_from and rows is not None:
                step.lora = lora[1] if lora is not None else None
                # Only the values later steps read (a handful, not every layer's): one gather each.
                env = {name: _gather_rows(v, rows) if v.dim() and v.shape[0] == step.T else v
                       for name, v in env.items() if name in self._live_tail}
                step.T = rows.shape[0]
                step.amax.clear()  # maxima over the rows before the gather
            run = _RUN.get(op.kind)
            if run is None:
                raise NotImplementedError(f"cuda backend: unhandled step '{op.kind}' ({op.instrs[0].op.pos})")
            run(self, op, env, step, n)
            if op.collectives and self.comm is not None:  # tensor parallel: in place where it can (NCCL:
                for v, kind in op.collectives:              # captured in the graphs like the kernels)
                    env[v] = self.comm.collective(kind, env[v])
                    step.amax.pop(v, None)  # maxima of the rank's own values, not of the result
            if trace is not None:  # (not a q / k / v a linked qkv GEMV wrote rotated or into the cache: step.roped)
                trace.update((o.id, env[o].clone()) for o in op.outs if o in env)
            for v in self._dead_after[n]:
                env.pop(v, None)
                step.amax.pop(v, None)
        return env[self.plan.program.output]

    # -- one method per kind of step ----------------------------------------------------------
    def _gemm_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        w, b = self._gemm[n]
        att = op.extra.get("rope")
        if att is not None and self._gemv_rope(op, att, w, b, env, step, n):
            return
        pro = op.extra.get("prologue")
        if pro is not None and "epilogue" in op.extra:  # a norm, then a GEMM step with an epilogue (fuse.py)
            if self._gemv_prologue(op, pro, w, b, env, step):
                return  # one launch: the norm, the GEMV and the gated activation
            _RUN[pro.kind](self, pro, env, step, n)  # the norm's own kernel, then the GEMM step with its epilogue
            op = op.extra["gemm"]
        epi = op.extra.get("epilogue")
        if epi is not None:
            if not self._gemv_epilogue(op, epi, w, b, env, step):
                self._gemm_step(op.extra["gemm"], env, step, n)  # the GEMM as it was, then the activation's kernel
                _RUN[epi.kind](self, epi, env, step, n)
            return
        pro = op.extra.get("prologue")
        if pro is not None:
            if self._gemv_prologue(op, pro, w, b, env, step):
                return
            _RUN[pro.kind](self, pro, env, step, n)  # the prologue's own kernel, then the GEMM as it was
            op = op.extra["gemm"]
        x = env[op.ins[0]]
        if isinstance(w, QGemm):
            y = w(x, b, step.meta.valid, step.amax.get(op.ins[0]), out_dtype=self.dtype)
        elif isinstance(w, SplitGemm):
            y = w(x, b, step.meta.valid)
        elif GEMV in ("1", "pdl") and x.shape[0] <= GEMV_ROWS and G.takes(x, w):
            y = G.linear(x, w, b, pdl=GEMV == "pdl", origin=fuse_origin(op.instrs[0]))
        else:
            y = torch.nn.functional.linear(x, w, b)
        if step.lora is not None:  # each row's LoRA adapter: y += (x A^T) B^T (runtime/lora.py)
            self._lora.apply(n, env[op.ins[0]], y, step.lora)
        if op.extra["fused"]:
            for name, (start, width) in zip(op.outs, op.extra["slices"]):
                env[name] = y[:, start:start + width]
        else:
            env[op.outs[0]] = y

    def _gemv_prologue(self, op: KOp, pro: KOp, w, b, env, step: "_Run") -> bool:
        """A GEMM step with a prologue as one GEMV launch (codegen/gemv.py gemv_prologue) where the GEMV
        runs it: a few rows, a plain weight the GEMV takes, no LoRA, a prologue it computes, inputs it can
        read with 16-byte vectors. False: nothing ran."""
        ins = [env[v] for v in pro.ins]
        gemm = op.extra["gemm"]
        epi = gemm.extra.get("epilogue")  # (fuse.py: after an ungated RMSNorm only)
        if not self._prologue_runs(pro, ins, w, step, linked=epi is not None):
            return False
        if epi is not None and GEMV_EPILOGUE != "1":
            return False  # KILN_GEMV_EPILOGUE=0: the activation's own kernel (_gemv_epilogue refuses a bad value)
        origin = f"{fuse_origin(pro.instrs[-1])} -> {fuse_origin(gemm.instrs[0])}"
        if epi is not None:
            origin += f" -> {fuse_origin(epi.instrs[-1])}"
            spec = G.spec_for(w.shape[0], w.shape[1], pro.spec.dtype, b is not None, origin, G._num_sms(self.device),
                              prologue=pro.spec, epilogue=epi.spec, halves=_epilogue_halves(gemm),
                              post_norm=_post_norm(pro))
        else:
            spec = G.spec_for(w.shape[0], w.shape[1], pro.spec.dtype, b is not None, origin, G._num_sms(self.device),
                              prologue=pro.spec, post_norm=_post_norm(pro))
        y = torch.empty(step.T, spec.n, dtype=self.dtype, device=self.device)
        self._run_prologue(spec, pro, w, b, y, ins, env)
        if epi is not None:
            env[epi.outs[0]] = y
        elif gemm.extra["fused"]:
            for name, (start, width) in zip(gemm.outs, gemm.extra["slices"]):
                env[name] = y[:, start:start + width]
        else:
            env[gemm.outs[0]] = y
        return True

    @staticmethod
    def _prologue_runs(pro: KOp, ins: list, w, step: "_Run", linked: bool = False) -> bool:
        """Whether the GEMV runs `pro` (a step fused before a GEMM, inputs `ins`; `linked`: a GEMV with an epilogue,
        the rotary or an activation) in its prologue: KILN_GEMV_PROLOGUE takes it, a few rows, a plain weight the
        GEMV takes, no LoRA, a prologue it computes, inputs it can read with 16-byte vectors."""
        if GEMV_PROLOGUE not in ("0", "1", "norm", "post", "lone"):
            raise KernelSpecError(f"KILN_GEMV_PROLOGUE={GEMV_PROLOGUE!r}: must be 0, 1, norm, post or lone")
        if GEMV_PROLOGUE in ("norm", "post", "lone") and (pro.kind is not Exec.NORM or pro.spec.gate):
            return False
        if GEMV_PROLOGUE == "lone" and linked:
            return False
        return not (GEMV not in ("1", "pdl") or GEMV_PROLOGUE == "0" or step.T > GEMV_ROWS or step.lora is not None
                    or not isinstance(w, torch.Tensor) or not G.takes(ins[0], w) or not G.prologue_takes(*ins)
                    or G.prologue_refusal(pro.spec, w.shape[1], pro.spec.dtype))

    def _run_prologue(self, spec, pro: KOp, w, b, y, ins: list, env, rope_args: tuple | None = None) -> None:
        """G.gemv_prologue of `spec` into y from the prologue step's inputs; its residual sum, where it has one,
        into env."""
        norm = pro.kind is Exec.NORM
        r = torch.empty_like(ins[0]) if norm and pro.spec.has_residual else None
        G.gemv_prologue(spec, w, y, ins[0], ins[1] if len(ins) > 1 else None,
                        self.weights[pro.extra["weight"].name] if norm else None, r, b, pdl=GEMV == "pdl",
                        rope_args=rope_args)
        if r is not None:
            env[pro.outs[1]] = r

    def _gemv_epilogue(self, op: KOp, epi: KOp, w, b, env, step: "_Run") -> bool:
        """A GEMM step with a gated activation after it as one GEMV launch (codegen/gemv.py's epilogue; fp8
        weights: QGemm.gemv_epilogue) where the GEMV runs it: a few rows (fp8: one), a weight the GEMV takes,
        no LoRA. False: nothing ran."""
        if GEMV_EPILOGUE not in ("0", "1"):
            raise KernelSpecError(f"KILN_GEMV_EPILOGUE={GEMV_EPILOGUE!r}: must be 0 or 1")
        x = env[op.ins[0]]
        if GEMV_EPILOGUE == "0" or step.T > GEMV_ROWS or step.lora is not None:
            return False
        gemm = op.extra["gemm"]
        halves = _epilogue_halves(op)
        origin = f"{fuse_origin(gemm.instrs[0])} -> {fuse_origin(epi.instrs[-1])}"
        if isinstance(w, QGemm):
            y = w.gemv_epilogue(x, b, epi.spec, halves, origin)
            if y is None:
                return False
        else:
            if GEMV not in ("1", "pdl") or not G.takes(x, w):
                return False
            if not G.prologue_takes(x):
                x = x.contiguous()
            spec = G.spec_for(w.shape[0], w.shape[1], epi.spec.dtype, b is not None, origin, G._num_sms(self.device),
                              epilogue=epi.spec, halves=halves)
            y = torch.empty(step.T, spec.n, dtype=self.dtype, device=self.device)
            G.gemv(spec, x, w, y, b, pdl=GEMV == "pdl")
        env[epi.outs[0]] = y
        return True

    def _gemv_rope(self, op: KOp, att: KOp, w, b, env, step: "_Run", n: int) -> bool:
        """A qkv GEMM step linked to its attention step as one GEMV launch whose epilogue rotates q into a
        buffer of its own and k and v into the site's cache (codegen/gemv.py gemv_rope) where the GEMV runs
        it: a few rows, a plain weight the GEMV takes (quantized: QGemm.gemv_rope decides), no LoRA, a rotary spec
        with fixed frequencies. Leaves
        q in step.roped for the attention step, which then skips its rotary + KV write; q, k and v (before
        rotation) are never in env. A prologue fused into the step (KILN_GEMV_PROLOGUE) runs as its own
        kernel first. False: nothing ran."""
        if GEMV_ROPE not in ("0", "1"):
            raise KernelSpecError(f"KILN_GEMV_ROPE={GEMV_ROPE!r}: must be 0 or 1")
        rope, pro = att.spec[0], op.extra.get("prologue")
        quantized = isinstance(w, QGemm)  # QGemm.gemv_rope decides (fp8: one row; int4: KILN_INT4_GEMV_ROPE)
        if GEMV_ROPE == "0" or GEMV not in ("1", "pdl") or not 1 <= step.T <= min(GEMV_ROWS, G.GEMV_MAX_T) \
                or step.lora is not None or not (quantized or G.weight_takes(w, self.dtype)) \
                or G.rope_epilogue_refusal(rope, rope.dtype):
            return False
        qkv = _rope_qkv_rows(op, att)
        site, kv, meta = att.extra["site"], step.kv, step.meta
        rope_args = (meta.positions, meta.slots, kv.k[site], kv.v[site], kv.k_scale[site], kv.v_scale[site])
        if pro is not None:  # (fuse.py's gemv_prologue too): the norm, the GEMV and the rotary in one launch
            ins = [env[v] for v in pro.ins]
            gemm = op.extra["gemm"]
            if self._prologue_runs(pro, ins, w, step, linked=True) and G.epilogue_takes_prologue(pro.spec):
                origin = " -> ".join(fuse_origin(i) for i in (pro.instrs[-1], gemm.instrs[0], att.instrs[-1]))
                spec = G.spec_for(w.shape[0], w.shape[1], rope.dtype, b is not None, origin, G._num_sms(self.device),
                                  prologue=pro.spec, epilogue=rope, halves=qkv, post_norm=_post_norm(pro))
                q = torch.empty(step.T, rope.heads * rope.head_dim, dtype=self.dtype, device=self.device)
                self._run_prologue(spec, pro, w, b, q, ins, env, rope_args)
                step.roped[id(att)] = q
                return True
            _RUN[pro.kind](self, pro, env, step, n)  # its own kernel first, then the GEMV with the rotary
            op = gemm
        x = env[op.ins[0]]
        origin = f"{fuse_origin(op.instrs[0])} -> {fuse_origin(att.instrs[-1])}"
        if quantized:
            q = w.gemv_rope(x, b, rope, qkv, origin, rope_args)
            if q is None:
                return False
        else:
            if not G.prologue_takes(x):
                x = x.contiguous()
            spec = G.spec_for(w.shape[0], w.shape[1], rope.dtype, b is not None, origin, G._num_sms(self.device),
                              epilogue=rope, halves=qkv)
            q = torch.empty(step.T, rope.heads * rope.head_dim, dtype=self.dtype, device=self.device)
            G.gemv_rope(spec, x, w, q, meta.positions, meta.slots, kv.k[site], kv.v[site], b, kv.k_scale[site],
                        kv.v_scale[site], pdl=GEMV == "pdl")
        step.roped[id(att)] = q
        return True

    def _amax_out(self, op: KOp, step: "_Run"):
        """(spec, partial maxima buffer or None) of a norm / activation step: its spec with `amax` and a buffer
        for them where an fp8 GEMM quantizes its output per tensor (CudaModel._amax) from more than one row (one
        row: the fp8 GEMV quantizes x itself)."""
        spec = self._amax.get(id(op))
        if spec is None or step.T < 2 or not cuda_quant._on("KILN_FP8_AMAX_FUSE", cuda_quant.AMAX_FUSE):
            return op.spec, None
        parts = torch.empty(K.amax_parts(spec, step.T), dtype=torch.float32, device=self.device)
        step.amax[op.outs[0]] = parts
        return spec, parts

    def _norm_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        fp8 = self._fp8_target(op, step)
        if fp8 is not None:  # the next GEMM's fp8 input, written here
            spec, q = fp8
            out = torch.empty(step.T, spec.hidden, dtype=torch.float8_e4m3fn, device=self.device)
            extra = dict(out_scale=q.input_scale)
        else:
            spec, parts = self._amax_out(op, step)
            out = torch.empty(step.T, spec.hidden, dtype=self.dtype, device=self.device)
            extra = dict(amax=parts, valid_rows=step.meta.valid) if parts is not None else {}
        bias = self.weights[op.extra["bias"].name] if spec.has_bias else None
        w = self.weights[op.extra["weight"].name]
        if spec.has_residual:
            res_out = torch.empty(step.T, spec.hidden, dtype=self.dtype, device=self.device)
            K.norm(spec, _c(env[op.ins[1]]), w, out, residual=_c(env[op.ins[0]]), residual_out=res_out, bias=bias,
                   pdl=_chain("norm", self._state_space), **extra)
            env[op.outs[1]] = res_out
        else:  # a gated norm (fuse.py's gated_norm) reads z, op.ins[1], as it is: row-strided views work
            K.norm(spec, _c(env[op.ins[0]]), w, out, bias=bias, gate=env[op.ins[1]] if spec.gate else None,
                   pdl=_chain("gated" if spec.gate else "norm", self._state_space), **extra)
        env[op.outs[0]] = out

    def _attention_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        env[op.outs[0]] = self._attention(op, env, step.meta, step.kv, step.T, step.roped.pop(id(op), None))

    def _act_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        fp8 = self._fp8_target(op, step)
        if fp8 is not None:  # the next GEMM's fp8 input, written here
            spec, q = fp8
            extra = dict(out_scale=q.input_scale)
            out = torch.empty(step.T, spec.features, dtype=torch.float8_e4m3fn, device=self.device)
        else:
            spec, parts = self._amax_out(op, step)
            extra = dict(amax=parts, valid_rows=step.meta.valid) if parts is not None else {}
            out = torch.empty(step.T, spec.features, dtype=self.dtype, device=self.device)
        if spec.gated:
            K.activation(spec, out, gate=env[op.ins[0]], up=env[op.ins[1]], pdl=_chain("act"), **extra)
        else:
            K.activation(spec, out, x=env[op.ins[0]], pdl=_chain("act"), **extra)
        env[op.outs[0]] = out

    def _embed_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        out = torch.empty(step.T, op.spec.hidden, dtype=self.dtype, device=self.device)
        K.embed(op.spec, step.tokens, self.weights[op.ins[1].name], out)
        env[op.outs[0]] = out

    def _map_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        x = _c(env[op.ins[0]])
        out = torch.empty_like(x)
        K.map_elementwise(op.spec, x, out)
        env[op.outs[0]] = out

    def _moe_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        self._moe[n](env, step, self.weights)

    def _ssm_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        self._ssm(op, env, step, self.weights)

    def _torch_step(self, op: KOp, env, step: "_Run", n: int) -> None:
        ins = op.instrs[0]
        out = OPS[ins.kind].reference(step, ins, [fetch(a, env, self.weights) for a in ins.inputs])
        env.update(zip(ins.outputs, out if isinstance(out, tuple) else (out,)))

    def _attention(self, op: KOp, env, meta: _Meta, kv: KVStore, T: int, q: torch.Tensor | None = None) -> torch.Tensor:
        """q: rotated by the linked qkv GEMV (_gemv_rope), which also wrote k and v into the cache; None: the
        rotary + KV write kernel here does both."""
        rope, dspec, pspec = op.spec
        site = op.extra["site"]
        kc, vc = kv.k[site], kv.v[site]
        # An fp8 site's scales: plain kernel arguments (fixed per site, so captured graphs stay valid)
        scales = dict(k_scale=kv.k_scale[site], v_scale=kv.v_scale[site])
        if q is None:
            q, k, v = (env[i] for i in op.ins)
            rotated = (kv.shift[site], kv.k_mean[site], meta.cu_seqlens, meta.block_tables) if rope.kv_rotated \
                else None  # fp8-rotated: the shifts, the key mean and where each token's sequence begins
            K.rope_write_kv(rope, q, k, v, meta.positions, meta.slots, kc, vc,
                            seq_len=meta.seq_len if rope.scaling in ("dynamic", "longrope") else None, **scales,
                            pdl=_chain("rope"), rotated=rotated)
        out = torch.empty(T, dspec.heads * dspec.head_dim, dtype=self.dtype, device=self.device)
        if meta.fresh is not None and not pspec.window and not pspec.softcap and not pspec.alibi_max \
                and pspec.causal and not pspec.kv_fp8 \
                and (FRESH_SDPA == "1"
                     or K.render(K.prefill_for_device(pspec, self.device)).meta["variant"] != "sm90"):
            # Whole prompts (no cached context): torch's flash attention (SDPA) over the rotated
            # K/V just written to the cache, gathered page by page. (ALiBi takes the kernel path;
            # so does every prompt on Hopper, whose wgmma prefill kernel reads the paged cache,
            # unless FRESH_SDPA.)
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
            if meta.short:
                dspec = self._short_specs.get(dspec.key(), dspec)
            K.paged_decode_attention(dspec, q, kc, vc, meta.block_tables, meta.kv_lens, out,
                                     self._scratch[dspec.key()], meta.max_context, **scales, pdl=_chain("attention"))
        else:
            d = meta.decode_rows  # rows 0..d-1: one token each, through the decode kernel
            if d:
                K.paged_decode_attention(dspec, q[:d], kc, vc, meta.block_tables[:d], meta.kv_lens[:d], out[:d],
                                         self._scratch[dspec.key()], meta.max_context, **scales,
                                         pdl=_chain("attention"))
            # the rest: q / out rows stay absolute (cu_seqlens[d:] are offsets into the whole batch)
            K.prefill_attention(pspec, q, kc, vc, meta.block_tables[d:], meta.cu_seqlens[d:], meta.kv_lens[d:], out,
                                meta.max_q_len, max_context=meta.max_context, **scales,
                                linear=cuda_quant._on("KILN_PREFILL_LINEAR", PREFILL_LINEAR))
        if rope.kv_rotated:  # q and the cache in each head's Hadamard basis: the output too, turned back here
            K.unrotate_heads(rope, out)
        return out


def short_spec(dspec):
    """An fp8 site's decode kernel in its short-context shape (DECODE_SHORT_SHAPE), or None: a 16-bit cache, whose
    shapes were not measured."""
    return dataclasses.replace(dspec, **DECODE_SHORT_SHAPE) if dspec.kv_fp8 else None


def _post_norm(pro: KOp) -> bool:
    """KILN_GEMV_PROLOGUE=post or lone: an RMSNorm prologue's 1 / rms applied to the GEMV's sums (GemvSpec.post_norm)
    where the norm takes it."""
    return GEMV_PROLOGUE in ("post", "lone") and pro.kind is Exec.NORM and G.post_norm_takes(pro.spec)


def base_gemm(op: KOp) -> KOp:
    """The GEMM step as the patterns found it, under any prologue and epilogue fused around it (fuse.py): its
    outputs are the slices of its weight's rows."""
    while "gemm" in op.extra:
        op = op.extra["gemm"]
    return op


def _rope_qkv_rows(op: KOp, att: KOp) -> tuple[int, ...]:
    """A qkv GEMM step linked to its attention step (fuse.py's gemv_rope): the first rows of q, k and v in its
    weight (of the GEMM itself where a prologue is fused before it)."""
    gemm = base_gemm(op)
    start = {v: s for v, (s, _) in zip(gemm.outs, gemm.extra["slices"])}
    return tuple(start[v] for v in att.ins)


def _epilogue_halves(op: KOp) -> tuple[int, int]:
    """A GEMM step with a gated act fused after it (fuse.py's gemv_epilogue; a norm may be fused before it too):
    the first rows of the gate and the up projection in its weight."""
    gemm, epi = base_gemm(op), op.extra["epilogue"]
    start = {v: s for v, (s, _) in zip(gemm.outs, gemm.extra["slices"])}
    return start[epi.ins[0]], start[epi.ins[1]]


def _fused_weight(op: KOp, weights, dtype: torch.dtype) -> tuple[torch.Tensor | QGemm | SplitGemm,
                                                                   torch.Tensor | None]:
    """The GEMM's weight (and bias): the siblings' rows at their slices' starts, zeros between."""
    ws = [weights[w.name] for w in op.extra["weights"]]
    bs = [weights[b.name] if b else None for b in op.extra["biases"]]
    if isinstance(ws[0], QWeight):
        b = None
        if bs[0] is not None:
            start, width = op.extra["slices"][-1]
            b = bs[0].new_zeros(start + width)
            for (start, width), bi in zip(op.extra["slices"], bs):
                b[start:start + width] = bi
        return cuda_quant.prepare(ws, list(op.extra["slices"]), dtype, origin=fuse_origin(op.instrs[0])), b
    if len(ws) == 1:
        return ws[0].contiguous(), bs[0]
    start, width = op.extra["slices"][-1]
    w = ws[0].new_zeros(start + width, ws[0].shape[1])
    b = ws[0].new_zeros(start + width) if bs[0] is not None else None
    for (start, width), wi, bi in zip(op.extra["slices"], ws, bs):
        w[start:start + width] = wi
        if b is not None:
            b[start:start + width] = bi
    return w, b


_RUN = {
    Exec.GEMM: CudaModel._gemm_step, Exec.NORM: CudaModel._norm_step, Exec.ATTENTION: CudaModel._attention_step,
    Exec.ACT: CudaModel._act_step, Exec.EMBED: CudaModel._embed_step, Exec.MAP: CudaModel._map_step,
    Exec.TORCH: CudaModel._torch_step, Exec.MOE: CudaModel._moe_step, Exec.SSM: CudaModel._ssm_step,
}


class _Run:
    """One forward's inputs; also the context (dsl.ops.RefContext) of its torch steps. What an op
    reference reads of the batch on the host is made on first use: a captured graph has no batch,
    so only ops that need none (arithmetic, splits, norms) may run as torch steps inside one."""

    def __init__(self, model: CudaModel, tokens, meta: _Meta, kv: KVStore, batch: StepBatch | None, T: int):
        self.model, self.tokens, self.meta, self.kv, self.batch, self.T = model, tokens, meta, kv, batch, T
        self.lora = None  # runtime/lora.py LoraRows of this step's rows, if any has an adapter
        # attention step (id of its KOp) -> q its linked qkv GEMV rotated (CudaModel._gemv_rope), until it runs
        self.roped: dict[int, torch.Tensor] = {}
        # value -> its partial maxima, written by the norm / activation kernel that wrote it (CudaModel._amax)
        self.amax: dict[Value, torch.Tensor] = {}
        self.traced = False  # (_run with a trace: every value in the run dtype, as the reference's)
        self.positions = meta.positions
        self._host: StepContext | None = None

    def _host_context(self) -> StepContext:
        if self.batch is None:
            raise RuntimeError("a torch step that reads the batch cannot run inside a captured graph")
        if self._host is None:
            self._host = StepContext(self.batch, self.kv, self.model.weights)
        return self._host

    @property
    def seq_len(self) -> torch.Tensor:
        return self._host_context().seq_len

    def run(self, prog, env) -> torch.Tensor:
        return self._host_context().run(prog, env)


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


def _staging_free(model: CudaModel) -> None:
    """Wait (host) until the copies out of the last replay's pinned staging buffers have run, before
    any replay refills its own (graphs' buffers, LoRA rows, state slots). Only an overlapped engine
    launches a step before reading the previous one back; then those copies are queued behind the
    step still running, and refilling the memory under them would change that step's inputs."""
    done = getattr(model, "_staging_done", None)
    if done is not None:
        done.synchronize()


def _staged(model: CudaModel) -> None:
    """Mark the end of a replay's copies out of pinned staging memory (see _staging_free)."""
    done = getattr(model, "_staging_done", None)
    if done is None:
        done = model._staging_done = torch.cuda.Event()
    done.record()


_MIXED_KINDS = (Exec.GEMM, Exec.NORM, Exec.ATTENTION, Exec.ACT, Exec.EMBED, Exec.MAP, Exec.MOE, Exec.TORCH)


def _mixed_key(seqs: int, tokens: int, rows: int) -> tuple[int, int, int] | None:
    """The (sequences, tokens, rows) buckets of a mixed step, or None: too big for a graph."""
    def fit(n, buckets):
        return next((b for b in buckets if b >= n), None)
    key = fit(seqs, MIXED_SEQS), fit(tokens, MIXED_TOKENS), fit(rows, MIXED_ROWS)
    return None if None in key or key[2] > key[1] else key


def _static_meta(model: CudaModel, seqs: int, tokens: int, decode: bool) -> _Meta:
    """A captured graph's metadata buffers, sized for `seqs` sequences and `tokens` new tokens (refreshed
    before each replay). Decode: one token a sequence, each with its one cached token to start with."""
    dev = model.device
    max_pages = -(-model.max_context // model.page_size)
    return _Meta(
        positions=torch.zeros(tokens, dtype=torch.int64, device=dev),
        slots=torch.full((tokens,), -1, dtype=torch.int32, device=dev),
        block_tables=torch.zeros(seqs, max_pages, dtype=torch.int32, device=dev),
        kv_lens=(torch.ones if decode else torch.zeros)(seqs, dtype=torch.int32, device=dev),
        cu_seqlens=(torch.arange(seqs + 1, dtype=torch.int32, device=dev) if decode
                    else torch.zeros(seqs + 1, dtype=torch.int32, device=dev)),
        seq_len=torch.ones(1, dtype=torch.int32, device=dev),
        decode=decode, max_q_len=1 if decode else tokens, max_context=model.max_context,
        valid=torch.full((1,), tokens, dtype=torch.int32, device=dev))


class GraphMemoryShort(Exception):
    """A mixed graph's capture refused for want of device memory (_capture): its steps run eagerly."""


# A mixed graph is captured only where the device keeps, after it, this share more than an eager step of its size
# takes: a graph's pool is memory no eager step can use, and the KV cache took most of the rest at start-up
# (EngineConfig.kv_memory_fraction), so graphs of the largest buckets could otherwise starve the steps they do not
# cover (session 24, H100: at an 8,192-token budget bench throughput ran out of memory with 13.9 GiB in graph pools).
GRAPH_MEMORY_MARGIN = 1.25


def _capture(model: CudaModel, run, pool=None, check: bool = False):
    """Warm `run` up on a side stream (first launches load modules, cuBLAS picks algorithms), then
    capture it: (graph, its output), into `pool` (None: a private one). With `check` (a mixed graph): first a
    check that the device holds the memory the warm-up took twice over, once for the capture (less what the
    pool's earlier captures freed in it) and once for an eager step after it; else GraphMemoryShort."""
    dev = model.device
    if model._warm_stream is None:
        model._warm_stream = torch.cuda.Stream(dev)
    stream = model._warm_stream
    stream.wait_stream(torch.cuda.current_stream(dev))
    if check:
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    lt = model._lt  # (the per-tensor fp8 GEMMs' cuBLASLt plans are made and tuned in this run: cuda_lt)
    if lt is not None:
        lt.tuning = True
    try:
        with torch.cuda.stream(stream):
            run()
    finally:
        if lt is not None:
            lt.tuning = False
    torch.cuda.current_stream(dev).wait_stream(stream)
    if check:
        peak = torch.cuda.max_memory_allocated(dev) - base
        stream.synchronize()
        torch.cuda.empty_cache()  # the warm-up's blocks are cached for its side stream alone: back to the device
        free, _ = torch.cuda.mem_get_info(dev)
        if free < GRAPH_MEMORY_MARGIN * (max(0, peak - model._pool_peak) + peak):
            raise GraphMemoryShort(f"{free / 2**30:.2f} GiB free, a step of this size takes {peak / 2**30:.2f}")
        model._pool_peak = max(model._pool_peak, peak)
    graph = torch.cuda.CUDAGraph()
    # No garbage collection inside the capture: collecting an unreachable CUDA graph (or its
    # memory) while another is being captured aborts the process.
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = run()
    finally:
        gc.enable()
    return graph, out


def large_warm_keys(max_batch: int, tokens: int, prompt_len: int | None = None,
                    scratch: int | None = None) -> list[tuple[int, int, int, int]]:
    """The large mixed buckets (large_mixed_key's) of the steps a throughput run takes most, to capture ahead, for
    steps of up to `max_batch` sequences and `tokens` tokens (the budget), of `prompt_len`-token prompts where
    known: a full step (the budget's token bucket) of one or two prompt chunks, or of as many prompts as it holds
    (short prompts: the whole ones, or those and a chunk of one more at each end), beside each decode
    bucket up to max_batch (the seats filling); then every seat taken (max_batch's decode bucket) and prompts
    trickling in as others finish, the same prompt buckets at each smaller token bucket past the decode rows.
    Largest first (in the shared pool the smaller captures fit in the blocks the first took). Session 27: at max
    batch 512, 4,096 tokens a step, a 128/128 run's 32-prompt steps (the warm-up had taken 33: bucket 64) were
    captured in its timed region, 6 captures of ~0.4 s in 7 s (tests/test_graph_buckets.py simulates the shapes).
    `scratch`: the model's decode scratch (its max_batch, at least `max_batch`; default `max_batch`), which caps
    large_mixed_key's decode bucket: with a larger scratch, 20 seats' decode rows take bucket 32, not 20."""
    def fit(n, buckets):
        return next((b for b in buckets if b >= n), None)
    t = fit(tokens, LARGE_TOKENS)
    if not tokens or t is None:
        return []
    scratch = max(scratch or max_batch, max_batch)
    top = min(fit(max_batch, LARGE_DECODE) or scratch, scratch)  # large_mixed_key's bucket of max_batch rows
    cap = min(top, t)
    full = (tokens // prompt_len, -(-tokens // prompt_len) + 1) if prompt_len else ()
    seqs = {LARGE_SEQS[0]} | {fit(min(n, max_batch), LARGE_SEQS) for n in full if n > 0} - {None}
    keys = {(p, t, d + p, d) for p in seqs for d in {0} | {min(b, cap) for b in LARGE_DECODE}}
    keys |= {(p, t2, top + p, top) for p in seqs for t2 in LARGE_TOKENS if top < t2 < t}
    return sorted(keys, key=lambda k: (k[1], k[2], k[0]), reverse=True)


def large_mixed_key(batch: StepBatch, rows: int, max_batch: int) -> tuple[int, int, int, int] | None:
    """The (prompt sequences, tokens, rows, decode rows) buckets of a large mixed step (MIXED_GRAPHS_LARGE): its
    leading one-token sequences (the decode rows, MIXED_SPLIT) in a LARGE_DECODE bucket (or max_batch, the most),
    the rest in LARGE_SEQS, its tokens in LARGE_TOKENS (at least the decode bucket: the decode kernel's padding
    rows are token rows the prefill kernel overwrites, or padding), `rows` sampled rows (at most one a sequence:
    the rows bucket is the sequences'). None: eager."""
    seqs = batch.seqs
    lead = next((i for i, s in enumerate(seqs) if s.length != 1), len(seqs)) if MIXED_SPLIT == "1" else 0
    if rows > len(seqs) or lead == len(seqs):
        return None

    def fit(n, buckets):
        return next((b for b in buckets if b >= n), None)
    if lead > max_batch:  # (the decode scratch holds max_batch rows)
        return None
    d = min(fit(lead, LARGE_DECODE) or max_batch, max_batch) if lead else 0
    p = fit(len(seqs) - lead, LARGE_SEQS)
    t = fit(max(batch.num_tokens, d), LARGE_TOKENS)
    if None in (p, t):
        return None
    return p, t, d + p, d


def _large_layout(h, decode: int, n: int, T: int, ints, tables) -> None:
    """A large mixed graph's sequence metadata (host_int's kv_lens [n] and cu_seqlens [n + 1], tables [n]) for
    `h` (host_meta of a step whose first D sequences are one-token decode rows, D <= decode): sequences 0..D-1 are
    the decode rows; D..decode-1 the decode bucket's padding, one cached token on page 0 each, whose rows D..decode-1
    the decode kernel writes and the prefill kernel then overwrites (they are the prompts' first token rows) or
    nobody reads (padding); then the step's prompt sequences, then padding sequences with no queries and no context.
    cu_seqlens: the decode section's entries are unread (the decode kernel maps sequence i to row i)."""
    S = len(h.kv_lens)
    D = int(np.argmax(h.lengths != 1))  # (large_mixed_key: the step has a prompt sequence)
    P = S - D
    kv, cu = ints[:n], ints[n:2 * n + 1]
    kv[:D], kv[D:decode], kv[decode:decode + P], kv[decode + P:] = h.kv_lens[:D], 1, h.kv_lens[D:], 0
    cu[:decode] = np.minimum(np.arange(decode), D)
    cu[decode:decode + P + 1], cu[decode + P + 1:] = h.cu_seqlens[D:], T
    tables[:D], tables[D:decode] = h.block_tables[:D], 0
    tables[decode:decode + P], tables[decode + P:] = h.block_tables[D:], 0


class _MixedGraph:
    """A step of up to `seqs` sequences, `tokens` new tokens and `rows` sampled rows, captured once
    and replayed with new metadata. The prefill attention kernel's grid covers `tokens` queries per
    sequence (a host bound it needs); blocks past a sequence's own queries exit at once. Padding:
    tokens past the step's write no K/V (slot -1) and belong to no sequence; sequences past it
    have no queries and no context; rows past it read row 0. The logits of real rows only are used."""

    def __init__(self, model: CudaModel, kv: KVStore, seqs: int, tokens: int, rows: int, decode: int = 0):
        self.model, self.tokens_n, self.rows_n, self.decode = model, tokens, rows, decode
        self.seqs = decode + seqs  # the metadata's sequences: `decode` rows' (MIXED_GRAPHS_LARGE), then the prompts'
        dev = model.device
        self.tokens = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self.rows = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.meta = _static_meta(model, self.seqs, tokens, decode=False)
        if decode:  # the decode kernel's rows: one cached token each until replays fill them (as _Graph's)
            self.meta.decode_rows = decode
            self.meta.kv_lens[:decode] = 1
        self.graph, self.logits = _capture(
            model, lambda: model.mixed_out(model._run(self.tokens, self.meta, kv, None, rows=self.rows)),
            model.graph_pool(), check=True)
        # Pinned host staging (numpy views of the same memory): [tokens, positions, slots] x tokens;
        # sampled rows; [kv_lens x seqs, cu_seqlens x (seqs + 1), longest, real tokens]; block tables.
        self.host = torch.zeros(3, tokens, dtype=torch.int64).pin_memory()
        self.host_rows = torch.zeros(rows, dtype=torch.int64).pin_memory()
        self.host_int = torch.zeros(2 * self.seqs + 3, dtype=torch.int32).pin_memory()  # ... longest, real tokens
        self.tables = torch.zeros_like(self.meta.block_tables, device="cpu").pin_memory()

    def replay(self, batch: StepBatch, sample: list[int]) -> torch.Tensor:
        """The logits of `sample` (batch.sample_rows()) for `batch`."""
        S, T = len(batch.seqs), batch.num_tokens
        h = host_meta(batch, self.model.page_size, self.tables.shape[1])
        _staging_free(self.model)
        tok, rows, ints, tables = self.host.numpy(), self.host_rows.numpy(), self.host_int.numpy(), self.tables.numpy()
        tok[0, :T], tok[1, :T], tok[2, :T] = batch.tokens.cpu().numpy(), h.positions, h.slots
        tok[:2, T:], tok[2, T:] = 0, -1
        rows[:len(sample)], rows[len(sample):] = sample, 0
        n = self.seqs
        if self.decode:  # [decode rows | their bucket's padding | prompts | padding]; see _large_layout
            _large_layout(h, self.decode, n, T, ints, tables)
        else:
            ints[:S], ints[S:n] = h.kv_lens, 0
            ints[n:n + S + 1], ints[n + S + 1:2 * n + 1] = h.cu_seqlens, T
            tables[:S], tables[S:] = h.block_tables, 0
        ints[2 * n + 1], ints[2 * n + 2] = h.kv_lens.max(), T
        m = self.meta
        self.tokens.copy_(self.host[0], non_blocking=True)
        m.positions.copy_(self.host[1], non_blocking=True)
        m.slots.copy_(self.host[2], non_blocking=True)
        self.rows.copy_(self.host_rows, non_blocking=True)
        m.kv_lens.copy_(self.host_int[:n], non_blocking=True)
        m.cu_seqlens.copy_(self.host_int[n:2 * n + 1], non_blocking=True)
        m.seq_len.copy_(self.host_int[2 * n + 1:2 * n + 2], non_blocking=True)
        m.valid.copy_(self.host_int[2 * n + 2:], non_blocking=True)
        m.block_tables.copy_(self.tables, non_blocking=True)
        _staged(self.model)
        if batch.pending is not None:
            batch.pending.apply(self.tokens)
        self.graph.replay()
        return self.logits[:len(sample)]


class _Graph:
    """A decode step for `size` sequences, captured once and replayed with new metadata."""

    def __init__(self, model: CudaModel, kv: KVStore, size: int, short: bool = False):
        self.model = model
        dev = model.device
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.int64, device=dev)
        self.meta = _static_meta(model, size, size, decode=True)
        if short:  # replayed only for steps whose contexts are within the bound: the kernels' grids sized for it
            bound = decode_short_bounds()[1]
            self.meta = dataclasses.replace(self.meta, short=True, max_context=min(bound, self.meta.max_context))
        self.lora = model._lora.static_rows(size)  # adapters' row grouping, refreshed per replay
        lora = (self.lora, None) if self.lora is not None else None
        where = os.environ.get("KILN_GRAPH_POOL", GRAPH_POOL)
        if where not in ("shared", "private"):
            raise ValueError(f"KILN_GRAPH_POOL must be 'shared' or 'private', got {where!r}")
        self.graph, self.logits = _capture(model, lambda: model._run(self.tokens, self.meta, kv, None, lora=lora),
                                           model.graph_pool() if where == "shared" else None)
        self.host = torch.empty(5, size, dtype=torch.int64).pin_memory()
        self.tables = torch.zeros_like(self.meta.block_tables, device="cpu").pin_memory()
        self.host_valid = torch.zeros(1, dtype=torch.int32).pin_memory()  # the batch's sequences (real rows)
        self.host_np, self.tables_np = self.host.numpy(), self.tables.numpy()  # same memory

    def replay(self, batch: StepBatch) -> torch.Tensor:
        m = self.meta
        _staging_free(self.model)
        fill_decode_buffers(batch, self.model.page_size, self.host_np, self.tables_np)
        if self.lora is not None:
            self.model._lora.fill(self.lora, [s.adapter for s in batch.seqs])
        self.model._ssm.fill(batch, self.size)  # the sequences' state slots (no-op without state-space steps)
        h = self.host
        self.tokens.copy_(h[0], non_blocking=True)
        m.positions.copy_(h[1], non_blocking=True)
        m.slots.copy_(h[3], non_blocking=True)
        m.kv_lens.copy_(h[4], non_blocking=True)
        m.seq_len.copy_(h[2, :1], non_blocking=True)
        m.block_tables.copy_(self.tables, non_blocking=True)
        self.host_valid.numpy()[0] = len(batch.seqs)
        m.valid.copy_(self.host_valid, non_blocking=True)
        _staged(self.model)
        if batch.pending is not None:
            batch.pending.apply(self.tokens)
        self.graph.replay()
        return self.logits
