"""Fusion pass: a checked Plan -> the kernel program the `cuda` backend runs.

First the fusion patterns (`PATTERNS`) claim groups of instructions; each fused group must
compute exactly what its instructions' op references compute in sequence (its `semantics`),
and each needs its intermediates to have no other use, so fusing never changes what any other
op sees. Every instruction no pattern took is lowered by its own op definition's `cuda`
(dsl/ops): a generated kernel, a cuBLAS GEMM, or its torch reference. Each step keeps the
instructions it covers, so generated code names the spec op it came from.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from kiln.dsl.ops import OPS, Gemm, Kernel, KernelCall, OpKind, Torch, activation_of
from kiln.dsl.ops.elementwise import KERNEL_ACTIVATIONS
from kiln.dsl.ops.rope import kernel_constants as rope_constants
from kiln.dsl.plan import Instr, Plan, Value, WeightArg

from . import specs as ks
from . import ssm_kernels


class Exec(enum.Enum):
    """How the cuda backend runs one step of the kernel program (runtime/cuda_backend.py's table)."""

    GEMM = "gemm"  # cuBLAS, over the concatenated weights of sibling linears
    NORM = "norm"
    ATTENTION = "attention"  # rope + paged KV write, then paged decode / varlen prefill attention
    ACT = "act"
    EMBED = "embed"
    MAP = "map"
    MOE = "moe"  # router (torch), then the experts as grouped GEMMs over token copies sorted by expert
    SSM = "ssm"  # a state-space op (conv, with its activation; scan) on its state slots (runtime/cuda_ssm.py)
    TORCH = "torch"  # the op definition's reference, on the GPU


@dataclass
class KOp:
    kind: Exec
    ins: tuple[Value | WeightArg | None, ...]
    outs: tuple[Value, ...]
    instrs: tuple[Instr, ...]
    spec: Any = None  # the kernel spec (attention: (RopeCacheSpec, DecodeAttnSpec, PrefillAttnSpec))
    extra: dict = field(default_factory=dict)
    # (output, "all_reduce" | "all_gather") for each output the shard pass placed a collective after
    # (plan.collectives): the backend applies it to that output right after this step runs
    collectives: tuple[tuple[Value, str], ...] = ()


def origin(instr: Instr) -> str:
    return f"{Path(instr.op.pos.file).name}:{instr.op.pos.line} {instr.op.text}"


class _Program:
    """The instruction list with its use counts, producers and consumers, and what is claimed."""

    def __init__(self, plan: Plan, dtype: torch.dtype, page_size: int):
        self.plan, self.dtype, self.page_size = plan, dtype, page_size
        self.dt = ks.dtype_name(dtype)
        self.instrs = plan.program.instrs
        self.pos = {id(ins): n for n, ins in enumerate(self.instrs)}
        self.uses: Counter = Counter(a for ins in self.instrs for a in ins.inputs if isinstance(a, Value))
        self.uses[plan.program.output] += 1
        self.users: dict[Value, list[int]] = {}
        for n, ins in enumerate(self.instrs):
            for a in ins.inputs:
                if isinstance(a, Value):
                    self.users.setdefault(a, []).append(n)
        self.producer = {o: ins for ins in self.instrs for o in ins.outputs}
        self.anchor: dict[int, KOp] = {}  # instruction position -> the step emitted there
        self.covered: set[int] = set()
        # values a collective follows (tensor parallelism): each must leave its step whole (an output
        # of the step, read by none of its other instructions), so the collective runs between steps
        self.collective = {c.value: c.kind for c in plan.collectives if c.kind != "send"}

    def claim(self, op: KOp, at: Instr) -> bool:
        """Emit `op` at `at`, unless it would hide a collective's value inside it (False: nothing claimed;
        its instructions stay free for the other patterns and the single-op lowering)."""
        if self.collective:
            inner = {a for i in op.instrs for a in i.inputs if isinstance(a, Value)}
            mine = [o for i in op.instrs for o in i.outputs if o in self.collective]
            if any(o not in op.outs or o in inner for o in mine):
                return False
            op.collectives = tuple((o, self.collective[o]) for o in op.outs if o in self.collective)
        self.anchor[self.pos[id(at)]] = op
        self.covered.update(id(i) for i in op.instrs)
        return True

    def free(self, *xs: Instr | None) -> bool:
        return all(x is not None and id(x) not in self.covered for x in xs)

    def feeds_only(self, producer: Instr | None, value: Value) -> bool:
        return self.free(producer) and self.uses[value] == 1

    def width(self, v: Value) -> int:
        return self.plan.types[v].shape[1]


@dataclass(frozen=True)
class Pattern:
    name: str
    semantics: str  # what the fused step computes, in the ops' own terms: it must equal that
    apply: Callable[[_Program], None]


def _sibling_gemms(p: _Program) -> None:
    groups: dict[tuple, list[Instr]] = {}
    for ins in p.instrs:
        if ins.kind is OpKind.LINEAR:
            # Siblings share one GEMM only if their weights are stored alike (one quantized format).
            quant = p.plan.weights[ins.inputs[1].name].quant
            # an output a collective follows is a GEMM of its own (reduced in place, whole)
            alone = ins.out if ins.out in p.collective else None
            groups.setdefault((ins.inputs[0], ins.inputs[2] is None, quant, alone), []).append(ins)
    for group in groups.values():
        fused = "gemm__" + "__".join(g.out.id.replace("/", "_") for g in group) if len(group) > 1 else None
        widths = [p.width(g.out) for g in group]
        # Each output starts on a 16-byte boundary of the fused row (zero rows pad the weight), so
        # kernels that read its slices with 16-byte vectors (gated activations, rotary) can.
        align = 16 // ks.RUN_DTYPES[p.dt].itemsize
        starts = [0]
        for w in widths[:-1]:
            starts.append(-(-(starts[-1] + w) // align) * align)
        p.claim(KOp(Exec.GEMM, (group[0].inputs[0],), tuple(g.out for g in group), tuple(group),
                    extra={"weights": tuple(g.inputs[1] for g in group), "biases": tuple(g.inputs[2] for g in group),
                           "fused": fused, "slices": tuple(zip(starts, widths))}), group[0])


def _rope_attention(p: _Program) -> None:
    for ins in p.instrs:
        if ins.kind is not OpKind.ATTENTION:
            continue
        q, k, v = ins.inputs
        qr, kr = p.producer.get(q), p.producer.get(k)
        roped = p.feeds_only(qr, q) and p.feeds_only(kr, k) and qr.kind is kr.kind is OpKind.ROPE \
            and qr.attrs == kr.attrs
        call = OPS[ins.kind].cuda(ins, p.plan, p.dtype)
        if not isinstance(call, KernelCall):
            continue  # the attention lowers itself (Torch: e.g. v heads narrower than q/k's): nothing to fuse
        c = dict(call.constants)
        causal = c.pop("causal")
        site = p.plan.sites[ins.site]
        if site.kv_dtype not in ("run", "fp8", "fp8-rotated"):
            raise ks.KernelSpecError(f"attention site {site.index}: no kernels for a {site.kv_dtype} KV cache")
        # fp8-rotated (runtime/kv_store.py): only the rotary + KV write differs (and a turn back after the attention);
        # its keys' shift leaves softmax alone, but not a soft-cap applied before it
        rotated = site.kv_dtype == "fp8-rotated"
        if rotated and c.get("softcap"):
            raise ks.KernelSpecError(f"attention site {site.index}: --kv-cache-dtype fp8-rotated shifts the keys, "
                                     f"which changes a logit soft-cap's scores (use fp8, or --backend reference)")
        fp8 = site.kv_dtype != "run"  # the site's pages hold E4M3 (scaled): every kernel reads / writes them so
        common = dict(c, page_size=p.page_size, dtype=p.dt, kv_fp8=fp8, origin=origin(ins))
        rope = dict(rope_constants(qr.attrs)) if roped else dict(rotary_dim=0)
        rope_spec = ks.RopeCacheSpec(heads=site.heads, kv_heads=site.kv_heads, head_dim=c["head_dim"],
                                     page_size=p.page_size, dtype=p.dt, kv_fp8=fp8, kv_rotated=rotated,
                                     origin=origin(ins), **rope)
        p.claim(KOp(Exec.ATTENTION, (qr.inputs[0] if roped else q, kr.inputs[0] if roped else k, v), ins.outputs,
                    (qr, kr, ins) if roped else (ins,),
                    (rope_spec, ks.DecodeAttnSpec(**common), ks.PrefillAttnSpec(causal=causal, **common)),
                    extra={"site": ins.site}), ins)


def _residual_norm(p: _Program) -> None:
    for ins in p.instrs:
        if ins.kind not in (OpKind.RMSNORM, OpKind.LAYERNORM) or not p.free(ins):
            continue
        call = OPS[ins.kind].cuda(ins, p.plan, p.dtype)
        if not isinstance(call, KernelCall):
            continue
        x = ins.inputs[0]
        add = p.producer.get(x)
        types = p.plan.types
        # Fuse the add only if nothing between it and the norm reads its result.
        fused = p.free(add) and add.kind is OpKind.ADD and types[add.inputs[0]] == types[add.inputs[1]] and \
            all(u >= p.pos[id(ins)] for u in p.users.get(x, []))
        spec = ks.NormSpec(**call.constants, has_residual=fused, dtype=p.dt, origin=origin(ins))
        p.claim(KOp(Exec.NORM, (add.inputs[0], add.inputs[1]) if fused else (x,),
                    (ins.out, x) if fused else ins.outputs, (add, ins) if fused else (ins,), spec,
                    extra={"weight": ins.inputs[1], "bias": ins.inputs[2] if ins.kind is OpKind.LAYERNORM else None}),
                ins)


def _gated_act(p: _Program) -> None:
    for ins in p.instrs:
        if ins.kind is not OpKind.MUL:
            continue
        act = p.producer.get(ins.inputs[0])
        same = p.plan.types[ins.inputs[0]] == p.plan.types[ins.inputs[1]]  # not a [T, 1] scalar times a row
        if same and p.feeds_only(act, ins.inputs[0]) and activation_of(act) in KERNEL_ACTIVATIONS:
            spec = ks.ActSpec(activation_of(act), True, p.width(ins.out), dtype=p.dt, origin=origin(ins))
            p.claim(KOp(Exec.ACT, (act.inputs[0], ins.inputs[1]), ins.outputs, (act, ins), spec), ins)


def _ssm_conv_act(p: _Program) -> None:
    for ins in p.instrs:
        if ins.kind is not OpKind.CAUSAL_CONV1D or not p.free(ins):
            continue
        users = p.users.get(ins.out, [])
        act = p.instrs[users[0]] if len(users) == 1 else None
        if act is not None and p.feeds_only(ins, ins.out) and p.free(act) and len(act.inputs) == 1 \
                and activation_of(act) in KERNEL_ACTIVATIONS:
            op = _ssm(p, ins, activation_of(act))
            if op is not None:
                p.claim(KOp(Exec.SSM, op.ins, act.outputs, (ins, act), op.spec, op.extra), act)


def ssm_fuse_enabled() -> bool:
    """Mamba-2's conv and scan as one decode kernel (codegen/ssm_kernels.py SsmConvScanSpec): on by default
    since session 18, KILN_SSM_FUSE=0 off. On the H200 the 2.7B batch-1 step on the GPU (bench latency's
    decode_back_to_back_ms, benchmarks/2026-12-04-05.md session 18) took 2.327 / 2.326 ms with it against
    2.354 / 2.355 without, alternating in one call. Session 8's per-step events (host jitter included) had shown
    it slower, 2.789 against 2.649 ms (benchmarks/2026-12-02-03.md); the kernel alone was 1.13x the two at batch 1,
    0.98x at batch 64."""
    v = os.environ.get("KILN_SSM_FUSE") or "1"
    if v not in ("0", "1"):
        raise ks.KernelSpecError(f"KILN_SSM_FUSE={v!r}: must be 0 or 1")
    return v == "1"


def _ssm_conv_scan(p: _Program) -> None:
    """xs, b, c = split(act(causal_conv1d(x, w, cb))); y = selective_scan(xs, dt, a_log, b, c, ...) (Mamba-2),
    the split's parts read by the scan alone, as its x, B and C: one Exec.SSM step, extra "op" "conv_scan",
    spec the fused decode kernel's (codegen/ssm_kernels.SsmConvScanSpec), extra "conv" and "scan" the two
    kernels' specs, which run a step with a longer sequence (prefill, mixed) as before. Only with
    KILN_SSM_FUSE=1 (ssm_fuse_enabled); otherwise left to ssm_conv_act and the scan's own step."""
    if not ssm_fuse_enabled():
        return
    for scan in p.instrs:
        if scan.kind is not OpKind.SELECTIVE_SCAN or not p.free(scan) or not isinstance(scan.inputs[0], Value):
            continue
        split = p.producer.get(scan.inputs[0])
        if not p.free(split) or split.kind is not OpKind.SPLIT or len(split.outputs) != 3 \
                or (scan.inputs[0], scan.inputs[3], scan.inputs[4]) != split.outputs \
                or any(p.uses[o] != 1 for o in split.outputs):
            continue
        act = p.producer.get(split.inputs[0])
        if not p.feeds_only(act, split.inputs[0]) or len(act.inputs) != 1 \
                or activation_of(act) not in KERNEL_ACTIVATIONS:
            continue
        conv = p.producer.get(act.inputs[0])
        if not p.feeds_only(conv, act.inputs[0]) or conv.kind is not OpKind.CAUSAL_CONV1D:
            continue
        conv_op, scan_op = _ssm(p, conv, activation_of(act)), _ssm(p, scan)
        if conv_op is None or scan_op is None:
            continue
        spec = ssm_kernels.SsmConvScanSpec.of(conv_op.spec, scan_op.spec, f"{origin(conv)} -> {origin(scan)}")
        if spec is None:  # the split is not [x; B; C] as the scan reads them
            continue
        p.claim(KOp(Exec.SSM, (*conv.inputs, *scan.inputs[1:3], *scan.inputs[5:]), scan.outputs,
                    (conv, act, split, scan), spec,
                    extra={"op": "conv_scan", "conv": conv_op.spec, "scan": scan_op.spec,
                           "sizes": tuple(split.attrs.sizes)}), scan)


def _gated_norm(p: _Program) -> None:
    """norm(y * act(z)) (Mamba-2's gated RMSNorm): the norm kernel reads y and z, rounds act(z) and
    the product to the run dtype where the activation and the mul would, and normalises; the
    product and act(z) never reach memory."""
    for ins in p.instrs:
        if ins.kind not in (OpKind.RMSNORM, OpKind.LAYERNORM) or not p.free(ins):
            continue
        call = OPS[ins.kind].cuda(ins, p.plan, p.dtype)
        mul = p.producer.get(ins.inputs[0])
        if not isinstance(call, KernelCall) or not p.feeds_only(mul, ins.inputs[0]) or mul.kind is not OpKind.MUL \
                or p.plan.types[mul.inputs[0]] != p.plan.types[mul.inputs[1]]:  # not a [T, 1] gate times a row
            continue
        for side in (1, 0):  # y * act(z), or act(z) * y
            act = p.producer.get(mul.inputs[side])
            kind = activation_of(act)
            if kind in KERNEL_ACTIVATIONS and p.feeds_only(act, mul.inputs[side]) and len(act.inputs) == 1:
                spec = ks.NormSpec(**call.constants, has_residual=False, gate=kind, dtype=p.dt, origin=origin(ins))
                p.claim(KOp(Exec.NORM, (mul.inputs[1 - side], act.inputs[0]), ins.outputs, (act, mul, ins), spec,
                            extra={"weight": ins.inputs[1],
                                   "bias": ins.inputs[2] if ins.kind is OpKind.LAYERNORM else None}), ins)
                break


def _gemv_prologue(p: _Program) -> None:
    """A norm step (rms: plain, residual or gated) or a gated activation step whose output x feeds
    one GEMM step only (its sibling linears' shared x, nothing else) becomes that GEMM step's
    prologue: one Exec.GEMM step, extra "prologue" (the norm / act step, its spec) and "gemm" (the
    GEMM step as it was), run where the prologue stood. Its outputs: the GEMM's, then the
    prologue's others (the residual sum r). At a few rows the cuda backend runs it as one GEMV launch
    that forms x per chunk (codegen/gemv.py); otherwise the two steps as before. Runs on the steps
    the other patterns made, so it comes last: an ungated RMSNorm also joins a GEMM step that has an
    epilogue (the gated activation's, gemv_epilogue; "gemm" is then that step) or a rotary link (gemv_rope),
    so that the norm, the GEMV and the step after it are one launch."""
    made = {o: n for n, op in p.anchor.items() for o in op.outs}
    for n, gemm in sorted(p.anchor.items()):
        if gemm.kind is not Exec.GEMM or gemm.ins[0] not in made:
            continue
        x, m = gemm.ins[0], made[gemm.ins[0]]
        pro = p.anchor.get(m)
        if pro is None or pro.outs[0] != x or pro.collectives or not _prologue_kind(pro):
            continue
        if "epilogue" in gemm.extra and not (pro.kind is Exec.NORM and not pro.spec.gate):
            continue  # before a GEMV with an epilogue: an ungated RMSNorm only (codegen/gemv.py)
        # x leaves nowhere else: only the sibling linears read it (once each), and it is no output
        if p.uses[x] != sum(a == x for i in gemm.instrs for a in i.inputs):
            continue
        if any(p.plan.weights[w.name].quant.quantized for w in gemm.extra["weights"]):
            continue  # quantized weights: their own GEMV / GEMM, which take x from memory
        fused = KOp(Exec.GEMM, pro.ins, gemm.outs + pro.outs[1:], pro.instrs + gemm.instrs,
                    extra=dict(gemm.extra, prologue=pro, gemm=gemm))
        del p.anchor[n], p.anchor[m]
        if not p.claim(fused, p.instrs[m]):  # a collective would fall inside: leave both as they were
            p.anchor[n], p.anchor[m] = gemm, pro


def _gemv_epilogue(p: _Program) -> None:
    """A gated activation step act(g) * u whose g and u are the two outputs of one GEMM step (two sibling
    linears of one x) that nothing else reads becomes that GEMM step's epilogue: one Exec.GEMM step, extra
    "epilogue" (the act step, its spec) and "gemm" (the GEMM step as it was), run where the GEMM stood,
    its output the act's. At a few rows the cuda backend runs it as one GEMV launch whose warps compute
    (gate, up) row pairs and write act(g) * u (codegen/gemv.py; fp8 weights: codegen/gemv_fp8.py's "mma"
    kernel at one row); otherwise (other formats too) the two steps as before."""
    made = {o: n for n, op in p.anchor.items() for o in op.outs}
    for n, act in sorted(p.anchor.items()):
        if act.kind is not Exec.ACT or not act.spec.gated or act.collectives or act.ins[0] not in made:
            continue
        m = made[act.ins[0]]
        gemm = p.anchor[m]
        if gemm.kind is not Exec.GEMM or "prologue" in gemm.extra or gemm.collectives or made.get(act.ins[1]) != m \
                or len(gemm.outs) != 2 or act.ins[0] == act.ins[1] or any(p.uses[v] != 1 for v in gemm.outs):
            continue
        fused = KOp(Exec.GEMM, gemm.ins, act.outs, gemm.instrs + act.instrs,
                    extra=dict(gemm.extra, epilogue=act, gemm=gemm))
        del p.anchor[n], p.anchor[m]
        if not p.claim(fused, p.instrs[m]):  # a collective would fall inside: leave both as they were
            p.anchor[n], p.anchor[m] = act, gemm


def _gemv_rope(p: _Program) -> None:
    """An attention step (rope_attention's) whose q, k and v, before their ropes, are the three outputs of one
    GEMM step (the q, k, v projections of one x) that nothing else reads: the GEMM step gets extra "rope",
    the attention step. A link, not a merge: at a few rows the cuda backend runs that GEMM as one GEMV launch
    that rotates q and k and writes k and v into the site's cache in its epilogue (codegen/gemv.py gemv_rope),
    and the attention step then runs without its own rotary + KV write; otherwise both run as they are.
    gemv_prologue, after this, may still give the GEMM step a prologue; it keeps the link."""
    made = {o: n for n, op in p.anchor.items() for o in op.outs}
    for att in list(p.anchor.values()):
        if att.kind is not Exec.ATTENTION or att.collectives or any(v not in made for v in att.ins):
            continue
        gemm = p.anchor[made[att.ins[0]]]
        if gemm.kind is Exec.GEMM and not {"epilogue", "rope"} & gemm.extra.keys() \
                and not gemm.collectives and len(gemm.outs) == 3 and set(gemm.outs) == set(att.ins) \
                and all(p.uses[v] == 1 for v in gemm.outs):
            gemm.extra["rope"] = att


def step_reads(op: KOp) -> set[Value]:
    """The values a step reads: its inputs and its instructions' (a fused step's inner values among them)."""
    return {a for a in (*op.ins, *(a for ins in op.instrs for a in ins.inputs)) if isinstance(a, Value)}


def last_reads(ops: list[KOp], output: Value) -> list[list[Value]]:
    """For each step, the values no later step reads: those it is the last to read, and those it makes that nothing
    reads (all but `output`, the program's). A backend that holds a step's values by name drops these after the
    step, so that it holds about a layer's values at a time, not the whole step's (the cuda backend's _run)."""
    last: dict[Value, int] = {}
    for n, op in enumerate(ops):
        for v in op.outs:
            last.setdefault(v, n)
        for a in step_reads(op):
            last[a] = n
    dead: list[list[Value]] = [[] for _ in ops]
    for v, n in last.items():
        if v != output:
            dead[n].append(v)
    return dead


def unfused(ops: list[KOp]) -> list[KOp]:
    """The program with every gemv_prologue / gemv_epilogue step split back into its GEMM step and the norm
    / act step fused with it (what the cuda backend runs at more rows): for code and tests that look at the
    norm / act steps."""
    def split(op: KOp) -> tuple[KOp, ...]:
        if "prologue" in op.extra:  # its GEMM step may have an epilogue too
            return (op.extra["prologue"], *split(op.extra["gemm"]))
        if "epilogue" in op.extra:
            return op.extra["gemm"], op.extra["epilogue"]
        return (op,)
    return [s for op in ops for s in split(op)]


def _prologue_kind(op: KOp) -> bool:
    """Whether the GEMV's prologue (codegen/gemv.py prologue_refusal) computes this step: an RMSNorm
    without bias (plain, residual or gated), or a gated activation."""
    if op.kind is Exec.NORM:
        return op.spec.kind == "rms" and not op.spec.has_bias
    return op.kind is Exec.ACT and op.spec.gated


PATTERNS = (
    Pattern("sibling_gemms", "linear(x, w_i[, b_i]) for every i, as one GEMM over concat(w_i) sliced back",
            _sibling_gemms),
    Pattern("rope_attention", "attention(rope(q), rope(k), v): rope of q and k (same attributes), K/V appended "
            "to the cache, then attention; without ropes, the K/V write and attention", _rope_attention),
    # before residual_norm and gated_act, which would each take a part of it
    Pattern("gated_norm", "h = norm(y * act(z), w) (or act(z) * y): act(z) and the product rounded to the run "
            "dtype as the activation and the mul round them, then the norm (per group with group=g)", _gated_norm),
    Pattern("residual_norm", "r = a + b; h = norm(r, w): both h and r, in one pass", _residual_norm),
    Pattern("gated_act", "act(g) * u", _gated_act),
    # after gated_act, whose steps it joins; before gemv_prologue, which would make the act step a prologue
    Pattern("gemv_epilogue", "g, u = linear(x, w_g[, b_g]), linear(x, w_u[, b_u]); act(g) * u: g and u rounded to the "
            "run dtype as the GEMM stores them, then the gated activation, g and u read by nothing else",
            _gemv_epilogue),
    # after rope_attention and sibling_gemms, whose steps it links; before gemv_prologue, which keeps the link in
    # the step it makes (the backend's GEMV then runs the norm, the linear and the rotary + KV write in one launch)
    Pattern("gemv_rope", "q, k, v = linear(x, w_q[, b_q]), linear(x, w_k[, b_k]), linear(x, w_v[, b_v]); "
            "attention(rope(q), rope(k), v): q, k and v rounded to the run dtype as the GEMM stores them, then the "
            "rotary + KV write as the attention step's own kernel does it, q, k and v read by nothing else",
            _gemv_rope),
    # before ssm_conv_act, which would take its conv
    Pattern("ssm_conv_scan", "xs, b, c = split(act(causal_conv1d(x, w, cb))); selective_scan(xs, dt, a_log, b, c, d, "
            "dt_bias): at one token a sequence, both in one kernel, each conv output rounded to the run dtype after "
            "the activation as the conv step stores it", _ssm_conv_scan),
    Pattern("ssm_conv_act", "act(causal_conv1d(x, w, b)): the activation applied to the conv's output in its kernel",
            _ssm_conv_act),
    # last: it joins steps the patterns above made
    Pattern("gemv_prologue", "linear(h, w_i[, b_i]) for every i where h = an rms norm step's output (r = a + b; "
            "norm(r, w); or norm(y * act(z), w); or norm(x, w)) or a gated act step's (act(g) * u) that nothing "
            "else reads: h formed from the step's inputs, rounded as that step rounds it, and r kept",
            _gemv_prologue),
)


def _ssm(p: _Program, ins: Instr, act: str = "") -> KOp | None:
    """A state-space op as a generated kernel (codegen/ssm_kernels.py), None where its op lowers to torch.
    extra "op": "conv" or "scan"."""
    low = OPS[ins.kind].cuda(ins, p.plan, p.dtype)
    if not (isinstance(low, KernelCall) and low.kernel is Kernel.SSM):
        return None
    c = dict(low.constants)
    what = c.pop("op")
    if what == "conv":
        spec = ssm_kernels.SsmConvSpec(**c, act=act, dtype=p.dt, origin=origin(ins))
    else:
        spec = ssm_kernels.SsmScanSpec(**c, dtype=p.dt, origin=origin(ins))
    return KOp(Exec.SSM, ins.inputs, ins.outputs, (ins,), spec, extra={"op": what})


def _moe(p: _Program, ins: Instr, stages: tuple) -> KOp:
    """A moe whose experts run as grouped GEMMs: spec (route, one GEMM per "gemm" stage); extra
    "stages" (dsl.ops.moe.expert_stages) and, per GEMM, its outputs' (start, width) slices."""
    prog, types = ins.experts[0], p.plan.types
    route = ks.MoeRouteSpec(len(ins.experts), ins.attrs.top_k, p.width(ins.out), dtype=p.dt, origin=origin(ins))
    align = 16 // ks.RUN_DTYPES[p.dt].itemsize  # each output starts on a 16-byte boundary, as sibling GEMMs'
    gemms, slices = [], []
    for kind, pos in stages:
        if kind != "gemm":
            continue
        lins = [prog.instrs[i] for i in pos]
        widths = [types[g.out].shape[1] for g in lins]
        starts = [0]
        for w in widths[:-1]:
            starts.append(-(-(starts[-1] + w) // align) * align)
        gemms.append(ks.MoeGemmSpec(len(ins.experts), starts[-1] + widths[-1], types[lins[0].inputs[0]].shape[1],
                                    gather=lins[0].inputs[0] == prog.inputs[0], has_bias=lins[0].inputs[2] is not None,
                                    dtype=p.dt, origin=origin(lins[0])))
        slices.append(tuple(zip(starts, widths)))
    return KOp(Exec.MOE, ins.inputs, ins.outputs, (ins,), (route, *gemms),
               extra={"stages": stages, "slices": tuple(slices)})


def _single(p: _Program, ins: Instr) -> KOp:
    """An instruction no pattern took, lowered by its own op definition."""
    low = OPS[ins.kind].cuda(ins, p.plan, p.dtype)
    if isinstance(low, KernelCall) and low.kernel is Kernel.ACT:
        return KOp(Exec.ACT, ins.inputs, ins.outputs, (ins,), ks.ActSpec(**low.constants, dtype=p.dt,
                                                                         origin=origin(ins)))
    if isinstance(low, KernelCall) and low.kernel is Kernel.EMBED and ins.inputs[0] == Value("tokens"):
        return KOp(Exec.EMBED, ins.inputs, ins.outputs, (ins,), ks.EmbedSpec(**low.constants, dtype=p.dt,
                                                                             origin=origin(ins)))
    if isinstance(low, KernelCall) and low.kernel is Kernel.MAP:
        return KOp(Exec.MAP, ins.inputs, ins.outputs, (ins,), ks.MapSpec(low.constants["body"],
                   tuple(low.constants["consts"]), dtype=p.dt, origin=origin(ins)))
    if isinstance(low, KernelCall) and low.kernel is Kernel.MOE:
        return _moe(p, ins, low.constants["stages"])
    if isinstance(low, KernelCall) and low.kernel is Kernel.SSM:
        return _ssm(p, ins)
    if isinstance(low, (Gemm, KernelCall)):  # a KernelCall here: only valid fused (ROPE_KV), or on token ids
        return KOp(Exec.TORCH, ins.inputs, ins.outputs, (ins,))
    if isinstance(low, Torch):
        return KOp(Exec.TORCH, ins.inputs, ins.outputs, (ins,), extra={"why": low.why})
    raise TypeError(f"{ins.kind.value}: unhandled cuda lowering {low!r} ({ins.op.pos})")


def fuse(plan: Plan, dtype: torch.dtype, page_size: int) -> list[KOp]:
    """Patterns claim groups over the whole program first, then emit: a group runs where its
    anchor stood (its last instruction; a GEMM group: its first), everything else in order."""
    p = _Program(plan, dtype, page_size)
    for pattern in PATTERNS:
        pattern.apply(p)
    for ins in p.instrs:
        if id(ins) not in p.covered:
            p.claim(_single(p, ins), ins)
    return [p.anchor[n] for n in sorted(p.anchor)]
