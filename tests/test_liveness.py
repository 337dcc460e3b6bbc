"""codegen/fuse.py last_reads: the values a step is the last to read, which the cuda backend's _run drops after it
(session 27: every value of a step lived to its end; a 4,352-token fp8 step of the 8B shape peaked 19.8 GiB). Checked
on every family's fused program, bf16 (the GEMV prologues and epilogues fused) and fp32, by running the program's
names as _run does: every step finds each value it reads that it does not make itself, every value is dropped once,
the output is left, and what is live at once stays a layer's worth whatever the depth."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from kiln.codegen import fuse as F
from kiln.dsl import check, load_spec
from kiln.dsl.plan import Value

from tests.configs import FAMILY_CONFIGS


def _program(name: str, dtype: torch.dtype, layers: int | None = None):
    config = dict(FAMILY_CONFIGS[name])
    if layers is not None:
        key = "n_layer" if "n_layer" in config else "num_hidden_layers"
        config[key] = layers
    config = dict(transformers.AutoConfig.for_model(**config).to_dict(), architectures=config["architectures"])
    plan = check(load_spec(name.split("-")[0]), config)
    return plan, F.fuse(plan, dtype, 16)


def _most_live(plan, ops) -> int:
    """Run the program's names as the cuda backend's _run holds them; the most values held at once."""
    dead = F.last_reads(ops, plan.program.output)
    env = set(plan.program.inputs) | {Value("tokens"), Value("positions")}
    dropped: set = set()
    most = 0
    for n, op in enumerate(ops):
        made = {o for ins in op.instrs for o in ins.outputs} | set(op.outs)
        reads = F.step_reads(op)
        missing = reads - made - env
        assert not missing, f"step {n} ({op.kind.name}) reads {sorted(v.id for v in missing)}, dropped or never made"
        env |= made
        most = max(most, len(env))
        for v in dead[n]:
            assert v not in dropped, f"{v.id} dropped twice"
            dropped.add(v)
            env.discard(v)
    assert plan.program.output in env and plan.program.output not in dropped
    return most


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_every_read_finds_its_value(name, dtype):
    plan, ops = _program(name, dtype)
    _most_live(plan, ops)


@pytest.mark.parametrize("name", ["llama", "mamba2", "jamba", "gpt2"])
def test_live_values_do_not_grow_with_depth(name):
    # Kept to the end of the step, 8 layers hold about four times 2 layers' values; dropped after their last
    # reader, the same number within a layer's few residual values.
    two = _most_live(*_program(name, torch.bfloat16, 2))
    eight = _most_live(*_program(name, torch.bfloat16, 8))
    assert eight <= two + 4, (two, eight)


def test_an_unread_value_is_dropped_where_it_is_made():
    plan, ops = _program("llama", torch.float32)
    extra = Value("unread")
    op = ops[0]
    ops = [dataclasses.replace(op, outs=op.outs + (extra,))] + ops[1:]
    assert extra in F.last_reads(ops, plan.program.output)[0]
