"""Mamba-2's layer stack at one token as one persistent kernel (templates/ssm_stack.cu.j2): the spec, its
rendering, and `find_stack`, which finds the run of steps in a kernel program that the kernel replaces.

Why: at batch 1 a Mamba-2 decode step is five small kernels a layer (the residual norm, in_proj, conv + scan, the
gated norm, out_proj), and each kernel boundary leaves DRAM idle while one kernel drains and the next fills the
machine: Mamba-2 2.7B took 1.40x its weight-streaming roofline on the H100 and 1.60x on the H200 (BENCHMARKS.md,
session 32). Weights never depend on the activations, so one resident block an SM can stream them layer after
layer through a ring of shared-memory stages while its consumer warps wait at the grid barriers that the data
dependencies need (three a layer). Session 33 measured this design at 1.33x on the H100 (BENCHMARKS.md, session 33).

The program the fusion pass makes of models/mamba2.kiln, a layer at a time (codegen/fuse.py):

    GEMM   in_proj, prologue rmsnorm (with the residual sum r = x + o from layer 1 on): [xbc; dt; z] = W_in h
    SSM    conv_scan (xbc, conv_w, conv_b, dt, a_log, d, dt_bias) -> y
    GEMM   out_proj, prologue the gated rmsnorm norm(y * act(z)) per group -> o

`find_stack` checks that shape step by step (sizes, flags, which value feeds which) and returns the run, or a
sentence saying why not; it reads only the program, so planning needs no GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.dsl.dtypes import RUN_DTYPES
from kiln.dsl.ops.elementwise import KERNEL_ACTIVATIONS
from kiln.dsl.plan import Value, WeightArg

from .fuse import Exec, KOp, step_reads
from .render import _RENDERERS, KernelSource, _emit, _name, f32
from .specs import _dtype, _fail, _positive, _Spec
from .ssm_kernels import SsmScanSpec

CONSUMER_WARPS = 8  # warps that compute; one more warp streams the weights (its lane 0)
STAGE_BYTES = 20 * 1024  # a ring stage: session 33's best (20 KB with one copy in flight beat 40 KB unbounded)
INFLIGHT = 1  # bulk copies a block keeps in flight (0: no limit); more queue the barriers' and scan's accesses
SMEM_LIMIT = 227 * 1024  # Hopper's per-block opt-in shared memory
MAX_STAGES = 16
MAX_GATE_GROUPS = 16
# The probe's points in a layer (SsmStackSpec.probe; .ci/stack_probe.py prints the phases between them)
PROBE_POINTS = ("start", "norm", "in_proj", "barrier 1", "conv + scan", "barrier 2", "gated norm", "out_proj",
                "barrier 3")
# The per-layer pointer table's columns, in this order (runtime/cuda_ssm.py SsmStack builds it)
POINTERS = ("in_w", "norm_w", "conv_w", "conv_b", "a_log", "d", "dt_bias", "gnorm_w", "out_w", "conv_state", "state")


@dataclass(frozen=True)
class SsmStackSpec(_Spec):
    """`layers` Mamba-2 layers at one token: hidden size `hidden`; in_proj's `in_rows` rows hold xbc, dt and z at
    xbc_off, dt_off and z_off; the conv + scan as SsmConvScanSpec's fields say; the gated norm over groups of
    `gate_group` features; out_proj [hidden, heads * head_dim]. No projection biases (refused by find_stack)."""

    layers: int
    hidden: int
    in_rows: int
    xbc_off: int
    dt_off: int
    z_off: int
    heads: int
    head_dim: int
    d_state: int
    groups: int
    kernel: int
    gate_group: int
    eps: float
    gate_eps: float
    act: str = "silu"  # after the conv
    gate: str = "silu"  # the gated norm's
    conv_bias: bool = True
    has_d: bool = True
    has_dt_bias: bool = True
    softplus: bool = True
    stage_bytes: int = STAGE_BYTES
    inflight: int = INFLIGHT
    # L2 prefetches while the ring is full: up to pf_ahead chunks past the last loaded, one per pf_cycles cycles at
    # most (0: none; unmeasured, so off)
    pf_ahead: int = 0
    pf_cycles: int = 0
    probe: bool = False  # consumer thread 0's clock at PROBE_POINTS of every layer into the kernel's `clocks` argument
    dump: bool = False  # each layer's in_proj output, y and out_proj output into the kernel's `dump` argument
    # every consumer thread fences its own writes before a grid barrier, not thread 0 alone (a diagnosis: session 35
    # saw reads after barrier 1 find in_proj rows not yet written, at random; KILN_SSM_STACK_FENCE=1)
    fence: bool = False

    @property
    def dump_row(self) -> int:
        """A layer's row of the dump: in_proj's output, then y, then out_proj's output."""
        return self.in_rows + self.d_inner + self.hidden
    dtype: str = "bf16"
    origin: str = ""

    def __post_init__(self):
        _positive(self, "layers", "hidden", "in_rows", "heads", "head_dim", "d_state", "groups", "kernel",
                  "gate_group", "stage_bytes")
        _dtype(self)
        isz = RUN_DTYPES[self.dtype].itemsize
        vec = 16 // isz
        if self.heads % self.groups:
            _fail(self, "groups", f"{self.groups} does not divide heads={self.heads}")
        if self.kernel < 2:
            _fail(self, "kernel", f"must be >= 2 (a width-1 conv keeps no state), got {self.kernel}")
        for f in ("act", "gate"):
            if getattr(self, f) not in KERNEL_ACTIVATIONS:
                _fail(self, f, f"must be one of {KERNEL_ACTIVATIONS}, got {getattr(self, f)!r}")
        # bulk copies move whole 16-byte units, and the GEMV rows are read as 16-byte vectors
        for f, n in (("hidden", self.hidden), ("heads", self.d_inner), ("gate_group", self.gate_group)):
            if n % vec:
                _fail(self, f, f"{n} features are not whole 16-byte vectors of {self.dtype}")
        if self.d_state % 4:
            _fail(self, "d_state", f"{self.d_state} fp32 state entries a row are not whole 16-byte units")
        if self.d_inner % self.gate_group:
            _fail(self, "gate_group", f"{self.gate_group} does not divide heads * head_dim = {self.d_inner}")
        if self.d_inner // self.gate_group > MAX_GATE_GROUPS:
            _fail(self, "gate_group", f"{self.d_inner // self.gate_group} groups: at most {MAX_GATE_GROUPS} (a sum "
                                      f"each held in registers)")
        # in_proj's rows: xbc, dt and z in some order, each slice at a 16-byte boundary (fuse.py's sibling GEMMs pad
        # the fused weight with zero rows between them), the last ending the weight
        spans = sorted([(self.xbc_off, self.channels), (self.dt_off, self.heads), (self.z_off, self.d_inner)])
        if spans[0][0] < 0 or any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
            _fail(self, "xbc_off", f"xbc, dt and z at {self.xbc_off}, {self.dt_off}, {self.z_off} overlap")
        end = spans[-1][0] + spans[-1][1]
        if self.in_rows != end:
            _fail(self, "in_rows", f"{self.in_rows}: the last of xbc, dt and z ends at row {end}")
        for f, row in (("hidden", self.hidden * isz), ("heads", self.d_inner * isz), ("d_state", self.d_state * 4)):
            if row > self.stage_bytes:
                _fail(self, "stage_bytes", f"{self.stage_bytes} bytes hold no row of {row} bytes ({f})")
        if self.stage_bytes % 128:
            _fail(self, "stage_bytes", f"must be a multiple of 128, got {self.stage_bytes}")
        for f in ("inflight", "pf_ahead", "pf_cycles"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                _fail(self, f, f"must be an int >= 0, got {getattr(self, f)!r}")
        stages = self.layout()["stages"]
        if stages < 2:
            _fail(self, "stage_bytes", f"{stages} stage(s) of {self.stage_bytes} bytes fit beside the rest of shared "
                                       f"memory; the ring needs 2")
        if self.inflight >= stages:
            _fail(self, "inflight", f"{self.inflight} copies in flight need more than the {stages} stages")

    @property
    def d_inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def channels(self) -> int:
        return self.d_inner + 2 * self.groups * self.d_state

    @property
    def lanes(self) -> int:
        """Lanes a state row (the fused conv + scan kernel's: the same order of sums, so the same y)."""
        return SsmScanSpec(self.heads, self.head_dim, self.d_state, self.groups).lanes

    def chunks(self) -> dict:
        """Rows a ring stage holds: in_proj rows, state rows (a head's split evenly), out_proj rows."""
        isz = RUN_DTYPES[self.dtype].itemsize
        per = self.stage_bytes // (self.d_state * 4)
        n_state = math.ceil(self.head_dim / per)
        return dict(in_chunk=self.stage_bytes // (self.hidden * isz), state_chunk=math.ceil(self.head_dim / n_state),
                    out_chunk=self.stage_bytes // (self.d_inner * isz))

    def layout(self) -> dict:
        """Dynamic shared memory: the ring first, then the barriers and the vectors (byte offsets)."""
        isz = RUN_DTYPES[self.dtype].itemsize
        hist = self.kernel - 1
        parts = [("act", max(self.hidden, self.d_inner) * isz),  # the GEMV input: h, then the gated norm's output
                 ("res", self.hidden * isz),  # this block's copy of the residual stream
                 ("bc", 2 * self.d_state * 4),  # its head's group's B and C
                 ("x", self.head_dim * 4),  # its head's x
                 ("keep", 2 * self.d_state * hist * 4),  # the group's new B/C conv windows
                 ("scratch", max(32, CONSUMER_WARPS * self.d_inner // self.gate_group) * 4)]
        fixed = sum(_up(n, 16) for _, n in parts)
        stages = min(MAX_STAGES, (SMEM_LIMIT - fixed - 2 * 8 * MAX_STAGES) // self.stage_bytes)
        off = {"ring": 0, "bars": stages * self.stage_bytes}
        at = off["bars"] + 2 * 8 * stages
        for name, n in parts:
            off[name] = at
            at += _up(n, 16)
        return dict(stages=stages, smem=at, **off)


def _up(n: int, m: int) -> int:
    return -(-n // m) * m


def _render(s: SsmStackSpec) -> KernelSource:
    lay, ch = s.layout(), s.chunks()
    isz = RUN_DTYPES[s.dtype].itemsize
    lanes = s.lanes
    threads = 32 * (CONSUMER_WARPS + 1)
    params = dict(
        layers=s.layers, hidden=s.hidden, in_rows=s.in_rows, xbc_off=s.xbc_off, dt_off=s.dt_off, z_off=s.z_off,
        heads=s.heads, head_dim=s.head_dim, d_state=s.d_state, groups=s.groups, heads_per_group=s.heads // s.groups,
        d_inner=s.d_inner, channels=s.channels, kernel=s.kernel, hist=s.kernel - 1, gate_group=s.gate_group,
        gate_groups=s.d_inner // s.gate_group, eps=f32(s.eps), gate_eps=f32(s.gate_eps),
        inv_hidden=f32(1.0 / s.hidden), inv_gate_group=f32(1.0 / s.gate_group), act=s.act, gate=s.gate,
        conv_bias=s.conv_bias, has_d=s.has_d, has_dt_bias=s.has_dt_bias, softplus=s.softplus,
        consumer_warps=CONSUMER_WARPS, consumer_threads=32 * CONSUMER_WARPS, threads=threads,
        vec=16 // isz, stage_bytes=s.stage_bytes, stages=lay["stages"], inflight=s.inflight, pf_ahead=s.pf_ahead,
        pf_cycles=s.pf_cycles, probe=s.probe, probe_points=len(PROBE_POINTS), dump=s.dump, dump_row=s.dump_row,
        fence=s.fence,
        state_chunks=math.ceil(s.head_dim / ch["state_chunk"]),
        conv_per_thread=math.ceil((s.head_dim + 2 * s.d_state) / (32 * CONSUMER_WARPS)),
        va=math.ceil(s.hidden // (16 // isz) / (32 * CONSUMER_WARPS)),  # a consumer thread's vectors of hidden
        vc=math.ceil(s.d_inner // (16 // isz) / (32 * CONSUMER_WARPS)),  # and of heads * head_dim
        z_vec=s.z_off % (16 // isz) == 0,
        in_row_bytes=s.hidden * isz, out_row_bytes=s.d_inner * isz, state_row_bytes=s.d_state * 4,
        lanes=lanes, per_lane=s.d_state // lanes, rows_per_pass=32 // lanes,
        shuffles=[lanes >> i for i in range(1, int(math.log2(lanes)) + 1)],
        pointers=list(enumerate(POINTERS)), n_pointers=len(POINTERS), col={p: i for i, p in enumerate(POINTERS)}, **ch,
        **{f"off_{k}": v for k, v in lay.items() if k not in ("stages", "smem")})
    name = _name(f"ssm_stack_l{s.layers}_h{s.hidden}_n{s.heads}x{s.head_dim}_s{s.d_state}_g{s.groups}", s)
    meta = dict(threads=threads, smem=lay["smem"], stages=lay["stages"], **ch)
    return _emit("ssm_stack.cu.j2", name, s, params, [name], meta)


_RENDERERS[SsmStackSpec] = _render


# ---- finding the run of steps the kernel replaces --------------------------------------------------------------

@dataclass(frozen=True)
class StackLayer:
    """One layer's steps (indices into the program) and the weights its pointer row names."""

    in_proj: int  # the in_proj GEMM step
    ssm: int  # the conv + scan step
    out_proj: int  # the out_proj GEMM step
    norm_w: WeightArg
    gnorm_w: WeightArg


@dataclass(frozen=True)
class Stack:
    """A run of Mamba-2 layers: steps [first, end) of the program, replaced at one token by one launch of `spec`.
    x0: layer 0's input; x_last and out_last: what the step at `end` reads (the last layer's input and its
    out_proj output)."""

    spec: SsmStackSpec
    first: int
    end: int
    layers: tuple[StackLayer, ...]
    x0: Value
    x_last: Value
    out_last: Value


def _norm_weight(pro: KOp) -> WeightArg | None:
    norm = pro.instrs[-1]
    return next((a for a in norm.inputs if isinstance(a, WeightArg)), None)


def _layer(ops: list[KOp], n: int, x: Value, o: Value | None) -> tuple[StackLayer, dict] | str:
    """The layer whose steps start at ops[n] with input x (and, from layer 1 on, out_proj output o to add to it):
    the layer and what its spec needs, or why ops[n:n + 3] is not one."""
    if n + 3 > len(ops):
        return f"step {n}: fewer than three steps left"
    a, s, c = ops[n:n + 3]
    pro = a.extra.get("prologue") if a.kind is Exec.GEMM else None
    if pro is None or pro.kind is not Exec.NORM:
        return f"step {n}: not a GEMM after a norm"
    p = pro.spec
    if p.kind != "rms" or p.gate or p.group or p.has_bias or p.weight_offset or p.amax or p.fp8_out:
        return f"step {n}: the norm before in_proj is not a plain RMSNorm ({p})"
    if p.has_residual != (o is not None) or list(pro.ins[:2 if o is not None else 1]) != ([x, o] if o is not None
                                                                                          else [x]):
        return f"step {n}: the norm does not read the layer's input" + (" and the last out_proj" if o else "")
    if any(k in a.extra for k in ("epilogue", "rope")) or a.collectives or len(a.extra["slices"]) != 3 \
            or any(b is not None for b in a.extra["biases"]):
        return f"step {n}: in_proj is not three bias-free slices (xbc, dt, z)"
    if s.kind is not Exec.SSM or s.extra.get("op") != "conv_scan":
        return f"step {n + 1}: not a fused conv + scan step"
    q = s.spec
    if q.a_per_state:
        return f"step {n + 1}: A per state (Mamba-1)"
    outs = a.extra["gemm"].outs
    if s.ins[0] not in outs or s.ins[3] not in outs:
        return f"step {n + 1}: the conv + scan does not read in_proj's xbc and dt"
    gpro = c.extra.get("prologue") if c.kind is Exec.GEMM else None
    if gpro is None or gpro.kind is not Exec.NORM or not gpro.spec.gate:
        return f"step {n + 2}: not a GEMM after a gated norm"
    g = gpro.spec
    if g.kind != "rms" or g.has_bias or g.weight_offset or g.has_residual or g.amax or g.fp8_out \
            or (g.group and g.group != g.hidden and not g.per_group_weight):
        return f"step {n + 2}: the gated norm is not a plain per-group RMSNorm ({g})"
    z = [v for v in outs if v not in (s.ins[0], s.ins[3])]
    if list(gpro.ins) != [s.outs[0], *z]:
        return f"step {n + 2}: the gated norm does not read the scan's y and in_proj's z"
    if any(k in c.extra for k in ("epilogue", "rope")) or c.collectives or len(c.extra["slices"]) != 1 \
            or any(b is not None for b in c.extra["biases"]) or a.collectives or s.collectives:
        return f"step {n + 2}: out_proj is not one bias-free GEMM"
    slices = dict(zip(outs, a.extra["slices"]))
    norm_w, gnorm_w = _norm_weight(pro), _norm_weight(gpro)
    if norm_w is None or gnorm_w is None:
        return f"step {n}: a norm without a weight"
    fields = dict(hidden=p.hidden, in_rows=max(at + w for at, w in a.extra["slices"]), xbc_off=slices[s.ins[0]][0],
                  dt_off=slices[s.ins[3]][0], z_off=slices[z[0]][0], heads=q.heads, head_dim=q.head_dim,
                  d_state=q.d_state, groups=q.groups, kernel=q.kernel, gate_group=g.group or g.hidden, eps=p.eps,
                  gate_eps=g.eps, act=q.act, gate=g.gate, conv_bias=q.has_bias, has_d=q.has_d,
                  has_dt_bias=q.has_dt_bias, softplus=q.softplus, dtype=q.dtype)
    if not q.act:
        return f"step {n + 1}: a conv without an activation"
    return StackLayer(n, n + 1, n + 2, norm_w, gnorm_w), fields


def find_stack(ops: list[KOp], output: Value) -> Stack | str:
    """The longest run of Mamba-2 layers (at least one) in the program, the first found; or why there is none.
    The run's values other than its last layer's input and out_proj output must be read by no later step."""
    why = "no step is an RMSNorm-prologue GEMM"
    for first, op in enumerate(ops):
        pro = op.extra.get("prologue") if op.kind is Exec.GEMM else None
        if pro is None or pro.kind is not Exec.NORM or pro.spec.has_residual or pro.spec.gate:
            continue
        x0 = pro.ins[0]
        layers, fields = [], None
        x, o, n = x0, None, first
        while True:
            got = _layer(ops, n, x, o)
            if isinstance(got, str):
                if not layers:
                    why = got
                break
            layer, f = got
            if fields is not None and f != fields:
                break  # a layer of another shape ends the run
            fields = f
            layers.append(layer)
            if o is not None:  # the residual sum this layer's norm made: the next layer's input
                x = ops[n].extra["prologue"].outs[1]
            o = ops[n + 2].extra["gemm"].outs[0]
            n += 3
        if not layers:
            continue
        end = first + 3 * len(layers)
        inside = {v for op in ops[first:end] for v in (*op.outs, *(v for i in op.instrs for v in i.outputs))}
        # the step at `end` must read the pair (x, o) as the next layer's norm would: x + o
        kept = {x, o}
        later = {v for op in ops[end:] for v in step_reads(op)} | {output}
        leaks = sorted(str(v) for v in (inside & later) - kept)
        if leaks:
            return f"steps {first}-{end - 1}: later steps read values inside the layers ({', '.join(leaks[:3])})"
        try:
            spec = SsmStackSpec(layers=len(layers), origin=ops[first + 1].spec.origin, **fields)
        except ValueError as e:
            return str(e)
        return Stack(spec, first, end, tuple(layers), x0, x, o)
    return why
