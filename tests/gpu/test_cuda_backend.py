"""The `cuda` backend against the reference backend on the GPU: whole-model logits (prefill,
then decode steps through the captured CUDA graphs), and the engine's greedy outputs."""

from __future__ import annotations

import random

import pytest
import torch
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import LoadedModel, make_backend, random_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.state_cache import StateStore

from tests.configs import FAMILY_CONFIGS as FAMILIES

LLAMA = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=512, max_position_embeddings=512,
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64})
GPT2 = dict(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, n_positions=512)


def pair(spec, config, dtype, kv_cache_dtype="auto"):
    ref = random_model(spec, config, dtype=dtype, device="cuda", seed=0, kv_cache_dtype=kv_cache_dtype)
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    return ref, cuda


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def divergence(ref, cuda, batch: StepBatch, tol: float) -> str:
    """The first values where the cuda backend departs from the reference, for the message."""
    from kiln.dsl.plan import Value
    from kiln.runtime.reference import StepContext

    kv = [KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda", state=StateStore(len(batch.seqs))) for _ in range(2)]
    b = StepBatch(batch.tokens.cuda(), batch.seqs)
    ctx = StepContext(b, kv[0], ref.model.weights)
    env = {Value("tokens"): b.tokens, Value("positions"): ctx.positions}
    ctx.run(ref.plan.program, env)
    env = {v.id: t for v, t in env.items()}
    trace: dict = {}
    cuda.model._run(b.tokens, cuda.model._meta(b), kv[1], b, trace)
    bad = [f"{name}: rel {rel(v, env[name]):.3g}" for name, v in trace.items()
           if name in env and rel(v, env[name]) > tol]
    return "first divergent values: " + "; ".join(bad[:6])


def oracle(spec, config, ref, kv_cache_dtype="auto"):
    """The reference backend in fp32 on `ref`'s weights (bf16 values held in fp32): what a bf16 run
    approximates. Two bf16 runs that round differently drift apart through the layers of a random
    model by a few percent (more than either is from the fp32 run), so bf16 is judged against this."""
    gold = random_model(spec, config, dtype="fp32", device="cuda", seed=0, kv_cache_dtype=kv_cache_dtype)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in ref.model.weights.items()}
    return LoadedModel(gold.plan, make_backend(gold.plan, weights, "reference", "cuda"), None, torch.float32,
                       gold.device)


def row_error(a, g) -> float:
    """The median over rows (tokens) of each row's relative distance: a bf16 rounding that flips a
    discrete choice on one token (an MoE route, a near-tie) moves that row alone, while an error in
    a kernel's arithmetic moves them all."""
    a, g = a.float(), g.float()
    return float(((a - g).norm(dim=-1) / g.norm(dim=-1)).median())


def bf16_check(a, b, g, tol) -> tuple[bool, str]:
    """bf16/fp16 logits `b` of the cuda backend against the fp32 oracle's `g`, beside the
    reference's `a` in the same dtype: the cuda backend's row error at most `tol`, or at most 1.5x
    the reference's own (both round at different points, so neither is exactly the other)."""
    got, ref = row_error(b, g), row_error(a, g)
    return got <= max(tol, 1.5 * ref), f"median row {got:.3g} from the fp32 oracle (reference: {ref:.3g})"


def check_against_reference(spec, config, dtype, tol, seed, kv_cache_dtype="auto", scales=(1.0, 1.0)):
    """Prefill of 5 sequences of odd lengths, then 6 decode steps through the CUDA graphs.
    scales: every site's (k_scale, v_scale), which an fp8 KV cache applies. fp32: the cuda backend
    within `tol` of the reference. bf16/fp16: against the fp32 oracle (bf16_check)."""
    ref, cuda = pair(spec, config, dtype, kv_cache_dtype)
    gold = oracle(spec, config, ref, kv_cache_dtype) if dtype != "fp32" else None
    vocab = ref.plan.vocab_size
    rng = random.Random(seed)
    lens = [rng.randint(1, 70) for _ in range(3)] + [17, 33]  # odd lengths, crossing page boundaries
    # A state slot per sequence, for the state-space specs (runtime/state_cache.py).
    kvs = [KVStore(ref.plan.sites, 64, 16, m.dtype, "cuda", state=StateStore(len(lens)))
           for m in (ref, cuda, gold) if m is not None]
    for kv in kvs:
        kv.k_scale, kv.v_scale = [scales[0]] * len(kv.k), [scales[1]] * len(kv.v)
    tables, start, seqs = [], 0, []
    pages = rng.sample(range(64), 8 * len(lens))  # scattered, never shared between sequences
    for i, n in enumerate(lens):
        table = tuple(pages[8 * i: 8 * i + 8])  # 8 pages = 128 tokens
        tables.append(table)
        seqs.append(SeqSlice(start, n, 0, table, state_slot=i))
        start += n
    tokens = torch.randint(0, vocab, (start,))

    def error(a, b, g) -> tuple[bool, str]:
        if g is None:
            return rel(b, a) <= tol, f"{rel(b, a):.3g} from the reference"
        return bf16_check(a, b, g, tol)

    def step(batch, **kw):
        out = [m.model.forward(batch, kv, **kw) for m, kv in zip((ref, cuda, gold), kvs)]
        return out + [None] * (3 - len(out))

    with torch.no_grad():
        ok, msg = error(*step(StepBatch(tokens, seqs), all_logits=True))
        assert ok, f"prefill {msg}; " + divergence(ref, cuda, StepBatch(tokens, seqs), tol)
        ctx = list(lens)
        for n in range(6):  # decode: one token per sequence, CUDA graph replays
            nxt = torch.randint(0, vocab, (len(lens),))
            dseqs = [SeqSlice(i, 1, ctx[i], tables[i], state_slot=i) for i in range(len(lens))]
            ok, msg = error(*step(StepBatch(nxt, dseqs)))
            assert ok, f"decode step {n}: {msg}"
            ctx = [c + 1 for c in ctx]


@pytest.mark.parametrize("spec,config", [("llama", LLAMA), ("gpt2", GPT2)])
@pytest.mark.parametrize("dtype,tol", [("bf16", 2e-2), ("fp32", 1e-4)])
def test_logits_match_reference(spec, config, dtype, tol, fresh_seed):
    check_against_reference(spec, config, dtype, tol, fresh_seed)


# FP8 KV cache: the generated rope/KV-write, prefill and decode kernels read and write E4M3 pages with
# the sites' scales (1.0 here, and 0.5 / 2.0: values past 448 * scale saturate the same way on both).
# fp32 too: both sides round the same K/V to fp8, so only values on a rounding boundary can differ.
@pytest.mark.parametrize("dtype,tol", [("bf16", 2e-2), ("fp32", 1e-2)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
def test_fp8_kv_cache_matches_reference(dtype, tol, scales, fresh_seed):
    check_against_reference("llama", LLAMA, dtype, tol, fresh_seed, kv_cache_dtype="fp8", scales=scales)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_matches_reference(name, dtype, tol, fresh_seed):
    """Every spec in models/, with the small config its CPU test checks against transformers, in
    fp32 and in bf16 (the fast path's run dtype; the reference runs in bf16 too)."""
    import transformers

    config = transformers.AutoConfig.for_model(**FAMILIES[name]).to_dict()  # with transformers' defaults
    check_against_reference(name.split("-")[0], config, dtype, tol, fresh_seed)


def greedy_through_engine(model, reqs, config: EngineConfig):
    """Each (prompt, max_tokens) of `reqs` through one engine, greedy: (their tokens, the engine),
    every page free again at the end."""
    engine = LLMEngine(model, None, config)
    return greedy_on(engine, reqs), engine


def greedy_on(engine: LLMEngine, reqs) -> list:
    """Each (prompt, max_tokens) of `reqs` through `engine`, greedy: their tokens, every page free again at the end."""
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)) for p, n in reqs]
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert engine.pool.num_free == engine.pool.num_pages
    return [done[i] for i in ids]


@pytest.mark.parametrize("page_size", [16, 7, 32])
def test_engine_greedy_equals_reference_fp32(page_size):
    """Greedy tokens through the engine equal the reference's; at pages of 7 or 32 tokens the engine has the cuda
    backend (built for 16) respecialise its cache kernels (CudaModel.set_page_size)."""
    ref, cuda = pair("llama", LLAMA, "fp32")
    rng = random.Random(0)
    reqs = [([rng.randrange(1000) for _ in range(rng.randint(1, 60))], rng.randint(1, 20)) for _ in range(16)]

    def run(model):
        return greedy_through_engine(model, reqs, EngineConfig(page_size=page_size, num_pages=4096 // page_size,
                                                               max_num_seqs=16, max_tokens_per_step=128))[0]

    assert run(cuda) == run(ref)
    assert cuda.model.page_size == page_size


def test_engine_graphs_captured_at_start_serve_every_step_without_a_capture():
    """LLMEngine.capture_graphs (kiln serve's start-up): afterwards a run of mixed lengths replays graphs only,
    captures none, and its greedy tokens equal the reference's; disable_graphs (--enforce-eager) runs it all
    eagerly, to the same tokens."""
    ref, cuda = pair("llama", LLAMA, "fp32")
    rng = random.Random(1)
    reqs = [([rng.randrange(1000) for _ in range(rng.randint(1, 40))], rng.randint(1, 12)) for _ in range(6)]
    config = EngineConfig(page_size=16, num_pages=128, max_num_seqs=8, max_tokens_per_step=128)
    engine = LLMEngine(cuda, None, config)
    assert engine.capture_graphs() >= 4  # the decode buckets 1, 2, 4, 8 at least
    before = dict(cuda.model.step_counts)
    got = greedy_on(engine, reqs)
    counts = {k: v - before.get(k, 0) for k, v in cuda.model.step_counts.items()}
    assert counts.get("decode_graph") and not counts.get("decode_capture"), counts
    want = greedy_through_engine(ref, reqs, config)[0]
    assert got == want
    cuda.model.disable_graphs()
    assert not cuda.model._graphs and not cuda.model._mixed
    assert greedy_through_engine(cuda, reqs, config)[0] == want
    assert not cuda.model._graphs and not cuda.model._mixed  # nothing captured after


@pytest.mark.parametrize("quantization", ["int4-wo", "fp8"])
def test_set_page_size_writes_the_same_cache(quantization):
    """A quantized bf16 model at 32-token pages after 16-token ones (set_page_size), one sequence: a prefill, then
    decode steps (CUDA graphs; the qkv GEMV rotates and writes K / V in its epilogue, the int4 one from the page size
    its packed weight holds): every token's cached K and V are the same bits either way, and the logits agree."""
    ref = random_model("llama", LLAMA, dtype="bf16", device="cuda", seed=0, quantization=quantization)
    cuda = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                       ref.device)
    prompt = torch.tensor([5, 17, 300, 2, 9, 41, 7, 7, 100, 3, 1, 999, 4, 8, 15, 16, 23, 42, 11])
    nxt = [6, 60, 600, 61]
    caches, logits = {}, {}
    for page in (16, 32):
        cuda.model.set_page_size(page)
        pages = 64 // page
        kv = KVStore(ref.plan.sites, pages + 2, page, ref.dtype, "cuda")
        table = tuple(range(2, 2 + pages))  # not from page 0
        out = []
        with torch.no_grad():
            out.append(cuda.model.forward(StepBatch(prompt, [SeqSlice(0, len(prompt), 0, table)]), kv).float().clone())
            for i, t in enumerate(nxt):
                out.append(cuda.model.forward(StepBatch(torch.tensor([t]), [SeqSlice(0, 1, len(prompt) + i, table)]),
                                              kv).float().clone())
        n = len(prompt) + len(nxt)
        # [site][token, kv heads, head_dim] in token order
        caches[page] = [torch.cat([c[p] for p in table], 1)[:, :n].transpose(0, 1).contiguous()
                        for c in kv.k + kv.v]
        logits[page] = out
    for a, b in zip(caches[16], caches[32]):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    for a, b in zip(logits[16], logits[32]):
        assert rel(a, b) <= 1e-2


@pytest.mark.parametrize("name", ["mamba", "mamba2", "jamba"])
def test_state_space_engine_equals_reference_fp32(name):
    """Recurrent state slots through the engine on the GPU: chunked prefill, the conv and scan
    kernels (decode steps in CUDA graphs), greedy outputs as the reference's."""
    ref, cuda = pair(name, FAMILIES[name], "fp32")
    assert cuda.model.use_graphs
    rng = random.Random(0)
    reqs = [([rng.randrange(256) for _ in range(rng.randint(1, 40))], rng.randint(1, 12)) for _ in range(8)]

    def run(model):
        tokens, engine = greedy_through_engine(model, reqs, EngineConfig(page_size=16, num_pages=64, max_num_seqs=8,
                                                                         max_tokens_per_step=32))
        assert engine.scheduler.states.num_free == engine.scheduler.states.num_slots
        return tokens

    assert run(cuda) == run(ref)


@pytest.mark.parametrize("seqs", [512, 1024])
def test_engine_runs_any_batch_width(seqs):
    """max_num_seqs 512 and 1024: all sequences decode in one batch (one CUDA graph that wide),
    and each gets the tokens the reference gives it alone."""
    ref, cuda = pair("llama", LLAMA, "fp32")
    rng = random.Random(seqs)
    prompts = [[rng.randrange(1000) for _ in range(rng.randint(1, 12))] for _ in range(seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def run(model, batch):
        engine = LLMEngine(model, None, EngineConfig(page_size=16, num_pages=2 * len(batch) + 8,
                                                     max_num_seqs=len(batch), max_tokens_per_step=16 * len(batch),
                                                     max_model_len=64))
        ids = [engine.add_request(p, params) for p in batch]
        done = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        return [done[i] for i in ids]

    together = run(cuda, prompts)
    assert max(cuda.model._graphs) >= seqs  # the decode steps ran as one batch, in a captured graph
    for i in rng.sample(range(seqs), 6):
        assert run(ref, [prompts[i]]) == [together[i]], i


def test_decode_graphs_captured_ahead():
    """CudaModel.capture_decode_graphs (bench throughput's warm-up): every bucket up to the batch, once; the
    decode steps then replay them (no capture of their own) and equal the reference (fp32)."""
    from kiln.runtime.cuda_backend import GRAPH_BUCKETS
    ref, cuda = pair("llama", LLAMA, "fp32")
    kv_ref, kv = (KVStore(ref.plan.sites, 64, 16, ref.dtype, "cuda") for _ in range(2))
    assert cuda.model.capture_decode_graphs(kv, 5) == len([b for b in GRAPH_BUCKETS if b <= 8])
    assert sorted(cuda.model._graphs) == [1, 2, 4, 8] and cuda.model.capture_decode_graphs(kv, 5) == 0
    graphs = dict(cuda.model._graphs)
    tables = [tuple(range(i * 8, i * 8 + 8)) for i in range(5)]
    rng = random.Random(5)
    ctx = [rng.randint(2, 30) for _ in range(5)]
    prompt = StepBatch(torch.tensor([rng.randrange(1000) for _ in range(sum(ctx))]),
                       [SeqSlice(sum(ctx[:i]), n, 0, tables[i]) for i, n in enumerate(ctx)])
    with torch.no_grad():
        for m, store in ((ref, kv_ref), (cuda, kv)):
            m.model.forward(prompt, store)
        for step in range(3):
            rows = list(range(5 - step))  # batches of 5, 4 and 3: buckets 8 and 4
            batch = StepBatch(torch.tensor([rng.randrange(1000) for _ in rows]),
                              [SeqSlice(j, 1, ctx[i] + step, tables[i]) for j, i in enumerate(rows)])
            want, got = ref.model.forward(batch, kv_ref), cuda.model.forward(batch, kv)
            assert rel(got, want) <= 1e-4, f"step {step}: {rel(got, want):.3g}"
    assert cuda.model._graphs == graphs  # the same graph objects: replayed, none captured anew
    # step_counts (bench throughput's report): three decode replays, no decode graph captured in forward
    assert cuda.model.step_counts["decode_graph"] == 3 and not cuda.model.step_counts["decode_capture"]


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_mixed_steps_replay_graphs(dtype, tol, fresh_seed):
    """Steps that are not pure decode and fit a bucket (queries after a cached context, speculative
    verifications with several sampled rows per sequence, short prompts beside decode tokens) run
    as captured graphs: each replay, with other lengths in the same bucket, equals the eager run and
    the reference (fp32)."""
    ref, cuda = pair("llama", LLAMA, dtype)
    eager = LoadedModel(ref.plan, make_backend(ref.plan, ref.model.weights, "cuda", "cuda"), None, ref.dtype,
                        ref.device)
    eager.model.mixed_graphs = False
    rng = random.Random(fresh_seed)
    kvs = [KVStore(ref.plan.sites, 96, 16, ref.dtype, "cuda") for _ in range(3)]
    tables = [tuple(range(i * 24, i * 24 + 24)) for i in range(4)]
    ctx = [0] * 4
    for step in range(8):
        seqs, flat = [], []
        for i in rng.sample(range(4), rng.randint(1, 4)):
            n = rng.randint(1, 40 if step == 0 else 9)
            logits = rng.randint(1, n) if step % 2 else 1  # a verification samples its last rows
            seqs.append(SeqSlice(len(flat), n, ctx[i], tables[i], logits=logits))
            flat += [rng.randrange(ref.plan.vocab_size) for _ in range(n)]
            ctx[i] += n
        if all(s.length == 1 for s in seqs):
            continue  # a pure decode step: the decode graphs' test covers it
        batch = StepBatch(torch.tensor(flat), seqs)
        with torch.no_grad():
            want, got, plain = (m.model.forward(batch, kv) for m, kv in zip((ref, cuda, eager), kvs))
        assert got.shape == plain.shape == (len(batch.sample_rows()), ref.plan.vocab_size)
        # cuBLAS may pick another algorithm for the bucket's padded row count: rounding only
        assert rel(got, plain) <= (1e-5 if dtype == "fp32" else 1e-2), f"step {step}: graph vs eager {rel(got, plain):.3g}"
        if dtype == "fp32":
            assert rel(got, want) <= tol, f"step {step}: {rel(got, want):.3g} from the reference"
    assert cuda.model._mixed, "the mixed steps ran in captured graphs"
    assert not eager.model._mixed
    counts = cuda.model.step_counts  # each capture in forward counted, each replay (the capturing step's too)
    assert counts["mixed_capture"] == len(cuda.model._mixed) and counts["mixed_graph"] >= counts["mixed_capture"]
    assert not eager.model.step_counts["mixed_graph"] and eager.model.step_counts["eager"] >= counts["mixed_graph"]
