"""Tensor and expert parallelism (issue 14) on CPU with gloo: two processes on this machine.

Every family of FAMILY_CONFIGS runs split over 2 ranks (one process group for all of them) and must
give the single process's greedy tokens with logits within 1e-5 (fp32); MoE families also with
experts split across ranks (EP). Sharded loading reads only each rank's slices; a dead rank is
detected; `kiln show --tp` prints the shards and collectives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from kiln.dsl import load_spec, passes
from kiln.dsl.errors import SpecError
from kiln.dsl.ops import OPS
from kiln.runtime.model import SingleSequence, random_model

from tests.configs import FAMILY_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
PROMPT, STEPS = [5, 17, 3, 99, 42, 7], 3


def _cases():
    out = []
    for name, config in FAMILY_CONFIGS.items():
        moe = any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        out += [(name, "tp")] + ([(name, "ep")] if moe else [])
    return out


def _full(config: dict) -> dict:
    """The config as transformers writes it to config.json (every default filled in)."""
    import transformers

    return transformers.AutoConfig.for_model(**config).to_dict()


def _spec(name):
    return ROOT / "models" / f"{name.split('-')[0]}.kiln"


def _greedy(step, n):
    """Greedy tokens and every step's logits of a `step(tokens) -> logits` driver."""
    logits = [step(PROMPT)[-1]]
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits.append(step([tokens[-1]])[-1])
    return tokens, torch.stack(logits)


def compare_on_rank0(full, model, steps: int) -> dict:
    """Rank 0's side of a split-vs-single check: `steps` greedy steps of the single-process model and
    of `model` (this rank's part, the workers following through ParallelModel), which then stop:
    both runs' tokens and the largest logit difference, or the error a case raised."""
    from kiln.runtime import distributed as d

    want_tokens, want = _greedy(SingleSequence(full, 32).step, steps)
    seq = SingleSequence(full, 32)
    seq.model = d.ParallelModel(model)
    seq.kv = d.KVStore(model.plan.sites, seq.kv.num_pages, seq.kv.page_size, torch.float32)
    try:
        got_tokens, got = _greedy(seq.step, steps)
    except (RuntimeError, ValueError, IndexError, KeyError) as e:  # reported per case
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        seq.model.shutdown()
    return {"tokens": [want_tokens, got_tokens], "diff": float((got - want).abs().max())}


def check_same_as_single(r: dict) -> None:
    """A compare_on_rank0 result: skipped (the pass refused the case, saying why) or the same greedy
    tokens as the single process with logits within 1e-5."""
    if "skip" in r:
        pytest.skip(r["skip"])
    assert "error" not in r, r.get("error")
    want, got = r["tokens"]
    assert got == want
    assert r["diff"] <= 1e-5


def _rank(rank, world, init, cases, configs, out):
    from kiln.runtime import distributed as d

    comm = d.init(rank, world, init, timeout_s=60)
    results = {}
    for name, mode in cases:
        full = random_model(_spec(name), configs[name])
        try:
            plan = passes.build(load_spec(_spec(name)), configs[name], ranks=world, experts=mode)
        except SpecError as e:
            results[f"{name}/{mode}"] = {"skip": str(e)}
            continue
        model = d.rank_model(plan, full.model.weights, comm)
        if rank:
            d.worker_loop(model)
            continue
        results[f"{name}/{mode}"] = r = compare_on_rank0(full, model, STEPS)
        r.update(split=sum(w.shard.kind != "replicated" for w in plan.weights.values()),
                 collectives=len(plan.collectives))
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    out = tmp / "results.json"
    configs = {n: _full(c) for n, c in FAMILY_CONFIGS.items()}
    mp.spawn(_rank, args=(2, f"file://{tmp / 'rdv'}", _cases(), configs, str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", [f"{n}/{m}" for n, m in _cases()])
def test_tp2_matches_single_process(tp_results, case):
    r = tp_results[case]
    check_same_as_single(r)
    assert r["collectives"] > 0 and r["split"] > 0  # something was really split


def test_sharded_load_reads_only_each_ranks_slices(tmp_path):
    from kiln.runtime.checkpoint import open_checkpoint
    from kiln.runtime.parallel_weights import load_sharded, local_weights
    from safetensors.torch import save_file

    config = FAMILY_CONFIGS["llama"]
    full = random_model(_spec("llama"), config)
    names = {s.name: s.source.name for s in full.plan.weights.values() if s.source is not None}
    save_file({names[n]: t.contiguous() for n, t in full.model.weights.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(tmp_path)
    plan = passes.build(load_spec(_spec("llama")), config, ranks=2)
    whole = sum(t.numel() * 4 for t in full.model.weights.values())
    total = 0
    for rank in range(2):
        got, nbytes = load_sharded(plan, ckpt, rank)
        want = local_weights(plan, full.model.weights, rank)
        assert set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), n
        split = sum(want[n].numel() * 4 for n, s in plan.weights.items() if s.shard.kind == "split" and n in want)
        replicated = sum(want[n].numel() * 4 for n, s in plan.weights.items() if s.shard.kind != "split" and n in want)
        assert nbytes == split + replicated < whole
        total += nbytes
    assert total < 2 * whole


def _dies(rank, init, out):
    from kiln.runtime import distributed as d

    comm = d.init(rank, 2, init, timeout_s=10)
    full = random_model(_spec("llama"), FAMILY_CONFIGS["llama"])
    plan = passes.build(load_spec(_spec("llama")), FAMILY_CONFIGS["llama"], ranks=2)
    model = d.rank_model(plan, full.model.weights, comm)
    if rank == 1:
        comm.broadcast()  # the first step's batch arrives: die in the middle of the request
        os._exit(3)
    step_until_lost(full, model, out)


def step_until_lost(full, model, out: str) -> None:
    """Rank 0 of a dead-rank test: steps through ParallelModel until RankLost, whose message goes to
    `out`; exit status 2 then, 0 if every step completed."""
    from kiln.runtime import distributed as d

    seq = SingleSequence(full, 32)
    seq.model = d.ParallelModel(model)
    seq.kv = d.KVStore(model.plan.sites, 2, 16, torch.float32)
    try:
        for _ in range(4):
            seq.step([1, 2, 3])
    except d.RankLost as e:
        Path(out).write_text(str(e))
        os._exit(2)
    os._exit(0)


def test_dead_rank_is_detected(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dies, args=(r, f"file://{tmp_path / 'rdv'}", str(tmp_path / "msg"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [2, 3]
    assert "another rank died" in (tmp_path / "msg").read_text() or "a rank died" in (tmp_path / "msg").read_text()


@pytest.mark.parametrize("spec", ["llama", "mixtral"])
def test_show_tp(spec):
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "show", str(_spec(spec)), "--tp", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "layer.0.wq: [4096, 4096] -> [2048, 4096] split axis 0 (column-parallel)" in lines
    assert "layer.0.wo: [4096, 4096] -> [4096, 2048] split axis 1 (row-parallel)" in lines
    assert "lm_head: [32000, 4096] -> [16000, 4096] split axis 0 (column-parallel)" in lines
    assert "embed: [32000, 4096] -> [16000, 4096] split axis 0 (column-parallel)" in lines  # vocabulary-parallel
    coll = [x for x in lines if x.startswith("all_")]
    assert coll[0].startswith("all_gather") and "linear at llama.kiln" in coll[0]
    assert coll[1].startswith("all_reduce x after embedding") and "vocabulary-parallel" in coll[1]
    assert len(coll) == 2 + 2 * 32  # the logits' gather, the embedding's sum, two all-reduces a layer (o; down or moe)
    if spec == "llama":
        assert "layer.0.w_down: [4096, 11008] -> [4096, 5504] split axis 1 (row-parallel)" in lines
    else:
        assert "layer.0.expert.0.w2: [4096, 11008] -> [4096, 5504] split axis 1 (row-parallel)" in lines
        assert any("after moe at mixtral.kiln" in x for x in coll)


def test_show_tp_70b_class_holds_an_eighth_per_rank():
    """Llama-3-70B's shape over 8 ranks: every weight but the norms is split (the embedding by vocabulary
    rows, one KV head a rank), so the largest rank holds an eighth of the parameters."""
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "show", "llama", "--config", "configs/llama-3-70b.json",
                        "--tp", "8"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    whole, most = (int(n.replace(",", "")) for n in re.match(
        r"# parameters: ([\d,]+) in all; the largest rank holds ([\d,]+)", lines[1]).groups())
    assert 70e9 < whole < 71e9
    assert abs(most * 8 / whole - 1) < 1e-3
    assert "layer.0.wk: [1024, 8192] -> [128, 8192] split axis 0 (column-parallel)" in lines


def test_vocabulary_parallel_embedding_reads_only_its_rows():
    """A rank's embedding (offset = its first vocabulary row) gives its rows for the ids it holds and zero
    rows for the others, so the all-reduce of the ranks' lookups is the whole table's lookup."""
    from kiln.runtime.parallel_weights import local_plan, local_weights

    config = FAMILY_CONFIGS["llama"]
    full = random_model(_spec("llama"), config)
    plan = passes.build(load_spec(_spec("llama")), config, ranks=2)
    ids = torch.tensor([0, 5, config["vocab_size"] - 1, config["vocab_size"] // 2, 7])
    whole = torch.nn.functional.embedding(ids, full.model.weights["embed"])
    total = torch.zeros_like(whole)
    for rank in range(2):
        lp = local_plan(plan, rank)
        ins = next(i for i in lp.program.instrs if i.kind.value == "embedding")
        assert ins.attrs.offset == rank * config["vocab_size"] // 2
        part = OPS[ins.kind].reference(None, ins, [ids, local_weights(plan, full.model.weights, rank)["embed"]])
        held = (ids >= ins.attrs.offset) & (ids < ins.attrs.offset + config["vocab_size"] // 2)
        assert torch.equal(part[held], whole[held]) and not part[~held].any()
        total += part
    assert torch.equal(total, whole)


# -- the entry points: LLM(tensor_parallel_size=N) and `kiln generate --tp N` -----------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random-init transformers Llama (FAMILY_CONFIGS' llama, the default model's vocabulary) saved
    with save_pretrained, with the default model's tokenizer."""
    transformers = pytest.importorskip("transformers")
    from kiln.runtime.checkpoint import open_checkpoint
    from kiln.runtime.gguf_file import default_model_path
    from kiln.runtime.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tp-ckpt") / "ckpt"
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**dict(FAMILY_CONFIGS["llama"], vocab_size=49152))
    transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(folder)
    Tokenizer.from_checkpoint(open_checkpoint(default_model_path())).save(folder)
    return str(folder)


def test_llm_tensor_parallel_matches_one_process(tiny_checkpoint):
    from kiln import LLM, SamplingParams

    prompts = ["The quick brown fox", [5, 17, 3, 99, 42, 7]]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(tiny_checkpoint).generate(prompts, params)]
    llm = LLM(tiny_checkpoint, tensor_parallel_size=2)
    procs = list(llm.engine.model.procs)
    assert len(procs) == 1 and procs[0].is_alive()
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()
    assert got == want and all(len(t) == 8 for t in got)
    assert [p.exitcode for p in procs] == [0]  # the worker left its loop when told to stop
    assert not torch.distributed.is_initialized()


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "kiln.cli", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_generate_tp_matches_one_process(tiny_checkpoint):
    args = [tiny_checkpoint, "--prompt", "Hello there", "--max-tokens", "8"]
    one, two = _generate(*args), _generate(*args, "--tp", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert len(one.stdout.strip()) > 0 and two.stdout == one.stdout
    assert "Traceback" not in two.stderr


def _torchrun(procs: int, *args):
    """`torchrun --standalone --nproc-per-node procs -m kiln.cli generate ...`: every process runs the
    command; they meet at torchrun's rendezvous (as on several nodes with --rdzv-endpoint)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(procs), "-m", "kiln.cli", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("split", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_torchrun_generate_matches_one_process(tiny_checkpoint, split):
    """Under torchrun the ranks join its process group (no processes of Kiln's own): rank 0 prints the
    single process's text, the other rank prints nothing, and both exit 0."""
    args = [tiny_checkpoint, "--prompt", "Hello there", "--max-tokens", "8"]
    one, run = _generate(*args), _torchrun(2, *args, *split)
    assert one.returncode == 0 and run.returncode == 0, (one.stderr, run.stderr)
    assert len(one.stdout.strip()) > 0 and run.stdout == one.stdout


def test_torchrun_world_size_must_match(tiny_checkpoint):
    r = _torchrun(2, tiny_checkpoint, "--prompt", "Hi", "--tp", "4")
    assert r.returncode != 0
    assert "--tp 4: 4 ranks, but torchrun started WORLD_SIZE=2 processes" in r.stderr


@pytest.mark.parametrize("extra, says", [(["--backend", "cuda"], "--tp 2"), (["--quantization", "fp8"], "--tp 2"),
                                         (["--ep"], "--ep")])
def test_cli_generate_tp_refusals(tiny_checkpoint, extra, says):
    r = _generate(tiny_checkpoint, "--prompt", "Hi", "--tp", "1" if extra == ["--ep"] else "2", *extra)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "Traceback" not in r.stderr
