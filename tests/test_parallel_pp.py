"""Pipeline parallelism (issue 14) on CPU with gloo, alone and composed with tensor parallelism.

Every attention family of FAMILY_CONFIGS runs in 2 pipeline stages (2 processes, one process group
for all of them), and in TP=2 x PP=2 (4 processes), and must give the single process's greedy tokens
with logits within 1e-5 (fp32). Each rank loads only its stage's weights (its slices of them); a rank that dies mid-request is detected; `kiln show --pp` prints the stages and
`kiln generate --pp` / `LLM(pipeline_parallel_size=)` match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from kiln.dsl import load_spec, passes
from kiln.dsl.errors import SpecError
from kiln.runtime.model import random_model

from tests.configs import FAMILY_CONFIGS
from tests.test_parallel import (
    _full,
    _generate,
    _spec,
    check_same_as_single,
    compare_on_rank0,
    step_until_lost,
    tiny_checkpoint,  # noqa: F401 (a fixture)
)

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
# TP=2 x PP=2 (4 processes, one process group for all of them): every family, as PP=2 — among them
# tied LM heads (the last stage loads the embedding) and MoEs (experts split by TP inside each stage).
TP_PP_CASES = tuple(FAMILY_CONFIGS)


def _rank(rank, world, tp, pp, init, names, configs, out):
    from kiln.runtime import distributed as d

    torch.set_num_threads(1)
    comm = d.init(rank, world, init, timeout_s=120, tp=tp)
    results = {}
    for name in names:
        full = random_model(_spec(name), configs[name])
        try:
            plan = passes.build(load_spec(_spec(name)), configs[name], ranks=tp, stages=pp)
        except SpecError as e:
            results[name] = {"skip": str(e)}
            continue
        model = d.rank_model(plan, full.model.weights, comm)
        mine = {n for n in model.weights}
        if rank:
            d.worker_loop(model)
            continue
        results[name] = r = compare_on_rank0(full, model, STEPS)
        r.update(stages=len(plan.stages), rank0_weights=len(mine), all_weights=len(full.model.weights),
                 rank0_kv_sites=sum(s.kv_heads > 0 for s in model.plan.sites), sites=len(plan.sites))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def _run(tmp, tp, pp, names):
    out = tmp / "results.json"
    configs = {n: _full(FAMILY_CONFIGS[n]) for n in names}
    mp.spawn(_rank, args=(tp * pp, tp, pp, f"file://{tmp / 'rdv'}", list(names), configs, str(out)),
             nprocs=tp * pp, join=True)
    return json.loads(out.read_text())


def _attention_families():
    return list(FAMILY_CONFIGS)  # the state-space ones are refused by the stage pass: skipped, saying so


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("pp"), 1, 2, _attention_families())


@pytest.fixture(scope="module")
def tp_pp_results(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tppp"), 2, 2, TP_PP_CASES)


def _check(r):
    check_same_as_single(r)
    assert r["stages"] == 2
    assert r["rank0_weights"] < r["all_weights"]  # stage 0 holds only its layers (and the embedding)
    assert 0 < r["rank0_kv_sites"] < r["sites"]  # and a KV cache of its layers' sites only


@pytest.mark.parametrize("name", _attention_families())
def test_pp2_matches_single_process(pp_results, name):
    _check(pp_results[name])


@pytest.mark.parametrize("name", TP_PP_CASES)
def test_tp2_pp2_matches_single_process(tp_pp_results, name):
    _check(tp_pp_results[name])


def test_micro_batches_split_a_step_in_order():
    """A step's sequences in at most n contiguous, non-empty groups of about equal tokens, whose tokens
    and sampled rows, concatenated, are the step's."""
    import random

    from kiln.runtime.batch import SeqSlice, StepBatch
    from kiln.runtime.distributed import micro_batches

    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        batch = StepBatch(torch.arange(sum(lengths)), [SeqSlice(a, n, rng.randint(0, 5), (0, 1, 2, 3, 4, 5, 6, 7),
                                                                sample=rng.random() < 0.8) for a, n in zip(starts, lengths)])
        n = rng.randint(1, 5)
        parts = micro_batches(batch, n)
        assert len(parts) == min(n, len(lengths)) and all(p.seqs for p in parts)
        assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
        offsets = [sum(p.num_tokens for p in parts[:i]) for i in range(len(parts))]
        assert [o + r for o, p in zip(offsets, parts) for r in p.sample_rows()] == batch.sample_rows()
        for p in parts:
            p.validate(16)
    tokens = StepBatch(torch.arange(8), [SeqSlice(0, 5, 0, (0,)), *(SeqSlice(i, 1, 0, (0,)) for i in (5, 6, 7))])
    assert [[q.length for q in p.seqs] for p in micro_batches(tokens, 2)] == [[5], [1, 1, 1]]


def test_stage_pass_splits_by_layers_and_sends_the_residual():
    config = dict(FAMILY_CONFIGS["llama"], num_hidden_layers=5)
    plan = passes.build(load_spec(_spec("llama")), config, stages=2)
    assert [s.layers for s in plan.stages] == [("layer.0", "layer.1"), ("layer.2", "layer.3", "layer.4")]
    sends = [c for c in plan.collectives if c.kind == "send"]
    assert [(c.src, c.dst) for c in sends] == [(0, 1), (1, 0)]  # the residual stream, then the logits
    assert sends[0].value.id.startswith("layer.1/") and sends[1].value == plan.program.output
    first = plan.program.instrs[plan.stages[0].start]
    assert first.kind.value == "embedding"
    assert "embed" in passes.stage_weights(plan, 0) and "lm_head" in passes.stage_weights(plan, 1)
    assert "embed" not in passes.stage_weights(plan, 1)  # llama's head is not tied
    assert passes.stage_sites(plan, 0) == {0, 1} and passes.stage_sites(plan, 1) == {2, 3, 4}


def test_verify_catches_a_missing_send():
    import dataclasses

    from kiln.dsl.plan import PlanError

    plan = passes.build(load_spec(_spec("llama")), FAMILY_CONFIGS["llama"], stages=2)
    for drop in (0, 1):  # the residual stream's send, the logits'
        sends = [c for c in plan.collectives if c.kind == "send"]
        bad = dataclasses.replace(plan, collectives=tuple(c for c in plan.collectives if c is not sends[drop]))
        with pytest.raises(PlanError, match="stage 1 reads|logits"):
            bad.verify()


def test_stage_pass_refusals():
    with pytest.raises(SpecError, match="--pp 3: the model has 2 layers"):
        passes.build(load_spec(_spec("llama")), FAMILY_CONFIGS["llama"], stages=3)
    with pytest.raises(SpecError, match="--pp 2: .* state-space layer"):
        passes.build(load_spec(_spec("mamba")), FAMILY_CONFIGS["mamba"], stages=2)


def _save(tmp_path, name):
    from kiln.runtime.checkpoint import open_checkpoint
    from safetensors.torch import save_file

    config = FAMILY_CONFIGS[name]
    full = random_model(_spec(name), config)
    for n in full.plan.weights:  # ties as a checkpoint has them: one tensor (random_model draws each)
        if n in full.model.weights and full.plan.alias_target(n) != n:
            full.model.weights[n] = full.model.weights[full.plan.alias_target(n)]
    names = {s.name: s.source.name for s in full.plan.weights.values()
             if s.source is not None and hasattr(s.source, "name")}
    save_file({names[n]: t.contiguous() for n, t in full.model.weights.items() if n in names},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return full, config, open_checkpoint(tmp_path)


@pytest.mark.parametrize("name, tp", [("llama", 1), ("llama", 2), ("gemma3", 1)])
def test_staged_load_reads_only_each_ranks_stage(tmp_path, name, tp):
    from kiln.runtime.parallel_weights import load_sharded, local_weights, slice_of

    full, config, ckpt = _save(tmp_path, name)
    plan = passes.build(load_spec(_spec(name)), config, ranks=tp, stages=2)
    whole = sum(t.numel() * 4 for n, t in full.model.weights.items() if plan.alias_target(n) == n)
    for rank in range(2 * tp):
        stage = rank // tp
        got, nbytes = load_sharded(plan, ckpt, rank)
        want = local_weights(plan, full.model.weights, rank)
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), n
        own = passes.stage_weights(plan, stage)
        assert {plan.alias_target(n) for n in got} <= own
        # bytes read: exactly this stage's tensors (ties read once), this rank's slices of them
        expect = 0
        for n in own:
            slot = plan.weights[n]
            if slot.source is None or plan.alias_target(n) != n:
                continue
            s = slice_of(slot, rank % tp, tp)
            if s is False:
                continue
            expect += full.model.weights[n].numel() * 4 // (1 if s is None else slot.shape[s[0]] // (s[2] - s[1]))
        assert nbytes == expect < whole
    if name == "gemma3":  # tied head: the last stage read the embedding for it
        tie = next(n for n in plan.weights if plan.alias_target(n) != n)
        assert plan.alias_target(tie) in passes.stage_weights(plan, 1)


def _dies(rank, world, tp, init, out):
    from kiln.runtime import distributed as d

    comm = d.init(rank, world, init, timeout_s=10, tp=tp)
    full = random_model(_spec("llama"), FAMILY_CONFIGS["llama"])
    plan = passes.build(load_spec(_spec("llama")), FAMILY_CONFIGS["llama"], ranks=tp, stages=world // tp)
    model = d.rank_model(plan, full.model.weights, comm)
    if rank == world - 1:  # the last stage's (last tp) rank
        comm.broadcast()  # the first step's batch arrives: die in the middle of the request
        os._exit(3)
    if rank:
        try:
            d.worker_loop(model)
        except d.RankLost as e:
            Path(f"{out}.{rank}").write_text(str(e))
            os._exit(2)
        os._exit(0)
    step_until_lost(full, model, f"{out}.0")


@pytest.mark.parametrize("tp", [1, 2])
def test_dead_rank_is_detected_pp(tmp_path, tp):
    world = 2 * tp
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dies, args=(r, world, tp, f"file://{tmp_path / 'rdv'}", str(tmp_path / "msg")))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [2] * (world - 1) + [3]
    for r in range(world - 1):
        msg = (tmp_path / f"msg.{r}").read_text()
        assert "died or stopped answering" in msg and f"rank {r}" in msg


def test_show_pp():
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "show", str(_spec("llama")), "--tp", "2", "--pp", "4"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    stages = [x for x in lines if x.startswith("stage ")]
    assert stages[0].startswith("stage 0: layer.0 .. layer.7 (ranks 0-1)") and len(stages) == 4
    assert "embed" in stages[0] and "lm_head" in stages[3]
    sends = [x for x in lines if x.startswith("send ")]
    assert len(sends) == 4 and "stage 3 -> stage 0" in sends[-1]
    assert "layer.0.wq: [4096, 4096] -> [2048, 4096] split axis 0 (column-parallel)" in lines
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "show", str(_spec("llama")), "--pp", "64"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--pp 64" in r.stderr and "Traceback" not in r.stderr


def test_llm_pipeline_parallel_matches_one_process(tiny_checkpoint):  # noqa: F811
    from kiln import LLM, SamplingParams

    prompts = ["The quick brown fox", [5, 17, 3, 99, 42, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(tiny_checkpoint).generate(prompts, params)]
    llm = LLM(tiny_checkpoint, pipeline_parallel_size=2)
    procs = list(llm.engine.model.procs)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    assert got == want and all(len(t) == 6 for t in got)
    assert [p.exitcode for p in procs] == [0]
    assert not torch.distributed.is_initialized()


def test_cli_generate_pp_matches_one_process(tiny_checkpoint):  # noqa: F811
    args = [tiny_checkpoint, "--prompt", "Hello there", "--max-tokens", "6"]
    one, two = _generate(*args), _generate(*args, "--pp", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert len(one.stdout.strip()) > 0 and two.stdout == one.stdout


@pytest.mark.parametrize("extra, says", [(["--pp", "2", "--backend", "cuda"], "--pp 2"),
                                         (["--pp", "2", "--quantization", "fp8"], "--pp 2"),
                                         (["--pp", "3"], "--pp 3")])
def test_cli_generate_pp_refusals(tiny_checkpoint, extra, says):  # noqa: F811
    r = _generate(tiny_checkpoint, "--prompt", "Hi", *extra)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
