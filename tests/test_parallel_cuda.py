"""Tensor parallelism on the cuda backend (issue 14), what a CPU can check: the fusion pass keeps every
value a collective follows as a step boundary and exposes it (KOp.collectives), a rank's fused program
is sized for its shard (parallel_weights.local_types) and its kernels compile, and what is refused is
refused by name. tests/gpu/test_parallel_cuda.py runs it on a GPU."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
from kiln.codegen.fuse import Exec, fuse, unfused
from kiln.dsl import load_spec, passes
from kiln.dsl.errors import SpecError
from kiln.dsl.ops import OpKind
from kiln.dsl.plan import Collective, Value
from kiln.runtime.parallel_weights import local_plan, local_types, local_weights

from tests.configs import FAMILY_CONFIGS

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llama", "mixtral", "qwen3_moe", "gpt2"]


def _full(config: dict) -> dict:
    import transformers

    return transformers.AutoConfig.for_model(**config).to_dict()


def _plan(name: str, ranks: int = 2):
    return passes.build(load_spec(ROOT / "models" / f"{name}.kiln"), _full(FAMILY_CONFIGS[name]), ranks=ranks)


def _rank_plan(plan, rank: int):
    return dataclasses.replace(local_plan(plan, rank), types=local_types(plan, rank))


@pytest.mark.parametrize("name", FAMILIES)
def test_fuse_exposes_every_collective_at_a_boundary(name):
    plan = _plan(name)
    want = {c.value: c.kind for c in plan.collectives}
    assert "all_gather" in want.values() and "all_reduce" in want.values()
    plain = fuse(_plan(name, 1), torch.bfloat16, 16)
    assert all(not op.collectives for op in plain)
    for rank in range(2):
        ops = fuse(_rank_plan(plan, rank), torch.bfloat16, 16)
        got = {v: kind for op in ops for v, kind in op.collectives}
        assert got == want
        for op in ops:
            inner = {a for i in op.instrs for a in i.inputs if isinstance(a, Value)}
            for v, _ in op.collectives:
                assert v in op.outs and v not in inner  # whole when the step ends; nothing in it reads it
                if op.kind is Exec.GEMM:
                    assert op.extra["fused"] is None  # its own GEMM: reduced in place, contiguous
        # the same patterns fire as on one rank: a boundary already stood at every collective
        assert [op.kind for op in ops] == [op.kind for op in plain]


def _with_collective(plan, value: Value):
    return dataclasses.replace(plan, collectives=(Collective("all_reduce", value, "test"),))


def test_fuse_splits_a_pattern_that_would_hide_a_collective():
    """A collective after a value a pattern fuses away (the residual add of residual_norm, the
    activation of gated_act): the pattern does not fire there, and the value leaves its own step."""
    plan = _plan("llama", 1)
    norm = next(i for i in plan.program.instrs if i.kind is OpKind.RMSNORM
                and plan.program.instrs[plan.program.instrs.index(i) - 1].kind is OpKind.ADD)
    add = norm.inputs[0]
    mul = next(i for i in plan.program.instrs if i.kind is OpKind.MUL)
    act = mul.inputs[0]
    base = fuse(plan, torch.bfloat16, 16)
    for v in (add, act):
        ops = fuse(_with_collective(plan, v), torch.bfloat16, 16)
        holder = [op for op in ops if any(v in i.outputs for i in op.instrs)]
        assert len(holder) == 1 and holder[0].collectives == ((v, "all_reduce"),)
        assert len(holder[0].instrs) == 1  # the add / the activation alone
        assert not any(v in i.inputs for i in holder[0].instrs)
        # one pattern instance split in two, the rest as before (counted with the GEMV prologues split
        # out: the norm left alone by the split joins its GEMM as a prologue)
        assert len(unfused(ops)) == len(unfused(base)) + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_local_types_match_the_ranks_weights(name):
    plan, one = _plan(name), _plan(name, 1)
    assert local_types(one, 0) == one.types
    from kiln.runtime.model import random_model

    full = random_model(ROOT / "models" / f"{name}.kiln", _full(FAMILY_CONFIGS[name]))
    for rank in range(2):
        types = local_types(plan, rank)
        mine = local_weights(plan, full.model.weights, rank)
        assert types[plan.program.output] == plan.types[plan.program.output]  # the gathered logits
        split = 0
        for ins in plan.program.walk():
            if ins.kind is OpKind.LINEAR and ins.out not in {c.value for c in plan.collectives}:
                w = mine[ins.inputs[1].name]
                assert types[ins.out].shape[1] == w.shape[0] and types[ins.inputs[0]].shape[1] == w.shape[1]
                split += types[ins.out] != plan.types[ins.out]
        assert split > 0
        sites = local_plan(plan, rank).sites
        for ins in plan.program.walk():
            if ins.kind is OpKind.ATTENTION:
                hd = ins.attrs.head_dim
                assert types[ins.inputs[0]].shape[1] == sites[ins.site].heads * hd
                assert types[ins.inputs[1]].shape[1] == sites[ins.site].kv_heads * hd


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_rank_kernels_compile(name, tmp_path, monkeypatch):
    """Every generated kernel of a TP=2 rank's fused program (its own widths and heads) compiles."""
    pytest.importorskip("cuda.bindings")
    from kiln.codegen import nvrtc
    from kiln.codegen.render import render

    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    specs = {}
    for op in fuse(_rank_plan(_plan(name), 1), torch.bfloat16, 16):
        for s in (op.spec if isinstance(op.spec, tuple) else (op.spec,)):
            if s is not None:
                specs.setdefault(s.key(), s)
    assert specs
    for s in specs.values():
        ks = render(s)
        img = nvrtc.compile_source(ks.source, ks.name, "sm_90a", ks.origin)
        assert img.kind == "cubin" and all(e.encode() in img.data for e in ks.entries)
    # rank 1's vocabulary-parallel embedding looks up its own rows: ids from the second half on
    (embed,) = [s for s in specs.values() if type(s).__name__ == "EmbedSpec"]
    half = FAMILY_CONFIGS[name]["vocab_size"] // 2
    assert embed.vocab == half and embed.offset == half and f"tokens[t] - {half};" in render(embed).source


# -- refusals, by name, before anything loads ------------------------------------------------------


@pytest.mark.parametrize("kw, says", [
    (dict(tensor_parallel_size=2, pipeline_parallel_size=2, backend="cuda", device="cuda"),
     "--tp 2 --pp 2: pipeline stages run on the reference backend (CPU, gloo) only, not --backend cuda"),
    (dict(pipeline_parallel_size=2, backend="cuda", device="cuda"), "--pp 2: pipeline stages run on the reference"),
    (dict(tensor_parallel_size=2, expert_parallel=True, backend="cuda", device="cuda"),
     "--tp 2 --ep: experts whole per rank (--ep) run on the reference backend"),
    (dict(tensor_parallel_size=2, backend="cuda", device="cuda:1"), "--tp 2 --backend cuda: rank r runs on cuda:r"),
    (dict(tensor_parallel_size=2, device="cuda"),
     "--tp 2: tensor parallelism on --device cuda runs on the cuda backend (--backend cuda --tp N)"),
    (dict(pipeline_parallel_size=2, device="cuda"), "--pp 2: pipeline parallelism on --device cuda runs on the CPU"),
])
def test_load_refusals(kw, says):
    from kiln.runtime.model import load_model

    with pytest.raises(SpecError) as e:
        load_model("no-such-checkpoint", **kw)
    assert says in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="has 2 GPUs")
def test_tp_cuda_refused_with_fewer_gpus_than_ranks():
    from kiln.runtime.model import load_model

    with pytest.raises(SpecError) as e:
        load_model("no-such-checkpoint", tensor_parallel_size=2, backend="cuda", device="cuda")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert f"--tp 2 --backend cuda: one GPU per rank, and this machine has {n} CUDA GPU(s)" in str(e.value)


def test_generate_checks():
    from kiln.runtime.generate import GenerateError, check_parallel

    check_parallel(2, False, "cuda", "cuda")  # allowed: one GPU per rank (counted when it loads)
    check_parallel(2, False, "cpu", None)
    for args, says in [((2, False, "cuda", None), "--tp 2: tensor parallelism on --device cuda needs --backend cuda"),
                       ((1, False, "cuda", "cuda", 2), "--pp 2: pipeline parallelism runs on the reference backend"),
                       ((2, True, "cuda", "cuda"), "--tp 2: tensor parallelism runs on the reference backend")]:
        with pytest.raises(GenerateError) as e:
            check_parallel(*args)
        assert says in str(e.value)


def _bench_args(**kw):
    base = dict(mode="throughput", device="cuda", backend="cuda", tp=2, pp=1, quantization=None,
                kv_cache_dtype="auto", lora_adapters=0, hf_batch=0, requests=1, input_len=1, output_len=1,
                max_batch=1, tp1_overhead=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, says", [
    (dict(pp=2), "--pp 2 --device cuda: pipeline stages run on CPU processes"),
    (dict(backend="reference"), "--tp 2 --device cuda runs the cuda backend (NCCL), not --backend reference"),
    (dict(tp=64), "--tp 64: the split model needs 64 CUDA GPUs of this machine (one per rank)"),
    (dict(mode="latency", tp=1, backend="reference", tp1_overhead=True), "--tp1-overhead times the cuda backend"),
])
def test_bench_refusals(kw, says):
    from kiln.runtime.bench import BenchError, check_args

    with pytest.raises(BenchError) as e:
        check_args(_bench_args(**kw))
    assert says in str(e.value)
