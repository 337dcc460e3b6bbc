"""State-space ops on the GPU (templates/ssm_conv.cu.j2, templates/ssm_scan.cu.j2, and for a decode
step of Mamba-2's conv -> split -> scan both in one kernel, templates/ssm_conv_scan.cu.j2): the specs and
their rendering. The launch wrappers, `ssm_conv` and `ssm_scan`, are in codegen/kernels.py with the
others: planning imports this module and must not need the CUDA driver. runtime/cuda_ssm.py runs
them as the `Exec.SSM` steps of the kernel program; the semantics are the op references of
dsl/ops/ssm.py (`causal_conv1d`, `selective_scan`).

Both kernels serve a step of mixed sequences (prefill chunks and decode tokens) with everything on the
device: the sequences' rows (cu_seqlens), their context (kv_lens - length: 0 starts from a zero state)
and their state slots (int32; negative: a padding row of a captured graph, which reads a zero state and
writes none). No host synchronisation and no allocation: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.dsl.ops.elementwise import KERNEL_ACTIVATIONS

from .render import _RENDERERS, KernelSource, _emit, _name
from .specs import _dtype, _fail, _positive, _Spec

CONV_THREADS = 128  # channels per conv block
CONV_TOKENS = 64  # tokens per conv block of a prefill chunk (blocks over a sequence's tokens run at once)
SCAN_THREADS = 128
FUSED_THREADS = 256  # the fused decode kernel's block
FUSED_ROWS = 32  # state rows per fused block (a target: the largest divisor of a group's rows up to it)


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


@dataclass(frozen=True)
class SsmConvScanSpec(_Spec):
    """A decode step (one new token per sequence) of Mamba-2's act(causal_conv1d([x; B; C])) -> split ->
    selective_scan in one kernel: `channels` = heads * head_dim + 2 * groups * d_state conv channels of
    `kernel` taps, then the scan as SsmScanSpec's. `block_rows`: state rows per block (a target)."""

    heads: int
    head_dim: int
    d_state: int
    groups: int = 1
    kernel: int = 4
    has_bias: bool = True
    act: str = ""
    a_per_state: bool = False
    has_d: bool = True
    has_dt_bias: bool = True
    softplus: bool = True
    block_rows: int = FUSED_ROWS
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "heads", "head_dim", "d_state", "groups", "kernel", "block_rows")
        _dtype(self)
        if self.heads % self.groups:
            _fail(self, "groups", f"{self.groups} does not divide heads={self.heads}")
        if self.kernel < 2:
            _fail(self, "kernel", f"must be >= 2 (a width-1 conv keeps no state), got {self.kernel}")
        if self.act and self.act not in KERNEL_ACTIVATIONS:
            _fail(self, "act", f"must be '' or one of {KERNEL_ACTIVATIONS}, got {self.act!r}")

    @classmethod
    def of(cls, conv: SsmConvSpec, scan: SsmScanSpec, origin: str) -> SsmConvScanSpec | None:
        """The fused spec of a conv (with its act) whose output splits into exactly the scan's x, B and C
        (channels = heads * head_dim + 2 * groups * d_state), None if it does not."""
        if conv.channels != scan.heads * scan.head_dim + 2 * scan.groups * scan.d_state or conv.dtype != scan.dtype:
            return None
        return cls(scan.heads, scan.head_dim, scan.d_state, scan.groups, conv.kernel, conv.has_bias, conv.act,
                   scan.a_per_state, scan.has_d, scan.has_dt_bias, scan.softplus, dtype=scan.dtype, origin=origin)

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim + 2 * self.groups * self.d_state

    @property
    def lanes(self) -> int:
        return SsmScanSpec(self.heads, self.head_dim, self.d_state, self.groups).lanes

    @property
    def rows_per_block(self) -> int:
        """The largest divisor of a group's rows up to block_rows: a block's rows share one group's B and C."""
        per_group = self.heads // self.groups * self.head_dim
        return max(n for n in range(1, min(per_group, self.block_rows) + 1) if per_group % n == 0)

    @property
    def threads(self) -> int:
        """Whole warps (every lane takes the shuffles): lane groups past the block's rows idle."""
        return min(FUSED_THREADS, -(-self.rows_per_block * self.lanes // 32) * 32)


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


def _conv_scan_render(s: SsmConvScanSpec) -> KernelSource:
    lanes, rb, threads = s.lanes, s.rows_per_block, s.threads
    rows = s.heads * s.head_dim
    lane_groups = threads // lanes
    prologue = rb + 2 * s.d_state  # conv channels a block computes: its rows' x, then its group's B and C
    params = dict(channels=s.channels, kernel=s.kernel, hist=s.kernel - 1, hist_m1=s.kernel - 2,
                  has_bias=s.has_bias, act=s.act,
                  heads=s.heads, head_dim=s.head_dim, d_state=s.d_state, groups=s.groups,
                  heads_per_group=s.heads // s.groups, a_per_state=s.a_per_state, has_d=s.has_d,
                  has_dt_bias=s.has_dt_bias, softplus=s.softplus, lanes=lanes, per_lane=s.d_state // lanes,
                  rows=rows, rows_per_group=rows // s.groups, rb=rb, blocks_per_group=rows // s.groups // rb,
                  threads=threads, lane_groups=lane_groups, rows_per_lane_group=-(-rb // lane_groups),
                  prologue=prologue, per_thread=-(-prologue // threads),
                  shuffles=[lanes >> i for i in range(1, int(math.log2(lanes)) + 1)],
                  state_row=s.d_state, state_slot=rows * s.d_state,
                  a_len=s.d_state // lanes if s.a_per_state else 1, a_index="j" if s.a_per_state else "0")
    name = _name(f"ssm_conv_scan_h{s.heads}_p{s.head_dim}_n{s.d_state}_g{s.groups}_k{s.kernel}"
                 f"{'_' + s.act if s.act else ''}", s)
    meta = dict(threads=threads, lanes=lanes, rows_per_block=rb, blocks=rows // rb)
    return _emit("ssm_conv_scan.cu.j2", name, s, params, [name], meta)


_RENDERERS[SsmConvSpec] = _conv_render
_RENDERERS[SsmScanSpec] = _scan_render
_RENDERERS[SsmConvScanSpec] = _conv_scan_render
