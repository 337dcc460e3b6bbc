"""What multi-head latent attention needs from the language: `concat` (whole rows or head by head),
`repeat` (one [T, d] tensor for every head), and attention whose v heads are narrower than q/k's
(the reference, and the cuda lowering, which runs the reference for it). DeepSeek-V2/V3 end to end
are in tests/test_architectures.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kiln.dsl import check, load_spec
from kiln.dsl.ops import OPS, OpKind, Torch
from kiln.dsl.ops.base import KernelCall, ShapeError, TType

from tests.configs import FAMILY_CONFIGS

CONCAT, REPEAT = OPS[OpKind.CONCAT], OPS[OpKind.REPEAT]


def _ins(**attrs):
    return SimpleNamespace(attrs=SimpleNamespace(**attrs))


def test_concat_per_head():
    a = torch.arange(2 * 6, dtype=torch.float32).view(2, 6)  # 3 heads of 2
    b = -torch.arange(1, 2 * 3 + 1, dtype=torch.float32).view(2, 3)  # 3 heads of 1
    out = CONCAT.reference(None, _ins(group_a=2, group_b=1), [a, b])
    assert out.tolist()[0] == [0, 1, -1, 2, 3, -2, 4, 5, -3]
    whole = CONCAT.reference(None, _ins(group_a=None, group_b=None), [a, b])
    assert torch.equal(whole, torch.cat((a, b), 1))


def test_repeat():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert REPEAT.reference(None, _ins(times=3), [x]).tolist() == [[1, 2, 1, 2, 1, 2], [3, 4, 3, 4, 3, 4]]


@pytest.mark.parametrize("ga,gb,width_b,msg", [
    (2, None, 3, "go together"), (4, 1, 3, "not a multiple of group_a"), (2, 2, 4, "counts must match"),
])
def test_concat_errors(ga, gb, width_b, msg):
    with pytest.raises(ShapeError, match=msg):
        CONCAT.infer([TType(("T", 6)), TType(("T", width_b))], SimpleNamespace(group_a=ga, group_b=gb))


def test_repeat_error():
    with pytest.raises(ShapeError, match="times must be"):
        REPEAT.infer([TType(("T", 6))], SimpleNamespace(times=0))


@pytest.mark.parametrize("name,torch_attention", [("deepseek_v2", True), ("deepseek_v2-no-q-lora", False)])
def test_attention_v_head_dim(name, torch_attention):
    """v heads 12 wide under q/k heads of 16: one KV site with both sizes, output heads of v's width,
    and a cuda lowering that runs the reference (the kernels have one head size)."""
    cfg = FAMILY_CONFIGS[name]
    plan = check(load_spec("deepseek_v2"), cfg)
    att = [i for i in plan.program.instrs if i.kind is OpKind.ATTENTION]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    for ins in att:
        site = plan.sites[ins.site]
        assert (site.head_dim, site.v_head_dim) == (qk, cfg["v_head_dim"])
        assert plan.types[ins.out].shape[1] == cfg["num_attention_heads"] * cfg["v_head_dim"]
        low = OPS[OpKind.ATTENTION].cuda(ins, plan, torch.bfloat16)
        assert isinstance(low, Torch if torch_attention else KernelCall)
        if torch_attention:
            assert "v head size 12 != q/k head size 16" in low.why
