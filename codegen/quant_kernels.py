"""Weight-only quantized linears on the GPU: the spec, its rendering (templates/gemv_wq.cu.j2) and
the launch wrappers, and the packed layout they read (`repack`, `pack`: built once at load from a
`QWeight`; runtime/cuda_quant.py runs it).

`QGemvSpec` covers every weight stored as small integers with per-group records:
  fmt  "int4" (16-byte lane pieces of 32 nibbles, chunks of 64 columns) or "int8" (16 bytes, 32 columns)
  mode "post": value = (q - z) * s with the group spanning whole chunks; the tensor cores multiply the
       exact integers and each chunk's sum is scaled in fp32 (AWQ / GPTQ / RTN int4, int8 per channel,
       ggml q8_0)
       "pre": value = q * s + m rounded to the run dtype first (ggml q4_0 / q4_1 / q4_k as int4, q5_k / q6_k as
       int8: groups of 32, q6_k's of 16; `ggml_blocks`)
  tokens the bucket of rows per block (8: one mma n-tile, 16: two); the grid covers more rows.
  variant "stream" (16-bit runs): records and x staged in shared memory per block, a ring of `DEPTH`
       weight loads per lane kept full, K split over `splits` blocks (`choose_splits`: enough blocks
       for every SM, x's slice within `XS_MAX` bytes) whose partials the last block sums, launched
       with programmatic dependent launch so its weight loads overlap the kernel before;
       "loop": the first design (one tile per block, x and records read per chunk from L2).
       "persist" (16-bit runs): a grid sized to the device (`choose_persist`); each block owns a K split
       and `tpb` consecutive tiles, stages x's slice in shared memory once for all of them, and each warp
       streams its (tile, chunk) items through one ring of `PERSIST_DEPTH` slots (weight piece + the
       lane's records) that runs on across tiles: constant bytes in flight, no block turnover, no wait
       on staged records, and at 16 tokens x staged once per block instead of once per 16 rows (the
       stream variant moved 4x the weight bytes of x through L2 there: slower than bf16 cuBLAS).
       "stream" measured faster than "loop" at one token (49-58% of copy bandwidth against 30-56%) but
       slower at 16; "persist" slower at both: opt in with `KILN_QGEMV=stream|persist`.
       "warp" (int4 "post", 16-bit runs, T <= WARP_MAX_T; issue #13), the default where it applies: built
       like codegen/gemv.py's bf16 GEMV on this same layout: each warp owns `tpw` tiles and a K slice
       (`ksplit` warps of a block per tile, summed in shared memory), every lane keeps WARP_LOADS 16-byte
       weight loads in flight in a ring, records in their own ring one group ahead, x's B fragment read
       per chunk through L1, no staging, no split-K buffers, no branch in the chunk loop; `choose_warp`
       sizes the grid to be resident in one wave. More rows (or int8 / "pre" weights, or a group of other
       than a power of two chunks) take "loop". On the H200 (session 16) it ran the 8B model's four
       linears at one row in 47 us against the loop's 61 (51-61% of copy bandwidth) and int4 batch-1
       decode in 2.54-2.57 ms against 3.20-3.33; session 19 cut its loop from 94 to 61 instructions a chunk
       (byte-permute dequantization, x read with no test where slices are whole batches): 36.6 us
       (qkv 57%, o 54%, gate+up 85%, down 78% of copy bandwidth).
       A spec whose shared memory exceeds the device's per-block limit is refused (`SMEM_MAX`; a
       stream split of 14336 columns at 16 tokens needed 241 KB and failed in cuFuncSetAttribute).
fp32 runs take a CUDA-core variant of the same layout (full fp32 precision, as the reference).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from kiln.dsl.dtypes import RUN_DTYPES
from kiln.dsl.quant import QWeight, unpack_int4

from . import render as render_module
from .gemv import epilogue_refusal, one_wave, rope_epilogue_args, rope_epilogue_refusal, rope_pair_rows, rope_pairs
from .kernels import KernelArgError, _check, _torch_dtype
from .launch import get_kernel, i32, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name, rope_math_params
from .specs import KernelSpecError, RopeCacheSpec, _dtype, _fail, _positive, _Spec

# per format: columns per chunk (one 16-byte piece per lane), columns per lane, mma steps per piece
FORMATS = {"int4": (64, 16, 4), "int8": (32, 8, 2)}
TOKEN_BUCKETS = (8, 16)
WARPS = 8
GEMV_MAX_T = 64  # rows through the GEMV kernel (weights read once per 16 rows); more: dequantize + cuBLAS
VARIANTS = ("stream", "loop", "persist", "warp")
DEPTH = 8  # stream: 16-byte weight loads in flight per lane (8 warps x 8 x 512 B = 32 KB per block)
XS_MAX = 72 * 1024  # stream: shared memory for a block's x slice at the bucket's full rows
FILL = 1.5  # stream: split K until the grid has this many blocks per SM (one wave, 2-3 blocks each)
XS_PAD = {"int4": 8, "int8": 32}  # elements past each staged x row: the 8 lanes of a 16-byte phase hit distinct banks
SMEM_MAX = 227 * 1024  # the per-block dynamic shared memory sm_90 grants on opt-in (sm_80: 163 KB; choose_* keep below)
# persist, by token bucket: ring slots per lane (8 warps x 8 x 512 B = 32 KB of weights in flight per
# block) and blocks per SM (launch bounds: <= 128 registers; 3 blocks' 80 spilled with the records in the ring)
PERSIST_DEPTH = {8: 8, 16: 6}
PERSIST_BPS = {8: 2, 16: 2}
# warp (int4 "post", 16-bit runs, T <= WARP_MAX_T: one mma n-tile of tokens): tiles of 16 rows per warp,
# K slices per block (summed in shared memory), 16-byte weight loads in flight per lane (tpw x unroll),
# blocks per SM in the launch bounds (<= 128 registers; the grid is sized to be resident at once)
WARP_MAX_T = 8
WARP_TPW = (1, 2, 4)
WARP_KSPLITS = (1, 2, 4, 8)
WARP_LOADS = 8  # 16 (as the bf16 GEMV at one row) wanted 168 registers: spills under the cap of 2 blocks per SM
# Half WARP_LOADS where that makes a K slice whole batches (warp_shape), down to this: the 8B down GEMV at 4 loads a
# lane was 11.4 against 12.2 us at 8 (session 16, before whole batches read x with no test)
WARP_MIN_UNROLL = 4
WARP_MIN_BLOCKS = 2  # the default; 3 (`bps`, for the benchmark's sweep) caps registers at 80: a few bytes spill
WARP_BPS = (2, 3)


def default_variant() -> str:
    """KILN_QGEMV if set, else "warp" (where it applies; the loop elsewhere: Packed.spec). Measured on the
    H200 (BENCHMARKS.md, 8B-model shapes): warp 1.08-1.52x faster than "loop" per linear at one row and
    int4 batch-1 decode 1.26-1.29x (session 16); "stream" 5-30% faster than "loop" at one token and
    1.5-2.4x slower at 16 (it re-stages x per block); "persist" slower at both."""
    v = os.environ.get("KILN_QGEMV") or "warp"
    if v not in VARIANTS:
        raise KernelArgError(f"KILN_QGEMV: must be one of {VARIANTS}, got {v!r}")
    return v


def _cps(fmt: str, k: int, splits: int) -> int:
    """Chunks per split: whole rounds of the block's warps."""
    nch = math.ceil(k / FORMATS[fmt][0])
    return WARPS * math.ceil(math.ceil(nch / splits) / WARPS)


def _split_counts(fmt: str, k: int) -> list[int]:
    """Every K split count the stream / persist variants accept (whole rounds of WARPS chunks)."""
    nch = math.ceil(k / FORMATS[fmt][0])
    return sorted({math.ceil(nch / _cps(fmt, k, s)) for s in range(1, max(1, math.ceil(nch / WARPS)) + 1)})


def stream_smem(fmt: str, k: int, tokens: int, splits: int, group: int) -> int:
    """The stream variant's shared memory at the bucket's full rows (templates/gemv_wq.cu.j2)."""
    ck = FORMATS[fmt][0]
    cps = _cps(fmt, k, splits)
    gr = min(k // group, math.ceil(cps * ck / group) + 1)
    return WARPS * tokens * 16 * 4 + -(-gr * 16 * 4 // 16) * 16 + tokens * (cps * ck + XS_PAD[fmt]) * 2


def persist_smem(fmt: str, k: int, tokens: int, splits: int) -> int:
    """The persist variant's shared memory at the bucket's full rows: red[2][warps][tokens][16] + x's slice."""
    return 2 * WARPS * tokens * 16 * 4 + tokens * (_cps(fmt, k, splits) * FORMATS[fmt][0] + XS_PAD[fmt]) * 2


# persist cost model, in bytes of one SM's weight stream (32 KB ~ 1 us at 4.2 TB/s over 132 SMs)
BLOCK_COST = 32 * 1024  # a block's start: launch, x staging, the first loads' latency
TILE_COST = 1024  # a tile's reduction (one barrier; the ring keeps loading meanwhile)
SPLIT_COST = 4096  # a tile's split-K partials and the last block's dependent reads
INFLIGHT_NEED = 48 * 1024  # bytes in flight per SM that cover DRAM latency under load


def choose_persist(fmt: str, n: int, k: int, tokens: int, num_sms: int) -> tuple[int, int]:
    """(K splits, tiles per block) of the persist variant: the fewest bytes the busiest SM streams,
    charged for block starts, per-tile reductions and split partials, and slowed where its resident
    blocks keep less than INFLIGHT_NEED in flight; x's slice within SMEM_MAX / blocks per SM."""
    ck = FORMATS[fmt][0]
    tiles = math.ceil(n / 16)
    bps = PERSIST_BPS[tokens]
    budget = SMEM_MAX // bps - 1024
    best = None
    for s in _split_counts(fmt, k):
        if persist_smem(fmt, k, tokens, s) > budget:
            continue
        cps = _cps(fmt, k, s)
        unit = 16 * cps * ck // 2 if fmt == "int4" else 16 * cps * ck  # weight bytes of one (tile, split)
        per_warp = cps // WARPS
        seen = set()
        for tpb in range(1, tiles + 1):
            nbx = math.ceil(tiles / tpb)
            if nbx in seen:
                continue
            seen.add(nbx)
            blocks = nbx * s
            per_sm = math.ceil(blocks / num_sms)  # blocks the busiest SM runs
            resident = min(per_sm, bps)
            inflight = resident * WARPS * min(ring_shape(per_warp, tokens)[0], per_warp * tpb) * 512
            slow = max(1.0, INFLIGHT_NEED / inflight)
            work = per_sm * tpb * (unit + TILE_COST + (SPLIT_COST if s > 1 else 0))
            cost = math.ceil(per_sm / bps) * BLOCK_COST + work * slow
            key = (cost, s, -blocks)
            if best is None or key < best[0]:
                best = (key, s, tpb)
    if best is None:  # no split fits (cannot happen: 8 chunks per split always do)
        return _split_counts(fmt, k)[-1], 1
    return best[1], best[2]


def ring_shape(per_warp: int, tokens: int) -> tuple[int, str]:
    """(slots, kind) of the persist ring for a warp's items per tile: "a" whole tiles per round of slots
    (each slot's chunk a compile-time constant, one reduction per tile in the unrolled loop), "b" whole
    rounds per tile (a divisor of per_warp in [depth / 2, depth]), else "c" (runtime)."""
    depth = PERSIST_DEPTH[tokens]
    if per_warp <= depth:
        return per_warp * (depth // per_warp), "a"
    for d in range(depth, depth // 2 - 1, -1):
        if per_warp % d == 0:
            return d, "b"
    return depth, "c"


def persist_tpb(fmt: str, n: int, k: int, tokens: int, num_sms: int, splits: int) -> int:
    """Tiles per block for a given split count: one wave of PERSIST_BPS blocks per SM."""
    tiles = math.ceil(n / 16)
    per_split = max(1, num_sms * PERSIST_BPS[tokens] // splits)
    return math.ceil(tiles / min(tiles, per_split))


def choose_splits(fmt: str, n: int, k: int, tokens: int, num_sms: int) -> int:
    """K splits of the stream variant: the fewest that keep a block's x slice within XS_MAX and give
    the grid FILL blocks per SM (a 4096-row output has only 256 tiles of 16 rows)."""
    ck = FORMATS[fmt][0]
    nch, tiles = math.ceil(k / ck), math.ceil(n / 16)
    fits = None
    for s in range(1, max(1, math.ceil(nch / WARPS)) + 1):
        cps = _cps(fmt, k, s)
        eff = math.ceil(nch / cps)
        if tokens * (cps * ck + XS_PAD[fmt]) * 2 > XS_MAX:
            continue
        fits = fits or eff
        if tiles * eff >= FILL * num_sms:
            return eff
    return fits or math.ceil(nch / WARPS)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def warp_group_chunks(k: int, group: int) -> int | None:
    """Chunks of 64 columns per group for the warp variant; None: one group per row (records loaded once)."""
    return None if group == k else group // FORMATS["int4"][0]


def warp_shape(k: int, group: int, tpw: int, ksplit: int) -> tuple[int, int, int, int]:
    """(chunks per K slice, unroll, record slots, chunks per record slot) of the warp variant: `unroll`
    chunks per tile in flight (WARP_LOADS / tpw, fewer where a slice has fewer chunks: a power of two; half
    where that makes the slice whole batches of it), slices starting on group boundaries so that each record
    slot serves whole chunks of one group."""
    nch = math.ceil(k / FORMATS["int4"][0])
    raw = math.ceil(nch / ksplit)
    unroll = min(WARP_LOADS // tpw, 1 << (raw - 1).bit_length())
    if raw % unroll and raw % (unroll // 2) == 0 and unroll // 2 >= WARP_MIN_UNROLL:
        unroll //= 2  # whole batches: the template then reads x with no test (the 8B down GEMV's 28 chunks a slice)
    gch = warp_group_chunks(k, group)
    if gch is None:
        return raw, unroll, 1, unroll
    span = min(unroll, gch)
    return span * math.ceil(raw / span), unroll, unroll // span, span


def choose_warp(n: int, k: int, group: int, num_sms: int = 132, bps: int = WARP_MIN_BLOCKS) -> tuple[int, int]:
    """(tpw, ksplit) of the warp variant, as codegen/gemv.py `choose`: the least weight per warp (the
    critical path when every warp runs at once) such that the grid's warps are all resident
    (num_sms x WARPS x bps blocks per SM); ties to the fewest K slices, then the fewest tiles per warp.
    At most 2 tiles a warp; larger (an LM head): one tile a warp over half of K, in waves — at 128,256 x 4,096
    on the H200 (.ci/lmhead_probe.py, session 18) 85.3 us (77% of copy bandwidth) against 100.8 for its one
    wave of 4 tiles a warp, and 95.3 for waves of one tile over the whole of K."""
    tiles, nch = math.ceil(n / 16), math.ceil(k / FORMATS["int4"][0])
    return one_wave(tiles, WARP_TPW[:2], WARP_KSPLITS, nch, num_sms * WARPS * bps,
                    lambda tw, ks: (tw * warp_shape(k, group, tw, ks)[0], ks, tw), (1, min(2, nch)))


@dataclass(frozen=True)
class QGemvSpec(_Spec):
    fmt: str  # int4 | int8
    mode: str  # post | pre (module doc)
    n: int  # output features
    k: int  # input features
    group: int  # input columns per record
    tokens: int = 8  # rows of x per block: 8 or 16
    has_bias: bool = False
    dtype: str = "bf16"
    origin: str = ""
    variant: str = "stream"  # stream | loop | persist | warp (module doc); fp32 always runs the CUDA-core loop
    splits: int = 1  # stream / persist: blocks along K (choose_splits / choose_persist)
    tpb: int = 1  # persist: tiles of 16 rows per block (choose_persist)
    tpw: int = 1  # warp: tiles of 16 rows per warp (choose_warp)
    ksplit: int = 1  # warp: warps of a block sharing a tile, each a slice of K (choose_warp)
    bps: int = WARP_MIN_BLOCKS  # warp: blocks per SM in the launch bounds (the register cap)
    # W [n, k] packed as `pairs` (gate, up) row pairs (Packed.paired, int4 "post"): tile t's rows 0-7 are the gate
    # rows gate_row + 8 t + (0..7), its rows 8-15 the up rows up_row + 8 t + (0..7); out, bias and the
    # dequantized weight keep W's order. 0: W's own row order.
    pairs: int = 0
    gate_row: int = 0
    up_row: int = 0
    # The gated activation after it, in the warp variant's epilogue (issue #13; fuse.py's gemv_epilogue): a
    # gated ActSpec of `pairs` features (origin stripped); out [T, pairs] = act(g) * u. None: out [T, n].
    epilogue: Any = None
    # Or W [n, k] a qkv weight packed in the rotary epilogue's pairs (Packed.rope_paired, int4 "post"): `rope` a
    # RopeCacheSpec (gemv.rope_epilogue_spec's), qkv_rows W's first q, k and v rows (the three spans cover W, no gaps);
    # tile t's rows 0-7 are the first rows of pairs 8 t + (0..7) (gemv.rope_pair_rows), its rows 8-15 their second
    # rows; out, bias and the dequantized weight keep W's order. rope_epi: the warp variant writes q rotated into
    # out [T, heads x head_dim] and k (rotated) and v into the paged cache instead (kernels.rope_write_kv's math).
    rope: Any = None
    qkv_rows: tuple = ()
    rope_epi: bool = False

    def __post_init__(self):
        if self.fmt not in FORMATS:
            _fail(self, "fmt", f"must be one of {sorted(FORMATS)}, got {self.fmt!r}")
        if self.mode not in ("post", "pre"):
            _fail(self, "mode", f"must be 'post' or 'pre', got {self.mode!r}")
        _positive(self, "n", "k", "group")
        _dtype(self)
        ck, kpl, _ = FORMATS[self.fmt]
        if self.tokens not in TOKEN_BUCKETS:
            _fail(self, "tokens", f"must be one of {TOKEN_BUCKETS}, got {self.tokens!r}")
        if self.group % kpl or self.k % self.group:
            _fail(self, "group", f"{self.group} must be a multiple of {kpl} dividing k={self.k}")
        if self.mode == "post" and self.group % ck and self.group != self.k:  # one group per row is fine
            _fail(self, "group", f"mode 'post' needs whole {ck}-column chunks per group, got {self.group}")
        if self.variant not in VARIANTS:
            _fail(self, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        nch = math.ceil(self.k / ck)
        if self.splits < 1 or (self.splits > 1 and math.ceil(nch / _cps(self.fmt, self.k, self.splits)) != self.splits):
            _fail(self, "splits", f"{self.splits} does not cut {nch} chunks into whole rounds of {WARPS} warps "
                  "(choose_splits gives valid counts)")
        if self.splits > 1 and (self.variant in ("loop", "warp") or self.dtype == "fp32"):
            _fail(self, "splits", "only the stream and persist variants (16-bit runs) split K")
        if self.tpb < 1 or (self.tpb > 1 and (self.variant != "persist" or self.dtype == "fp32")):
            _fail(self, "tpb", f"{self.tpb}: more than one tile per block is the persist variant's (16-bit runs)")
        if self.variant == "warp":
            if self.fmt != "int4":
                _fail(self, "fmt", f"the warp variant reads int4 weights, got {self.fmt!r}")
            if self.mode != "post":
                _fail(self, "mode", f"the warp variant reads mode 'post' (value = (q - z) * s), got {self.mode!r}")
            if self.tokens != 8:
                _fail(self, "tokens", f"the warp variant takes one mma n-tile of up to {WARP_MAX_T} rows: "
                      f"tokens must be 8, got {self.tokens!r}")
            if self.group != self.k and not _pow2(self.group // ck):
                _fail(self, "group", f"the warp variant needs a power of two of {ck}-column chunks per group "
                      f"(or one group per row), got {self.group}")
        if self.tpw not in WARP_TPW or (self.tpw > 1 and not self.warp):
            _fail(self, "tpw", f"{self.tpw!r}: tiles per warp are the warp variant's (16-bit runs), one of {WARP_TPW}")
        if self.bps not in WARP_BPS or (self.bps != WARP_MIN_BLOCKS and not self.warp):
            _fail(self, "bps", f"{self.bps!r}: blocks per SM are the warp variant's (16-bit runs), one of {WARP_BPS}")
        if self.ksplit not in WARP_KSPLITS or (self.ksplit > 1 and not self.warp):
            _fail(self, "ksplit", f"{self.ksplit!r}: K slices per block are the warp variant's (16-bit runs), one "
                  f"of {WARP_KSPLITS}")
        if self.pairs:
            if (self.fmt, self.mode) != ("int4", "post") or self.pairs % 8 or self.n != 2 * self.pairs:
                _fail(self, "pairs", f"{self.pairs}: (gate, up) pairs are int4 'post' rows in whole tiles, "
                      f"n = 2 x pairs (n={self.n})")
            if {self.gate_row, self.up_row} != {0, self.pairs}:
                _fail(self, "gate_row", f"the gate and up rows ({self.gate_row}, {self.up_row}) must be W's two halves "
                      f"(0 and {self.pairs})")
        elif (self.gate_row, self.up_row) != (0, 0):
            _fail(self, "gate_row", "gate_row / up_row belong to a paired layout (pairs > 0)")
        if self.rope is not None:
            self._check_rope()
        elif self.qkv_rows or self.rope_epi:
            _fail(self, "qkv_rows", "qkv_rows / rope_epi belong to a layout packed in rotary pairs (rope)")
        if self.rope_epi:
            if not self.warp:
                _fail(self, "rope_epi", "the rotary epilogue runs in the warp variant (16-bit runs)")
            why = rope_epilogue_refusal(self.rope, self.dtype)
            if why:
                _fail(self, "rope_epi", why)
        if self.epilogue is not None:
            if not self.warp or not self.pairs:
                _fail(self, "epilogue", "the gated activation runs in the warp variant's epilogue on a paired layout "
                      "(16-bit runs)")
            why = epilogue_refusal(self.epilogue, self.pairs, self.dtype)
            if why:
                _fail(self, "epilogue", why)
        if self.streams:
            need = stream_smem(self.fmt, self.k, self.tokens, self.splits, self.group)
            if self.variant == "persist":
                need = persist_smem(self.fmt, self.k, self.tokens, self.splits)
            if need > SMEM_MAX:
                _fail(self, "splits", f"{self.splits}: x's slice of {self.tokens} rows needs {need} bytes of shared "
                      f"memory, over the {SMEM_MAX} a block can have (choose_splits / choose_persist pick counts "
                      "that fit)")

    def _check_rope(self) -> None:
        e = self.rope
        if not isinstance(e, RopeCacheSpec):
            _fail(self, "rope", f"must be a RopeCacheSpec, got {type(e).__name__}")
        if (self.fmt, self.mode) != ("int4", "post") or self.pairs:
            _fail(self, "rope", "rotary pairs are an int4 'post' layout, without (gate, up) pairs")
        if e.head_dim % 2 or self.n != 2 * rope_pairs(e) or self.n % 16:
            _fail(self, "n", f"{self.n}: a layout in rotary pairs holds exactly q's, k's and v's rows "
                  f"({2 * rope_pairs(e)}), in whole 16-row tiles")
        hd = e.head_dim
        spans = sorted(zip(self.qkv_rows, (e.heads * hd, e.kv_heads * hd, e.kv_heads * hd)))
        if len(self.qkv_rows) != 3 or spans[0][0] != 0 or any(a + m != b for (a, m), (b, _) in zip(spans, spans[1:])):
            _fail(self, "qkv_rows", f"{self.qkv_rows}: q's, k's and v's first rows must tile W's {self.n} rows")

    @property
    def streams(self) -> bool:
        """The stream or persist kernel (16-bit runs); fp32 runs the loop."""
        return self.variant in ("stream", "persist") and self.dtype != "fp32"

    @property
    def warp(self) -> bool:
        """The warp kernel (16-bit runs); fp32 runs the loop."""
        return self.variant == "warp" and self.dtype != "fp32"


def _render(s: QGemvSpec) -> KernelSource:
    ck, kpl, steps = FORMATS[s.fmt]
    nch = math.ceil(s.k / ck)
    mma = s.dtype != "fp32"
    # enough 16-byte loads in flight per lane to cover memory latency, when there are chunks to fill them
    unroll = 8 if nch >= 8 * WARPS else 4
    qoff = 0.0
    if mma and s.fmt == "int4":
        qoff = 128.0 if s.dtype == "bf16" else 1024.0
    params = dict(
        fmt=s.fmt, mode=s.mode, n=s.n, k=s.k, group=s.group, groups=s.k // s.group, tokens=s.tokens,
        nt=s.tokens // 8, ck=ck, kpl=kpl, steps=steps, nch=nch, tiles=math.ceil(s.n / 16),
        warps=WARPS, threads=WARPS * 32, unroll=unroll, has_bias=s.has_bias, mma=mma,
        k_tail=s.k % ck != 0, n_tail=s.n % 16 != 0, qoff=f"{qoff:.1f}f",
        mma_type="bf16" if s.dtype == "bf16" else "f16",
        pair_t="__nv_bfloat162" if s.dtype == "bf16" else "__half2",
        splat="__bfloat162bfloat162" if s.dtype == "bf16" else "__half2half2",
        magic="0x43004300u" if s.dtype == "bf16" else "0x64006400u",
        magic_byte="0x43434343u" if s.dtype == "bf16" else "0x64646464u",
    )
    meta = dict(threads=WARPS * 32, warps=WARPS, tiles=params["tiles"], nch=nch, ck=ck, kpl=kpl, qoff=qoff,
                variant=s.variant if s.streams or s.warp else "loop", splits=s.splits, tpb=1)
    params["variant"] = meta["variant"]
    params.update(pairs=s.pairs, gate_row=s.gate_row, up_row=s.up_row,
                  epi=s.epilogue.kind if s.epilogue is not None and s.warp else "", rope=None, rope_epi=False)
    if s.rope is not None:  # gemv_rope_epi.cuh.j2's view (gemv.epilogue_params' "rope" form) and rope_math.cuh.j2's
        e, (q, k, v) = s.rope, s.qkv_rows
        params.update(rope=dict(rope=True, heads=e.heads, kv_heads=e.kv_heads, head_dim=e.head_dim, layout=e.layout,
                                page_size=e.page_size, kv_fp8=e.kv_fp8, q_row=q, k_row=k, v_row=v, w_rows=s.n),
                      rope_epi=s.rope_epi and s.warp, rope_n=s.n // 2, **rope_math_params(e))
    if meta["variant"] == "warp":
        cps, unroll, nr, span = warp_shape(s.k, s.group, s.tpw, s.ksplit)
        gch = warp_group_chunks(s.k, s.group)
        blocks = math.ceil(params["tiles"] / (s.tpw * WARPS // s.ksplit))
        # whole: every K slice is whole batches of `unroll` chunks of k, so x is read with no test. stepped: the
        # weight refills through one pointer stepped a batch at a time, where a warp has a whole tile (ksplit 1);
        # with K slices, at the 128-register cap, ptxas spilled the o GEMV's loop with it (session 19's SASS)
        lens = [min((i + 1) * cps, nch) - i * cps for i in range(s.ksplit)]
        whole = not params["k_tail"] and all(n % unroll == 0 for n in lens if n > 0)
        params.update(tpw=s.tpw, ksplit=s.ksplit, cps=cps, unroll=unroll, nr=nr, span=span, gch=gch or 0,
                      single=gch is None, blocks=blocks, min_blocks=s.bps, max_t=WARP_MAX_T, whole=whole,
                      stepped=s.ksplit == 1)
        meta.update(blocks=blocks, tpw=s.tpw, ksplit=s.ksplit, bps=s.bps, cps=cps, unroll=unroll)
    elif meta["variant"] == "persist":
        cps = _cps(s.fmt, s.k, s.splits)
        per_warp = cps // WARPS
        red_bytes = 2 * WARPS * s.tokens * 16 * 4
        xs_stride = cps * ck + XS_PAD[s.fmt]
        depth, ring = ring_shape(per_warp, s.tokens)
        params.update(cps=cps, per_warp=per_warp, depth=depth, ring=ring, splits=s.splits, tpb=s.tpb,
                      chunk_tail=cps * s.splits != nch, red_bytes=red_bytes, xs_stride=xs_stride,
                      bps=PERSIST_BPS[s.tokens])
        meta.update(smem_fixed=red_bytes, xs_row_bytes=xs_stride * 2, cps=cps, tpb=s.tpb,
                    blocks_x=math.ceil(params["tiles"] / s.tpb))
    elif s.streams:
        cps = _cps(s.fmt, s.k, s.splits)
        groups = s.k // s.group
        gr = min(groups, math.ceil(cps * ck / s.group) + 1)  # groups one split's columns can touch
        red_bytes = WARPS * s.tokens * 16 * 4
        rec_bytes = -(-gr * 16 * 4 // 16) * 16
        xs_stride = cps * ck + XS_PAD[s.fmt]
        params.update(cps=cps, per_warp=cps // WARPS, depth=min(DEPTH, cps // WARPS), splits=s.splits,
                      chunk_tail=cps * s.splits != nch, gr=gr, red_bytes=red_bytes, rec_bytes=rec_bytes,
                      xs_stride=xs_stride)
        meta.update(smem_fixed=red_bytes + rec_bytes, xs_row_bytes=xs_stride * 2, cps=cps)
    tag = "_loop"
    if meta["variant"] == "warp":
        tag = f"_w{s.tpw}x{s.ksplit}b{s.bps}"
    elif meta["variant"] == "persist":
        tag = f"_p{s.splits}x{s.tpb}"
    elif s.streams:
        tag = f"_s{s.splits}"
    if s.pairs:
        tag += f"_pairs{s.gate_row}x{s.up_row}" + (f"_{params['epi']}" if params["epi"] else "")
    if s.rope is not None:
        tag += "_ropepairs" + ("_rope" if params["rope_epi"] else "")
    name = _name(f"gemv_{s.fmt}_{s.mode}_n{s.n}_k{s.k}_g{s.group}_t{s.tokens}" + tag, s)
    return _emit("gemv_wq.cu.j2", name, s, params, [name, name + "_dequant"], meta)


_RENDERERS[QGemvSpec] = _render


def record_dtype(spec: QGemvSpec) -> torch.dtype:
    """Records are pairs of the run dtype (16-bit runs) or fp32 pairs."""
    return _torch_dtype(spec)


def _check_packed(spec, wq, rec, dev):
    ck, _, _ = FORMATS[spec.fmt]
    tiles, nch = math.ceil(spec.n / 16), math.ceil(spec.k / ck)
    _check("wq", wq, torch.uint8, (tiles * nch * 512,), dev)
    _check("rec", rec, record_dtype(spec), (tiles, spec.k // spec.group, 16, 2), dev)


class Workspace:
    """The stream variant's split-K buffers on one device, shared by every weight (kernels on a
    stream run one after another; a dependent launch touches them only after griddepcontrol.wait):
    fp32 partials and arrival counters (zero between calls: the last block resets its counter).
    Sized before a CUDA graph captures (`reserve`); growing inside a capture is refused."""

    _by_device: dict = {}

    def __init__(self, device):
        self.device = device
        self.part = torch.empty(0, dtype=torch.float32, device=device)
        self.count = torch.zeros(0, dtype=torch.int32, device=device)

    @classmethod
    def get(cls, device) -> "Workspace":
        device = torch.device(device)
        ws = cls._by_device.get(device)
        if ws is None:
            ws = cls._by_device[device] = Workspace(device)
        return ws

    def reserve(self, part: int, count: int) -> None:
        if part <= self.part.numel() and count <= self.count.numel():
            return
        if torch.cuda.is_current_stream_capturing():
            raise KernelArgError(f"quantized GEMV workspace: {part} partials / {count} counters needed while a CUDA "
                                 "graph captures; run the step once before capturing")
        if part > self.part.numel():
            self.part = torch.empty(part, dtype=torch.float32, device=self.device)
        if count > self.count.numel():
            self.count = torch.zeros(count, dtype=torch.int32, device=self.device)


def qgemv(spec: QGemvSpec, x, wq, rec, out, bias=None, rope=None):
    """out [T, n] = x [T, k] @ W^T (+ bias) for any T (blocks of `spec.tokens` rows). spec.rope_epi: out is q_out
    [T, heads x head_dim] and rope = (positions, slot_mapping, k_cache, v_cache, k_scale, v_scale), as
    gemv.gemv_rope takes them: q rotated into out, k rotated and v into the paged cache."""
    dt = _torch_dtype(spec)
    dev = x.device
    _check("x", x, dt, device=dev, rows_aligned=True, contiguous=False)
    if x.shape[1] != spec.k:
        raise KernelArgError(f"x: {x.shape[1]} columns, expected {spec.k}")
    T = x.shape[0]
    extra = []
    if spec.rope_epi:
        e = spec.rope
        if rope is None:
            raise KernelArgError("rope: (positions, slot_mapping, k_cache, v_cache, k_scale, v_scale) required by "
                                 "this spec's rotary epilogue")
        extra = rope_epilogue_args(e, out, rope, T, dt, dev, out_name="out")
    elif rope is not None:
        raise KernelArgError("rope: this spec has no rotary epilogue (rope_epi)")
    else:
        _check("out", out, dt, (T, spec.pairs if spec.epilogue is not None else spec.n), dev)
    _check_packed(spec, wq, rec, dev)
    if spec.has_bias:
        if bias is None:
            raise KernelArgError("bias: required by this spec")
        _check("bias", bias, dt, (spec.n,), dev, aligned=False)
    kern = get_kernel(spec, dev)
    meta = kern.source.meta
    if T == 0:
        return
    if meta["variant"] == "warp":
        if T > WARP_MAX_T:
            raise KernelArgError(f"x: {T} rows; the warp variant takes 1 to {WARP_MAX_T} (Packed.linear sends more "
                                 "to another variant)")
        kern.launch_dependent(kern.source.entries[0], (meta["blocks"],), (meta["threads"],),
                              [ptr(wq), ptr(rec), ptr(x), ptr(bias if spec.has_bias else None), ptr(out),
                               i64(x.stride(0)), i32(T), *extra])
        return
    if meta["variant"] == "loop":
        kern.launch(kern.source.entries[0], (meta["tiles"], math.ceil(T / spec.tokens)), (meta["threads"],),
                    [ptr(wq), ptr(rec), ptr(x), ptr(bias if spec.has_bias else None), ptr(out),
                     i64(x.stride(0)), i32(T)])
        return
    zb = math.ceil(T / spec.tokens)
    part = count = None
    if spec.splits > 1:
        ws = Workspace.get(dev)
        ws.reserve(spec.splits * T * spec.n, meta["tiles"] * zb)
        part, count = ws.part, ws.count
    smem = meta["smem_fixed"] + min(T, spec.tokens) * meta["xs_row_bytes"]
    gx = meta["blocks_x"] if meta["variant"] == "persist" else meta["tiles"]
    kern.launch_dependent(kern.source.entries[0], (gx, spec.splits, zb), (meta["threads"],),
                          [ptr(wq), ptr(rec), ptr(x), ptr(bias if spec.has_bias else None), ptr(out), ptr(part),
                           ptr(count), i64(x.stride(0)), i32(T)], smem)


def qdequant(spec: QGemvSpec, wq, rec, w):
    """w [n, k] (run dtype) = the packed weight's values, for a cuBLAS GEMM."""
    dev = wq.device
    _check("w", w, _torch_dtype(spec), (spec.n, spec.k), dev)
    _check_packed(spec, wq, rec, dev)
    kern = get_kernel(spec, dev)
    meta = kern.source.meta
    kern.launch(kern.source.entries[1], (meta["tiles"], math.ceil(meta["nch"] / meta["warps"])),
                (meta["threads"],), [ptr(wq), ptr(rec), ptr(w)])


def itemsize(spec: QGemvSpec) -> int:
    return RUN_DTYPES[spec.dtype].itemsize


# ---- the packed layout (built once at load) and the linear through it


@dataclass
class Packed:
    """A weight in the tile layout of templates/gemv_wq.cu.j2 (`repack`), with its per-group
    records (`rec32`: fp32 [tiles, groups, 16, 2]; (z, s) for mode post, (s, m) for pre)."""

    fmt: str
    mode: str
    n: int
    k: int
    group: int
    wq: torch.Tensor  # uint8 [tiles * chunks * 512]
    rec32: torch.Tensor
    perm: torch.Tensor | None = None  # act-order: x's columns in the packed order
    origin: str = "linear"
    variant: str | None = None  # None: default_variant() (KILN_QGEMV)
    splits: int | None = None  # stream / persist: K splits; None: choose_splits / choose_persist for the device
    tpb: int | None = None  # persist: tiles per block; None: choose_persist's
    warp_pick: tuple[int, int, int] | None = None  # warp: (tpw, ksplit, bps); None: choose_warp's, 2 blocks per SM
    _rec: dict = field(default_factory=dict)
    pairs: tuple[int, int] | None = None  # (gate_row, up_row): rows packed in (gate, up) pairs (`paired`)
    rope: Any = None  # a RopeCacheSpec: rows packed in the rotary epilogue's pairs (`rope_paired`) ...
    qkv_rows: tuple = ()  # ... q's, k's and v's first rows in W

    def spec(self, dtype: torch.dtype, tokens: int, has_bias: bool, num_sms: int = 132,
             epilogue=None, rope_epi: bool = False) -> QGemvSpec:
        """The kernel at bucket `tokens` (8 or 16 rows of x a block); `epilogue`: a gated ActSpec after it, out
        [T, n / 2] (the warp variant on a paired weight: `gated_takes`); rope_epi: the rotary epilogue (the warp
        variant on a weight packed in rotary pairs: `rope_takes`)."""
        from .specs import dtype_name
        variant = self.variant or default_variant()
        splits, tpb = 1, 1
        rows = dict(pairs=self.n // 2, gate_row=self.pairs[0], up_row=self.pairs[1]) if self.pairs else {}
        if self.rope is not None:
            rows = dict(rope=dataclasses.replace(self.rope, dtype=dtype_name(dtype)), qkv_rows=self.qkv_rows)
        if variant == "warp" and not self.warp_takes(dtype, tokens):
            variant = "loop"  # more rows, or a format the warp kernel does not read
        if (epilogue is not None or rope_epi) and variant != "warp":
            raise KernelArgError(f"{self.origin}: the {'gated' if epilogue is not None else 'rotary'} epilogue runs "
                                 f"in the warp variant (gated_takes / rope_takes), not {variant!r}")
        if variant == "warp":
            tpw, ksplit, bps = self.warp_pick or (*choose_warp(self.n, self.k, self.group, num_sms), WARP_MIN_BLOCKS)
            return QGemvSpec(self.fmt, self.mode, self.n, self.k, self.group, tokens, has_bias, dtype_name(dtype),
                             self.origin, variant, tpw=tpw, ksplit=ksplit, bps=bps, **rows,
                             epilogue=epilogue.key() if epilogue is not None else None, rope_epi=rope_epi)
        if variant == "stream" and dtype != torch.float32:
            splits = self.splits or choose_splits(self.fmt, self.n, self.k, tokens, num_sms)
        elif variant == "persist" and dtype != torch.float32:
            splits, tpb = choose_persist(self.fmt, self.n, self.k, tokens, num_sms)
            if self.splits:  # an explicit split count (the benchmark's sweep): tiles per block for it
                splits, tpb = self.splits, self.tpb or persist_tpb(self.fmt, self.n, self.k, tokens, num_sms,
                                                                    self.splits)
            elif self.tpb:
                tpb = self.tpb
        return QGemvSpec(self.fmt, self.mode, self.n, self.k, self.group, tokens, has_bias, dtype_name(dtype),
                         self.origin, variant, splits, tpb, **rows)

    def paired(self, gate_row: int, up_row: int) -> "Packed":
        """This weight with its rows packed in (gate, up) pairs (QGemvSpec.pairs): W's halves [gate_row, +n/2)
        and [up_row, +n/2) interleaved 8 rows at a time, so that the warp variant's lanes hold both sums of a
        pair and can write act(g) * u (`gated`). Every kernel of the paired weight still writes W's row order."""
        if not self.can_pair(gate_row, up_row):
            raise KernelArgError(f"{self.origin}: only an int4 'post' weight without act-order, its two halves in "
                                 f"whole tiles, packs in (gate, up) pairs")
        t = torch.arange(self.n, device=self.wq.device)
        src = torch.where(t % 16 < 8, gate_row, up_row) + (t // 16) * 8 + t % 8  # packed row -> W's row
        return self._rows_from(src, pairs=(gate_row, up_row))

    def _rows_from(self, src: torch.Tensor, **layout) -> "Packed":
        """This weight repacked with its packed row r holding W's row src[r] (records alike); `layout`: the Packed
        fields that name the order (pairs, or rope and qkv_rows), which the kernels' row map turns back."""
        q = unrepack(self.wq, self.n, self.k)[src]
        tiles, groups = self.rec32.shape[0], self.rec32.shape[1]
        rec = self.rec32.permute(0, 2, 1, 3).reshape(tiles * 16, groups, 2)[src]
        return Packed(self.fmt, self.mode, self.n, self.k, self.group, repack(q, "int4"),
                      rec.reshape(tiles, 16, groups, 2).permute(0, 2, 1, 3).contiguous(), None, self.origin,
                      self.variant, self.splits, self.tpb, self.warp_pick, **layout)

    def can_pair(self, gate_row: int, up_row: int) -> bool:
        """Whether `paired` takes these halves: an int4 'post' weight without act-order, not paired yet, its two
        halves (gate_row, up_row) in whole 16-row tiles."""
        return (self.fmt == "int4" and self.mode == "post" and self.perm is None and self.pairs is None
                and self.rope is None and self.n % 16 == 0 and {gate_row, up_row} == {0, self.n // 2})

    def rope_paired(self, rope, qkv_rows: tuple[int, int, int]) -> "Packed":
        """This qkv weight with its rows packed in the rotary epilogue's pairs (QGemvSpec.rope): tile t's rows 0-7
        the first rows of pairs 8 t + (0..7) (codegen/gemv.py rope_pair_rows), its rows 8-15 their second rows, so
        that the warp variant's lanes hold both sums of a pair and can rotate and store them (`rope_gemv`). Every
        kernel of the paired weight still writes W's row order. rope: a RopeCacheSpec (gemv.rope_epilogue_spec's)."""
        if not self.can_rope_pair(rope, qkv_rows):
            raise KernelArgError(f"{self.origin}: only an int4 'post' weight without act-order whose rows are exactly "
                                 f"q's, k's and v's, in whole tiles, packs in rotary pairs")
        pr = rope_pair_rows(rope, tuple(qkv_rows)).to(self.wq.device)
        t = torch.arange(self.n, device=self.wq.device)
        src = pr[(t // 16) * 8 + t % 8, (t % 16 >= 8).long()]  # packed row -> W's row
        return self._rows_from(src, rope=rope, qkv_rows=tuple(qkv_rows))

    def can_rope_pair(self, rope, qkv_rows: tuple[int, ...]) -> bool:
        """Whether `rope_paired` takes this weight: int4 'post' without act-order, not paired yet, its rows exactly
        q's, k's and v's at qkv_rows (no rows between), in whole 16-row tiles."""
        if not (self.fmt == "int4" and self.mode == "post" and self.perm is None and self.pairs is None
                and self.rope is None and isinstance(rope, RopeCacheSpec) and len(qkv_rows) == 3
                and rope.head_dim % 2 == 0 and self.n % 16 == 0 and self.n == 2 * rope_pairs(rope)):
            return False
        hd = rope.head_dim
        spans = sorted(zip(qkv_rows, (rope.heads * hd, rope.kv_heads * hd, rope.kv_heads * hd)))
        return spans[0][0] == 0 and all(a + m == b for (a, m), (b, _) in zip(spans, spans[1:]))

    def rope_takes(self, x: torch.Tensor) -> bool:
        """Whether `rope_gemv` runs for x: a weight packed in rotary pairs, x's rows within the warp variant's
        (16-bit runs), frequencies the epilogue can compute."""
        return (self.rope is not None and (self.variant or default_variant()) == "warp"
                and 1 <= x.shape[0] <= WARP_MAX_T and self.warp_takes(x.dtype, 8)
                and not rope_epilogue_refusal(self.rope, self.rope.dtype))

    def rope_gemv(self, x: torch.Tensor, bias: torch.Tensor | None, cache: tuple,
                  origin: str | None = None) -> torch.Tensor:
        """q [T, heads x head_dim] of x rotated, with k rotated and v written into the paged cache (cache:
        positions, slot_mapping, k_cache, v_cache, k_scale, v_scale), through the warp variant with the rotary
        epilogue; bias in W's row order. origin: the kernel's comment (both spec ops), else the linear's."""
        if not self.rope_takes(x):
            raise KernelArgError(f"{self.origin}: the rotary epilogue needs a weight packed in rotary pairs and 1 to "
                                 f"{WARP_MAX_T} 16-bit rows of x (rope_takes)")
        if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            x = x.contiguous()
        out = torch.empty(x.shape[0], self.rope.heads * self.rope.head_dim, dtype=x.dtype, device=x.device)
        spec = self.spec(x.dtype, 8, bias is not None, _num_sms(x.device), rope_epi=True)
        if origin is not None:
            spec = dataclasses.replace(spec, origin=origin)
        qgemv(spec, x, self.wq, self.records(x.dtype), out, bias, rope=cache)
        return out

    def gated_takes(self, x: torch.Tensor) -> bool:
        """Whether `gated` runs for x: a paired weight, x's rows within the warp variant's (16-bit runs)."""
        return (self.pairs is not None and (self.variant or default_variant()) == "warp"
                and 1 <= x.shape[0] <= WARP_MAX_T and self.warp_takes(x.dtype, 8))

    def gated(self, x: torch.Tensor, bias: torch.Tensor | None, epilogue, origin: str | None = None) -> torch.Tensor:
        """act(g) * u [T, n / 2] of x through the warp variant with the gated activation `epilogue` (an ActSpec)
        in its epilogue; g and u this paired weight's halves (`paired`), bias in W's row order. origin: the
        kernel's comment (both spec ops), else the linear's."""
        if not self.gated_takes(x):
            raise KernelArgError(f"{self.origin}: the gated epilogue needs a paired weight and 1 to {WARP_MAX_T} "
                                 f"16-bit rows of x (gated_takes)")
        if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            x = x.contiguous()
        out = torch.empty(x.shape[0], self.n // 2, dtype=x.dtype, device=x.device)
        spec = self.spec(x.dtype, 8, bias is not None, _num_sms(x.device), epilogue=epilogue)
        if origin is not None:
            spec = dataclasses.replace(spec, origin=origin)
        qgemv(spec, x, self.wq, self.records(x.dtype), out, bias)
        return out

    def warp_takes(self, dtype: torch.dtype, tokens: int) -> bool:
        """Whether the warp variant serves this weight at bucket `tokens` (8: T <= WARP_MAX_T)."""
        return (self.fmt == "int4" and self.mode == "post" and dtype != torch.float32 and tokens == 8
                and (self.group == self.k or _pow2(self.group // FORMATS["int4"][0])))

    def reserve(self, device, dtype: torch.dtype) -> None:
        """Size the shared split-K workspace for this weight's largest GEMV (before graph capture)."""
        splits = max(self.spec(dtype, tokens, False, _num_sms(device)).splits for tokens in TOKEN_BUCKETS)
        if splits > 1:
            Workspace.get(device).reserve(splits * GEMV_MAX_T * self.n,
                                          math.ceil(self.n / 16) * math.ceil(GEMV_MAX_T / 8))

    def records(self, dtype: torch.dtype) -> torch.Tensor:
        """The records in the kernel's form for run dtype `dtype` (built once per dtype)."""
        r = self._rec.get(dtype)
        if r is None:
            r = self.rec32.clone()
            if self.mode == "post" and self.fmt == "int4" and dtype != torch.float32:
                # the kernel turns nibbles into the exact 16-bit values qoff + q; zb = qoff + z
                r[..., 0] += 128.0 if dtype == torch.bfloat16 else 1024.0
            r = r.to(dtype).contiguous()
            self._rec[dtype] = r
        return r

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            x = x.contiguous()
        T = x.shape[0]
        rec = self.records(x.dtype)
        if T <= GEMV_MAX_T:
            out = torch.empty(T, self.n, dtype=x.dtype, device=x.device)
            spec = self.spec(x.dtype, 8 if T <= 8 else 16, bias is not None, _num_sms(x.device))
            qgemv(spec, x, self.wq, rec, out, bias)
            return out
        w = torch.empty(self.n, self.k, dtype=x.dtype, device=x.device)
        qdequant(self.spec(x.dtype, 16, False), self.wq, rec, w)
        return torch.nn.functional.linear(x, w, bias)


_SMS: dict = {}


def _num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def repack(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Integer values [n, k] (int4: 0..15; int8: -128..127) -> the kernels' tile layout, flat uint8.

    Rows pad to 16-row tiles, columns to whole chunks (zeros). int4: lane l = 4 g + c of chunk ch
    holds 16 bytes; nibble p of its word j is row 8 (p & 1) + g, column ch * 64 + 16 c + 4 j +
    2 ((p >> 1) & 1) + (p >> 2) (the mma.sync A fragments: nibbles (0, 4), (1, 5), (2, 6), (3, 7)
    are a0..a3). int8: byte 8 j + 4 h + b of the lane is row 8 (b >> 1) + g, column ch * 32 + 8 c +
    4 j + 2 h + (b & 1)."""
    ck = FORMATS[fmt][0]
    n, k = q.shape
    tiles, nch = math.ceil(n / 16), math.ceil(k / ck)
    qp = q.new_zeros(tiles * 16, nch * ck)
    qp[:n, :k] = q
    if fmt == "int4":
        # [tile, rs, g, ch, c, j, h, e] -> [tile, ch, g, c, j, e, h, rs]: nibble p = rs + 2 h + 4 e
        v = qp.to(torch.uint8).reshape(tiles, 2, 8, nch, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1)
        v = v.reshape(-1, 2)
        return (v[:, 0] | (v[:, 1] << 4)).contiguous()
    # [tile, rs, g, ch, c, j, h, e] -> [tile, ch, g, c, j, h, rs, e]
    v = qp.to(torch.int8).reshape(tiles, 2, 8, nch, 4, 2, 2, 2).permute(0, 3, 2, 4, 5, 6, 1, 7)
    return v.contiguous().view(torch.uint8).reshape(-1)


def unrepack(wq: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`repack`'s inverse for int4: the tile layout (flat uint8) -> integer values [n, k] (uint8, 0..15)."""
    ck = FORMATS["int4"][0]
    tiles, nch = math.ceil(n / 16), math.ceil(k / ck)
    v = torch.stack((wq & 15, wq >> 4), dim=-1)  # [..., rs]
    # [tile, ch, g, c, j, e, h, rs] -> [tile, rs, g, ch, c, j, h, e]
    v = v.reshape(tiles, nch, 8, 4, 4, 2, 2, 2).permute(0, 7, 2, 1, 3, 4, 6, 5)
    return v.reshape(tiles * 16, nch * ck)[:n, :k].contiguous()


def tile_records(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (row, group) pairs [n, groups] x 2 -> fp32 [tiles, groups, 16, 2] (padded rows zero)."""
    n, groups = a.shape
    tiles = math.ceil(n / 16)
    r = torch.zeros(tiles * 16, groups, 2, dtype=torch.float32, device=a.device)
    r[:n, :, 0] = a.float()
    r[:n, :, 1] = b.float()
    return r.reshape(tiles, 16, groups, 2).permute(0, 2, 1, 3).contiguous()


def pack(w: QWeight, origin: str = "linear") -> Packed | None:
    """`w` in the generated kernels' layout, or None where they do not cover its format (it then
    runs dequantized)."""
    d = w.desc
    n, k = w.shape
    if d.act != "none":
        return None
    if d.dtype == "int4":
        g = d.group_size or k
        if g % FORMATS["int4"][0] or k % g:
            return None
        q = unpack_int4(w.q)
        zero = w.zero.float() if w.zero is not None else torch.full_like(w.scale.float(), 8.0)
        if not bool(((zero == zero.round()) & (zero >= 0) & (zero <= 15)).all()):
            return None  # the kernel subtracts integer zero points exactly; others run dequantized
        perm = None
        if w.g_idx is not None:
            perm = torch.argsort(w.g_idx.long(), stable=True)
            if not torch.equal(w.g_idx.long()[perm], torch.arange(k, device=q.device) // g):
                return None  # groups of unequal sizes: no contiguous layout
            q = q[:, perm]
            perm = perm.to(torch.int64)
        return Packed("int4", "post", n, k, g, repack(q, "int4"), tile_records(zero, w.scale), perm, origin)
    if d.dtype == "int8":
        if k % FORMATS["int8"][1]:
            return None
        s = w.scale.float().reshape(n, 1)
        return Packed("int8", "post", n, k, k, repack(w.q, "int8"), tile_records(torch.zeros_like(s), s),
                      None, origin)
    kind = d.dtype.removeprefix("gguf_")
    if kind in GGML_PACKED:
        q, s, m, group = ggml_blocks(w.q, kind, n, k)
        if kind == "q8_0":
            return Packed("int8", "post", n, k, 32, repack(q, "int8"), tile_records(torch.zeros_like(s), s),
                          None, origin)
        fmt = GGML_PACKED[kind]
        return Packed(fmt, "pre", n, k, group, repack(q, fmt), tile_records(s, m), None, origin)
    return None


# The ggml block types the generated kernels run as they are (`pack`), with the kernel format that holds their
# integers: each is integers q with a scale s and an offset m per group of 16 or 32 values, value = q * s + m. The
# K-quants' super-blocks of 256 values carry their sub-blocks' scales (and minima) as 6-bit or 8-bit integers times
# one fp16 scale; their products are exact in fp32 (at most 24 bits: Q6_K's fp16 x int8 x 6-bit), so the records
# hold the values gguf's dequantization computes.
GGML_PACKED = {"q4_0": "int4", "q4_1": "int4", "q8_0": "int8", "q4_k": "int4", "q5_k": "int8", "q6_k": "int8"}


def ggml_blocks(data: torch.Tensor, kind: str, n: int, k: int):
    """ggml rows [n, bytes] of a GGML_PACKED type -> (integer values q [n, k], s and m [n, k / group], group) with
    value = q * s + m as gguf's dequantization computes it (dsl.quant.gguf_dequantize): q4_0 m = -8 s, q8_0 and
    q6_k m = 0 (q6_k's q signed, -32..31); q4_0 / q4_1 / q5_k / q4_k q unsigned. Groups: 32 values, q6_k's 16."""
    if kind in ("q4_k", "q5_k", "q6_k"):
        return _ggml_k_blocks(data, kind, n, k)
    size = {"q4_0": 18, "q4_1": 20, "q8_0": 34}[kind]
    b = data.reshape(n, k // 32, size)
    s = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if kind == "q8_0":
        return b[..., 2:].contiguous().view(torch.int8).reshape(n, k), s, torch.zeros_like(s), 32
    head = 2 if kind == "q4_0" else 4
    qs = b[..., head:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(n, k)  # low nibbles: the first 16 values
    m = -8.0 * s if kind == "q4_0" else b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return q, s, m, 32


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes a block [..., 2] -> their fp16 value as fp32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def _ggml_k_blocks(data: torch.Tensor, kind: str, n: int, k: int):
    """The K-quants (super-blocks of 256 values), field by field as ggml lays them out (ggml-common.h's
    block_q4_K / block_q5_K / block_q6_K; gguf-py's quants.py reads them the same way)."""
    size = {"q4_k": 144, "q5_k": 176, "q6_k": 210}[kind]
    b = data.reshape(n * (k // 256), size)
    nb = b.shape[0]
    shifts4 = torch.tensor([0, 4], dtype=torch.uint8, device=data.device)
    if kind == "q6_k":
        # ql [128] (low nibbles), qh [64] (two high bits each), scales [16] int8, d fp16: 16 groups of 16
        ql = (b[:, :128].reshape(nb, 2, 1, 64) >> shifts4.reshape(1, 1, 2, 1)) & 0x0F
        shifts2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=data.device)
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32) >> shifts2.reshape(1, 1, 4, 1)) & 0x03
        q = (ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)).to(torch.int8) - 32
        s = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()  # [nb, 16]
        return q.reshape(n, k), s.reshape(n, k // 16), torch.zeros(n, k // 16, device=data.device), 16
    # q4_k / q5_k: d fp16, dmin fp16, 12 bytes of 6-bit (scale, min) pairs for 8 groups of 32, [qh [32]], qs [128]
    d, dmin, sc = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].reshape(nb, 3, 4)
    lo, mi, hi = sc[:, 0], sc[:, 1], sc[:, 2]  # bytes 0-3, 4-7, 8-11
    scale = torch.cat((lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)), dim=-1).float()  # [nb, 8]
    minimum = torch.cat((mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)), dim=-1).float()
    qs = b[:, 16:] if kind == "q4_k" else b[:, 48:]
    q = ((qs.reshape(nb, 4, 1, 32) >> shifts4.reshape(1, 1, 2, 1)) & 0x0F).reshape(nb, 8, 32)
    if kind == "q5_k":  # bit j of qh's byte i: value i of group j's fifth bit
        shifts8 = torch.arange(8, dtype=torch.uint8, device=data.device)
        qh = (b[:, 16:48].reshape(nb, 1, 32) >> shifts8.reshape(1, 8, 1)) & 0x01
        q = q | (qh << 4)
    s, m = d * scale, -(dmin * minimum)
    return q.reshape(n, k), s.reshape(n, k // 32), m.reshape(n, k // 32), 32


# ---- fp8 activation quantization for W8A8 GEMMs (templates/quant_act.cu.j2)

ACT_THREADS = 256


def _env_choice(name: str, default: int, allowed: tuple[int, ...]) -> int:
    """An integer switch from the environment; another value is a KernelSpecError naming it (the CLI
    prints it and exits 2)."""
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or int(raw) not in allowed:
        raise KernelSpecError(f"{name}={raw!r}: must be one of {', '.join(map(str, allowed))}")
    return int(raw)


# Per-tensor fp8 activation quantization's grid: blocks per SM of its two grid-stride launches. 8 by
# default: on the H200 (benchmarks/2026-12-03-04.md, session 11) it streamed a 2,048 x 14,336 activation at 78% of copy
# bandwidth where 2 per SM (session 10's default) reached 46%, and an fp8 mixed step's quantization took
# 2.7 ms instead of 4.1; at 256 x 4,096 (a decode step's) 2 per SM is 0.3 us faster. The grids give the
# same bytes (a max is order-free; tests/gpu/test_quant_kernels.py). KILN_ACT_QUANT_BLOCKS / _UNROLL
# select the others for `bench_kernels --only actquant`; unroll 4 was no faster than 1.
ACT_GRID_CHOICES = (1, 2, 4, 8)  # of both: blocks per SM, and vectors a thread loads per step (unroll)
ACT_BLOCKS_PER_SM = _env_choice("KILN_ACT_QUANT_BLOCKS", 8, ACT_GRID_CHOICES)
ACT_UNROLL = _env_choice("KILN_ACT_QUANT_UNROLL", 1, ACT_GRID_CHOICES)


@dataclass(frozen=True)
class ActQuantSpec(_Spec):
    """x [T, k] (run dtype) -> fp8 e4m3 values + fp32 scale, as dsl/quant.py's reference computes them.
    mode "tensor": one scale (dynamic: two launches, block amaxes then fold + quantize; static: the
    given scale, one launch); "token": one scale per row, one launch (a block per row)."""

    mode: str  # tensor | token
    k: int
    static: bool = False
    dtype: str = "bf16"
    origin: str = ""
    unroll: int = 1  # per tensor: vectors a thread loads per step of its grid-stride loops (bytes in flight)

    def __post_init__(self):
        if self.unroll not in ACT_GRID_CHOICES or isinstance(self.unroll, bool):
            _fail(self, "unroll", f"must be one of {ACT_GRID_CHOICES}, got {self.unroll!r}")
        if self.mode not in ("tensor", "token"):
            _fail(self, "mode", f"must be 'tensor' or 'token', got {self.mode!r}")
        _positive(self, "k")
        _dtype(self)
        if self.k % (16 // RUN_DTYPES[self.dtype].itemsize):
            _fail(self, "k", f"{self.k} is not a whole number of 16-byte vectors")
        if self.static and self.mode != "tensor":
            _fail(self, "static", "a static scale is per tensor")


def _render_act(s: ActQuantSpec) -> KernelSource:
    vec = 16 // RUN_DTYPES[s.dtype].itemsize
    name = _name(f"quant_act_fp8_{s.mode}{'_static' if s.static else ''}_k{s.k}", s)
    if s.mode == "token":
        entries = [name]
    else:
        entries = ([] if s.static else [name + "_amax"]) + [name + "_quant"]
    params = dict(mode=s.mode, k=s.k, static=s.static, vec=vec, threads=ACT_THREADS, unroll=s.unroll)
    return _emit("quant_act.cu.j2", name, s, params, entries, dict(threads=ACT_THREADS, vec=vec))


_RENDERERS[ActQuantSpec] = _render_act


def act_quant_fp8(spec: ActQuantSpec, x, q, scale, partial=None, per_sm: int | None = None, valid_rows=None):
    """q (float8_e4m3fn [T, k]), scale (fp32: [] per tensor, [T, 1] per token) from x; no host sync.
    `partial`: fp32 scratch of at least `act_blocks(x)` values (dynamic per-tensor only). `valid_rows`:
    int32 [1] on the device, the rows of x that are real (a padded graph step's; the rest do not count
    in a measured per-tensor scale, and are quantized with it); None: all T."""
    dev = x.device
    _check("x", x, _torch_dtype(spec), device=dev)
    if x.dim() != 2 or x.shape[1] != spec.k:
        raise KernelArgError(f"x: shape {tuple(x.shape)}, expected [T, {spec.k}]")
    T = x.shape[0]
    _check("q", q, torch.float8_e4m3fn, (T, spec.k), dev, align=8)
    _check("scale", scale, torch.float32, (T, 1) if spec.mode == "token" else (), dev, aligned=False)
    if T == 0:
        return
    kern = get_kernel(spec, dev)
    threads = kern.source.meta["threads"]
    if spec.mode == "token":
        kern.launch(kern.source.entries[0], (T,), (threads,), [ptr(x), ptr(q), ptr(scale)])
        return
    nvec = T * spec.k // kern.source.meta["vec"]
    blocks = act_blocks(x, kern.num_sms, per_sm)
    if not spec.static:
        if partial is None or partial.numel() < blocks:
            raise KernelArgError(f"partial: needs {blocks} fp32 values")
        _check("partial", partial, torch.float32, device=dev)
        if valid_rows is not None:
            _check("valid_rows", valid_rows, torch.int32, (1,), dev, aligned=False)
        kern.launch(kern.source.entries[0], (blocks,), (threads,), [ptr(x), ptr(partial), i64(nvec), ptr(valid_rows)])
    # dynamic, with render.PDL_TRIGGER: launch 2 is a programmatic dependent of launch 1 (its start
    # overlaps launch 1's end; it waits for launch 1's partials); otherwise a plain launch
    run = kern.launcher(render_module.PDL_TRIGGER and not spec.static)
    run(kern.source.entries[-1], (blocks,), (threads,),
        [ptr(x), ptr(q), ptr(scale), ptr(partial), i32(blocks), i64(nvec)])


def act_quant_fp8_folded(spec: ActQuantSpec, x, q, scale, partial):
    """act_quant_fp8 of a dynamic per-tensor spec whose amax pass a producer already did: `partial` (fp32, every
    value a maximum of |x| over some of x's real rows, zeros for the rest: NormSpec.amax / ActSpec.amax) is what
    the second launch folds into the scale. One launch; the same bits as act_quant_fp8 over the same rows."""
    dev = x.device
    if spec.mode != "tensor" or spec.static:
        raise KernelArgError(f"partial maxima: only a dynamic per-tensor scale folds them, not {spec.mode}"
                             f"{' (static)' if spec.static else ''}")
    _check("x", x, _torch_dtype(spec), device=dev)
    if x.dim() != 2 or x.shape[1] != spec.k:
        raise KernelArgError(f"x: shape {tuple(x.shape)}, expected [T, {spec.k}]")
    T = x.shape[0]
    _check("q", q, torch.float8_e4m3fn, (T, spec.k), dev, align=8)
    _check("scale", scale, torch.float32, (), dev, aligned=False)
    _check("partial", partial, torch.float32, device=dev, aligned=False)
    if partial.dim() != 1 or partial.numel() < 1:
        raise KernelArgError(f"partial: must be a non-empty vector, got shape {tuple(partial.shape)}")
    if T == 0:
        return
    kern = get_kernel(spec, dev)
    threads, vec = kern.source.meta["threads"], kern.source.meta["vec"]
    nvec = T * spec.k // vec
    blocks = act_blocks(x, kern.num_sms)
    # a programmatic dependent where triggers are on: it waits (griddepcontrol.wait) before reading the partials
    kern.launcher(render_module.PDL_TRIGGER)(kern.source.entries[-1], (blocks,), (threads,),
                                             [ptr(x), ptr(q), ptr(scale), ptr(partial), i32(partial.numel()),
                                              i64(nvec)])


def act_blocks(x: torch.Tensor, num_sms: int = 132, per_sm: int | None = None) -> int:
    """Blocks of the per-tensor launches: enough to stream x, at most `per_sm` (ACT_BLOCKS_PER_SM) per
    SM: the second launch folds every block's partial."""
    vec = 16 // x.element_size()
    return max(1, min((per_sm or ACT_BLOCKS_PER_SM) * num_sms, math.ceil(x.numel() / vec / ACT_THREADS)))


def act_partials(device) -> torch.Tensor:
    """The per-tensor launches' scratch: room for every block `act_blocks` can give on `device`."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return torch.empty(max(1024, max(ACT_GRID_CHOICES) * sms), dtype=torch.float32, device=device)
