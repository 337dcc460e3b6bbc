"""Mixed steps too big for a graph run eagerly; their decode rows (one new token each, first in the
batch as the scheduler orders them) take the decode attention kernel and only the prompt chunks the
prefill kernel (runtime/cuda_backend.py MIXED_SPLIT). Checked on every family's small config: the
logits of such a step equal the reference backend's (fp32) and the unsplit run's."""

from __future__ import annotations

import random

import pytest
import torch
from kiln.runtime import cuda_backend
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.kv_store import KVStore
from kiln.runtime.state_cache import StateStore

from tests.configs import FAMILY_CONFIGS as FAMILIES
from tests.gpu.test_cuda_backend import LLAMA, bf16_check, oracle, pair, rel

pytestmark = pytest.mark.usefixtures("fresh_seed")


def _steps(rng: random.Random, vocab: int):
    """Two steps over 6 sequences (page tables of 8 pages each): a prefill of sequences 0-3 (their
    contexts), then the mixed step: 0-3 decode one token each, 4 a fresh prompt, 5 a prompt chunk
    of 20 after its own first chunk of 17 (given in the first step)."""
    tables = [tuple(range(i * 8, i * 8 + 8)) for i in range(6)]
    lens = [rng.randint(1, 40) for _ in range(4)] + [0, 17]
    first, flat = [], []
    for i, n in enumerate(lens):
        if n:
            first.append(SeqSlice(len(flat), n, 0, tables[i], state_slot=i))
            flat += [rng.randrange(vocab) for _ in range(n)]
    prefill = StepBatch(torch.tensor(flat), first)
    mixed, flat = [], []
    for i in range(4):
        mixed.append(SeqSlice(len(flat), 1, lens[i], tables[i], state_slot=i))
        flat.append(rng.randrange(vocab))
    for i, (n, ctx) in ((4, (30, 0)), (5, (20, 17))):
        mixed.append(SeqSlice(len(flat), n, ctx, tables[i], state_slot=i))
        flat += [rng.randrange(vocab) for _ in range(n)]
    return prefill, StepBatch(torch.tensor(flat), mixed)


def _run(model, prefill: StepBatch, mixed: StepBatch) -> torch.Tensor:
    kv = KVStore(model.plan.sites, 48, 16, model.dtype, "cuda", state=StateStore(6))
    with torch.no_grad():
        model.model.forward(prefill, kv)
        return model.model.forward(mixed, kv)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_mixed_step_decode_rows_through_the_decode_kernel(name, fresh_seed, monkeypatch):
    import transformers

    config = transformers.AutoConfig.for_model(**FAMILIES[name]).to_dict()
    ref, cuda = pair(name.split("-")[0], config, "fp32")
    cuda.model.mixed_graphs = False  # eager, as a step past the mixed graphs' buckets runs
    prefill, mixed = _steps(random.Random(fresh_seed), ref.plan.vocab_size)
    want = _run(ref, prefill, mixed)
    monkeypatch.setattr(cuda_backend, "MIXED_SPLIT", "1")
    assert cuda.model._meta(mixed).decode_rows == 4
    split = _run(cuda, prefill, mixed)
    monkeypatch.setattr(cuda_backend, "MIXED_SPLIT", "0")
    assert cuda.model._meta(mixed).decode_rows == 0
    whole = _run(cuda, prefill, mixed)
    assert split.shape == want.shape == (6, ref.plan.vocab_size)
    assert rel(split, want) <= 1e-4, f"split {rel(split, want):.3g} from the reference"
    assert rel(split, whole) <= 1e-4, f"split {rel(split, whole):.3g} from the unsplit run"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_mixed_step_split_in_bf16(kv_cache_dtype, fresh_seed, monkeypatch):
    """The run dtype and an fp8 KV cache: the split step within bf16 rounding of the unsplit one
    (the same cache contents; only the attention kernel of the decode rows differs)."""
    ref, cuda = pair("llama", LLAMA, "bf16", kv_cache_dtype=kv_cache_dtype)
    cuda.model.mixed_graphs = False
    prefill, mixed = _steps(random.Random(fresh_seed), ref.plan.vocab_size)
    monkeypatch.setattr(cuda_backend, "MIXED_SPLIT", "1")
    split = _run(cuda, prefill, mixed)
    monkeypatch.setattr(cuda_backend, "MIXED_SPLIT", "0")
    whole = _run(cuda, prefill, mixed)
    assert rel(split, whole) <= 1e-2, f"split {rel(split, whole):.3g} from the unsplit run"


def test_fresh_prompts_through_sdpa(fresh_seed, monkeypatch):
    """KILN_FRESH_SDPA=1 on Hopper: a bf16 step of whole prompts (no context) runs torch's SDPA over the
    pages just written instead of the wgmma prefill kernel; every row's logits as close to the fp32
    oracle as the kernel path's (bf16_check). (In fp32 both paths are SDPA already.)"""
    ref, cuda = pair("llama", LLAMA, "bf16")
    gold = oracle("llama", LLAMA, ref)
    rng = random.Random(fresh_seed)
    lens = [rng.randint(2, 100) for _ in range(3)]
    seqs, flat = [], []
    for i, n in enumerate(lens):
        seqs.append(SeqSlice(len(flat), n, 0, tuple(range(i * 8, i * 8 + 8))))
        flat += [rng.randrange(ref.plan.vocab_size) for _ in range(n)]
    batch = StepBatch(torch.tensor(flat), seqs)

    def run(model):
        kv = KVStore(model.plan.sites, 32, 16, model.dtype, "cuda")
        with torch.no_grad():
            return model.model.forward(batch, kv, all_logits=True)

    assert cuda.model._meta(batch).fresh is not None
    monkeypatch.setattr(cuda_backend, "FRESH_SDPA", "0")
    kernel = run(cuda)
    monkeypatch.setattr(cuda_backend, "FRESH_SDPA", "1")
    sdpa = run(cuda)
    ok, msg = bf16_check(kernel, sdpa, run(gold), 2e-2)
    assert ok, msg


@pytest.mark.parametrize("dtype, kv_cache_dtype", [("fp32", "auto"), ("bf16", "fp8")])
def test_large_mixed_graph_equals_eager(dtype, kv_cache_dtype, fresh_seed, monkeypatch):
    """KILN_MIXED_GRAPHS_LARGE=1: a mixed step past the small graphs' buckets (here made small) replays a graph
    bucketed by decode rows (4 in the bucket of 16), prompt sequences and tokens, its decode rows through the decode
    kernel; its logits equal the eager run's, and in fp32 the reference's. Twice, with other contexts (each run's
    new KV store drops the graphs captured for the one before)."""
    from kiln.runtime.model import LoadedModel, make_backend
    monkeypatch.setattr(cuda_backend, "MIXED_GRAPHS_LARGE", "1")
    monkeypatch.setattr(cuda_backend, "MIXED_TOKENS", (16,))  # every mixed step here past the small graphs
    monkeypatch.setattr(cuda_backend, "LARGE_TOKENS", (64, 128, 256))
    ref, cuda = pair("llama", LLAMA, dtype, kv_cache_dtype=kv_cache_dtype)
    eager = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                        ref.device)
    eager.model.mixed_graphs = False
    for seed in (fresh_seed, fresh_seed + 1):
        prefill, mixed = _steps(random.Random(seed), ref.plan.vocab_size)
        got, plain = _run(cuda, prefill, mixed), _run(eager, prefill, mixed)
        assert got.shape == plain.shape == (6, ref.plan.vocab_size)
        assert rel(got, plain) <= (1e-5 if dtype == "fp32" else 1e-2), f"graph vs eager {rel(got, plain):.3g}"
        if dtype == "fp32":
            want = _run(ref, prefill, mixed)
            assert rel(got, want) <= 1e-4, f"{rel(got, want):.3g} from the reference"
    large = [k for k in cuda.model._mixed if len(k) == 4 and k[3] == 16]
    assert len(large) == 1, f"one large graph with 16 decode rows: {list(cuda.model._mixed)}"


def test_mixed_graph_short_of_memory_runs_eagerly(fresh_seed, monkeypatch):
    """A mixed bucket whose capture the device lacks the memory for (here: a margin no device meets) is not
    captured; its steps run eagerly and their logits equal the reference's; the capture-ahead skips it too."""
    monkeypatch.setattr(cuda_backend, "MIXED_GRAPHS_LARGE", "1")
    monkeypatch.setattr(cuda_backend, "MIXED_TOKENS", (16,))
    monkeypatch.setattr(cuda_backend, "LARGE_TOKENS", (64, 128, 256))
    monkeypatch.setattr(cuda_backend, "GRAPH_MEMORY_MARGIN", 1e9)
    ref, cuda = pair("llama", LLAMA, "fp32")
    prefill, mixed = _steps(random.Random(fresh_seed), ref.plan.vocab_size)
    got, want = _run(cuda, prefill, mixed), _run(ref, prefill, mixed)
    assert rel(got, want) <= 1e-4, f"{rel(got, want):.3g} from the reference"
    assert not cuda.model._mixed and cuda.model._eager_mixed, "no mixed graph kept, the buckets marked eager"
    assert cuda.model.step_counts["mixed_short"] == len(cuda.model._eager_mixed) and not cuda.model.step_counts["mixed_graph"]
    kv = KVStore(cuda.plan.sites, 48, 16, cuda.dtype, "cuda")
    made = cuda.model.capture_decode_graphs(kv, 20, tokens=100)
    assert made == len(cuda.model._graphs) and not cuda.model._mixed


def test_large_mixed_graphs_captured_ahead(monkeypatch):
    """capture_decode_graphs with a token budget (bench throughput's warm-up) also captures the large mixed graphs
    of a full step of one or two prompt chunks beside each decode bucket up to max_batch, and max_batch's own
    (KILN_MIXED_GRAPHS_LARGE), and of as many prompts as a workload's full step holds where asked
    (large_warm_keys; tests/test_graph_buckets.py checks them against the scheduler's steps)."""
    monkeypatch.setattr(cuda_backend, "MIXED_GRAPHS_LARGE", "1")
    monkeypatch.setattr(cuda_backend, "LARGE_TOKENS", (64, 128, 256))
    _, cuda = pair("llama", LLAMA, "bf16")
    kv = KVStore(cuda.plan.sites, 48, 16, cuda.dtype, "cuda")
    made = cuda.model.capture_decode_graphs(kv, 20, tokens=100)
    # 32: the decode bucket of 20 seats' rows within the model's 256-row decode scratch (what forward takes: session
    # 30); (2, 64, 34, 32): every seat taken, a prompt trickling in (a smaller token bucket)
    assert sorted(cuda.model._mixed) == [(2, 64, 34, 32), (2, 128, 2, 0), (2, 128, 18, 16), (2, 128, 34, 32)]
    assert made == len(cuda.model._graphs) + 4
    # A workload of short prompts (20 tokens: five in a full step): their LARGE_SEQS bucket (8) too, and a step of four decode
    # rows beside five prompts of 20 (104 tokens: bucket 128; no small mixed bucket holds it) then replays one of
    # them without a capture of its own
    assert cuda.model.capture_decode_graphs(kv, 20, tokens=100, prompt_len=20) == 4
    assert sorted(k for k in cuda.model._mixed if k[0] == 8) == [(8, 64, 40, 32), (8, 128, 8, 0), (8, 128, 24, 16),
                                                                 (8, 128, 40, 32)]
    monkeypatch.setattr(cuda_backend, "MIXED_TOKENS", (16,))
    rng = random.Random(3)
    flat = [rng.randrange(cuda.plan.vocab_size) for _ in range(4 + 5 * 20)]
    seqs = [SeqSlice(i, 1, 5, (i,)) for i in range(4)] + [SeqSlice(4 + 20 * j, 20, 0, (4 + 2 * j, 5 + 2 * j))
                                                          for j in range(5)]
    with torch.no_grad():
        cuda.model.forward(StepBatch(torch.tensor(flat), seqs), kv)
    assert cuda.model.step_counts["mixed_graph"] == 1 and not cuda.model.step_counts["mixed_capture"]
