"""Kernel specs: the frozen constants each CUDA kernel is specialized on.

A spec is what the IR hands codegen for one op: sizes, variants, dtype, and `origin`, the spec
op it came from (rendered as a comment). Specs validate themselves at construction, so a bad
value fails here with the field named rather than as a compile error in generated source.
`key()` is the spec without its origin: equal keys compile to the same kernel code.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from kiln.dsl.dtypes import RUN_DTYPES, of_torch
from kiln.dsl.ops.elementwise import KERNEL_ACTIVATIONS as ACTIVATIONS

ROPE_LAYOUTS = ("half", "interleaved")
ROPE_VARIANTS = ("token", "bulk")  # RopeCacheSpec.variant
ACT_VARIANTS = ("flat", "rows", "rows_stream", "bulk")  # ActSpec.variant
# The spec language's rope_scaling kinds that have kernels ("llama3": HF's frequency bands, low
# frequencies divided by `factor`, high ones kept, a smooth blend between; "yarn": a static table
# too; "longrope": a short and a long table, picked by the step's sequence length like "dynamic").
ROPE_SCALINGS = ("none", "linear", "llama3", "dynamic", "yarn", "longrope")


def dtype_name(dtype: torch.dtype) -> str:
    return of_torch(dtype).name


class KernelSpecError(ValueError):
    """A kernel spec has a value no kernel can be generated for."""


def _fail(spec, field: str, why: str):
    raise KernelSpecError(f"{type(spec).__name__}.{field}: {why} (from {spec.origin or '?'})")


def _positive(spec, *fields):
    for f in fields:
        v = getattr(spec, f)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(spec, f, f"must be a positive int, got {v!r}")


def _dtype(spec):
    if spec.dtype not in RUN_DTYPES:
        _fail(spec, "dtype", f"must be one of {sorted(RUN_DTYPES)}, got {spec.dtype!r}")


class _Spec:
    def key(self):
        return dataclasses.replace(self, origin="")

    def constants(self) -> str:
        """'field=value' for every constant but origin, for the kernel's header comment."""
        return " ".join(
            f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name != "origin"
        )


@dataclass(frozen=True)
class NormSpec(_Spec):
    kind: str  # "rms" | "layer"
    hidden: int
    eps: float
    weight_offset: float = 0.0  # y = norm(x) * (w + offset): 1.0 where weights are stored as w - 1
    has_bias: bool = False  # layer norm only
    has_residual: bool = True  # fused h = x + residual first
    dtype: str = "bf16"
    origin: str = ""
    # group=g: each run of g features normalised on its own (one block per token and group); 0: the row
    group: int = 0
    per_group_weight: bool = False  # weight (and bias) [hidden / g, g], a row per group; else [g]
    # A gated norm's prologue, norm(x * gate(z)) (fuse.py's gated_norm): the activation, "" for none
    gate: str = ""
    # Also each row's max |out| into a [T] buffer: the partials of an fp8 per-tensor activation quantization of out
    # (runtime/cuda_quant.py AMAX_FUSE), whose own amax launch is then skipped. Whole rows only (no group).
    amax: bool = False
    # out as float8_e4m3fn values of out / s, s the static per-tensor activation scale (fp32 on the device) of the
    # fp8 GEMM that reads it: the bytes that GEMM's own quantization of out would give (runtime/cuda_quant.py
    # FP8_OUT_FUSE), without writing out in the run dtype and reading it back. Whole rows (no group), no amax.
    fp8_out: bool = False

    @property
    def width(self) -> int:
        """Features normalised together: the group, or the whole row."""
        return self.group or self.hidden

    def __post_init__(self):
        if self.kind not in ("rms", "layer"):
            _fail(self, "kind", f"must be 'rms' or 'layer', got {self.kind!r}")
        _positive(self, "hidden")
        _dtype(self)
        if not self.eps > 0:
            _fail(self, "eps", f"must be > 0, got {self.eps!r}")
        if self.has_bias and self.kind != "layer":
            _fail(self, "has_bias", "only a layer norm has a bias")
        if self.group:
            _positive(self, "group")
            if self.hidden % self.group:
                _fail(self, "group", f"{self.group} does not divide hidden={self.hidden}")
        if self.per_group_weight and not self.group:
            _fail(self, "per_group_weight", "a weight row per group needs group")
        if self.gate and self.gate not in ACTIVATIONS:
            _fail(self, "gate", f"must be '' or one of {', '.join(ACTIVATIONS)}, got {self.gate!r}")
        if self.gate and self.has_residual:
            _fail(self, "gate", "a gated norm has no fused residual add (one prologue per kernel)")
        if self.amax and self.group:
            _fail(self, "amax", "row maxima need whole rows (no group)")
        if self.fp8_out and (self.group or self.amax):
            _fail(self, "fp8_out", "an fp8 output needs whole rows (no group) and a static scale (no amax)")


@dataclass(frozen=True)
class RopeCacheSpec(_Spec):
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # leading dims of each head that rotate; 0 = write K/V with no rotation
    page_size: int
    layout: str = "half"  # "half": pairs (i, i + rot/2); "interleaved": pairs (2i, 2i + 1)
    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # "llama3" only
    high_freq_factor: float = 4.0  # "llama3" only
    original_max_position: int = 0  # "llama3", "dynamic", "yarn", "longrope"
    attention_factor: float = 1.0  # multiplies cos and sin
    beta_fast: float = 32.0  # "yarn" only
    beta_slow: float = 1.0  # "yarn" only
    truncate: bool = True  # "yarn" only
    short_factor: tuple[float, ...] = ()  # "longrope" only: rotary_dim / 2 entries each
    long_factor: tuple[float, ...] = ()  # "longrope": used once seq_len > original_max_position
    dtype: str = "bf16"
    # FP8 KV cache: K/V pages hold float8_e4m3fn values of K / k_scale, V / v_scale (the kernel
    # takes the site's scales as arguments), else the run dtype
    kv_fp8: bool = False
    # --kv-cache-dtype fp8-rotated (runtime/kv_store.py; needs kv_fp8 and a power-of-2 head_dim): q, k and v turned by
    # each head's Hadamard matrix, k less its sequence's shift (templates/rope_cache_rotated.cu.j2); the attention's
    # output is turned back after it (kernels.unrotate_heads). The variant and prefetch do not apply.
    kv_rotated: bool = False
    # Each thread issues all its q, k and v loads before the cos/sin table and the first store (one
    # memory round trip per block instead of three). Off: measured slower on the H200 (70.3 vs 62.6 us
    # at T=8192, an 8B model; its registers cut the blocks per SM), kept for A/B (bench_kernels).
    prefetch: bool = False
    origin: str = ""
    # Issue #12 (the kernel at >= 85% of copy bandwidth), measured side by side by bench_kernels --only rope:
    # "token": a block per token (the kernel above); "bulk": Hopper bulk copies (templates/bulk_copy.cuh.j2),
    # a persistent grid streaming each token's q, k, v rows through a shared-memory pipeline and storing q
    # and the cache rows with bulk stores. "bulk" renders "token" where it cannot apply (an fp8 cache, heads
    # not whole 16-byte chunks, a stage over shared memory), and the launch wrapper before sm_90.
    variant: str = "token"

    def __post_init__(self):
        _positive(self, "heads", "kv_heads", "head_dim", "page_size")
        _dtype(self)
        if not isinstance(self.prefetch, bool):
            _fail(self, "prefetch", f"must be a bool, got {self.prefetch!r}")
        if self.variant not in ROPE_VARIANTS:
            _fail(self, "variant", f"must be one of {ROPE_VARIANTS}, got {self.variant!r}")
        if self.prefetch and self.variant != "token":
            _fail(self, "prefetch", f"applies to the 'token' variant only, not {self.variant!r}")
        if self.heads % self.kv_heads:
            _fail(self, "kv_heads", f"{self.kv_heads} does not divide heads={self.heads}")
        if self.layout not in ROPE_LAYOUTS:
            _fail(self, "layout", f"must be one of {ROPE_LAYOUTS}, got {self.layout!r}")
        if not (0 <= self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            _fail(self, "rotary_dim", f"must be even and in [0, head_dim={self.head_dim}]")
        if self.scaling not in ROPE_SCALINGS:
            _fail(self, "scaling", f"must be one of {ROPE_SCALINGS}, got {self.scaling!r}")
        if self.rotary_dim and not self.theta > 0:
            _fail(self, "theta", f"must be > 0, got {self.theta!r}")
        if self.scaling != "none" and not self.factor > 0:
            _fail(self, "factor", f"must be > 0, got {self.factor!r}")
        if self.scaling in ("llama3", "dynamic", "yarn", "longrope") and self.original_max_position <= 0:
            _fail(self, "original_max_position", f"scaling {self.scaling!r} needs it > 0")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            _fail(self, "high_freq_factor", "must exceed low_freq_factor")
        if self.scaling == "dynamic" and self.rotary_dim <= 2:
            _fail(self, "rotary_dim", "dynamic scaling needs rotary_dim > 2")
        for name in ("short_factor", "long_factor"):  # hashable, whatever sequence was given
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.scaling == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(self, name)) != self.rotary_dim // 2:
                    _fail(self, name, f"longrope needs rotary_dim / 2 = {self.rotary_dim // 2} entries")
        if not self.attention_factor > 0:
            _fail(self, "attention_factor", f"must be > 0, got {self.attention_factor!r}")
        _fp8_rows(self)
        if self.kv_rotated and not (self.kv_fp8 and self.head_dim & (self.head_dim - 1) == 0):
            _fail(self, "kv_rotated", f"needs kv_fp8 and a power-of-2 head_dim, got kv_fp8={self.kv_fp8}, "
                                      f"head_dim={self.head_dim}")


def _fp8_rows(spec):
    """An fp8 KV row is copied in 16-byte chunks: head_dim bytes must be whole chunks."""
    if not isinstance(spec.kv_fp8, bool):
        _fail(spec, "kv_fp8", f"must be a bool, got {spec.kv_fp8!r}")
    if spec.kv_fp8 and spec.head_dim % 16:
        _fail(spec, "head_dim", f"an fp8 KV cache needs head_dim % 16 == 0, got {spec.head_dim}")


@dataclass(frozen=True)
class _AttnSpec(_Spec):
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    scale: float  # softmax(q k^T * scale)
    window: int = 0  # sliding window: a query at p sees keys in (p - window, p]; 0 = none
    softcap: float = 0.0  # scores -> softcap * tanh(scores / softcap); 0 = none
    # ALiBi: scores += slope_h * (key position - query position), slope_h = alibi_scale *
    # dsl.ops.attention.alibi_slopes(heads, alibi_max)[h] (a table baked into the kernel); 0 = none
    alibi_max: float = 0.0
    alibi_scale: float = 1.0
    dtype: str = "bf16"
    kv_fp8: bool = False  # K/V pages hold float8_e4m3fn (K / k_scale, V / v_scale; scales: kernel arguments)
    origin: str = ""

    def __post_init__(self):
        _positive(self, "heads", "kv_heads", "head_dim", "page_size")
        _dtype(self)
        if self.heads % self.kv_heads:
            _fail(self, "kv_heads", f"{self.kv_heads} does not divide heads={self.heads}")
        if self.head_dim * RUN_DTYPES[self.dtype].itemsize % 16:
            _fail(self, "head_dim", "a head must be a whole number of 16-byte chunks")
        if not self.scale > 0:
            _fail(self, "scale", f"must be > 0, got {self.scale!r}")
        if self.window < 0 or self.softcap < 0:
            _fail(self, "window" if self.window < 0 else "softcap", "must be >= 0 (0 = off)")
        if self.alibi_max < 0:
            _fail(self, "alibi_max", "must be >= 0 (0 = off)")
        _fp8_rows(self)


@dataclass(frozen=True)
class DecodeAttnSpec(_AttnSpec):
    # Issue #12's batch-1 changes: the fused split merge reads every split's (max, sum) and o rows in
    # one round trip per 32 splits (weights by shuffle), and the tensor-core kernel loads each tile's
    # page index an iteration before copying the tile. False renders the kernel as before (A/B).
    tuned: bool = True
    # The tensor-core kernel's shape (render._decode_mma): warps per block, cp.async ring stages per
    # warp, blocks per SM it is compiled for (__launch_bounds__' minimum, which caps registers);
    # 0 = the renderer's choice. For A/B runs (bench_kernels --only fp8kv), not for the runtime.
    warps: int = 0
    stages: int = 0
    min_blocks: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.tuned, bool):
            _fail(self, "tuned", f"must be a bool, got {self.tuned!r}")
        for f, ok in (("warps", (0, 2, 4, 8, 16)), ("stages", (0, 2, 3, 4, 5, 6, 7, 8)),
                      ("min_blocks", (0, 1, 2, 3, 4))):
            v = getattr(self, f)
            if isinstance(v, bool) or v not in ok:
                _fail(self, f, f"must be one of {ok} (0 = the renderer's choice), got {v!r}")


# Compute capabilities (major * 10 + minor) whose prefill attention is the wgmma kernel
# (templates/prefill_attn_sm90.cu.j2: sm_90a instructions, which later families lack).
HOPPER_SM = range(90, 100)


@dataclass(frozen=True)
class PrefillAttnSpec(_AttnSpec):
    causal: bool = True
    # The GPU generation the kernel is generated for (compute capability major * 10 + minor):
    # 9x (Hopper) picks the wgmma kernel where it applies (see render.prefill_variant). The
    # launch wrapper retargets a spec to the device it runs on; 90 (the H100/H200) by default,
    # so `kiln show --kernels` prints what those GPUs run.
    sm: int = 90
    # Where the wgmma kernel applies: its warp-specialised form (templates/prefill_attn_sm90_ws.cu.j2:
    # a producer warpgroup loading K/V, two consumer warpgroups in ping-pong) instead of the one in
    # which both warpgroups load and compute (prefill_attn_sm90.cu.j2). No effect elsewhere.
    ws: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.sm, int) or isinstance(self.sm, bool) or self.sm < 70:
            _fail(self, "sm", f"must be a compute capability * 10 (int >= 70), got {self.sm!r}")
        if not isinstance(self.ws, bool):
            _fail(self, "ws", f"must be a bool, got {self.ws!r}")


@dataclass(frozen=True)
class ActSpec(_Spec):
    kind: str
    gated: bool
    features: int  # F: output width (the gated input is 2F wide)
    dtype: str = "bf16"
    # Vectors each thread loads before using any, on a grid the GPU holds at once. 1 (one vector at a
    # time on up to 8 blocks per SM): 4 measured slower on the H200 (296 vs 224 us, SwiGLU T=8192:
    # 2 blocks per SM at 99 registers), kept for A/B (bench_kernels)
    unroll: int = 1
    origin: str = ""
    # Issue #12 (SwiGLU at >= 85% of copy bandwidth), measured side by side by bench_kernels --only act:
    # "flat": the grid-stride loop above; "rows": a block per row segment, each thread's vectors of every
    # input all loaded before use, 32-bit offsets; "rows_stream": the same with L1-bypassing loads (256-byte
    # L2 prefetch) and evict-first stores; "bulk": Hopper bulk copies (templates/bulk_copy.cuh.j2) through a
    # shared-memory pipeline on a persistent grid. "bulk" renders "flat" where rows are not whole 16-byte
    # chunks, and the launch wrapper picks "flat" before sm_90; "rows_stream" is "rows" below 16-byte vectors.
    # "rows" (a block per row segment, every load issued before any use): 98% of the H200's copy bandwidth
    # for SwiGLU at 8,192 x 14,336 against 77% for "flat" (benchmarks/2026-12-02-03.md, session 8)
    variant: str = "rows"
    # Also each block's max |out| into a [T x chunks] buffer (as NormSpec.amax): the "rows" variants only.
    amax: bool = False
    # out as fp8 values of out / a static scale (as NormSpec.fp8_out): the "rows" variants only, no amax.
    fp8_out: bool = False

    def __post_init__(self):
        if self.kind not in ACTIVATIONS:
            _fail(self, "kind", f"must be one of {ACTIVATIONS}, got {self.kind!r}")
        _positive(self, "features", "unroll")
        if self.unroll > 16:
            _fail(self, "unroll", f"must be at most 16, got {self.unroll}")
        if self.variant not in ACT_VARIANTS:
            _fail(self, "variant", f"must be one of {ACT_VARIANTS}, got {self.variant!r}")
        if self.unroll > 1 and self.variant != "flat":
            _fail(self, "unroll", f"applies to the 'flat' variant only, not {self.variant!r}")
        if self.amax and self.variant not in ("rows", "rows_stream"):
            _fail(self, "amax", f"block maxima need the 'rows' or 'rows_stream' variant, not {self.variant!r}")
        if self.fp8_out and (self.variant not in ("rows", "rows_stream") or self.amax):
            _fail(self, "fp8_out", f"an fp8 output needs the 'rows' or 'rows_stream' variant and no amax, not "
                                   f"{self.variant!r}{' with amax' if self.amax else ''}")
        _dtype(self)


@dataclass(frozen=True)
class EmbedSpec(_Spec):
    vocab: int
    hidden: int
    dtype: str = "bf16"
    origin: str = ""
    offset: int = 0  # the table holds vocabulary rows [offset, offset + vocab) (a tensor-parallel rank's)

    def __post_init__(self):
        _positive(self, "vocab", "hidden")
        _dtype(self)
        if not isinstance(self.offset, int) or isinstance(self.offset, bool) or self.offset < 0:
            _fail(self, "offset", f"must be an int >= 0, got {self.offset!r}")


@dataclass(frozen=True)
class MapSpec(_Spec):
    """y = f(x) elementwise, f the device function in the template `body` (an op's own, e.g.
    templates/map_softcap.cu.j2), rendered with the float constants `consts` (name, value)."""

    body: str
    consts: tuple[tuple[str, float], ...] = ()
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _dtype(self)
        if not re.fullmatch(r"map_[a-z0-9_]+\.cu\.j2", self.body):
            _fail(self, "body", f"must name a map_*.cu.j2 template, got {self.body!r}")
        for name, _ in self.consts:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                _fail(self, "consts", f"constant name {name!r} is not a lower-case identifier")


# ---- mixture of experts: grouped GEMMs over the token copies sorted by expert

MOE_BLOCK_M = 64  # rows of a grouped-GEMM tile; each expert's rows start a new tile


@dataclass(frozen=True)
class MoeRouteSpec(_Spec):
    """The bookkeeping around a moe's grouped GEMMs: sort the T x top_k token copies by expert
    (each expert's row offset and first tile by a device-side prefix sum), then the weighted sum
    of each token's top_k expert rows back into [T, hidden]."""

    experts: int
    top_k: int
    hidden: int  # width of the combined output
    block_m: int = MOE_BLOCK_M
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "experts", "top_k", "hidden", "block_m")
        _dtype(self)
        if self.top_k > self.experts:
            _fail(self, "top_k", f"{self.top_k} is more than the {self.experts} experts")


@dataclass(frozen=True)
class MoeGemmSpec(_Spec):
    """out[r] = a[r] @ w[e]^T (+ b[e]) for every sorted row r of every expert e at once: one launch,
    tiles of block_m rows that never straddle two experts. `gather`: a's rows are token rows, picked
    through the sorted order (the expert input); else a holds the sorted rows themselves."""

    experts: int
    n: int  # output features (sibling linears' rows, concatenated)
    k: int  # input features
    gather: bool
    has_bias: bool = False
    block_m: int = MOE_BLOCK_M
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "experts", "n", "k", "block_m")
        _dtype(self)
        if self.block_m % 32:
            _fail(self, "block_m", f"must be a multiple of 32 (two warps of 16-row mma tiles), got {self.block_m}")
