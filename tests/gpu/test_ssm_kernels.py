"""The state-space kernels (codegen/ssm_kernels.py, run as Exec.SSM steps by runtime/cuda_ssm.py) on a GPU.

Each kernel against its op reference (dsl/ops/ssm.py, with the activation after the conv) on random
inputs over three steps of mixed sequences: prompts (one longer than a conv block's 64 tokens), a
prompt continued in a second chunk, decode tokens, and a slot reused by a new sequence (context 0: it
must ignore what the slot held); outputs and every slot's state after each step. Then whole models
(mamba, mamba-bias, mamba2, jamba) against the reference backend, decode through CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from kiln.codegen import kernels as K
from kiln.codegen.fuse import Exec, fuse
from kiln.dsl import check, load_spec
from kiln.dsl.ops import OPS
from kiln.dsl.plan import Value, WeightArg
from kiln.runtime.batch import SeqSlice, StepBatch, host_meta
from kiln.runtime.kv_store import KVStore
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


def _ops(family: str, dtype=torch.float32):
    spec = FAMILY_CONFIGS[family]["model_type"]
    plan = check(load_spec(spec), FAMILY_CONFIGS[family])
    return plan, [op for op in fuse(plan, dtype, 16) if op.kind is Exec.SSM][:2]  # one layer's conv, scan


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
