"""Decode-sized 16-bit / fp32 linears on the GPU (issue #18): the spec, its rendering
(templates/gemv.cu.j2), the launch wrapper and `linear`, the drop-in for torch's at T <= GEMV_MAX_T rows.

At one token a GEMM reads each weight byte once and does almost no math: cuBLAS reached 73% of the
H200's copy bandwidth on Mamba-2's in_proj (N=10576, K=2560) and 56% (split-K + a reduce kernel) on its
out_proj (N=2560, K=5120). This kernel streams the weight with 16-byte loads, `rows` rows per warp and
`LOADS_FEW` / `LOADS_MANY` loads per lane in flight, and splits K over the warps of a block (`ksplit`, summed in
shared memory) only where N is too small to give every SM work. `choose` sizes both per shape and device.
runtime/cuda_backend.py runs it for the decode GEMMs of one row (KILN_GEMV, KILN_GEMV_ROWS); its epilogues
(the gated activation, the rotary + KV write) spare a launch each.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from kiln.dsl.dtypes import RUN_DTYPES

from .kernels import KernelArgError, _check, _check_cache, _scales, _torch_dtype
from .launch import get_kernel, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name, _vec, f32, rope_math_params
from .specs import ActSpec, NormSpec, RopeCacheSpec, _dtype, _fail, _positive, _Spec

GEMV_MAX_T = 4  # rows of x one launch takes (an entry per count, accumulators in registers)
WARPS = 8  # per block (256 threads)
MIN_BLOCKS = 2  # __launch_bounds__ minimum blocks per SM: <= 128 registers, 16 resident warps per SM
# 16-byte weight loads per lane per step (rows * unroll): 16 at up to FEW_T rows of x, 8 beyond (registers)
LOADS_FEW, LOADS_MANY, FEW_T = 16, 8, 2
X_LOADS = 16  # x's 16-byte loads per lane per step at most (T * unroll): at one row a warp, x's registers dominate
ROWS = (1, 2, 4, 8)
KSPLITS = (1, 2, 4, 8)


@dataclass(frozen=True)
class GemvSpec(_Spec):
    n: int  # output features (rows of W)
    k: int  # input features
    has_bias: bool = False
    dtype: str = "bf16"
    origin: str = ""
    rows: int = 2  # rows of W per warp
    ksplit: int = 1  # warps of a block sharing a row group, each a slice of K
    # The step before, fused into the prologue (issue #12 item 2; fuse.py's gemv_prologue): x is computed
    # per chunk from that step's inputs instead of read. A NormSpec (rms, plain / residual / gated, its
    # origin stripped: one kernel for every layer) or a gated ActSpec; None: x is read as it is.
    prologue: Any = None
    # The gated activation after it, fused into the epilogue (fuse.py's gemv_epilogue): W [w_rows, k] holds
    # the gate projection at rows [gate_row, gate_row + n) and the up projection at [up_row, up_row + n);
    # each warp computes rows / 2 (gate, up) row pairs and writes act(g) * u, out [T, n], so the [T, 2n]
    # product is never stored and the activation needs no launch of its own. A gated ActSpec (its origin
    # stripped) or None.
    # Or the rotary embedding + paged KV write after a qkv GEMM (fuse.py's gemv_rope): a RopeCacheSpec (origin
    # stripped, `rope_epilogue_spec`); W's q, k and v rows start at qkv_rows; n is the (row, row) pairs,
    # (heads + 2 kv_heads) * head_dim / 2; out is q rotated [T, heads * head_dim], k and v go to the cache.
    epilogue: Any = None
    gate_row: int = 0
    up_row: int = 0
    w_rows: int = 0  # W's rows where there is an epilogue (n otherwise)
    qkv_rows: tuple[int, ...] = ()  # the rotary epilogue's (q, k, v) first rows in W
    # An RMSNorm prologue post-scaled: x = h * w, each sum times the row's 1 / rms at the end (sum(h^2) gathered
    # beside the sums), instead of a first pass over h for the 1 / rms before x is formed. The same norm, another
    # rounding: h / rms * w is not rounded to the run dtype as the norm kernel stores it.
    post_norm: bool = False

    def __post_init__(self):
        _positive(self, "n", "k")
        _dtype(self)
        if self.rows not in ROWS:
            _fail(self, "rows", f"must be one of {ROWS}, got {self.rows!r}")
        if self.ksplit not in KSPLITS:
            _fail(self, "ksplit", f"must be one of {KSPLITS}, got {self.ksplit!r}")
        if self.prologue is not None:
            why = prologue_refusal(self.prologue, self.k, self.dtype)
            if why:
                _fail(self, "prologue", why)
        check_epilogue(self)
        if self.post_norm and not post_norm_takes(self.prologue):
            _fail(self, "post_norm", "needs an RMSNorm prologue without a gate or groups")
        if self.epilogue is not None:
            if self.prologue is not None and not epilogue_takes_prologue(self.prologue):
                _fail(self, "prologue", "with an epilogue, only an RMSNorm without a gate (plain or residual) is fused "
                                        "before the GEMV")
            if self.rows < 2:
                _fail(self, "rows", "an epilogue's warp takes (gate, up) row pairs: at least 2 rows")

    @property
    def weight_rows(self) -> int:
        return epilogue_weight_rows(self)

    @property
    def vec(self) -> int:
        return _vec(RUN_DTYPES[self.dtype].itemsize, self.k)


@lru_cache(maxsize=None)
def choose(n: int, k: int, dtype: str, num_sms: int = 132) -> tuple[int, int]:
    """(rows, ksplit): the least weight per warp (the critical path of a stream whose warps all run at
    once) such that the grid's warps fit on the device at once (num_sms * 16); ties to the fewest K
    slices. Shapes too large for one wave take 8 rows a warp, no split (the stream stays saturated
    until the last wave drains)."""
    return choose_chunks(n, math.ceil(k / (32 * _vec(RUN_DTYPES[dtype].itemsize, k))), num_sms)


@lru_cache(maxsize=None)
def choose_chunks(n: int, nch: int, num_sms: int = 132) -> tuple[int, int]:
    """`choose` for a row of `nch` warp steps (chunks of 32 16-byte loads); the fp8 GEMV
    (codegen/gemv_fp8.py) sizes its grid with it too."""
    return one_wave(n, ROWS, KSPLITS, nch, num_sms * WARPS * MIN_BLOCKS, lambda r, ks: (r * math.ceil(nch / ks), ks),
                    (8, 1))


def one_wave(units: int, per_warp: tuple[int, ...], ksplits: tuple[int, ...], nch: int, cap: int, cost,
             fallback: tuple[int, int]) -> tuple[int, int]:
    """(units a warp, K slices) of a GEMV grid (blocks of WARPS warps, `ks` warps sharing each unit's
    K): the least `cost(r, ks)` (its weight per warp first: the critical path when every warp runs at
    once) among the choices whose whole grid is resident at once (at most `cap` warps); none fits:
    `fallback`. The bf16 / fp8 GEMVs' units are rows, the INT4 warp variant's 16-row tiles."""
    best = None
    for ks in ksplits:
        if ks > nch:
            break
        for r in per_warp:
            if math.ceil(units / (r * WARPS // ks)) * WARPS > cap:  # whole blocks
                continue
            c = cost(r, ks)
            if best is None or c < best[0]:
                best = (c, r, ks)
    return (best[1], best[2]) if best else fallback


def spec_for(n: int, k: int, dtype: str, has_bias: bool, origin: str = "linear", num_sms: int = 132,
             prologue=None, epilogue=None, halves: tuple[int, ...] = (0, 0), post_norm: bool = False) -> GemvSpec:
    """The GEMV of W [n, k]; with a gated `epilogue` (an ActSpec), of its row halves (gate_row, up_row) =
    `halves`, epilogue.features rows each: out [T, epilogue.features]; with a rotary one (a RopeCacheSpec),
    of its q, k and v rows starting at `halves` (three starts): out q [T, heads * head_dim]. post_norm: an RMSNorm
    prologue's 1 / rms applied to the sums (GemvSpec.post_norm)."""
    rows, ks = choose(n, k, dtype, num_sms)
    pro = prologue.key() if prologue is not None else None
    if epilogue is None:
        return GemvSpec(n, k, has_bias, dtype, origin, rows, ks, pro, post_norm=post_norm)
    if isinstance(epilogue, RopeCacheSpec):
        rope = rope_epilogue_spec(epilogue)
        return GemvSpec(rope_pairs(rope), k, has_bias, dtype, origin, max(2, rows), ks, pro, rope, w_rows=n,
                        qkv_rows=tuple(halves), post_norm=post_norm)
    return GemvSpec(epilogue.features, k, has_bias, dtype, origin, max(2, rows), ks, pro, epilogue.key(), *halves, n,
                    post_norm=post_norm)


def post_norm_takes(pro) -> bool:
    """Whether `pro` can be post-scaled (GemvSpec.post_norm): an RMSNorm without a gate, over the whole row (one
    1 / rms a row of x, one weight of k values)."""
    return epilogue_takes_prologue(pro) and pro.width == pro.hidden


def epilogue_takes_prologue(pro) -> bool:
    """Whether a GEMV with an epilogue (rotary + KV write, gated activation) also takes `pro` before it: an RMSNorm
    without a gate, plain or after its residual sum (the attention norm before qkv, the MLP norm before gate+up)."""
    return isinstance(pro, NormSpec) and pro.kind == "rms" and not pro.gate


def rope_epilogue_spec(rope: RopeCacheSpec) -> RopeCacheSpec:
    """The rotary spec as the GEMV's epilogue holds it: what the math and the cache layout need, not how
    the rotary kernel of its own would run (variant, prefetch) or where it came from (one kernel for
    every layer)."""
    return dataclasses.replace(rope, origin="", variant="token", prefetch=False)


def rope_pairs(rope: RopeCacheSpec) -> int:
    """The rotary epilogue's (row, row) pairs: head_dim / 2 for each of q's, k's and v's heads."""
    return (rope.heads + 2 * rope.kv_heads) * rope.head_dim // 2


def rope_pair_rows(rope: RopeCacheSpec, qkv_rows: tuple[int, int, int]) -> torch.Tensor:
    """W's rows of each rotary-epilogue pair, int64 [rope_pairs, 2]: what gemv_rope_epi.cuh.j2's pair_row(j, false /
    true) computes in the kernels, for layouts built at load (quant_kernels.Packed.rope_paired). Pair j is head
    j // (head_dim / 2) of q's, then k's, then v's heads, and p = j % (head_dim / 2) its dims (p, p + rot / 2)
    where it is a rotary pair of the "half" layout, else (2p, 2p + 1)."""
    hd, rot = rope.head_dim, rope.rotary_dim
    j = torch.arange(rope_pairs(rope))
    h, p = j // (hd // 2), j % (hd // 2)
    da, db = 2 * p, 2 * p + 1
    if rot and rope.layout == "half":
        rotary = (h < rope.heads + rope.kv_heads) & (p < rot // 2)
        da, db = torch.where(rotary, p, da), torch.where(rotary, p + rot // 2, db)
    q, k, v = qkv_rows
    nq, nqk = rope.heads, rope.heads + rope.kv_heads
    base = torch.where(h < nq, q + h * hd, torch.where(h < nqk, k + (h - nq) * hd, v + (h - nqk) * hd))
    return torch.stack([base + da, base + db], dim=1)


def check_epilogue(spec) -> None:
    """A GEMV spec's epilogue fields (GemvSpec, gemv_fp8's Fp8GemvSpec): a gated act of n pairs whose gate
    and up rows lie apart in W's w_rows, or a rotary epilogue whose q, k and v rows lie apart in them; none
    of the row fields without an epilogue."""
    qkv = getattr(spec, "qkv_rows", ())
    if spec.epilogue is None:
        if (spec.gate_row, spec.up_row, spec.w_rows) != (0, 0, 0) or qkv:
            _fail(spec, "w_rows", "gate_row / up_row / w_rows / qkv_rows belong to an epilogue")
        return
    if isinstance(spec.epilogue, RopeCacheSpec):
        why = rope_epilogue_refusal(spec.epilogue, spec.dtype)
        if why:
            _fail(spec, "epilogue", why)
        if spec.n != rope_pairs(spec.epilogue):
            _fail(spec, "n", f"the rotary epilogue's pairs are {rope_pairs(spec.epilogue)}, not {spec.n}")
        if (spec.gate_row, spec.up_row) != (0, 0) or len(qkv) != 3:
            _fail(spec, "qkv_rows", "a rotary epilogue takes (q, k, v) first rows, not gate_row / up_row")
        e = spec.epilogue
        spans = sorted(zip(qkv, (e.heads * e.head_dim, e.kv_heads * e.head_dim, e.kv_heads * e.head_dim)))
        if spans[0][0] < 0 or spans[-1][0] + spans[-1][1] > spec.w_rows \
                or any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
            _fail(spec, "qkv_rows", f"q, k and v rows {qkv} must lie apart in W's {spec.w_rows}")
        return
    if qkv:
        _fail(spec, "qkv_rows", "belongs to a rotary epilogue")
    why = epilogue_refusal(spec.epilogue, spec.n, spec.dtype)
    if why:
        _fail(spec, "epilogue", why)
    g, u, n = spec.gate_row, spec.up_row, spec.n
    if min(g, u) < 0 or max(g, u) + n > spec.w_rows:
        _fail(spec, "w_rows", f"rows [{g}, +{n}) and [{u}, +{n}) must lie in W's {spec.w_rows}")
    if abs(g - u) < n:
        _fail(spec, "up_row", "the gate and up rows overlap")


def epilogue_params(spec) -> dict | None:
    """The templates' view of a GEMV spec's epilogue (gemv.cu.j2, gemv_fp8_mma.cu.j2); None without one.
    "rope": a rotary epilogue's cache and head layout (its frequencies: render.rope_math_params)."""
    e = spec.epilogue
    if e is None:
        return None
    if isinstance(e, RopeCacheSpec):
        q, k, v = spec.qkv_rows
        return dict(rope=True, act="", heads=e.heads, kv_heads=e.kv_heads, head_dim=e.head_dim, layout=e.layout,
                    page_size=e.page_size, kv_fp8=e.kv_fp8, q_row=q, k_row=k, v_row=v, w_rows=spec.w_rows)
    return dict(rope=False, act=e.kind, gate_row=spec.gate_row, up_row=spec.up_row, w_rows=spec.w_rows)


def outputs_per_warp(spec) -> int:
    """Outputs a warp writes: its rows, or half of them, (gate, up) pairs, with an epilogue."""
    return spec.rows // 2 if spec.epilogue is not None else spec.rows


def epilogue_weight_rows(spec) -> int:
    """W's rows: w_rows with an epilogue, n otherwise."""
    return spec.w_rows if spec.epilogue is not None else spec.n


def epilogue_refusal(epi, n: int, dtype: str) -> str:
    """Why the GEMV cannot apply `epi` (an ActSpec) to its (gate, up) row pairs; "" where it can."""
    if not isinstance(epi, ActSpec) or not epi.gated:
        return "only a gated activation act(g) * u is fused after the GEMV"
    if epi.dtype != dtype:
        return f"the epilogue's dtype {epi.dtype} is not the GEMV's {dtype}"
    if epi.features != n:
        return f"the activation's features={epi.features} is not the GEMV's n={n} pairs"
    return ""


def rope_epilogue_refusal(rope, dtype: str) -> str:
    """Why the GEMV cannot apply `rope` (a RopeCacheSpec) to a qkv GEMM's pairs; "" where it can. The
    frequencies must be a fixed table: dynamic NTK and longrope pick theirs by the step's length."""
    if not isinstance(rope, RopeCacheSpec):
        return "only a gated activation or the rotary + KV write is fused after the GEMV"
    if rope.dtype != dtype:
        return f"the rotary epilogue's dtype {rope.dtype} is not the GEMV's {dtype}"
    if rope.rotary_dim and rope.scaling in ("dynamic", "longrope"):
        return f"rotary scaling {rope.scaling!r} picks its frequencies per step (its own kernel does)"
    if rope.head_dim % 2:
        return f"head_dim {rope.head_dim} is odd: its dims do not pair"
    if rope.kv_rotated:
        return "an fp8-rotated cache's write turns whole heads (its own kernel does)"
    return ""


def prologue_refusal(pro, k: int, dtype: str) -> str:
    """Why the GEMV cannot compute x [T, k] as `pro` (a NormSpec / ActSpec) would in its prologue; ""
    where it can. Layer norms are left to their own kernel (two reductions; not in decode's hot path)."""
    if pro.dtype != dtype:
        return f"the prologue's dtype {pro.dtype} is not the GEMV's {dtype}"
    if isinstance(pro, NormSpec):
        if pro.kind != "rms" or pro.has_bias:
            return "only an RMSNorm (no bias) is fused"
        if pro.hidden != k:
            return f"the norm's hidden={pro.hidden} is not k={k}"
        if pro.width % _vec(RUN_DTYPES[dtype].itemsize, k):
            return f"the norm's group {pro.width} is not a whole number of the GEMV's {k}-wide row's vectors"
        return ""
    if isinstance(pro, ActSpec):
        if not pro.gated:
            return "only a gated activation act(g) * u is fused"
        if pro.features != k:
            return f"the activation's features={pro.features} is not k={k}"
        return ""
    return f"must be a NormSpec or an ActSpec, got {type(pro).__name__}"


def _render(s: GemvSpec) -> KernelSource:
    vec = s.vec
    chunk = 32 * vec
    nch = math.ceil(s.k / chunk)
    cps = math.ceil(nch / s.ksplit)
    unroll = {t: max(1, min((LOADS_FEW if t <= FEW_T else LOADS_MANY) // s.rows, X_LOADS // t))
              for t in range(1, GEMV_MAX_T + 1)}
    groups = WARPS // s.ksplit
    vp = {t: 1 << max(0, math.ceil(math.log2(t * s.rows))) for t in range(1, GEMV_MAX_T + 1)}
    params = dict(n=s.n, k=s.k, vec=vec, chunk=chunk, nch=nch, cps=cps, rows=s.rows, ksplit=s.ksplit,
                  unroll=unroll, groups=groups, warps=WARPS, threads=WARPS * 32, min_blocks=MIN_BLOCKS,
                  k_tail=s.k % chunk != 0, few_t=FEW_T, has_bias=s.has_bias, max_t=GEMV_MAX_T, vp=vp,
                  pro=_prologue_params(s.prologue, vec), post=s.post_norm,
                  epi=epilogue_params(s), rot=0)
    if isinstance(s.epilogue, RopeCacheSpec):
        params.update(rope_math_params(s.epilogue))
    meta = dict(threads=WARPS * 32, blocks=math.ceil(s.n / (groups * outputs_per_warp(s))), vec=vec, rows=s.rows,
                ksplit=s.ksplit, unroll=unroll)
    kind = "" if s.prologue is None else f"_{params['pro']['variant']}{'_post' if s.post_norm else ''}"
    if isinstance(s.epilogue, RopeCacheSpec):
        e = s.epilogue
        kind += f"_rope_{e.layout[0]}{e.rotary_dim}_d{e.head_dim}_{e.heads}x{e.kv_heads}_p{e.page_size}"
    elif s.epilogue is not None:
        kind += f"_{s.epilogue.kind}_gated_g{s.gate_row}_u{s.up_row}"
    name = _name(f"gemv{kind}_n{s.n}_k{s.k}_r{s.rows}_s{s.ksplit}", s)
    return _emit("gemv.cu.j2", name, s, params, [f"{name}_t{t}" for t in range(1, GEMV_MAX_T + 1)], meta)


def _prologue_params(pro, vec: int) -> dict | None:
    """The template's view of a prologue: which variant, and the norm's constants spelled as
    render.py's norm spells them (the same float32 literals, so the same roundings)."""
    if pro is None:
        return None
    if isinstance(pro, ActSpec):
        return dict(variant=f"{pro.kind}_gated", norm=False, act=pro.kind, gate="", residual=False)
    width = pro.width
    return dict(variant=f"rmsnorm{'_res' if pro.has_residual else ''}{f'_{pro.gate}' if pro.gate else ''}",
                norm=True, act=pro.gate, gate=pro.gate, residual=pro.has_residual, width=width,
                ngroups=pro.hidden // width, width_vecs=width // vec, shared_weight=bool(pro.group)
                and not pro.per_group_weight, eps=f32(pro.eps), inv_width=f32(1.0 / width),
                weight_offset=f32(pro.weight_offset) if pro.weight_offset else "", origin=pro.origin)


_RENDERERS[GemvSpec] = _render


def gemv(spec: GemvSpec, x, w, out, bias=None, pdl: bool = False) -> None:
    """out [T, n] = x [T, k] @ w [n, k]^T (+ bias), 1 <= T <= GEMV_MAX_T. x may be row-strided (rows
    16-byte aligned); w, out, bias contiguous. pdl: a programmatic dependent launch (LoadedKernel.
    launch_dependent), the first weight loads overlapping the kernel before."""
    dt = _torch_dtype(spec)
    _check("x", x, dt, contiguous=False, aligned=False)
    dev = x.device
    if x.dim() != 2 or x.shape[1] != spec.k:
        raise KernelArgError(f"x: shape {tuple(x.shape)}, expected [T, {spec.k}]")
    T = x.shape[0]
    if not 1 <= T <= GEMV_MAX_T:
        raise KernelArgError(f"x: {T} rows; the GEMV takes 1 to {GEMV_MAX_T} (more: a GEMM)")
    _check("x", x, dt, device=dev, rows_aligned=True, contiguous=False)
    _check("w", w, dt, (spec.weight_rows, spec.k), dev)
    _check("out", out, dt, (T, spec.n), dev)
    check_bias(spec, bias, dt, dev, spec.weight_rows)
    launch(spec, dev, T - 1, [ptr(w), ptr(x), ptr(bias), ptr(out), i64(x.stride(0))], pdl)


def gemv_rope(spec: GemvSpec, x, w, q_out, positions, slot_mapping, k_cache, v_cache, bias=None,
              k_scale: float = 1.0, v_scale: float = 1.0, pdl: bool = False) -> None:
    """The qkv GEMV with the rotary embedding and the paged KV write in its epilogue (spec.epilogue a
    RopeCacheSpec): q, k, v = x [T, k] @ w [w_rows, k]^T (+ bias) at spec.qkv_rows; q_out [T, heads * head_dim]
    gets q rotated; k rotated and v go into the paged cache at slot_mapping (negative: not written), as
    kernels.rope_write_kv writes them (spec.epilogue.kv_fp8: float8_e4m3fn pages of K / k_scale, V / v_scale).
    positions [T] int64, slot_mapping [T] int32."""
    rope, dt = spec.epilogue, _torch_dtype(spec)
    if not isinstance(rope, RopeCacheSpec):
        raise KernelArgError("spec: has no rotary epilogue (use gemv)")
    _check("x", x, dt, contiguous=False, aligned=False)
    dev, T = x.device, x.shape[0]
    if x.dim() != 2 or x.shape[1] != spec.k:
        raise KernelArgError(f"x: shape {tuple(x.shape)}, expected [T, {spec.k}]")
    if not 1 <= T <= GEMV_MAX_T:
        raise KernelArgError(f"x: {T} rows; the GEMV takes 1 to {GEMV_MAX_T} (more: a GEMM)")
    _check("x", x, dt, device=dev, rows_aligned=True, contiguous=False)
    _check("w", w, dt, (spec.weight_rows, spec.k), dev)
    extra = rope_epilogue_args(rope, q_out, (positions, slot_mapping, k_cache, v_cache, k_scale, v_scale), T, dt, dev)
    check_bias(spec, bias, dt, dev, spec.weight_rows)
    launch(spec, dev, T - 1, [ptr(w), ptr(x), ptr(bias), ptr(q_out), *extra, i64(x.stride(0))], pdl)


def rope_epilogue_args(rope: RopeCacheSpec, q_out, rope_args: tuple, T: int, dt: torch.dtype, dev,
                       out_name: str = "q_out") -> list:
    """A rotary epilogue's output and arguments checked (q_out [T, heads * head_dim]; rope_args: positions [T]
    int64, slot_mapping [T] int32, the site's k and v caches, k_scale, v_scale): the launch arguments after q_out."""
    positions, slot_mapping, k_cache, v_cache, k_scale, v_scale = rope_args
    _check(out_name, q_out, dt, (T, rope.heads * rope.head_dim), dev)
    _check("positions", positions, torch.int64, (T,), dev, aligned=False)
    _check("slot_mapping", slot_mapping, torch.int32, (T,), dev, aligned=False)
    _check_cache(rope, k_cache, v_cache, dt, dev)
    return [ptr(positions), ptr(slot_mapping), ptr(k_cache), ptr(v_cache), *_scales(rope, k_scale, v_scale)]


def gemv_prologue(spec: GemvSpec, w, out, a, b=None, norm_weight=None, r_out=None, bias=None,
                  pdl: bool = False, rope_args: tuple | None = None) -> None:
    """out [T, n] = x @ w^T (+ bias) where x [T, k] is what spec.prologue computes, never stored:
    rmsnorm(a) (a: x); rmsnorm(a + b) with r_out = b + a (a: the residual, b: x, the residual norm's
    operands); the gated norm rmsnorm(a * act(b)) (a: y, b: z); the gated activation act(a) * b (a: g,
    b: u). a and b may be row-strided (unit column stride, rows and starts 16-byte aligned: `prologue_takes`);
    norm_weight as the NormSpec's; r_out [T, k] contiguous. With an epilogue too (an RMSNorm prologue): a gated
    one's out is [T, n] = act(g) * u as `gemv` writes it; a rotary one's out is q_out as `gemv_rope` writes it,
    and rope_args its (positions, slot_mapping, k_cache, v_cache, k_scale, v_scale)."""
    pro, dt = spec.prologue, _torch_dtype(spec)
    if pro is None:
        raise KernelArgError("spec: has no prologue (use gemv)")
    rope = spec.epilogue if isinstance(spec.epilogue, RopeCacheSpec) else None
    if (rope_args is not None) != (rope is not None):
        raise KernelArgError("rope_args: given without a rotary epilogue" if rope is None else
                             "rope_args: the rotary epilogue needs (positions, slot_mapping, k_cache, v_cache, "
                             "k_scale, v_scale)")
    _check("a", a, dt, contiguous=False, aligned=False)
    dev, T = a.device, a.shape[0]
    if not 1 <= T <= GEMV_MAX_T:
        raise KernelArgError(f"a: {T} rows; the GEMV takes 1 to {GEMV_MAX_T} (more: a GEMM)")
    norm = isinstance(pro, NormSpec)
    two = not norm or pro.has_residual or bool(pro.gate)
    for label, t in (("a", a), ("b", b)) if two else (("a", a),):
        if t is None:
            raise KernelArgError(f"{label}: required by this prologue")
        _check(label, t, dt, device=dev, rows_aligned=True, contiguous=False)
        if t.dim() != 2 or tuple(t.shape) != (T, spec.k) or t.stride(1) != 1:
            raise KernelArgError(f"{label}: must be [{T}, {spec.k}] with unit column stride, got shape "
                                 f"{tuple(t.shape)} stride {tuple(t.stride())}")
    if norm:
        wshape = (pro.hidden // pro.width, pro.width) if pro.per_group_weight else (pro.width,)
        _check("norm_weight", norm_weight, dt, wshape, dev)
    if norm and pro.has_residual:
        _check("r_out", r_out, dt, (T, spec.k), dev)
    elif r_out is not None:
        raise KernelArgError("r_out: given to a prologue without a residual sum")
    _check("w", w, dt, (spec.weight_rows, spec.k), dev)
    extra = []
    if rope is not None:
        extra = rope_epilogue_args(rope, out, rope_args, T, dt, dev)
    else:
        _check("out", out, dt, (T, spec.n), dev)
    check_bias(spec, bias, dt, dev, spec.weight_rows)
    launch(spec, dev, T - 1, [ptr(w), ptr(a), ptr(b if two else None), ptr(norm_weight if norm else None), ptr(bias),
                              ptr(out), *extra, ptr(r_out), i64(a.stride(0)), i64(b.stride(0) if two else 0)], pdl)


def prologue_takes(*inputs: torch.Tensor) -> bool:
    """Whether the prologue's inputs can be read as the kernel reads them: 16-byte vectors of rows with
    unit column stride (a slice of a fused GEMM's row whose start or stride is off 16 bytes: not)."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
               and (t.stride(0) * t.element_size()) % 16 == 0 for t in inputs)


def check_bias(spec, bias, dt: torch.dtype, dev, n: int | None = None) -> None:
    """A GEMV spec's bias argument: [n] (default spec.n) of the run dtype where it has one (has_bias),
    None where not."""
    if spec.has_bias:
        if bias is None:
            raise KernelArgError("bias: required by this spec (has_bias)")
        _check("bias", bias, dt, (spec.n if n is None else n,), dev, aligned=False)
    elif bias is not None:
        raise KernelArgError("bias: given to a spec without one (has_bias=False)")


def launch(spec, dev, entry: int, args: list, pdl: bool) -> None:
    """One grid of a GEMV spec's kernel (its entry `entry`), sized by its meta; pdl: a programmatic
    dependent launch (LoadedKernel.launch_dependent)."""
    k = get_kernel(spec, dev)
    meta = k.source.meta
    run = k.launcher(pdl)
    run(k.source.entries[entry], (meta["blocks"],), (meta["threads"],), args, meta.get("smem", 0))


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def takes(x: torch.Tensor, w) -> bool:
    """Whether `linear` runs this GEMM: a plain 2-D weight of x's dtype, 1..GEMV_MAX_T rows, K in
    16-byte vectors."""
    return x.dim() == 2 and 1 <= x.shape[0] <= GEMV_MAX_T and x.is_cuda and weight_takes(w, x.dtype, x.shape[1])


def weight_takes(w, dtype: torch.dtype, k: int | None = None) -> bool:
    """`takes`' conditions on the weight, for an x of `dtype` (and k columns; None: as many as w's, an x not
    computed yet)."""
    return (isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_cuda and w.dtype == dtype
            and dtype in (torch.bfloat16, torch.float16, torch.float32) and w.shape[1] == (k or w.shape[1])
            and w.is_contiguous() and w.data_ptr() % 16 == 0 and (w.shape[1] * w.element_size()) % 16 == 0)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, pdl: bool = False,
           origin: str = "linear") -> torch.Tensor:
    """torch.nn.functional.linear(x, w, bias) through the GEMV (check `takes` first)."""
    from .specs import dtype_name
    if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
        x = x.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    n, k = w.shape
    spec = spec_for(n, k, dtype_name(x.dtype), bias is not None, origin, _num_sms(x.device))
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    gemv(spec, x, w, out, bias, pdl)
    return out
