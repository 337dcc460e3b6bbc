"""The state-space kernels (codegen/ssm_kernels.py, run as Exec.SSM steps by runtime/cuda_ssm.py) on a GPU.

Each kernel against its op reference (dsl/ops/ssm.py, with the activation after the conv) on random
inputs over three steps of mixed sequences: prompts (one longer than a conv block's 64 tokens), a
prompt continued in a second chunk, decode tokens, and a slot reused by a new sequence (context 0: it
must ignore what the slot held); outputs and every slot's state after each step. Then whole models
(mamba, mamba-bias, mamba2, jamba) against the reference backend, decode through CUDA graphs.

Mamba-2's fused decode kernel (conv -> split -> scan in one launch, fuse.py's ssm_conv_scan) against the
two kernels and the op references at the 2.7B shape and odd ones (groups > 1, 3 taps, lanes < 32):
outputs, conv and scan states after each decode step, padding rows, its counters left at zero; and a
whole Mamba-2 decoding through the CUDA graphs with the fusion on equals it off (KILN_SSM_FUSE=0)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from kiln.codegen import kernels as K
from kiln.codegen.fuse import Exec, fuse
from kiln.dsl import check, load_spec
from kiln.dsl.ops import OPS
from kiln.dsl.plan import Value, WeightArg
from kiln.runtime.batch import SeqSlice, StepBatch, host_meta
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend
from kiln.runtime.reference import StepContext
from kiln.runtime.state_cache import StateStore

from tests.configs import FAMILY_CONFIGS
from tests.gpu.test_cuda_backend import check_against_reference, pair, rel

NUM_SLOTS = 6
SLOTS = (3, 0, 2, 5)
# Per step: (length, context) of each sequence (slot SLOTS[i]); the last sequence starts over in step 2.
STEPS = [[(5, 0), (70, 0), (1, 0), (2, 0)],
         [(1, 5), (3, 70), (1, 1), (4, 0)],
         [(1, 6), (1, 73), (1, 2), (1, 4)]]
DTYPES = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 2e-2)}


@pytest.fixture(autouse=True)
def _fusion_on(monkeypatch):
    """The fused conv + scan step (codegen/fuse.py ssm_fuse_enabled, the default): on for these tests whatever the
    environment says."""
    monkeypatch.setenv("KILN_SSM_FUSE", "1")


def _unfused(plan, dtype):
    """The kernel program with Mamba-2's conv and scan as two steps (KILN_SSM_FUSE=0)."""
    old = os.environ.get("KILN_SSM_FUSE")
    os.environ["KILN_SSM_FUSE"] = "0"
    try:
        return fuse(plan, dtype, 16)
    finally:
        if old is None:
            del os.environ["KILN_SSM_FUSE"]
        else:
            os.environ["KILN_SSM_FUSE"] = old


def _ops(family: str, dtype=torch.float32):
    spec = FAMILY_CONFIGS[family]["model_type"]
    plan = check(load_spec(spec), FAMILY_CONFIGS[family])
    return plan, [op for op in _unfused(plan, dtype) if op.kind is Exec.SSM][:2]  # one layer's conv, scan


def _random_weight(plan, name: str, dtype):
    shape = plan.weights[name].shape
    w = torch.randn(shape, device="cuda") * 0.5
    if "a_log" in name:
        w = torch.rand(shape, device="cuda") * 2 - 1  # A = -exp(A_log) in [-e, -1/e]
    return w.to(dtype)


@pytest.mark.parametrize("family", ["mamba", "mamba-bias", "mamba2"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernels_match_op_references(family, dtype, fresh_seed):
    tdt, tol = DTYPES[dtype]
    plan, ops = _ops(family, tdt)
    weights = {a.name: _random_weight(plan, a.name, tdt) for op in ops for ins in op.instrs for a in ins.inputs
               if isinstance(a, WeightArg)}
    garbage = StateStore(NUM_SLOTS)  # what the slots held before: a fresh sequence must not read it
    for op in ops:
        site = plan.state_sites[op.instrs[0].state]
        sdt = torch.float32 if site.dtype == "fp32" else tdt
        garbage.site(site.index, site.shape, sdt, "cuda").copy_(torch.randn(NUM_SLOTS, *site.shape))
    stores = []
    for _ in range(2):
        s = StateStore(NUM_SLOTS)
        s.tensors = {k: v.clone() for k, v in garbage.tensors.items()}
        stores.append(KVStore(plan.sites, 8, 16, tdt, "cuda", state=s))
    ref_kv, ker_kv = stores
    for n, lens in enumerate(STEPS):
        seqs, start = [], 0
        for (length, context), slot in zip(lens, SLOTS):
            seqs.append(SeqSlice(start, length, context, tuple(range(-(-(context + length) // 16))), state_slot=slot))
            start += length
        batch = StepBatch(torch.zeros(start, dtype=torch.int64), seqs)
        ctx = StepContext(batch, ref_kv, weights)
        h = host_meta(batch, 16, max(len(s.block_table) for s in seqs))
        cu = torch.from_numpy(h.cu_seqlens).cuda()
        kv_lens = torch.from_numpy(h.kv_lens).cuda()
        slots = torch.tensor([s.state_slot for s in seqs], dtype=torch.int32, device="cuda")
        for op in ops:
            ins = op.instrs[0]
            args = []
            for a, name in zip(ins.inputs, OPS[ins.kind].inputs):
                if isinstance(a, WeightArg):
                    args.append(weights[a.name])
                elif a is None:
                    args.append(None)
                else:  # an activation operand; row-strided like the fused GEMM slices the kernels are given
                    width = plan.types[a].shape[1]
                    wide = torch.randn(start, width + 8, device="cuda").to(tdt)
                    args.append(wide[:, 3:3 + width] if name in ("x", "b") else wide[:, :width])
            want = OPS[ins.kind].reference(ctx, ins, args)
            for follow in op.instrs[1:]:  # the activation fused after the conv
                want = OPS[follow.kind].reference(ctx, follow, [want])
            site = plan.state_sites[ins.state]
            got = torch.empty(start, args[0].shape[1], dtype=tdt, device="cuda")
            if op.extra["op"] == "conv":
                state = ker_kv.state.site(ins.state, site.shape, tdt, "cuda")
                K.ssm_conv(op.spec, args[0], args[1], args[2],
                            state, slots, cu, kv_lens, got, len(seqs), max(length for length, _ in lens))
            else:
                state = ker_kv.state.site(ins.state, site.shape, torch.float32, "cuda")
                K.ssm_scan(op.spec, *args, state, slots, cu,
                            kv_lens, got, len(seqs))
            torch.cuda.synchronize()
            what = f"{family} {type(op.spec).__name__} step {n}"
            assert rel(got, want) <= tol, f"{what}: output {rel(got, want):.3g} from the reference"
            for slot in SLOTS:
                a, b = ker_kv.state.tensors[ins.state][slot], ref_kv.state.tensors[ins.state][slot]
                assert rel(a, b) <= tol, f"{what}: state of slot {slot} {rel(a, b):.3g} from the reference"
            untouched = [s for s in range(NUM_SLOTS) if s not in SLOTS]
            assert torch.equal(ker_kv.state.tensors[ins.state][untouched], garbage.tensors[ins.state][untouched])


def test_padding_rows_write_no_state():
    """A captured graph's padding rows (slot -1) read a zero state and write none."""
    plan, ops = _ops("mamba2")
    conv, scan = ops
    weights = {a.name: _random_weight(plan, a.name, torch.float32) for op in ops for a in op.instrs[0].inputs
               if isinstance(a, WeightArg)}
    site = plan.state_sites[scan.instrs[0].state]
    state = torch.randn(2, *site.shape, device="cuda")
    before = state.clone()
    ins = scan.instrs[0]
    T = 3
    args = [torch.randn(T, plan.types[a].shape[1], device="cuda") if isinstance(a, Value) else
            weights[a.name] if a is not None else None for a in ins.inputs]
    out = torch.empty(T, args[0].shape[1], device="cuda")
    cu = torch.arange(T + 1, dtype=torch.int32, device="cuda")
    K.ssm_scan(scan.spec, *args, state, torch.full((T,), -1, dtype=torch.int32, device="cuda"), cu,
                torch.full((T,), 5, dtype=torch.int32, device="cuda"), out, T)
    torch.cuda.synchronize()
    assert torch.equal(state, before) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mamba", "mamba-bias", "mamba2", "jamba"])
@pytest.mark.parametrize("dtype,tol", [("bf16", 2e-2), ("fp32", 1e-4)])
def test_state_space_models_match_reference(name, dtype, tol, fresh_seed):
    check_against_reference(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], dtype, tol, fresh_seed)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba"])
def test_state_space_decode_runs_in_cuda_graphs(name):
    """Prefill eagerly, then decode steps: the cuda backend captures them (no host-reading step left)
    and its logits stay within 1e-4 of the reference (fp32)."""
    ref, cuda = pair(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], "fp32")
    assert cuda.model.use_graphs
    lens = [7, 70]
    kvs = [KVStore(ref.plan.sites, 32, 16, torch.float32, "cuda", state=StateStore(4)) for _ in range(2)]
    seqs = [SeqSlice(0, 7, 0, (0,), state_slot=2), SeqSlice(7, 70, 0, (1, 2, 3, 4, 5), state_slot=1)]
    tokens = torch.randint(0, ref.plan.vocab_size, (77,))
    with torch.no_grad():
        for m, kv in zip((ref, cuda), kvs):
            m.model.forward(StepBatch(tokens, seqs), kv)
        ctx = list(lens)
        for _ in range(4):
            nxt = torch.randint(0, ref.plan.vocab_size, (2,))
            d = [SeqSlice(0, 1, ctx[0], (0,), state_slot=2), SeqSlice(1, 1, ctx[1], (1, 2, 3, 4, 5), state_slot=1)]
            a, b = (m.model.forward(StepBatch(nxt, d), kv) for m, kv in zip((ref, cuda), kvs))
            assert rel(b, a) <= 1e-4
            ctx = [c + 1 for c in ctx]
    assert cuda.model._graphs, "decode did not run through a CUDA graph"


@pytest.mark.parametrize("name", ["mamba2", "jamba"])
def test_prefix_reuse_restores_kept_states_on_the_cuda_backend(name):
    """The engine on the cuda backend (CUDA graphs, overlapped steps): a prompt sharing another's first 32
    tokens restores the state kept at 32 (runtime/state_cache.py StateSnapshots) and continues from it; its
    greedy tokens equal those of an engine that keeps no state and computes the whole prompt (fp32)."""
    from kiln.runtime.engine import EngineConfig, LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    _, cuda = pair(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], "fp32")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, cuda.plan.vocab_size, (45,), generator=g).tolist()
    b = a[:32] + torch.randint(0, cuda.plan.vocab_size, (11,), generator=g).tolist()
    got = {}
    for kept in (None, 0):
        engine = LLMEngine(cuda, None, EngineConfig(page_size=16, num_pages=64, max_num_seqs=4,
                                                     max_tokens_per_step=64, state_snapshots=kept))
        got[kept] = []
        for prompt in (a, b):  # one after the other: b finds a's pages and (kept) its state at 32
            rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished and out.request_id == rid:
                        got[kept].append(out.outputs[0].token_ids)
        assert engine.scheduler.prefix_hit_tokens == (32 if kept is None else 0)
    assert got[None] == got[0] and len(got[0]) == 2


# ---- Mamba-2's fused decode kernel (conv -> split -> scan)

ROOT = Path(__file__).resolve().parents[2]
FUSED_SHAPES = {
    "mamba2": FAMILY_CONFIGS["mamba2"],  # heads 8 x 16, d_state 8 (8 lanes a row), 2 groups of 2 blocks
    "2.7b": json.loads((ROOT / "configs" / "mamba2-2.7b.json").read_text()),  # 80 x 64, d_state 128, 160 blocks
    # 6 heads x 32, d_state 64 (32 lanes, 2 state entries each), 3 groups of 2 blocks, a 3-tap conv
    "odd": dict(FAMILY_CONFIGS["mamba2"], hidden_size=96, num_heads=6, head_dim=32, state_size=64, n_groups=3,
                conv_kernel=3),
}
# (tolerance against the two kernels, against the op references)
FUSED_DTYPES = {"fp32": (torch.float32, 1e-5, 1e-4), "bf16": (torch.bfloat16, 1e-2, 2e-2)}
# Per step: (length, context) of each sequence, in slots FUSED_SLOTS; step 0 a prefill (the two kernels),
# then decode steps (the fused kernel); the third sequence starts over in step 2 (context 0: a zero state)
FUSED_SLOTS = (3, 0, 5)
FUSED_STEPS = [[(5, 0), (3, 0), (2, 0)], [(1, 5), (1, 3), (1, 2)], [(1, 6), (1, 4), (1, 0)], [(1, 7), (1, 5), (1, 1)]]


def _reference(ctx, op, weights, env):
    """op's instructions (conv, act, split, scan) by their references: the scan's output."""
    for ins in op.instrs:
        args = [env[a] if isinstance(a, Value) else weights[a.name] if a is not None else None for a in ins.inputs]
        out = OPS[ins.kind].reference(ctx, ins, args)
        env.update(zip(ins.outputs, out if isinstance(out, tuple) else (out,)))
    return env[op.outs[0]]


def _two_kernels(op, xbc, dt, w, conv_state, state, slots, cu, kv_lens, S, max_len):
    """ssm_conv, then ssm_scan on views of its output: what the fused step runs for a prefill."""
    scan = op.instrs[-1]
    mid = torch.empty(xbc.shape[0], op.spec.channels, dtype=xbc.dtype, device="cuda")
    K.ssm_conv(op.extra["conv"], xbc, w[op.ins[1].name], w.get(getattr(op.ins[2], "name", None)), conv_state, slots,
                cu, kv_lens, mid, S, max_len)
    xs, b, c = mid.split(list(op.extra["sizes"]), dim=1)
    out = torch.empty(xbc.shape[0], op.spec.heads * op.spec.head_dim, dtype=xbc.dtype, device="cuda")
    d, dt_bias = (w[a.name] if a is not None else None for a in scan.inputs[5:])
    K.ssm_scan(op.extra["scan"], xs, dt, w[scan.inputs[2].name], b, c, d, dt_bias, state, slots, cu, kv_lens, out, S)
    return out


@pytest.mark.parametrize("shape", list(FUSED_SHAPES))
@pytest.mark.parametrize("dtype", list(FUSED_DTYPES))
def test_fused_conv_scan_matches_the_two_kernels_and_the_references(shape, dtype, fresh_seed):
    tdt, tight, tol = FUSED_DTYPES[dtype]
    plan = check(load_spec("mamba2"), FUSED_SHAPES[shape])
    op = next(op for op in fuse(plan, tdt, 16) if op.kind is Exec.SSM)
    assert op.extra["op"] == "conv_scan"
    conv, scan = op.instrs[0], op.instrs[-1]
    weights = {a.name: _random_weight(plan, a.name, tdt) for a in op.ins if isinstance(a, WeightArg)}
    sites = [plan.state_sites[conv.state], plan.state_sites[scan.state]]
    garbage = StateStore(NUM_SLOTS)  # what the slots held before: a fresh sequence must not read it
    for site in sites:
        sdt = torch.float32 if site.dtype == "fp32" else tdt
        garbage.site(site.index, site.shape, sdt, "cuda").copy_(torch.randn(NUM_SLOTS, *site.shape))
    stores = []
    for _ in range(3):  # the references, the two kernels, the fused kernel
        st = StateStore(NUM_SLOTS)
        st.tensors = {k: v.clone() for k, v in garbage.tensors.items()}
        stores.append(KVStore(plan.sites, 8, 16, tdt, "cuda", state=st))
    ref_kv, two_kv, one_kv = stores
    counters = torch.zeros(8 * op.spec.groups, dtype=torch.int32, device="cuda")
    C, H = op.spec.channels, op.spec.heads
    for n, lens in enumerate(FUSED_STEPS):
        seqs, start = [], 0
        for (length, context), slot in zip(lens, FUSED_SLOTS):
            seqs.append(SeqSlice(start, length, context, tuple(range(-(-(context + length) // 16))), state_slot=slot))
            start += length
        decode = n > 0
        pad = 1 if decode else 0  # a captured graph's padding row (slot -1) after the real ones
        T = start + pad
        batch = StepBatch(torch.zeros(start, dtype=torch.int64), seqs)
        ctx = StepContext(batch, ref_kv, weights)
        # in_proj's fused output: x B C and dt are row-strided slices of one wider row
        wide = torch.randn(T, C + H + 24, device="cuda").to(tdt)
        xbc, dt = wide[:, 3:3 + C], wide[:, C + 8:C + 8 + H]
        want = _reference(ctx, op, weights, {conv.inputs[0]: xbc[:start], scan.inputs[1]: dt[:start]})
        slot_list = [s.state_slot for s in seqs] + [-1] * pad
        slots = torch.tensor(slot_list, dtype=torch.int32, device="cuda")
        cu = torch.tensor([s.start for s in seqs] + [start] + ([T] if pad else []), dtype=torch.int32, device="cuda")
        kv_lens = torch.tensor([s.context + s.length for s in seqs] + [1] * pad, dtype=torch.int32, device="cuda")
        S, longest = len(slot_list), max(length for length, _ in lens)
        states = [kv.state.site(site.index, site.shape, torch.float32 if site.dtype == "fp32" else tdt, "cuda")
                  for kv in (two_kv, one_kv) for site in sites]
        two = _two_kernels(op, xbc, dt, weights, states[0], states[1], slots, cu, kv_lens, S, longest)
        if decode:
            one = torch.empty_like(two)
            d, dt_bias = (weights[a.name] if a is not None else None for a in scan.inputs[5:])
            K.ssm_conv_scan(op.spec, xbc, weights[conv.inputs[1].name],
                            weights[conv.inputs[2].name] if conv.inputs[2] is not None else None, states[2], dt,
                            weights[scan.inputs[2].name], d, dt_bias, states[3], slots, cu, kv_lens, counters, one, S)
        else:  # a prefill: the fused step runs the two kernels
            one = _two_kernels(op, xbc, dt, weights, states[2], states[3], slots, cu, kv_lens, S, longest)
        torch.cuda.synchronize()
        what = f"{shape} {dtype} step {n}"
        assert rel(one, two) <= tight, f"{what}: fused output {rel(one, two):.3g} from the two kernels'"
        assert rel(one[:start], want) <= tol, f"{what}: fused output {rel(one[:start], want):.3g} from the reference"
        assert torch.isfinite(one).all()
        assert not counters.any(), f"{what}: counters left at {counters.tolist()}"
        for site in sites:
            for slot in FUSED_SLOTS:
                a, b, r = (kv.state.tensors[site.index][slot] for kv in (one_kv, two_kv, ref_kv))
                assert rel(a, b) <= tight, f"{what}: {site.kind} state of slot {slot} {rel(a, b):.3g} from the kernels'"
                assert rel(a, r) <= tol, f"{what}: {site.kind} state of slot {slot} {rel(a, r):.3g} from the reference"
            untouched = [s for s in range(NUM_SLOTS) if s not in FUSED_SLOTS]  # the padding row wrote none
            assert torch.equal(one_kv.state.tensors[site.index][untouched], garbage.tensors[site.index][untouched])


@pytest.mark.parametrize("dtype,tight,tol", [("fp32", 1e-5, 1e-4), ("bf16", 1e-2, None)])
def test_mamba2_decode_with_the_fused_kernel_equals_without(dtype, tight, tol, monkeypatch):
    """A whole Mamba-2 (groups 2): prefill eagerly (the fused step runs the two kernels), then decode
    steps through the CUDA graphs (the fused kernel): logits equal the unfused model's (KILN_SSM_FUSE=0)
    and, in fp32, the reference backend's."""
    name = "mamba2"
    ref, on = pair(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], dtype)
    monkeypatch.setenv("KILN_SSM_FUSE", "0")
    off = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                      ref.device)
    monkeypatch.setenv("KILN_SSM_FUSE", "1")
    assert [op.extra["op"] for op in on.model.ops if op.kind is Exec.SSM] == ["conv_scan"] * 2
    assert {op.extra["op"] for op in off.model.ops if op.kind is Exec.SSM} == {"conv", "scan"}
    assert on.model.use_graphs and off.model.use_graphs
    models = (ref, on, off)
    kvs = [KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4)) for _ in models]
    seqs = [SeqSlice(0, 7, 0, (0,), state_slot=2), SeqSlice(7, 70, 0, (1, 2, 3, 4, 5), state_slot=1)]
    tokens = torch.randint(0, ref.plan.vocab_size, (77,))
    with torch.no_grad():
        outs = [m.model.forward(StepBatch(tokens, seqs), kv) for m, kv in zip(models, kvs)]
        assert rel(outs[1], outs[2]) <= tight
        ctx = [7, 70]
        for _ in range(4):
            nxt = torch.randint(0, ref.plan.vocab_size, (2,))
            d = [SeqSlice(0, 1, ctx[0], (0,), state_slot=2), SeqSlice(1, 1, ctx[1], (1, 2, 3, 4, 5), state_slot=1)]
            a, b, c = (m.model.forward(StepBatch(nxt, d), kv) for m, kv in zip(models, kvs))
            assert rel(b, c) <= tight, f"fused {rel(b, c):.3g} from unfused"
            if tol is not None:
                assert rel(b, a) <= tol, f"fused {rel(b, a):.3g} from the reference"
            ctx = [x + 1 for x in ctx]
    assert on.model._graphs and off.model._graphs, "decode did not run through a CUDA graph"
    assert not on.model._ssm.counters.any()
    for site in range(len(ref.plan.state_sites)):  # the states the two left behind
        assert rel(kvs[1].state.tensors[site], kvs[2].state.tensors[site]) <= tight


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mamba2_decode_with_the_scan_as_a_programmatic_dependent_is_bit_equal(dtype, monkeypatch):
    """KILN_SSM_PDL=1 (runtime/cuda_ssm.py): the fused conv + scan kernel launched as a programmatic dependent of
    the in_proj GEMV before it, its states, conv weights and windows read before its griddepcontrol.wait, xbc and
    dt after. Decode through the CUDA graphs (2 sequences, in_proj through the GEMV: KILN_GEMV_ROWS 4), 12 steps:
    logits bit-equal to the plain launch's, step by step (the same arithmetic; a read of xbc before the GEMV wrote
    it would take the graph's previous replay's values)."""
    from kiln.runtime import cuda_backend, cuda_ssm
    monkeypatch.setenv("KILN_SSM_FUSE", "1")
    monkeypatch.setattr(cuda_backend, "GEMV", "pdl")
    monkeypatch.setattr(cuda_backend, "GEMV_ROWS", 4)
    name = "mamba2"
    ref, on = pair(FAMILY_CONFIGS[name]["model_type"], FAMILY_CONFIGS[name], dtype)
    off = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                      ref.device)
    assert [op.extra["op"] for op in on.model.ops if op.kind is Exec.SSM] == ["conv_scan"] * 2
    models = {"1": on, "0": off}
    kvs = {k: KVStore(ref.plan.sites, 32, 16, ref.dtype, "cuda", state=StateStore(4)) for k in models}
    seqs = [SeqSlice(0, 7, 0, (0, 6), state_slot=2), SeqSlice(7, 70, 0, (1, 2, 3, 4, 5, 7), state_slot=1)]
    tokens = torch.randint(0, ref.plan.vocab_size, (77,))

    def run(batch):  # each model under its own switch value (its graphs are captured with it)
        outs = {}
        for k, m in models.items():
            monkeypatch.setattr(cuda_ssm, "SSM_PDL", k)
            outs[k] = m.model.forward(batch, kvs[k])
        return outs

    with torch.no_grad():
        run(StepBatch(tokens, seqs))
        ctx = [7, 70]
        for step in range(12):
            nxt = torch.randint(0, ref.plan.vocab_size, (2,))
            outs = run(StepBatch(nxt, [SeqSlice(0, 1, ctx[0], (0, 6), state_slot=2),
                                       SeqSlice(1, 1, ctx[1], (1, 2, 3, 4, 5, 7), state_slot=1)]))
            assert torch.isfinite(outs["1"]).all() and torch.equal(outs["1"], outs["0"]), f"decode step {step}"
            ctx = [x + 1 for x in ctx]
    assert on.model._graphs and off.model._graphs, "decode did not run through a CUDA graph"
    monkeypatch.setattr(cuda_ssm, "SSM_PDL", "yes")
    from kiln.codegen.specs import KernelSpecError
    eager = make_backend(ref.plan, ref.model.weights, "cuda", "cuda")
    eager.use_graphs = eager.mixed_graphs = False  # the refusal in an eager step, not inside a capture
    with pytest.raises(KernelSpecError, match="KILN_SSM_PDL='yes'"), torch.no_grad():
        eager.forward(StepBatch(nxt[:1], [SeqSlice(0, 1, 0, (0,), state_slot=0)]),
                      KVStore(ref.plan.sites, 4, 16, ref.dtype, "cuda", state=StateStore(1)))
