"""`stack(src, i=n)`: a weight gathered from n checkpoint tensors, one per index value (StableLM's
per-head q/k LayerNorms keep one tensor per head), stacked along a new first dimension."""

from __future__ import annotations

import pytest
import torch
from kiln.dsl import SpecError, check, load_spec, parse_spec
from kiln.runtime.checkpoint import CheckpointError, open_checkpoint, save_safetensors_checkpoint
from kiln.runtime.weights import load_weights

from tests.configs import FAMILY_CONFIGS

SPEC = """spec stacked
param heads: int = 3
param hd: int = 4
param layers: int = 2
weights {
  embed: [8, heads * hd] <- "embed.weight"
}
block layer[layers] {
  weights "layers.{layer}." {
    qn: [heads, hd] <- SOURCE
  }
  forward(x) {
    return layernorm(x, qn, group=hd)
  }
}
forward(tokens) {
  return linear(layer(embedding(tokens, embed)), embed)
}
"""

DEFAULT = 'stack("norms.{head}.weight", head=heads)'


def spec(source: str = DEFAULT):
    return parse_spec(SPEC.replace("SOURCE", source), "stacked.kiln")


def ckpt(tmp_path, tensors):
    save_safetensors_checkpoint(tmp_path, tensors, {})
    return open_checkpoint(tmp_path)


def tensors(shape=(4,), odd=None):
    out = {"embed.weight": torch.randn(8, 12)}
    for layer in range(2):
        for h in range(3):
            size = odd if (odd and (layer, h) == (1, 2)) else shape
            out[f"layers.{layer}.norms.{h}.weight"] = torch.full(size, 10.0 * layer + h)
    return out


def test_stack_gathers_one_tensor_per_index_in_order(tmp_path):
    t = tensors()
    w = load_weights(check(spec(), {}), ckpt(tmp_path, t))
    for layer in range(2):
        want = torch.stack([t[f"layers.{layer}.norms.{h}.weight"] for h in range(3)])
        assert torch.equal(w[f"layer.{layer}.qn"], want)


def test_stack_composes_with_other_transforms(tmp_path):
    # each checkpoint tensor [2, 2] reshaped to [4] before stacking; the branch picked by a parameter
    t = {k: (v.reshape(2, 2) if "norms" in k else v) for k, v in tensors().items()}
    s = spec('stack(reshape("norms.{head}.weight", [hd]), head=heads) if heads == 3 else none')
    w = load_weights(check(s, {}), ckpt(tmp_path, t))
    assert torch.equal(w["layer.1.qn"][2], t["layers.1.norms.2.weight"].reshape(4))


def test_stack_of_different_shapes_names_the_tensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"weight 'layer\.1\.qn' \(stacked\.kiln:10:5\): cannot stack "
                       r"tensors of different shapes over 'head': 'layers\.1\.norms\.0\.weight' is \[4\], "
                       r"'layers\.1\.norms\.2\.weight' is \[5\]"):
        load_weights(check(spec(), {}), ckpt(tmp_path, tensors(odd=(5,))))


def test_stack_missing_tensor_names_it(tmp_path):
    t = tensors()
    del t["layers.0.norms.1.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'layers\.0\.norms\.1\.weight'.*weight 'layer\.0\.qn'"):
        load_weights(check(spec(), {}), ckpt(tmp_path, t))


@pytest.mark.parametrize("source,fragment", [
    ('stack("norms.{head}.weight")', "stack() takes one source and one index=count"),
    ('stack("norms.{head}.weight", head=heads, dim=0)', "stack() takes one source and one index=count"),
    ('stack("a", "b", head=heads)', "stack() takes one source and one index=count"),
    ('stack("norms.{head}.weight", head=0)', "stack() count must be a positive int, got 0"),
    ('stack("norms.{head}.weight", head=1.5)', "stack() count must be a positive int, got 1.5"),
    ('stack("norms.{head}.weight", heads=heads)', "stack index 'heads' is already a name here"),
    ('stack("norms.{layer}.weight", layer=heads)', "stack index 'layer' is already a name here"),
    ('stack(none, head=heads)', "cannot transform an absent (none) weight"),
    ('stack(embed, head=heads)', "stack() stacks checkpoint tensors, not another weight"),
    ('stack("norms.{h}.weight", head=heads)', "'{h}' in tensor name"),
    ('stack("norms.{head}.weight", if=heads)', "'if' is a reserved word and cannot name a stack index"),
])
def test_stack_errors(source, fragment):
    with pytest.raises(SpecError) as e:
        check(spec(source), {})
    assert fragment in str(e.value)
    assert "stacked.kiln:10:" in str(e.value)


def test_stack_index_is_only_bound_inside(tmp_path):
    """`{head}` outside a stack is an error naming the tensor: the index does not leak."""
    with pytest.raises(SpecError, match=r"'\{head\}' in tensor name 'layers\.\{layer\}\.norms\.\{head\}\.weight'"):
        check(spec('"norms.{head}.weight"'), {})


def test_stablelm_qk_layernorm_stacks_one_row_per_head():
    plan = check(load_spec("stablelm"), FAMILY_CONFIGS["stablelm-qknorm"])
    q = plan.weights["layer.0.q_norm"]
    k = plan.weights["layer.1.k_norm"]
    assert q.shape == (4, 16) and k.shape == (2, 16)
    assert q.source.srcs[3].name == "model.layers.0.self_attn.q_layernorm.norms.3.weight"
    assert k.source.srcs[1].name == "model.layers.1.self_attn.k_layernorm.norms.1.weight"
    assert plan.weights["layer.0.q_norm"].source is not None
    plain = check(load_spec("stablelm"), FAMILY_CONFIGS["stablelm"])
    assert plain.weights["layer.0.q_norm"].source is None  # qk_layernorm off: no norm, no tensors
