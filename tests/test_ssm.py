"""State-space models (dsl/ops/ssm.py, runtime/state_cache.py) through the runtime, on the CPU.

The specs themselves are checked against transformers in tests/test_architectures.py (the
FAMILY_CONFIGS entries mamba, mamba-bias, mamba2, jamba). Here: in-flight batching must not change
what a request generates when every layer carries a recurrent state. Greedy outputs of concurrent
requests of mixed lengths equal each request run alone, with chunked prefill (a prompt's state
carried from chunk to chunk) and with preemption (the state rebuilt from the prompt); at the end
every state slot and every page is free. Prefix reuse: a request whose cached pages reach a boundary
where a state was kept restores it and generates what it generates alone; kept states are evicted
least recently used; the scheduler's chunks, saves and restores, exactly.
"""

from __future__ import annotations

import random

import pytest
import torch
from kiln.dsl import check, load_spec
from kiln.dsl.checker import check_backend
from kiln.dsl.errors import SpecError
from kiln.dsl.ops import OPS, Kernel, KernelCall, OpKind
from kiln.runtime.batch import SeqSlice, StepBatch
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.kv_cache import BlockPool
from kiln.runtime.kv_store import KVStore
from kiln.runtime.model import random_model
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Request, Scheduler, SchedulerError
from kiln.runtime.state_cache import StateAccountingError, StateCacheError, StatePool, StateSnapshots, StateStore

from tests.configs import FAMILY_CONFIGS
from tests.test_engine import alone

FAMILIES = [f for f in ("mamba", "mamba2", "jamba") if f in FAMILY_CONFIGS]
VOCAB = 256


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    model = random_model(name, FAMILY_CONFIGS[name], seed=1)
    return name, model, [alone(model, p, n) for p, n in requests()]


def requests(count=10, seed=0):
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))], rng.randint(1, 16)) for _ in range(count)]


def run(model, cfg: EngineConfig):
    engine = LLMEngine(model, None, cfg)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
           for p, n in requests()]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids], engine


def all_free(engine) -> bool:
    states = engine.scheduler.states
    return engine.pool.num_free == engine.pool.num_pages and states.num_free == states.num_slots


def test_batched_with_chunked_prefill_equals_alone(family):
    name, model, expected = family
    # 16 tokens a step: prompts of up to 30 tokens are prefilled in chunks beside other requests' decodes.
    got, engine = run(model, EngineConfig(page_size=4, num_pages=256, max_num_seqs=8, max_tokens_per_step=16))
    assert got == expected
    assert engine.scheduler.num_preemptions == 0
    assert all_free(engine)


def test_preemption_rebuilds_the_state(family):
    name, model, expected = family
    # 16 pages of 4 tokens cannot hold 8 sequences of up to 46 tokens: preemption must happen.
    got, engine = run(model, EngineConfig(page_size=4, num_pages=16, max_num_seqs=8, max_tokens_per_step=24))
    assert engine.scheduler.num_preemptions > 0
    assert got == expected
    assert all_free(engine)


def test_whole_prefills_without_chunking(family):
    name, model, expected = family
    got, engine = run(model, EngineConfig(page_size=4, num_pages=256, max_num_seqs=4, max_tokens_per_step=64,
                                          chunked_prefill=False))
    assert got == expected
    assert all_free(engine)


def test_cancel_frees_the_state_slot(family):
    _, model, _ = family
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4))
    a = engine.add_request([1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request([9, 8, 7], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    engine.step()
    assert engine.scheduler.states.num_free == 2
    engine.abort(a)
    while engine.has_unfinished():
        engine.step()
    assert all_free(engine)


def test_no_prefix_reuse_without_kept_states_and_no_speculation(family):
    _, model, _ = family
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4, state_snapshots=0))
    assert not engine.scheduler.prefix_caching  # a prefix hit would skip the tokens that build the state
    assert engine.kv.state.nbytes() > 0  # every slot allocated up front
    kept = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4))
    assert kept.scheduler.prefix_caching and kept.scheduler.snapshots.capacity == 4  # one kept state a seat
    assert kept.kv.state.nbytes() == 2 * engine.kv.state.nbytes()
    with pytest.raises(ValueError, match="recurrent state"):
        LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, speculative="ngram"))
    with pytest.raises(ValueError, match="state_snapshots"):
        EngineConfig(state_snapshots=-1)


def _greedy(engine, prompt, n):
    rid = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                got = out.outputs[0].token_ids
    return got


def test_prefix_reuse_restores_the_kept_state(family):
    # A 22-token prompt in chunks of up to 16 (pages of 4) ends its chunks at 16 and at 20, its last page
    # boundary before its final token, and keeps the state at both. A prompt sharing its first 16 tokens
    # restores the state at 16; the same prompt again, at 20; one sharing 13 tokens finds no state at 12,
    # computes everything, and ends its first chunk at 12 (the end of the pages it found resident), so the
    # next prompt sharing those 12 tokens restores the state there. Each generates what it generates alone.
    _, model, _ = family
    rng = random.Random(5)
    a = [rng.randrange(VOCAB) for _ in range(22)]
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, max_num_seqs=4, max_tokens_per_step=16))
    sched = engine.scheduler
    assert _greedy(engine, a, 6) == alone(model, a, 6)
    assert sched.prefix_hit_tokens == 0 and sched.snapshots.num_kept == 2
    for prompt, hit in [(a[:16] + [3, 1, 4, 1, 5], 16), (a, 20), (a[:13] + [9, 2, 6], 0), (a[:12] + [8] * 5, 12)]:
        before = sched.prefix_hit_tokens
        assert _greedy(engine, prompt, 5) == alone(model, prompt, 5), (len(prompt), hit)
        assert sched.prefix_hit_tokens - before == hit
    sched.snapshots.check()
    assert all_free(engine)


def test_kept_states_are_evicted_least_recently_used_first(family):
    _, model, _ = family
    rng = random.Random(6)
    a, b = ([rng.randrange(VOCAB) for _ in range(10)] for _ in range(2))
    engine = LLMEngine(model, None, EngineConfig(page_size=4, num_pages=64, max_num_seqs=2, state_snapshots=1))
    sched = engine.scheduler
    _greedy(engine, a, 2)  # keeps the state at 8 (its last boundary before its final token)
    _greedy(engine, b, 2)  # the one kept slot now holds b's
    assert sched.snapshots.num_kept == 1 and sched.snapshots.find(sched._hashes(Request("x", b), 2)[-1]) == 0
    before = sched.prefix_hit_tokens
    assert _greedy(engine, a, 3) == alone(model, a, 3)  # a's pages are cached, its state is not: no hit
    assert _greedy(engine, b + [7], 3) == alone(model, b + [7], 3)  # a's run kept its own again (at 8)...
    assert sched.prefix_hit_tokens == before  # ...so b's was evicted
    assert all_free(engine)


# ---- the plan: state sites, backends


@pytest.mark.parametrize("name", FAMILIES)
def test_state_sites(name):
    plan = check(load_spec(name), FAMILY_CONFIGS[name])
    stateful = [i for i in plan.program.walk() if i.state is not None]
    assert [i.state for i in stateful] == list(range(len(plan.state_sites)))
    kinds = {s.kind for s in plan.state_sites}
    assert kinds == {"causal_conv1d", "selective_scan"}
    for s in plan.state_sites:
        if s.kind == "causal_conv1d":
            assert len(s.shape) == 2 and s.dtype == "float"  # [channels, kernel - 1]
        else:
            assert len(s.shape) == 3 and s.dtype == "fp32"  # [heads, head size, d_state]
    with pytest.raises(SpecError, match="not supported on the tensorrt backend.*recurrent state"):
        check_backend(plan, "tensorrt")
    for ins in stateful:  # the cuda backend: generated kernels on the state slots (codegen/ssm_kernels.py)
        low = OPS[ins.kind].cuda(ins, plan, torch.float16)
        assert isinstance(low, KernelCall) and low.kernel is Kernel.SSM


@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_backend_captures_state_ops(name):
    """Every conv and scan is in an Exec.SSM step (the conv with its activation), and no torch step left
    reads the host, which is what lets runtime/cuda_backend.py decode through CUDA graphs."""
    cuda_backend = pytest.importorskip("kiln.runtime.cuda_backend")
    from kiln.codegen.fuse import Exec, fuse

    plan = check(load_spec(name), FAMILY_CONFIGS[name])
    ops = fuse(plan, torch.bfloat16, 16)
    ssm = [op for op in ops if op.kind is Exec.SSM]
    assert sorted(i.state for op in ssm for i in op.instrs if i.state is not None) == \
        list(range(len(plan.state_sites)))
    assert all([i.kind for i in op.instrs] in ([OpKind.CAUSAL_CONV1D, OpKind.ACT], [OpKind.SELECTIVE_SCAN],
                                               # Mamba-2: conv -> split -> scan, one step (fuse.py's ssm_conv_scan)
                                               [OpKind.CAUSAL_CONV1D, OpKind.ACT, OpKind.SPLIT, OpKind.SELECTIVE_SCAN])
               for op in ssm)
    assert not [op for op in ops if op.kind is Exec.TORCH and op.instrs[0].kind in cuda_backend._HOST_READERS]


SPEC = """spec s
param d: int = 6
weights { embed: [16, d] <- "e"
          w: [d, 3] <- "w" }
forward(tokens) {
  return causal_conv1d(embedding(tokens, embed), w)
}
"""


def test_causal_conv1d_state_carries_across_steps():
    """Token by token through the state equals the whole sequence at once, equals F.conv1d."""
    from kiln.dsl.loader import parse_spec
    from kiln.runtime.reference import ReferenceModel

    plan = check(parse_spec(SPEC), {})
    g = torch.Generator().manual_seed(0)
    weights = {"embed": torch.randn(16, 6, generator=g), "w": torch.randn(6, 3, generator=g)}
    model = ReferenceModel(plan, weights)
    tokens = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    kv = KVStore(plan.sites, 2, 16, torch.float32)
    whole = model.forward(StepBatch(tokens, [SeqSlice(0, 7, 0, (0,))]), kv, all_logits=True)
    x = weights["embed"][tokens].T[None]  # [1, C, T]
    oracle = torch.nn.functional.conv1d(x, weights["w"][:, None, :], padding=2, groups=6)[0, :, :7].T
    torch.testing.assert_close(whole, oracle)
    kv = KVStore(plan.sites, 2, 16, torch.float32)
    steps = [model.forward(StepBatch(tokens[i:i + 1], [SeqSlice(0, 1, i, (0,))]), kv, all_logits=True)
             for i in range(7)]
    torch.testing.assert_close(torch.cat(steps), oracle)
    # Two sequences of one step naming one slot would overwrite each other's state: refused.
    batch = StepBatch(tokens[:4], [SeqSlice(0, 2, 0, (0,)), SeqSlice(2, 2, 0, (1,))])
    with pytest.raises(StateCacheError, match="share a state slot"):
        model.forward(batch, KVStore(plan.sites, 2, 16, torch.float32), all_logits=True)


def test_state_pool_accounting():
    pool = StatePool(3)
    assert [pool.allocate() for _ in range(2)] == [0, 1]
    pool.free(0)
    assert pool.allocate() == 0 and pool.num_free == 1
    with pytest.raises(StateAccountingError):
        pool.free(2)


def test_state_snapshots_accounting():
    kept = StateSnapshots(2)
    assert kept.put(b"a") == 0 and kept.put(b"b") == 1 and kept.find(b"a") == 0
    assert kept.use(b"a") == 0  # now b is the least recently used
    assert kept.put(b"c") == 1 and kept.find(b"b") is None and kept.num_kept == 2
    with pytest.raises(StateAccountingError):
        kept.put(b"a")
    kept.check()


def test_state_store_saves_and_restores_slots():
    from kiln.dsl.plan import StateSite

    site = StateSite(0, "layers.0.conv", "causal_conv1d", (2, 3), "fp32")
    store = StateStore(3, [site], num_snapshots=2)
    live = store.tensors[0]
    live.copy_(torch.arange(18.0).reshape(3, 2, 3))
    store.save([(2, 0), (0, 1)])
    assert torch.equal(store.snapshots[0][0], live[2]) and torch.equal(store.snapshots[0][1], live[0])
    store.restore([(0, 1)])
    assert torch.equal(live[1], live[2])
    for bad in ([(3, 0)], [(0, 2)], [(0, 0), (1, 0)]):
        with pytest.raises(StateAccountingError):
            store.save(bad)
    with pytest.raises(StateCacheError):
        StateStore(2, num_snapshots=1)  # (lazily made sites have no snapshots)


def test_scheduler_keeps_and_restores_states_exactly():
    # Pages of 4, 16 tokens a step: a's 22-token prompt runs as 16 (kept in snapshot slot 0), 4 (the last
    # boundary before its final token, 20: slot 1), then 2 that sample. b, with the same prompt, is admitted
    # beside a's first decode row in the step scheduled ahead of a's update: its 20 cached tokens continue from
    # snapshot 1 restored into its own state slot before that step.
    sched = Scheduler(BlockPool(32, 4), 4, 16, prefix_caching=True, states=StatePool(4), snapshots=StateSnapshots(4))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    sched.add(Request("a", list(range(22)), params))
    steps = []
    for want_len, want_save in [(16, [(0, 0)]), (4, [(0, 1)])]:
        step = sched.schedule()
        assert [s.length for s in step.batch.seqs] == [want_len] and step.save == want_save and not step.restore
        sched.update(step, [])
        steps.append(step)
    last = sched.schedule()
    assert [(s.length, s.sample) for s in last.batch.seqs] == [(2, True)] and not last.save
    sched.add(Request("b", list(range(22)), params))
    ahead = sched.schedule_ahead(last, torch.tensor([7]))
    assert [(s.context, s.length, s.state_slot) for s in ahead.batch.seqs] == [(22, 1, 0), (20, 2, 1)]
    assert ahead.restore == [(1, 1)] and not ahead.save and sched.prefix_hit_tokens == 20
    with pytest.raises(SchedulerError, match="snapshots"):
        Scheduler(BlockPool(8, 4), 2, 16, prefix_caching=True, states=StatePool(2))

