"""Multi-LoRA on the GPU: the generated SGMV kernels (codegen/lora_kernels.py) against the
reference (runtime/lora.py LoraStep), and the cuda backend with adapters against the reference
backend — prefill and decode steps through the CUDA graphs, 8 adapters of different ranks and
base-model rows mixed in one batch."""

from __future__ import annotations

import random

import pytest
import torch
from kiln.codegen.lora_kernels import LoraSpec, lora_sgmv
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.lora import LoraSet, _State, group_rows

from tests.gpu.test_cuda_backend import LLAMA, pair, rel
from tests.test_lora import write_adapter

KV = LLAMA["hidden_size"] * LLAMA["num_key_value_heads"] // LLAMA["num_attention_heads"]
WIDTHS = {"q_proj": LLAMA["hidden_size"], "k_proj": KV, "v_proj": KV, "o_proj": LLAMA["hidden_size"]}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_sgmv_matches_reference(dtype, tol, T, fresh_seed):
    from kiln.codegen.specs import dtype_name
    from kiln.runtime.lora import LoraStep

    N, k, R, widths = 8, 512, 32, (256, 64, 64)  # three siblings (a fused qkv), rank 32
    out = sum(widths)
    x = torch.randn(T, k, device="cuda").to(dtype)
    A = (torch.randn(N, len(widths) * R, k, device="cuda") * 0.1).to(dtype)
    B = (torch.randn(N, out, R, device="cuda") * 0.1).to(dtype)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    sib = torch.cat([torch.full((w,), i, dtype=torch.int32) for i, w in enumerate(widths)]).cuda()
    adapters = torch.randint(-1, N, (T,))
    y0 = torch.randn(T, out, device="cuda").to(dtype)
    y = y0.clone()
    perm, seg = group_rows(adapters.numpy(), N)
    v = torch.empty(T, len(widths) * R, device="cuda")
    spec = LoraSpec(k, out, len(widths) * R, R, dtype_name(dtype), origin="test_lora")
    lora_sgmv(spec, x, A, B, sib, y, v, torch.from_numpy(perm).cuda(), torch.from_numpy(seg).cuda())
    # The reference, per sibling slot: A's rows of the sibling, B's rows of its slice.
    stacks = {f"s{i}": (A[:, i * R:(i + 1) * R], B[:, s:s + w]) for i, (s, w) in enumerate(zip(starts, widths))}
    step = LoraStep(_State(tuple(f"a{i}" for i in range(N)), R, stacks, 1), adapters.cuda())
    want = torch.cat([_ref(step, f"s{i}", x, y0[:, s:s + w]) for i, (s, w) in enumerate(zip(starts, widths))], dim=1)
    assert rel(y, want) <= tol
    base = adapters < 0
    assert torch.equal(y[base.cuda()], y0[base.cuda()])  # base rows untouched


def _ref(step, slot, x, y):
    """The reference in fp32 (what the kernel accumulates in)."""
    A, B = step.state.stacks[slot]
    s = type(step)(type(step.state)(step.state.names, step.state.rank, {slot: (A.float(), B.float())}, 1), step.rows)
    return s.apply(slot, x.float(), y.float())


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_cuda_backend_with_adapters_matches_reference(dtype, tol, tmp_path, fresh_seed):
    ref, cuda = pair("llama", LLAMA, dtype)
    L, H = LLAMA["num_hidden_layers"], LLAMA["hidden_size"]
    names = []
    for ref_or_cuda in (ref, cuda):
        lora = LoraSet(ref.plan, "cuda", ref.dtype)
        for i in range(8):
            p = tmp_path / f"a{i}"
            if not p.exists():
                write_adapter(p, L, H, (4, 8, 16, 24)[i % 4], seed=i, widths=WIDTHS,
                              modules=("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "v_proj", "o_proj"))
            lora.load(f"a{i}", p)
        ref_or_cuda.model.lora = lora
        names = lora.names
    assert len(names) == 8
    vocab = ref.plan.vocab_size
    rng = random.Random(fresh_seed)
    S = 12
    lens = [rng.randint(1, 40) for _ in range(S)]
    adapters = [i % 9 - 1 for i in range(S)]  # -1 (base) and the 8 adapters
    kvs = [KVStore(ref.plan.sites, 128, 16, ref.dtype, "cuda") for _ in range(2)]
    tables = [tuple(range(i * 8, i * 8 + 8)) for i in range(S)]
    tokens = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
    ctx = [0] * S
    for step in range(7):  # a prefill, then decode steps (CUDA graphs)
        seqs, flat = [], []
        for i in range(S):
            new = tokens[i] if step == 0 else [rng.randrange(vocab)]
            seqs.append(SeqSlice(len(flat), len(new), ctx[i], tables[i], adapter=adapters[i]))
            flat += new
            ctx[i] += len(new)
        batch = StepBatch(torch.tensor(flat), seqs)
        with torch.no_grad():
            want = ref.model.forward(batch, kvs[0])
            got = cuda.model.forward(batch, kvs[1])
        assert rel(got, want) <= tol, f"step {step}"
        if step == 1:
            assert cuda.model._graphs, "decode ran through a CUDA graph"
