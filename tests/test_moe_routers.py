"""The `moe` op's routers (dsl/ops/moe.py) against transformers' own router code: DeepSeek-V2's
greedy and group_limited_greedy, DeepSeek-V3's noaux_tc (sigmoid, choice bias, groups scored by
their best two, renormalised, scaled), PhiMoE's sparsemixer; the same routers as TensorRT layers
(interpreted); checker errors; and DeepSeek-V3 end to end with a non-zero correction bias (random
init leaves it at zero, so the family test cannot see it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kiln.dsl.ops import moe
from kiln.dsl.ops.base import ShapeError
from kiln.runtime import verify as verify_mod
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from tests.configs import FAMILY_CONFIGS

E, H, TOK = 16, 32, 40


def attrs(**over):
    a = dict(top_k=2, renormalize=False, scoring="softmax", groups=None, topk_groups=None, group_score="max",
             scale=1.0, select="topk", jitter_eps=0.01)
    a.update(over)
    return SimpleNamespace(**a)


def dense(weights, idx, n=E):
    """[T, k] weights at [T, k] indices -> [T, n], order-free."""
    return torch.zeros(weights.shape[0], n, dtype=torch.float64).scatter(1, idx.long(), weights.double())


def _hf_router(cls, **cfg):
    config = SimpleNamespace(num_experts_per_tok=3, num_experts=E, num_local_experts=E, hidden_size=H,
                             routed_scaling_factor=1.0, topk_method="greedy", n_group=None, topk_group=None,
                             norm_topk_prob=False)
    for k, v in cfg.items():
        setattr(config, k, v)
    r = cls(config)
    torch.manual_seed(0)
    with torch.no_grad():
        r.weight.normal_()
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.copy_(torch.randn(E) * 0.3)  # big enough to change choices
    return r


@pytest.mark.parametrize("method,groups", [("greedy", None), ("group_limited_greedy", 4)])
def test_deepseek_v2_router(method, groups):
    r = _hf_router(DeepseekV2TopkRouter, topk_method=method, n_group=groups, topk_group=2 if groups else None,
                   routed_scaling_factor=1.7)
    h = torch.randn(TOK, H)
    logits, w_hf, i_hf = r(h)
    w, i = moe.route(logits, None, attrs(top_k=3, groups=groups, topk_groups=2 if groups else None, scale=1.7))
    assert torch.allclose(dense(w, i), dense(w_hf, i_hf), atol=1e-7)
    if groups:  # the groups bite: the ungrouped choice differs for some token
        w0, i0 = moe.route(logits, None, attrs(top_k=3, scale=1.7))
        assert not torch.equal(dense(w0, i0), dense(w, i))


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_router(norm):
    r = _hf_router(DeepseekV3TopkRouter, n_group=4, topk_group=2, norm_topk_prob=norm, routed_scaling_factor=2.5)
    h = torch.randn(TOK, H)
    logits, w_hf, i_hf = r(h)
    at = attrs(top_k=3, scoring="sigmoid", groups=4, topk_groups=2, group_score="top2_sum", renormalize=norm,
               scale=2.5)
    w, i = moe.route(logits, r.e_score_correction_bias, at)
    assert torch.allclose(dense(w, i), dense(w_hf, i_hf), atol=1e-6)
    # the bias changes choices, never weights: without it some token picks differently
    w0, i0 = moe.route(logits, None, at)
    assert not torch.equal(i0.sort(-1).values, i.sort(-1).values)


def test_sparsemixer():
    torch.manual_seed(1)
    scores = torch.randn(TOK, E) * 0.05  # close logits, so the jitter threshold keeps several experts
    scores[:5] *= 40  # and far ones, where it keeps only the top
    w_hf, i_hf = sparsemixer(scores, jitter_eps=0.01, training=False)
    w, i = moe.route(scores, None, attrs(select="sparsemixer", jitter_eps=0.01))
    assert torch.equal(i, i_hf) and torch.allclose(w, w_hf, atol=1e-7)


@pytest.mark.parametrize("over,msg", [
    (dict(groups=3, topk_groups=1), "groups must divide"),
    (dict(groups=4, topk_groups=5), "topk_groups must be in"),
    (dict(groups=8, topk_groups=1, top_k=3), "top_k 3 is more than"),
    (dict(topk_groups=2), "topk_groups needs groups"),
    (dict(scoring="relu"), "scoring must be"),
    (dict(select="sparsemixer", top_k=3), "exactly 2"),
    (dict(select="sparsemixer", scoring="sigmoid"), "sparsemixer takes no"),
    (dict(group_score="mean", groups=4, topk_groups=2), "group_score must be"),
])
def test_shape_errors(over, msg):
    from kiln.dsl.ops.base import TType
    x, lg = TType(("T", H)), TType(("T", E))
    with pytest.raises(ShapeError, match=msg):
        moe._shape([x, lg, None], attrs(**over))


def test_bias_shape_error():
    from kiln.dsl.ops.base import TType
    with pytest.raises(ShapeError, match="correction bias"):
        moe._shape([TType(("T", H)), TType(("T", E)), TType((E + 1,))], attrs())


# ---- TensorRT: gates() interpreted layer by layer against route()

@pytest.mark.parametrize("case", ["v2-groups", "v3", "sparsemixer", "mixtral"])
def test_trt_gates_match_reference(case):
    trt_api = pytest.importorskip("kiln.codegen.trt_api")
    try:
        t = trt_api.load_tensorrt().module
    except trt_api.TensorRTMissing as e:
        pytest.skip(f"TensorRT not installed: {e}")
    from kiln.codegen.trt_layers import Network

    from tests.trt_interp import run_network

    kw = {"v2-groups": dict(top_k=3, groups=4, topk_groups=2, scale=1.7),
          "v3": dict(top_k=3, scoring="sigmoid", groups=4, topk_groups=2, group_score="top2_sum", renormalize=True,
                     scale=2.5),
          "sparsemixer": dict(select="sparsemixer", jitter_eps=0.01),
          "mixtral": dict(top_k=2, renormalize=True)}[case]
    torch.manual_seed(2)
    logits = torch.randn(TOK, E) * (0.05 if case == "sparsemixer" else 1.0)
    bias = torch.randn(E) * 0.3 if case == "v3" else None
    net = t.Builder(t.Logger(t.Logger.ERROR)).create_network(1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    nn = Network(t, net, {"bias": bias} if bias is not None else {}, dtype="fp32", max_seq_len=64, page_size=4)
    x = nn.input("logits", t.float32, (-1, E))
    trt_kw = {k: v for k, v in kw.items()}
    if bias is not None:
        trt_kw["bias"] = nn.weight("bias")
    outs = moe.gates(nn, x, experts=E, **{"top_k": 2, "renormalize": False, **trt_kw})
    for n, o in enumerate(outs):
        o.name = f"gate{n}"
        net.mark_output(o)
    got = run_network(t, net, {"logits": logits})
    got = torch.cat([got[f"gate{n}"] for n in range(E)], 1).double()
    w, i = moe.route(logits, bias, attrs(**kw))
    assert torch.allclose(got, dense(w, i), atol=1e-6)


# ---- DeepSeek-V3 end to end with a non-zero e_score_correction_bias

def test_deepseek_v3_with_correction_bias(monkeypatch):
    make = verify_mod.hf_random_model

    def with_bias(config, seed=0):
        model = make(config, seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=g) * 0.2)
        return model

    monkeypatch.setattr(verify_mod, "hf_random_model", with_bias)
    report = verify_mod.verify(FAMILY_CONFIGS["deepseek_v3"], steps=8)
    assert report.ok(1e-4), report.max_rel
