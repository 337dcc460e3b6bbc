"""Weight-only quantized linears on the GPU: the spec, its rendering (templates/gemv_wq.cu.j2) and
the launch wrappers, and the packed layout they read (`repack`, `pack`: built once at load from a
`QWeight`; runtime/cuda_quant.py runs it).

`QGemvSpec` covers every weight stored as small integers with per-group records:
  fmt  "int4" (16-byte lane pieces of 32 nibbles, chunks of 64 columns) or "int8" (16 bytes, 32 columns)
  mode "post": value = (q - z) * s with the group spanning whole chunks; the tensor cores multiply the
       exact integers and each chunk's sum is scaled in fp32 (AWQ / GPTQ / RTN int4, int8 per channel,
       ggml q8_0)
       "pre": value = q * s + m rounded to the run dtype first (ggml q4_0 / q4_1: groups of 32)
  tokens the bucket of rows per block (8: one mma n-tile, 16: two); grid.y covers more rows.
fp32 runs take a CUDA-core variant of the same layout (full fp32 precision, as the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from kiln.dsl.dtypes import RUN_DTYPES
from kiln.dsl.quant import QWeight, unpack_int4

from .kernels import KernelArgError, _check, _torch_dtype
from .launch import get_kernel, i32, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _dtype, _fail, _positive, _Spec

# per format: columns per chunk (one 16-byte piece per lane), columns per lane, mma steps per piece
FORMATS = {"int4": (64, 16, 4), "int8": (32, 8, 2)}
TOKEN_BUCKETS = (8, 16)
WARPS = 8
GEMV_MAX_T = 64  # rows through the GEMV kernel (weights read once per 16 rows); more: dequantize + cuBLAS


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
    )
    meta = dict(threads=WARPS * 32, warps=WARPS, tiles=params["tiles"], nch=nch, ck=ck, kpl=kpl, qoff=qoff)
    name = _name(f"gemv_{s.fmt}_{s.mode}_n{s.n}_k{s.k}_g{s.group}_t{s.tokens}", s)
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


def qgemv(spec: QGemvSpec, x, wq, rec, out, bias=None):
    """out [T, n] = x [T, k] @ W^T (+ bias) for any T (grid.y: blocks of `spec.tokens` rows)."""
    dt = _torch_dtype(spec)
    dev = x.device
    _check("x", x, dt, device=dev, rows_aligned=True, contiguous=False)
    if x.shape[1] != spec.k:
        raise KernelArgError(f"x: {x.shape[1]} columns, expected {spec.k}")
    T = x.shape[0]
    _check("out", out, dt, (T, spec.n), dev)
    _check_packed(spec, wq, rec, dev)
    if spec.has_bias:
        if bias is None:
            raise KernelArgError("bias: required by this spec")
        _check("bias", bias, dt, (spec.n,), dev, aligned=False)
    kern = get_kernel(spec, dev)
    meta = kern.source.meta
    kern.launch(kern.source.entries[0], (meta["tiles"], math.ceil(T / spec.tokens)), (meta["threads"],),
                [ptr(wq), ptr(rec), ptr(x), ptr(bias if spec.has_bias else None), ptr(out),
                 i64(x.stride(0)), i32(T)])


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
    _rec: dict = field(default_factory=dict)

    def spec(self, dtype: torch.dtype, tokens: int, has_bias: bool) -> QGemvSpec:
        from .specs import dtype_name
        return QGemvSpec(self.fmt, self.mode, self.n, self.k, self.group, tokens, has_bias, dtype_name(dtype),
                         self.origin)

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
            qgemv(self.spec(x.dtype, 8 if T <= 8 else 16, bias is not None), x, self.wq, rec, out, bias)
            return out
        w = torch.empty(self.n, self.k, dtype=x.dtype, device=x.device)
        qdequant(self.spec(x.dtype, 16, False), self.wq, rec, w)
        return torch.nn.functional.linear(x, w, bias)


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
    if kind in ("q4_0", "q4_1", "q8_0"):
        q, s, m = ggml_blocks(w.q, kind, n, k)
        if kind == "q8_0":
            return Packed("int8", "post", n, k, 32, repack(q, "int8"), tile_records(torch.zeros_like(s), s),
                          None, origin)
        return Packed("int4", "pre", n, k, 32, repack(q, "int4"), tile_records(s, m), None, origin)
    return None


def ggml_blocks(data: torch.Tensor, kind: str, n: int, k: int):
    """ggml q4_0 / q4_1 / q8_0 rows [n, bytes] -> integer values [n, k] and per-32 (s, m) [n, k / 32]
    with value = q * s + m (q4_0: m = -8 s; q8_0: m = 0), as dsl.quant.gguf_dequantize reads them."""
    size = {"q4_0": 18, "q4_1": 20, "q8_0": 34}[kind]
    b = data.reshape(n, k // 32, size)
    s = b[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    if kind == "q8_0":
        return b[..., 2:].contiguous().view(torch.int8).reshape(n, k), s, torch.zeros_like(s)
    head = 2 if kind == "q4_0" else 4
    qs = b[..., head:]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).reshape(n, k)  # low nibbles: the first 16 values
    m = -8.0 * s if kind == "q4_0" else b[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return q, s, m
