"""State-space ops on the GPU (templates/ssm_conv.cu.j2, templates/ssm_scan.cu.j2): the specs, their
rendering and the launch wrappers. runtime/cuda_ssm.py runs them as the `Exec.SSM` steps of the kernel
program; the semantics are the op references of dsl/ops/ssm.py (`causal_conv1d`, `selective_scan`).

Both kernels serve a step of mixed sequences (prefill chunks and decode tokens) with everything on the
device: the sequences' rows (cu_seqlens), their context (kv_lens - length: 0 starts from a zero state)
and their state slots (int32; negative: a padding row of a captured graph, which reads a zero state and
writes none). No host synchronisation and no allocation: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from kiln.dsl.ops.elementwise import KERNEL_ACTIVATIONS

from .kernels import KernelArgError, _check, _rows, _torch_dtype
from .launch import get_kernel, i64, ptr
from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _dtype, _fail, _positive, _Spec

CONV_THREADS = 128  # channels per conv block
CONV_TOKENS = 64  # tokens per conv block of a prefill chunk (blocks over a sequence's tokens run at once)
SCAN_THREADS = 128


@dataclass(frozen=True)
class SsmConvSpec(_Spec):
    """causal_conv1d over `channels` with a kernel of `kernel` taps (a rolling state of kernel - 1 inputs
    per channel, run dtype), an optional bias, and `act` (a Kiln activation, "" for none) fused after."""

    channels: int
    kernel: int
    has_bias: bool = True
    act: str = ""
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "channels", "kernel")
        _dtype(self)
        if self.kernel < 2:
            _fail(self, "kernel", f"must be >= 2 (a width-1 conv keeps no state), got {self.kernel}")
        if self.kernel - 1 > CONV_TOKENS:
            _fail(self, "kernel", f"must be <= {CONV_TOKENS + 1} (the state lies in a block's first tokens)")
        if self.act and self.act not in KERNEL_ACTIVATIONS:
            _fail(self, "act", f"must be '' or one of {KERNEL_ACTIVATIONS}, got {self.act!r}")


@dataclass(frozen=True)
class SsmScanSpec(_Spec):
    """selective_scan: `heads` heads of `head_dim` rows, each row a state of `d_state` (fp32), B/C per
    one of `groups` groups; A_log per head (Mamba-2) or per head and state (`a_per_state`, Mamba-1)."""

    heads: int
    head_dim: int
    d_state: int
    groups: int = 1
    a_per_state: bool = False
    has_d: bool = True
    has_dt_bias: bool = True
    softplus: bool = True
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "heads", "head_dim", "d_state", "groups")
        _dtype(self)
        if self.heads % self.groups:
            _fail(self, "groups", f"{self.groups} does not divide heads={self.heads}")

    @property
    def lanes(self) -> int:
        """Lanes sharing one state row (a power of 2, at most a warp, dividing d_state)."""
        n = 32
        while self.d_state % n:
            n //= 2
        return n


def _conv_render(s: SsmConvSpec) -> KernelSource:
    params = dict(channels=s.channels, kernel=s.kernel, hist=s.kernel - 1, hist_m1=s.kernel - 2, has_bias=s.has_bias,
                  act=s.act, threads=CONV_THREADS, tokens=CONV_TOKENS)
    name = _name(f"ssm_conv_c{s.channels}_k{s.kernel}{'_' + s.act if s.act else ''}", s)
    return _emit("ssm_conv.cu.j2", name, s, params, [name], dict(threads=CONV_THREADS, tokens=CONV_TOKENS))


def _scan_render(s: SsmScanSpec) -> KernelSource:
    lanes = s.lanes
    rows = s.heads * s.head_dim
    rows_per_block = SCAN_THREADS // lanes
    params = dict(heads=s.heads, head_dim=s.head_dim, d_state=s.d_state, groups=s.groups,
                  heads_per_group=s.heads // s.groups, a_per_state=s.a_per_state, has_d=s.has_d,
                  has_dt_bias=s.has_dt_bias, softplus=s.softplus, lanes=lanes, per_lane=s.d_state // lanes,
                  rows=rows, rows_per_block=rows_per_block, threads=SCAN_THREADS,
                  shuffles=[lanes >> i for i in range(1, int(math.log2(lanes)) + 1)],
                  state_row=s.d_state, state_slot=rows * s.d_state,
                  a_len=s.d_state // lanes if s.a_per_state else 1, a_index="j" if s.a_per_state else "0")
    name = _name(f"ssm_scan_h{s.heads}_p{s.head_dim}_n{s.d_state}_g{s.groups}", s)
    meta = dict(threads=SCAN_THREADS, lanes=lanes, rows_per_block=rows_per_block,
                blocks=math.ceil(rows / rows_per_block))
    return _emit("ssm_scan.cu.j2", name, s, params, [name], meta)


_RENDERERS[SsmConvSpec] = _conv_render
_RENDERERS[SsmScanSpec] = _scan_render


def _step_meta(slots, cu_seqlens, kv_lens, num_seqs: int, dev):
    """The step's per-sequence tensors (at least num_seqs entries; cu_seqlens num_seqs + 1), all int32."""
    if num_seqs < 1:
        raise KernelArgError(f"num_seqs: must be >= 1, got {num_seqs}")
    for name, t, n in (("slots", slots, num_seqs), ("cu_seqlens", cu_seqlens, num_seqs + 1),
                       ("kv_lens", kv_lens, num_seqs)):
        _check(name, t, torch.int32, device=dev, aligned=False)
        if t.dim() != 1 or t.shape[0] < n:
            raise KernelArgError(f"{name}: shape {tuple(t.shape)}, expected at least [{n}]")
    return [ptr(slots), ptr(cu_seqlens), ptr(kv_lens)]


def ssm_conv(spec: SsmConvSpec, x, weight, bias, state, slots, cu_seqlens, kv_lens, out, num_seqs: int,
             max_len: int):
    """out = act(causal_conv1d(x)) for the rows cu_seqlens[s]:cu_seqlens[s + 1] of each sequence s, its
    history from state[slots[s]] ([num_slots, channels, kernel - 1], run dtype) when it has context;
    the slot then holds its last kernel - 1 inputs. x [T, channels] (row-strided), weight [channels,
    kernel], bias [channels], out [T, channels]; max_len: a host bound on the sequences' lengths."""
    dt, C, K = _torch_dtype(spec), spec.channels, spec.kernel
    dev = x.device
    _rows("x", x, dt, C, dev, align=x.element_size())
    T = x.shape[0]
    _check("weight", weight, dt, (C, K), dev, aligned=False)  # read element by element
    if spec.has_bias:
        _check("bias", bias, dt, (C,), dev, aligned=False)
    _check("state", state, dt, device=dev)
    if state.dim() != 3 or tuple(state.shape[1:]) != (C, K - 1):
        raise KernelArgError(f"state: shape {tuple(state.shape)}, expected [slots, {C}, {K - 1}]")
    _check("out", out, dt, (T, C), dev)
    meta = _step_meta(slots, cu_seqlens, kv_lens, num_seqs, dev)
    kern = get_kernel(spec, dev)
    grid = (math.ceil(C / CONV_THREADS), num_seqs, max(1, math.ceil(max_len / CONV_TOKENS)))
    kern.launch(kern.source.entries[0], grid, (CONV_THREADS,),
                [ptr(x), i64(x.stride(0)), ptr(weight), ptr(bias if spec.has_bias else None), ptr(state), *meta,
                 ptr(out)])


def ssm_scan(spec: SsmScanSpec, x, dt_in, a_log, b, c, d, dt_bias, state, slots, cu_seqlens, kv_lens, out,
             num_seqs: int):
    """out = selective_scan(x, dt, A_log, B, C, D, dt_bias) over each sequence's rows (as ssm_conv's),
    starting from state[slots[s]] ([num_slots, heads, head_dim, d_state] fp32) when it has context, which
    then holds the state after its last token. x [T, heads * head_dim], dt [T, heads], b and c
    [T, groups * d_state] (all row-strided); a_log [heads] or [heads, d_state]; d, dt_bias [heads];
    out [T, heads * head_dim]."""
    rd, s = _torch_dtype(spec), spec
    dev = x.device
    HP, GN = s.heads * s.head_dim, s.groups * s.d_state
    _rows("x", x, rd, HP, dev, align=x.element_size())
    T = x.shape[0]
    for name, t, cols in (("dt", dt_in, s.heads), ("b", b, GN), ("c", c, GN)):
        _rows(name, t, rd, cols, dev, align=t.element_size())
        if t.shape[0] != T:
            raise KernelArgError(f"{name}: {t.shape[0]} rows, x has {T}")
    _check("a_log", a_log, rd, (s.heads, s.d_state) if s.a_per_state else (s.heads,), dev, aligned=False)
    if s.has_d:
        _check("d", d, rd, (s.heads,), dev, aligned=False)
    if s.has_dt_bias:
        _check("dt_bias", dt_bias, rd, (s.heads,), dev, aligned=False)
    _check("state", state, torch.float32, device=dev)
    if state.dim() != 4 or tuple(state.shape[1:]) != (s.heads, s.head_dim, s.d_state):
        raise KernelArgError(f"state: shape {tuple(state.shape)}, expected [slots, {s.heads}, {s.head_dim}, "
                             f"{s.d_state}]")
    _check("out", out, rd, (T, HP), dev)
    meta = _step_meta(slots, cu_seqlens, kv_lens, num_seqs, dev)
    kern = get_kernel(spec, dev)
    km = kern.source.meta
    kern.launch(kern.source.entries[0], (km["blocks"], num_seqs), (km["threads"],),
                [ptr(x), i64(x.stride(0)), ptr(dt_in), i64(dt_in.stride(0)), ptr(a_log), ptr(b), i64(b.stride(0)),
                 ptr(c), i64(c.stride(0)), ptr(d if s.has_d else None), ptr(dt_bias if s.has_dt_bias else None),
                 ptr(state), *meta, ptr(out)])
