"""State-space ops on the cuda backend (Exec.SSM): `causal_conv1d` (with the activation after it) and
`selective_scan` as generated kernels (codegen/ssm_kernels.py) over the state cache (runtime/state_cache.py).

The kernels read everything about the step on the device: its rows and contexts from the step metadata
every attention op shares (cu_seqlens, kv_lens), and each sequence's state slot from an int32 tensor
made here. An eager step uploads its slots once per forward (all the model's state-space steps share
them); a captured decode graph reads a static slot buffer of its size, which `fill` refreshes before
each replay (padding rows: slot -1, a zero state never written). So no step of this kind reads the
host, and a state-space model decodes through the CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from kiln.codegen import kernels as K
from kiln.codegen.fuse import Exec, KOp, ssm_fuse_enabled
from kiln.codegen.ssm_stack import POINTERS, PROBE_POINTS, Stack, find_stack
from kiln.dsl.plan import WeightArg, fetch

from .batch import StepBatch

# The fused conv + scan decode kernel as a programmatic dependent of the in_proj GEMV before it ("1"): its SSM state
# rows, conv weights and conv windows load while that GEMV drains, xbc and dt after its griddepcontrol.wait
# (templates/ssm_conv_scan.cu.j2). On since session 26: decode logits through the graphs bit-equal with it off
# (tests/gpu/test_ssm_kernels.py), and the Mamba-2 2.7B batch-1 step (H100, decode_back_to_back_ms) 2.919 -> 2.814 ms
# (-3.6%); "0": a plain launch. Read when a step runs (and is captured).
SSM_PDL = os.environ.get("KILN_SSM_PDL", "1")


class SsmSteps:
    """Every Exec.SSM step of a model: their contiguous weights, and the state slots of a step."""

    def __init__(self, model):
        self.model = model
        self.ops = [op for op in model.ops if op.kind is Exec.SSM]
        self.graph_slots: dict[int, torch.Tensor] = {}  # graph size -> [size] int32 slots (static buffers)
        self._host: dict[int, torch.Tensor] = {}  # graph size -> pinned staging of its slots
        self.num_slots: int | None = None  # the state store's, as last seen by a step (bounds `fill`)
        canonical: dict = {}  # a fused step's two fallback kernels: one compiled kernel per distinct spec
        for op in self.ops:  # the kernels read weights as dense rows (a reshaped conv weight may be a view)
            for a in (a for ins in op.instrs for a in ins.inputs):
                if isinstance(a, WeightArg) and a.name in model.weights:
                    model.weights[a.name] = model.weights[a.name].contiguous()
            if op.extra["op"] == "conv_scan":
                for k in ("conv", "scan"):
                    op.extra[k] = canonical.setdefault(op.extra[k].key(), op.extra[k])
        # The fused conv+scan kernel's per-(sequence, group) counters (zero between launches), for
        # max_batch sequences: allocated here, never inside a graph's capture (the graphs hold it).
        groups = max((op.spec.groups for op in self.ops if op.extra["op"] == "conv_scan"), default=0)
        self.fuse = ssm_fuse_enabled()
        self.counters = torch.zeros(max(model.max_batch, 1) * groups, dtype=torch.int32, device=model.device)
        self._retired: list[torch.Tensor] = []

    def __bool__(self) -> bool:
        return bool(self.ops)

    # -- the slots of a step ---------------------------------------------------------------
    def _slots(self, step) -> tuple[torch.Tensor, int]:
        """([S] int32 slots on the device, S): uploaded once per eager forward; a graph's own buffer."""
        cached = getattr(step, "ssm_slots", None)
        if cached is not None:
            return cached
        state = step.kv.state
        self.num_slots = state.num_slots
        if step.batch is not None:
            slots = state.slots(step.batch.seqs)  # checked: in range, one sequence per slot
            dev = torch.tensor(slots, dtype=torch.int32).pin_memory().to(self.model.device, non_blocking=True)
            cached = (dev, len(slots))
        else:  # inside a captured decode graph: one row per sequence, `fill` writes the slots
            size = step.T
            buf = self.graph_slots.get(size)
            if buf is None:
                buf = self.graph_slots[size] = torch.full((size,), -1, dtype=torch.int32, device=self.model.device)
                self._host[size] = torch.full((size,), -1, dtype=torch.int32).pin_memory()
            cached = (buf, size)
        step.ssm_slots = cached
        return cached

    def fill(self, batch: StepBatch, size: int) -> None:
        """Before a graph of `size` rows replays `batch`: its sequences' slots, then -1 (padding)."""
        buf = self.graph_slots.get(size)
        if buf is None:
            return  # the graph holds no state-space step
        slots = [s.state_slot for s in batch.seqs]
        bad = [x for x in slots if not 0 <= x < (self.num_slots or 0)]
        if bad or len(set(slots)) != len(slots):
            raise ValueError(f"state slots {slots}: each must be in [0, {self.num_slots}) and named once")
        host = self._host[size]
        host.fill_(-1)
        host[: len(slots)] = torch.tensor(slots, dtype=torch.int32)
        buf.copy_(host, non_blocking=True)

    # -- one step ------------------------------------------------------------------------------
    def __call__(self, op: KOp, env: dict, step, weights: dict) -> None:
        ins = op.instrs[0]
        meta, spec = step.meta, op.spec
        slots, S = self._slots(step)
        if op.extra["op"] == "conv_scan":
            self._conv_scan(op, env, step, weights, slots, S)
            return
        site = self.model.plan.state_sites[ins.state]
        args = [fetch(a, env, weights) for a in ins.inputs]
        x = args[0]
        out = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        if op.extra["op"] == "conv":
            state = step.kv.state.site(ins.state, site.shape, x.dtype, x.device)
            K.ssm_conv(spec, x, args[1], args[2], state, slots, meta.cu_seqlens, meta.kv_lens, out, S,
                        meta.max_q_len)
        else:
            state = step.kv.state.site(ins.state, site.shape, torch.float32, x.device)
            K.ssm_scan(spec, x, *args[1:], state, slots, meta.cu_seqlens, meta.kv_lens, out, S)
        env[op.outs[0]] = out

    def _conv_scan(self, op: KOp, env: dict, step, weights: dict, slots: torch.Tensor, S: int) -> None:
        """conv -> split -> scan (fuse.py's ssm_conv_scan): a decode step (every sequence one token, as a
        captured decode graph's) in one kernel; any other step as the conv kernel, then the scan kernel
        on views of its output."""
        conv, scan = op.instrs[0], op.instrs[-1]
        meta = step.meta
        xbc, conv_w, conv_b, dt, a_log, d, dt_bias = (fetch(a, env, weights) for a in op.ins)
        conv_state = step.kv.state.site(conv.state, self.model.plan.state_sites[conv.state].shape, xbc.dtype,
                                        xbc.device)
        state = step.kv.state.site(scan.state, self.model.plan.state_sites[scan.state].shape, torch.float32,
                                   xbc.device)
        spec = op.spec
        out = torch.empty(xbc.shape[0], spec.heads * spec.head_dim, dtype=xbc.dtype, device=xbc.device)
        if self.fuse and meta.decode:
            if self.counters.numel() < S * spec.groups:  # past max_batch: a larger buffer; a graph captured
                # with the old one keeps it (every launch leaves its counters at zero), so it stays alive
                self._retired.append(self.counters)
                self.counters = torch.zeros(max(S, self.model.max_batch) * spec.groups, dtype=torch.int32,
                                            device=xbc.device)
            if SSM_PDL not in ("0", "1"):
                raise K.KernelSpecError(f"KILN_SSM_PDL={SSM_PDL!r}: must be 0 or 1")
            K.ssm_conv_scan(spec, xbc, conv_w, conv_b, conv_state, dt, a_log, d, dt_bias, state, slots,
                            meta.cu_seqlens, meta.kv_lens, self.counters, out, S, pdl=SSM_PDL == "1")
        else:
            mid = torch.empty(xbc.shape[0], spec.channels, dtype=xbc.dtype, device=xbc.device)
            K.ssm_conv(op.extra["conv"], xbc, conv_w, conv_b, conv_state, slots, meta.cu_seqlens, meta.kv_lens,
                       mid, S, meta.max_q_len)
            xs, b, c = mid.split(list(op.extra["sizes"]), dim=1)
            K.ssm_scan(op.extra["scan"], xs, dt, a_log, b, c, d, dt_bias, state, slots, meta.cu_seqlens,
                       meta.kv_lens, out, S)
        env[op.outs[0]] = out


# Mamba-2's whole layer stack at one token as one persistent kernel (codegen/ssm_stack.py, templates/ssm_stack.cu.j2):
# "1" runs it for every batch-1 decode step it takes (SsmStack.takes), "0" (the default until a GPU has checked it
# against the step-by-step program: tests/gpu/test_ssm_stack.py) never. Read when a step runs (and is captured).
def stack_enabled() -> bool:
    v = os.environ.get("KILN_SSM_STACK", "0")
    if v not in ("0", "1"):
        raise K.KernelSpecError(f"KILN_SSM_STACK={v!r}: must be 0 or 1")
    return v == "1"


def stack_ring(spec):
    """spec with KILN_SSM_STACK_RING="STAGE_KB:INFLIGHT[:PF_AHEAD:PF_CYCLES]" applied (a tuning switch: the ring's
    stage size, the bulk copies a block keeps in flight, the L2 prefetches while the ring is full; unset:
    codegen/ssm_stack.py's defaults)."""
    v = os.environ.get("KILN_SSM_STACK_RING", "")
    if not v:
        return spec
    try:
        got = [int(x) for x in v.split(":")]
        if len(got) not in (2, 4):
            raise ValueError
    except ValueError:
        raise K.KernelSpecError(f"KILN_SSM_STACK_RING={v!r}: must be STAGE_KB:INFLIGHT[:PF_AHEAD:PF_CYCLES], e.g. "
                                f"20:1 or 20:1:8:1500") from None
    kb, inflight, pf_ahead, pf_cycles = got + [spec.pf_ahead, spec.pf_cycles][len(got) - 2:]
    return dataclasses.replace(spec, stage_bytes=kb * 1024, inflight=inflight, pf_ahead=pf_ahead, pf_cycles=pf_cycles)


class SsmStack:
    """The run of Mamba-2 layers `find_stack` found in a model's program (or `why` there is none), run at one token
    as one cooperative launch: the per-layer pointer table (one per state store it has run on, so that a captured
    graph keeps its own), and the kernel's scratch vectors, whose last two hold what the step after the run reads."""

    def __init__(self, model):
        self.model = model
        found = find_stack(model.ops, model.plan.program.output)
        self.stack: Stack | None = found if isinstance(found, Stack) else None
        self.why = found if isinstance(found, str) else ""
        if self.stack is not None:
            bad = [n for layer in self.stack.layers for n in (layer.in_proj, layer.out_proj)
                   if not isinstance(model._gemm[n][0], torch.Tensor) or not model._gemm[n][0].is_contiguous()]
            if bad:  # quantized (QGemm) or split weights: the kernel streams plain rows of the run dtype
                self.stack, self.why = None, f"step {bad[0]}: its weight is not one plain tensor"
        self._tables: dict[tuple, torch.Tensor] = {}
        self._buffers: tuple | None = None
        self.clocks: torch.Tensor | None = None  # the last probed launch's (KILN_SSM_STACK_PROBE=1)
        self.dumped: torch.Tensor | None = None  # the last dumped launch's (KILN_SSM_STACK_DUMP=1)

    @property
    def ran(self) -> bool:
        """Whether the kernel has run (eagerly, or in a graph's warm-up before its capture)."""
        return bool(self._tables)

    def takes(self, step, rows) -> bool:
        """Whether this step runs the stack: switched on, one decode token, nothing the kernel does not do (LoRA,
        a trace of every value, a gather of sampled rows inside the run other than of its one row), a Hopper GPU
        with a block an SM for every head."""
        s = self.stack
        if s is None or not stack_enabled() or step.T != 1 or not step.meta.decode or step.lora is not None \
                or step.traced or (rows is not None and rows.numel() != 1 and s.first <= self.model._rows_from < s.end):
            return False
        dev = self.model.device
        props = torch.cuda.get_device_properties(dev)
        return props.major >= 9 and s.spec.heads <= props.multi_processor_count

    def _table(self, step) -> torch.Tensor | None:
        """The [layers, len(POINTERS)] int64 pointer table for this step's state store (None: none yet, and the
        step is being captured, where it cannot be made)."""
        s, m, kv = self.stack, self.model, step.kv
        sites = self.model.plan.state_sites
        states = []
        for layer in s.layers:
            op = m.ops[layer.ssm]
            conv, scan = op.instrs[0].state, op.instrs[-1].state
            states.append((kv.state.site(conv, sites[conv].shape, m.dtype, m.device),
                           kv.state.site(scan, sites[scan].shape, torch.float32, m.device)))
        key = tuple(t.data_ptr() for pair in states for t in pair)
        table = self._tables.get(key)
        if table is not None or torch.cuda.is_current_stream_capturing():
            return table
        env: dict = {}
        rows = []
        for layer, (conv_state, state) in zip(s.layers, states):
            op = m.ops[layer.ssm]
            _, conv_w, conv_b, _, a_log, d, dt_bias = (fetch(a, env, m.weights) if isinstance(a, WeightArg) else None
                                                      for a in op.ins)
            named = dict(in_w=m._gemm[layer.in_proj][0], norm_w=fetch(layer.norm_w, env, m.weights), conv_w=conv_w,
                         conv_b=conv_b, a_log=a_log, d=d, dt_bias=dt_bias,
                         gnorm_w=fetch(layer.gnorm_w, env, m.weights), out_w=m._gemm[layer.out_proj][0],
                         conv_state=conv_state, state=state)
            for name, t in named.items():
                if t is not None and not t.is_contiguous():
                    raise K.KernelArgError(f"{name} of the layer at step {layer.in_proj}: not contiguous")
            rows.append([named[p].data_ptr() if named[p] is not None else 0 for p in POINTERS])
        table = self._tables[key] = torch.tensor(rows, dtype=torch.int64, device=m.device)
        return table

    def __call__(self, env: dict, step) -> bool:
        """The run's steps at this one-token step; False: nothing ran (its table cannot be made while capturing)."""
        s, m = self.stack, self.model
        table = self._table(step)
        if table is None:
            return False
        if self._buffers is None:
            sp = s.spec
            self._buffers = (torch.empty(sp.in_rows, dtype=m.dtype, device=m.device),
                             torch.empty(sp.d_inner, dtype=m.dtype, device=m.device),
                             torch.empty(1, sp.hidden, dtype=m.dtype, device=m.device),
                             torch.empty(1, sp.hidden, dtype=m.dtype, device=m.device),
                             torch.zeros(1, dtype=torch.int32, device=m.device))
        zx, yv, out_last, x_last, bar = self._buffers
        slots, _ = m._ssm._slots(step)
        spec, clocks, dump = stack_ring(s.spec), None, None
        if os.environ.get("KILN_SSM_STACK_PROBE", "0") == "1":  # each block's clock at each probe point of each layer,
            spec = dataclasses.replace(spec, probe=True)  # left in self.clocks (.ci/stack_probe.py; eager steps)
            sms = torch.cuda.get_device_properties(m.device).multi_processor_count
            clocks = self.clocks = torch.zeros(sms, spec.layers, len(PROBE_POINTS), dtype=torch.int64, device=m.device)
        if os.environ.get("KILN_SSM_STACK_FENCE", "0") == "1":  # every writer fences before a grid barrier (a
            spec = dataclasses.replace(spec, fence=True)  # diagnosis: .ci/stack_race.py)
        if os.environ.get("KILN_SSM_STACK_DUMP", "0") == "1":  # each layer's in_proj output, y, out_proj output, left
            spec = dataclasses.replace(spec, dump=True)  # in self.dumped (.ci/stack_diag.py; eager steps)
            dump = self.dumped = torch.full((spec.layers, spec.dump_row), float("nan"), dtype=m.dtype, device=m.device)
        K.ssm_stack(spec, table, env[s.x0], zx, yv, out_last, x_last, bar, slots, step.meta.kv_lens, clocks, dump)
        env[s.x_last] = x_last
        env[s.out_last] = out_last
        return True
