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

import os

import torch
from kiln.codegen import kernels as K
from kiln.codegen.fuse import Exec, KOp, ssm_fuse_enabled
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
