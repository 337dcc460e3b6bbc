"""The backend IR (dsl/plan.py): typed operands and attributes, the invariants `verify()` checks
between passes, and the weight descriptors passes set and backends read."""

from __future__ import annotations

import dataclasses

import pytest
from kiln.dsl import SpecError, check, load_spec, parse_spec, passes
from kiln.dsl.ops import OPS, OpKind
from kiln.dsl.plan import PlanError, QuantDesc, ShardDesc, Value, WeightArg
from kiln.runtime.model import make_backend, random_model

from tests.test_dsl_errors import TINY


@pytest.fixture(scope="module")
def plan():
    return check(load_spec("llama"), dict(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))


def test_operands_and_attributes_are_typed(plan):
    rope = next(i for i in plan.program.instrs if i.kind is OpKind.ROPE)
    assert isinstance(rope.inputs[0], Value) and rope.attrs.head_dim == 8 and rope.attrs.layout == "half"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rope.attrs.head_dim = 4
    linear = next(i for i in plan.program.instrs if i.kind is OpKind.LINEAR)
    assert isinstance(linear.inputs[1], WeightArg) and linear.inputs[1].name == "layer.0.wq"
    assert set(OPS) == set(OpKind) and all(OPS[k].name == k.value for k in OpKind)


def _replace_instr(plan, n, **changes):
    instrs = list(plan.program.instrs)
    instrs[n] = dataclasses.replace(instrs[n], **changes)
    return dataclasses.replace(plan, program=dataclasses.replace(plan.program, instrs=tuple(instrs)))


def test_verify_finds_a_value_read_before_it_is_defined(plan):
    bad = _replace_instr(plan, 1, inputs=(Value("layer.1/nowhere"),) + plan.program.instrs[1].inputs[1:])
    with pytest.raises(PlanError, match="layer.1/nowhere is read before it is defined"):
        bad.verify()


def test_verify_finds_a_weight_without_a_tensor(plan):
    n = next(i for i, ins in enumerate(plan.program.instrs) if ins.kind is OpKind.LINEAR)
    ins = plan.program.instrs[n]
    with pytest.raises(PlanError, match="weight nothing has no tensor"):
        _replace_instr(plan, n, inputs=(ins.inputs[0], WeightArg("nothing"), None)).verify()


def test_verify_finds_attention_sites_out_of_order(plan):
    n = next(i for i, ins in enumerate(plan.program.instrs) if ins.kind is OpKind.ATTENTION)
    with pytest.raises(PlanError, match="attention sites"):
        _replace_instr(plan, n, site=1).verify()


def test_verify_finds_attrs_of_another_op(plan):
    rope = next(i for i, ins in enumerate(plan.program.instrs) if ins.kind is OpKind.ROPE)
    with pytest.raises(PlanError, match="attrs are rmsnorm_attrs"):
        attrs = OPS[OpKind.RMSNORM].make_attrs(dict(eps=1e-6, offset=0.0, group=None))
        _replace_instr(plan, rope, attrs=attrs).verify()


def test_a_pass_that_breaks_the_plan_is_caught_where_it_ran(plan):
    def drop_outputs(p):
        return dataclasses.replace(p, program=dataclasses.replace(p.program, instrs=p.program.instrs[:-1]))

    with pytest.raises(PlanError, match="program output .* is never defined"):
        passes.run(plan, [passes.quantize("none"), drop_outputs])


def test_default_passes_leave_every_weight_unquantized_and_replicated(plan):
    out = passes.run(plan, [passes.quantize("none"), passes.shard(1)])
    assert all(not w.quant.quantized and w.shard.kind == "replicated" for w in out.weights.values())
    with pytest.raises(SpecError, match="unknown quantization scheme 'int3'"):
        passes.quantize("int3")


def test_backends_refuse_descriptors_they_cannot_run():
    model = random_model("llama", dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64))
    plan = model.plan
    quant = dict(plan.weights)
    quant["layer.0.wq"] = dataclasses.replace(quant["layer.0.wq"], quant=QuantDesc("gguf_q2_k", "blocks"))
    # The reference runs every storage format; the cuda backend refuses one it has no kernel for.
    assert passes.unsupported_weights(dataclasses.replace(plan, weights=quant), "reference", lambda d: True) == []
    with pytest.raises(SpecError, match=r"weight 'layer.0.wq' is stored as gguf_q2_k \(blocks\); the cuda backend "
                                        "does not run that format"):
        make_backend(dataclasses.replace(plan, weights=quant), model.model.weights, "cuda", "cpu")
    split = dict(plan.weights)
    split["layer.0.wo"] = dataclasses.replace(split["layer.0.wo"], shard=ShardDesc("split", 1))
    with pytest.raises(SpecError, match="weight 'layer.0.wo' is split across ranks"):
        make_backend(dataclasses.replace(plan, weights=split), model.model.weights, "reference", "cpu")


def test_a_quantized_descriptor_needs_scales(plan):
    w = dict(plan.weights)
    w["layer.0.wq"] = dataclasses.replace(w["layer.0.wq"], quant=QuantDesc("int8"))
    with pytest.raises(PlanError, match="layer.0.wq is stored as int8 with no scales"):
        dataclasses.replace(plan, weights=w).verify()


def test_a_storage_dtype_weight_is_never_read_as_float():
    text = TINY.replace('w: [hidden, hidden] <- "w.weight"', 'w: [hidden, hidden] int8 <- "w.weight"')
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "tiny.kiln"))
    assert "weight is stored as int8, which no op reads directly" in info.value.message
    assert info.value.pos.line == 14


def test_check_reports_an_op_the_backend_cannot_run(tmp_path, capsys):
    from kiln.cli import main
    from kiln.dsl.checker import check_backend

    config = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=128, vocab_size=256, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    plan = check(load_spec("llama"), config)
    check_backend(plan, "cuda")  # cuda runs every op
    with pytest.raises(SpecError, match="not supported on the tensorrt backend: rope with dynamic NTK") as info:
        check_backend(plan, "tensorrt")
    assert info.value.pos.file.endswith("llama.kiln") and info.value.pos.line > 1
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(config))
    assert main(["check", "llama", "--config", str(path), "--backend", "tensorrt"]) == 2
    assert "llama.kiln:" in capsys.readouterr().err
    assert main(["check", "llama", "--config", str(path), "--backend", "cuda"]) == 0


def test_ops_that_mix_a_sequences_rows_say_so():
    """Backends drop the rows whose logits are not wanted after the last op that mixes rows
    (OpDef.mixes_rows): an op with a per-sequence state (the conv, the scan) or over the KV cache
    (attention) must say so, or a prefill that samples one row would drop the rows it still reads."""
    for kind, d in OPS.items():
        if d.state is not None or kind is OpKind.ATTENTION:
            assert d.mixes_rows, kind
    assert {k for k, d in OPS.items() if d.mixes_rows} == {OpKind.ATTENTION, OpKind.CAUSAL_CONV1D,
                                                           OpKind.SELECTIVE_SCAN}
