"""FP8 (E4M3) W8A8 linear at one row of x (decode, issue #13): the spec, its rendering
(templates/gemv_fp8.cu.j2), the launch wrapper and `linear`, which runtime/cuda_quant.py's QGemm takes at
one row (behind `cuda_quant.FP8_GEMV`).

The W8A8 path runs two activation-quantization launches (amax, then scale + fp8 values) before each
cuBLASLt fp8 GEMM; at one token those two cost ~3 us a GEMM, ~0.4 ms of an 8B-model decode step. Here
each block measures x's amax and quantizes the (one, <= 48k-element) row into shared memory itself, bit
for bit as dsl/quant.py's reference (and templates/quant_act.cu.j2) do, then streams the fp8 weight as
the bf16 GEMV (codegen/gemv.py) does, accumulating the exact e4m3 products in fp32 and applying
x_scale * w_scale (+ bias) on the way out. Weight scale per tensor or per output channel; activation
scale measured (fp8_tensor, or fp8_token: one token, the same formula) or the checkpoint's static one.
Needs sm_89+ (the e4m3 conversions), as fp8 weights do anyway.

`decode` says how the products are made: "int" / "cvt" turn weight bytes into fp32 and multiply on the
CUDA cores (43-81% of copy bandwidth on the H200); "mma" (templates/gemv_fp8_mma.cu.j2, 16-bit runs; the
runtime's default since session 13) keeps x as the fp16 values of its e4m3 bytes and multiplies on the
tensor cores, 16-row tiles of W as MMA operand A, a conversion pair and half an MMA per 4 weight bytes.
Where the rest of the time goes, part by part: .ci/fp8_gemv_anatomy.py and BENCHMARKS.md (session 13).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from .gemv import (
    KSPLITS,
    LOADS_FEW,
    MIN_BLOCKS,
    ROWS,
    WARPS,
    _num_sms,
    check_bias,
    check_epilogue,
    choose_chunks,
    epilogue_params,
    epilogue_weight_rows,
    launch,
    one_wave,
    outputs_per_warp,
    rope_epilogue_spec,
    rope_pairs,
)
from .kernels import KernelArgError, _check, _check_cache, _torch_dtype
from .launch import f32 as f32_arg
from .launch import ptr
from .render import _RENDERERS, KernelSource, _emit, _name, rope_math_params
from .specs import RopeCacheSpec, _dtype, _fail, _positive, _Spec

VEC = 16  # e4m3 values per 16-byte weight load
CHUNK = 32 * VEC  # columns per warp step
# x quantized into shared memory as fp32 (4 bytes a column, whole warp steps): <= 192 KiB of the 227
MAX_K = 48 * 1024
DECODES = ("int", "cvt", "mma")
# decode="mma" (templates/gemv_fp8_mma.cu.j2): the tensor cores multiply (f16 MMAs on the exact values); a
# warp step is 64 columns of 16-row tiles (two 16-byte loads a lane), `rows` counts rows of W (whole tiles)
MMA_STEP = 64
MMA_ROWS = (16, 32, 64)
ONE_WAVE_TILES = (1, 2)  # spec_for's one-wave tiles a warp (64 rows spill, and lose to waves of 16: spec_for)
MMA_LOADS = 8  # 16-byte weight loads per lane in flight (2 x tiles x unroll), the default of `loads`
MMA_LOAD_CHOICES = (4, 8, 16)
MMA_RING = True  # spec_for's pick of `ring` (read by the mma variant only)
# x_once: x's 8-column vectors a thread holds at most (k <= 16,384 at 256 threads): 9 reach the 128-register
# cap beside the weight loads in flight, 12 spill (ptxas, sm_90a); past it x is read twice
X_ONCE_MAX_VECS = 8
MMA_DTYPES = ("bf16", "fp16")  # fp32 runs keep fp32 products summed on the CUDA cores (the reference's precision)


@dataclass(frozen=True)
class Fp8GemvSpec(_Spec):
    n: int  # output features (rows of W)
    k: int  # input features (a multiple of 16: 16-byte rows of e4m3)
    has_bias: bool = False
    dtype: str = "bf16"  # x, bias and out
    origin: str = ""
    per_channel: bool = False  # weight scale [n] (else one, [])
    static: bool = False  # activation scale given (the checkpoint's input_scale), else measured
    rows: int = 2  # rows of W per warp (decode="mma": whole tiles of 16, MMA_ROWS)
    ksplit: int = 1  # warps of a block sharing a row group, each a slice of K
    # weight bytes -> fp32: "int" (shifts and a mask, no conversion unit) or "cvt" (e4m3x2 -> f16x2
    # conversions, then f16 -> f32); the same values either way, the faster one is the GPU's to say;
    # "mma": f16 MMAs of the same exact values (16-bit runs only; fp32 sums of the same exact products)
    decode: str = "int"
    # decode="mma" only: 16-byte weight loads per lane in flight (0: MMA_LOADS), and whether they form a
    # ring (each step's slot refilled as soon as it is used) or are loaded U steps at a time
    loads: int = 0
    ring: bool = True
    # decode="mma" only: x read once into registers, its amax and quantization from them (else read twice: the
    # amax pass, then the quantization's); the same bits either way. spec_for's pick: KILN_FP8_GEMV_XONCE (on)
    x_once: bool = False
    # decode="mma" only: the gated activation after it in its epilogue, as GemvSpec's (codegen/gemv.py): W
    # [w_rows, k] holds the gate rows [gate_row, +n) and the up rows [up_row, +n); each 16-row tile is 8
    # (gate, up) pairs (rows g and g + 8 of the MMA: one lane holds both sums) and out [1, n] = act(g) * u.
    # Or the rotary + paged KV write after a qkv GEMM, as GemvSpec's (a RopeCacheSpec; qkv_rows): each tile 8
    # (row, row) pairs of one head, out [1, heads * head_dim] q rotated, k and v into the cache.
    epilogue: Any = None
    gate_row: int = 0
    up_row: int = 0
    w_rows: int = 0
    qkv_rows: tuple[int, ...] = ()

    def __post_init__(self):
        _positive(self, "n", "k")
        _dtype(self)
        if self.k % VEC:
            _fail(self, "k", f"{self.k} is not a whole number of 16-byte e4m3 vectors (a multiple of {VEC})")
        if self.k > MAX_K:
            _fail(self, "k", f"{self.k} columns: x's fp32 copy in shared memory takes at most {MAX_K}")
        if self.decode not in DECODES:
            _fail(self, "decode", f"must be one of {DECODES}, got {self.decode!r}")
        if self.decode == "mma" and self.dtype not in MMA_DTYPES:
            _fail(self, "decode", f"'mma' takes x in {MMA_DTYPES}, got {self.dtype!r} (fp32: 'int' or 'cvt')")
        if self.loads and (self.decode != "mma" or self.loads not in MMA_LOAD_CHOICES):
            _fail(self, "loads", f"one of {MMA_LOAD_CHOICES} with decode='mma' (0: the default), got {self.loads!r}")
        if not isinstance(self.x_once, bool) or (self.x_once and self.decode != "mma"):
            _fail(self, "x_once", f"a bool, True with decode='mma' only, got {self.x_once!r}")
        if self.x_once and self.x_vecs > X_ONCE_MAX_VECS:
            _fail(self, "x_once", f"k = {self.k} puts {self.x_vecs} of x's 8-column vectors in each thread's "
                                  f"registers, more than {X_ONCE_MAX_VECS}")
        rows = MMA_ROWS if self.decode == "mma" else ROWS
        if self.rows not in rows:
            _fail(self, "rows", f"must be one of {rows} (decode={self.decode!r}), got {self.rows!r}")
        if self.ksplit not in KSPLITS:
            _fail(self, "ksplit", f"must be one of {KSPLITS}, got {self.ksplit!r}")
        check_epilogue(self)
        if self.epilogue is not None and self.decode != "mma":
            _fail(self, "epilogue", f"fused after decode='mma' only, got {self.decode!r}")

    @property
    def weight_rows(self) -> int:
        return epilogue_weight_rows(self)

    @property
    def step(self) -> int:
        """Columns of a warp step."""
        return MMA_STEP if self.decode == "mma" else CHUNK

    @property
    def nch(self) -> int:
        return math.ceil(self.k / self.step)

    @property
    def x_vecs(self) -> int:
        """decode="mma": x's 8-column vectors (whole warp steps) per thread of the block."""
        return math.ceil(self.nch * self.step / 8 / (WARPS * 32))

    @property
    def smem(self) -> int:
        """Dynamic shared memory: x quantized, whole warp steps (mma: as fp16, else fp32)."""
        return self.nch * self.step * (2 if self.decode == "mma" else 4)


def default_x_once() -> bool:
    """KILN_FP8_GEMV_XONCE ("0" or "1", default "1"): spec_for's `x_once` for decode="mma". Session 17 (H200,
    .ci/fp8_x_probe.py, two calls): o 7.4 -> 6.4 us, down 20.2 -> 18.9, gate+up 34.7 -> 34.0, qkv 9.0 either way
    (Mamba-2's in_proj 9.8 -> 10.0); 8B fp8 batch-1 decode 3.152 against 3.231 ms, the mean of four pairs
    alternating in two calls; the same bits (tests/gpu/test_gemv_fp8_xonce.py). Read at each spec_for (so at
    graph capture)."""
    v = os.environ.get("KILN_FP8_GEMV_XONCE") or "1"
    if v not in ("0", "1"):
        raise KernelArgError(f"KILN_FP8_GEMV_XONCE: must be 0 or 1, got {v!r}")
    return v == "1"


def spec_for(n: int, k: int, dtype: str, has_bias: bool, per_channel: bool = False, static: bool = False,
             origin: str = "linear", num_sms: int = 132, decode: str = "int", epilogue=None,
             halves: tuple[int, ...] = (0, 0)) -> Fp8GemvSpec:
    """The fp8 GEMV of W [n, k]; with a gated `epilogue` (an ActSpec; decode="mma"), of its row halves
    (gate_row, up_row) = `halves`, epilogue.features rows each: out [1, epilogue.features]; with a rotary one
    (a RopeCacheSpec), of its q, k and v rows starting at `halves` (three starts): out q [1, heads * head_dim]."""
    if decode == "mma":
        # One wave of at most 2 tiles a warp; larger (an LM head): one tile a warp over half of K, in waves. At
        # 128,256 x 4,096 on the H200 (.ci/lmhead_probe.py, session 18): 134.6 us (92% of copy bandwidth) against
        # 222.7 for its one wave of 4 tiles a warp (whose 128 registers spill); 16 rows x 1 slice 139.0, 32 x 1 140.0.
        tiles, ks = one_wave(math.ceil(n / 16), ONE_WAVE_TILES, KSPLITS, math.ceil(k / MMA_STEP),
                             num_sms * WARPS * MIN_BLOCKS, lambda r, s: (r * math.ceil(k / MMA_STEP / s), s),
                             (1, min(2, math.ceil(k / MMA_STEP))))
        rows = 16 * tiles
    else:
        rows, ks = choose_chunks(n, math.ceil(k / CHUNK), num_sms)
    if epilogue is None:
        spec = Fp8GemvSpec(n, k, has_bias, dtype, origin, per_channel, static, rows, ks, decode, ring=MMA_RING)
    elif isinstance(epilogue, RopeCacheSpec):
        rope = rope_epilogue_spec(epilogue)
        spec = Fp8GemvSpec(rope_pairs(rope), k, has_bias, dtype, origin, per_channel, static, rows, ks, decode,
                           ring=MMA_RING, epilogue=rope, w_rows=n, qkv_rows=tuple(halves))
    else:
        spec = Fp8GemvSpec(epilogue.features, k, has_bias, dtype, origin, per_channel, static, rows, ks, decode,
                           ring=MMA_RING, epilogue=epilogue.key(), gate_row=halves[0], up_row=halves[1], w_rows=n)
    # x read once where its vectors fit in registers (KILN_FP8_GEMV_XONCE)
    if decode == "mma" and default_x_once() and spec.x_vecs <= X_ONCE_MAX_VECS:
        spec = dataclasses.replace(spec, x_once=True)
    return spec


def _render(s: Fp8GemvSpec) -> KernelSource:
    if s.decode == "mma":
        return _render_mma(s)
    nch = s.nch
    cps = math.ceil(nch / s.ksplit)
    unroll = max(1, LOADS_FEW // s.rows)
    groups = WARPS // s.ksplit
    params = dict(n=s.n, k=s.k, vec=VEC, chunk=CHUNK, nch=nch, cps=cps, rows=s.rows, ksplit=s.ksplit,
                  unroll=unroll, groups=groups, warps=WARPS, threads=WARPS * 32, min_blocks=MIN_BLOCKS,
                  k_tail=s.k % CHUNK != 0, has_bias=s.has_bias, per_channel=s.per_channel, static=s.static,
                  xvec=16 // RUN_DTYPES[s.dtype].itemsize, red=max(32, WARPS * s.rows), decode=s.decode,
                  x_up="2^119" if s.decode == "int" else "1")
    meta = dict(threads=WARPS * 32, blocks=math.ceil(s.n / (groups * s.rows)), rows=s.rows, ksplit=s.ksplit,
                unroll=unroll, smem=s.smem, decode=s.decode)
    tag = ("c" if s.per_channel else "t") + ("s" if s.static else "d") + s.decode[0]
    name = _name(f"gemv_fp8_{tag}_n{s.n}_k{s.k}_r{s.rows}_s{s.ksplit}", s)
    return _emit("gemv_fp8.cu.j2", name, s, params, [name], meta)


def _render_mma(s: Fp8GemvSpec) -> KernelSource:
    nch, tiles = s.nch, s.rows // 16
    cps = math.ceil(nch / s.ksplit)
    unroll = max(1, (s.loads or MMA_LOADS) // (2 * tiles))
    groups = WARPS // s.ksplit
    params = dict(n=s.n, k=s.k, nch=nch, cps=cps, tiles=tiles, ksplit=s.ksplit, unroll=unroll, groups=groups,
                  warps=WARPS, threads=WARPS * 32, min_blocks=MIN_BLOCKS, k_tail=s.k % MMA_STEP != 0,
                  has_bias=s.has_bias, per_channel=s.per_channel, static=s.static, ring=s.ring, x_once=s.x_once,
                  xv=s.x_vecs,
                  xvec=16 // RUN_DTYPES[s.dtype].itemsize, red=max(32, WARPS * s.rows), w_rows=s.weight_rows,
                  epi=epilogue_params(s), rot=0)
    if isinstance(s.epilogue, RopeCacheSpec):
        params.update(rope_math_params(s.epilogue))
    meta = dict(threads=WARPS * 32, blocks=math.ceil(s.n / (groups * outputs_per_warp(s))), rows=s.rows,
                ksplit=s.ksplit, unroll=unroll, smem=s.smem, decode=s.decode)
    tag = ("c" if s.per_channel else "t") + ("s" if s.static else "d") + ("r" if s.ring else "b")
    tag += "x" if s.x_once else ""
    if isinstance(s.epilogue, RopeCacheSpec):
        e = s.epilogue
        tag += f"_rope_{e.layout[0]}{e.rotary_dim}_d{e.head_dim}_{e.heads}x{e.kv_heads}_p{e.page_size}"
    elif s.epilogue is not None:
        tag += f"_{s.epilogue.kind}_gated_g{s.gate_row}_u{s.up_row}"
    name = _name(f"gemv_fp8_mma_{tag}_n{s.n}_k{s.k}_r{s.rows}_s{s.ksplit}_l{2 * tiles * unroll}", s)
    return _emit("gemv_fp8_mma.cu.j2", name, s, params, [name], meta)


_RENDERERS[Fp8GemvSpec] = _render


def gemv_fp8(spec: Fp8GemvSpec, x, w, w_scale, out, bias=None, x_scale=None, pdl: bool = False,
             rope: tuple | None = None) -> None:
    """out [1, n] = W8A8(x [1, k], w e4m3 [n, k], w_scale) (+ bias): dsl/quant.py QWeight.linear's result
    for an fp8 weight (fp32 sums in another order). w_scale fp32 [] (or [n] / [1, n] per channel);
    x_scale fp32 [] for a static spec. x, out, bias: the spec's dtype; x 16-byte aligned. A spec with the
    rotary epilogue: out is q [1, heads * head_dim], rotated, and rope = (positions [1] int64, slot_mapping
    [1] int32, k_cache, v_cache, k_scale, v_scale) say where k and v go, as codegen/gemv.py gemv_rope's."""
    dt = _torch_dtype(spec)
    _check("x", x, dt, contiguous=False, aligned=False)
    dev = x.device
    if x.dim() != 2 or tuple(x.shape) != (1, spec.k):
        raise KernelArgError(f"x: shape {tuple(x.shape)}, expected [1, {spec.k}] (one row)")
    _check("x", x, dt, device=dev)
    _check("w", w, torch.float8_e4m3fn, (spec.weight_rows, spec.k), dev)
    _check("w_scale", w_scale, torch.float32, device=dev, aligned=False)
    want = spec.weight_rows if spec.per_channel else 1
    if w_scale.numel() != want:
        raise KernelArgError(f"w_scale: {w_scale.numel()} values, expected {want} "
                             f"({'per channel' if spec.per_channel else 'per tensor'})")
    extra = []
    if isinstance(spec.epilogue, RopeCacheSpec):
        e = spec.epilogue
        _check("out", out, dt, (1, e.heads * e.head_dim), dev, aligned=False)
        if rope is None:
            raise KernelArgError("rope: the rotary epilogue needs (positions, slot_mapping, k_cache, v_cache, k_scale, "
                                 "v_scale)")
        positions, slots, kc, vc, k_scale, v_scale = rope
        _check("positions", positions, torch.int64, (1,), dev, aligned=False)
        _check("slot_mapping", slots, torch.int32, (1,), dev, aligned=False)
        _check_cache(e, kc, vc, dt, dev)
        extra = [ptr(positions), ptr(slots), ptr(kc), ptr(vc), f32_arg(k_scale), f32_arg(v_scale)]
    else:
        _check("out", out, dt, (1, spec.n), dev, aligned=False)
        if rope is not None:
            raise KernelArgError("rope: given to a spec without the rotary epilogue")
    if spec.static:
        if x_scale is None:
            raise KernelArgError("x_scale: required by this spec (static)")
        _check("x_scale", x_scale, torch.float32, device=dev, aligned=False)
        if x_scale.numel() != 1:
            raise KernelArgError(f"x_scale: {x_scale.numel()} values, expected 1")
    elif x_scale is not None:
        raise KernelArgError("x_scale: given to a spec that measures it (static=False)")
    check_bias(spec, bias, dt, dev, spec.weight_rows)
    launch(spec, dev, 0, [ptr(w), ptr(x), ptr(w_scale), ptr(x_scale), ptr(bias), ptr(out), *extra], pdl)


def takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear` runs this GEMM: one row of a run dtype on the GPU, an e4m3 [n, k] weight with
    16-byte rows, k within MAX_K."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype == torch.float8_e4m3fn
            and w.shape[1] == x.shape[1] and w.shape[1] % VEC == 0 and w.shape[1] <= MAX_K
            and w.is_contiguous() and w.data_ptr() % 16 == 0)


def linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           x_scale: torch.Tensor | None = None, pdl: bool = False, origin: str = "linear",
           decode: str = "int", epilogue=None, halves: tuple[int, ...] = (0, 0), rope: tuple | None = None
           ) -> torch.Tensor:
    """The W8A8 linear of one row through the kernel (check `takes` first). w_scale: fp32 [] per
    tensor, [n] or [1, n] per channel; x_scale: the static activation scale, None to measure it.
    decode "mma" applies to 16-bit x; fp32 x takes "int". epilogue (16-bit x, "mma"): a gated ActSpec,
    act(g) * u of the row halves at `halves` (gate_row, up_row), [1, epilogue.features]; or a RopeCacheSpec,
    q [1, heads * head_dim] rotated, k and v into the cache `rope` names (gemv_fp8), q, k, v rows at `halves`."""
    from .specs import dtype_name
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.contiguous()
        if x.data_ptr() % 16:
            x = x.clone()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    n, k = w.shape
    per_channel = w_scale.numel() != 1 or w_scale.dim() > 0
    ws = w_scale.reshape(-1) if per_channel else w_scale.reshape(())
    if not ws.is_contiguous() or ws.dtype != torch.float32:
        ws = ws.float().contiguous()
    xs = None if x_scale is None else x_scale.float().reshape(())
    dt = dtype_name(x.dtype)
    if decode == "mma" and dt not in MMA_DTYPES and epilogue is None:
        decode = "int"  # fp32 runs keep fp32 products on the CUDA cores (the reference's precision)
    spec = spec_for(n, k, dt, bias is not None, per_channel, x_scale is not None, origin, _num_sms(x.device), decode,
                    epilogue, halves)
    e = spec.epilogue
    width = e.heads * e.head_dim if isinstance(e, RopeCacheSpec) else spec.n
    out = torch.empty(1, width, dtype=x.dtype, device=x.device)
    gemv_fp8(spec, x, w, ws, out, bias, xs, pdl, rope)
    return out
