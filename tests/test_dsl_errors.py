"""Malformed specs: each gives its own message at the right line and column, with the
source line and a caret, and never anything but a SpecError."""

from __future__ import annotations

import pytest
from kiln.dsl import SpecError, check, parse_spec

TINY = """\
spec tiny
param vocab: int = 50
param hidden: int = 16
param layers: int = 2
weights {
  embed: [vocab, hidden] <- "embed.weight"
  norm: [hidden] <- "norm.weight"
}
block layer[layers] {
  weights "layers.{layer}." {
    w: [hidden, hidden] <- "w.weight"
  }
  forward(x) {
    return x + linear(rmsnorm(x, norm), w)
  }
}
forward(tokens) {
  x = embedding(tokens, embed)
  x = layer(x)
  return linear(x, embed)
}
"""


def test_tiny_is_valid():
    plan = check(parse_spec(TINY, "tiny.kiln"))
    assert plan.vocab_size == 50
    assert [s for s in plan.weights] == ["embed", "norm", "layer.0.w", "layer.1.w"]


# (name, replace this, with this, message fragment, line, col)
CASES = [
    ("no header", "spec tiny\n", "", "a spec starts with `spec NAME`", 1, 1),
    ("param without type", "param hidden: int = 16", "param hidden = 16", "parameter needs a type", 3, 14),
    ("param without default", "param layers: int = 2", "param layers: int", "needs a default value", 5, 1),
    ("unknown param type", "param layers: int = 2", "param layers: integer = 2", "unknown parameter type 'integer'", 4, 15),
    ("weight without arrow", '  norm: [hidden] <- "norm.weight"', '  norm: [hidden] "norm.weight"',
     "a weight is `name: [dims] <- source`", 7, 18),
    ("unknown weight dtype", '[hidden] <- "norm', '[hidden] float16 <- "norm', "unknown weight dtype 'float16'", 7, 18),
    ("unclosed paren", "return x + linear(rmsnorm(x, norm), w)", "return x + linear(rmsnorm(x, norm, w)",
     "unbalanced brackets", 15, 3),
    ("missing brace at end", "  return linear(x, embed)\n}\n", "  return linear(x, embed)\n",
     "missing closing brace", 20, 25),
    ("bad character", "x = layer(x)", "x = layer(x) @ 2", "unexpected character '@'", 19, 16),
    ("undefined value", "return linear(x, embed)", "return linear(y, embed)", "undefined name 'y'", 20, 17),
    ("unknown op", "x = embedding(tokens, embed)", "x = embed_lookup(tokens, embed)", "unknown op 'embed_lookup'", 18, 7),
    ("too many operands", "return linear(x, embed)", "return linear(x, embed, embed, x)",
     "linear() takes 2 to 3 tensor operand(s), got 4", 20, 10),
    ("unknown attribute", "rmsnorm(x, norm)", "rmsnorm(x, norm, epsilon=1e-5)", "rmsnorm() has no attribute 'epsilon'", 14, 40),
    ("norm group not dividing", "rmsnorm(x, norm)", "rmsnorm(x, norm, group=5)",
     "rmsnorm: group must divide the 16 features, got 5", 14, 23),
    ("norm weight not the group's width", "rmsnorm(x, norm)", "rmsnorm(x, norm, group=4)",
     "rmsnorm: norm weight must be [4], got float[16]", 14, 23),
    ("membership in a number", "param layers: int = 2", "param layers: int = 2 if 1 in 5 else 3",
     "'in' needs a list (or a string) on its right, got 5", 4, 31),
    ("attribute of wrong type", "rmsnorm(x, norm)", 'rmsnorm(x, norm, eps="small")', "attribute 'eps' must be float", 14, 44),
    ("shape mismatch", 'w: [hidden, hidden] <- "w.weight"', 'w: [hidden, vocab] <- "w.weight"',
     "input has 16 features but the weight is float[16, 50]", 14, 16),
    ("unused weight", '  norm: [hidden] <- "norm.weight"\n', '  norm: [hidden] <- "norm.weight"\n  extra: [hidden] <- "extra.weight"\n',
     "weight 'extra' is declared but never used", 8, 3),
    ("duplicate declaration", "param layers: int = 2", "param layers: int = 2\nparam hidden: int = 8",
     "'hidden' is already declared as a parameter", 5, 7),
    ("reserved word as name", "param layers: int = 2", "param class: int = 2", "'class' is a reserved word", 4, 7),
    ("double underscore name", "x = layer(x)", "x__1 = layer(x)", "'__' is reserved", 19, 3),
    ("unknown index in tensor name", '"layers.{layer}."', '"layers.{lyr}."', "'{lyr}' in tensor name 'layers.{lyr}.w.weight'", 11, 28),
    ("bad tensor name characters", '"w.weight"', '"w.weight\'); import os; (\'"', "invalid tensor name", 11, 28),
    ("repeat count not int", "block layer[layers]", "block layer[hidden / 3]", "repeats 5.333333333333333 times", 9, 20),
    ("block never called", "x = layer(x)\n", "", "block 'layer' is never called", 9, 7),
    ("no return", "  return linear(x, embed)\n", "", "forward has no return", 17, 1),
    ("division by zero", "block layer[layers]", "block layer[layers // 0]", "division by zero", 9, 20),
    ("tensor plus constant", "return linear(x, embed)", "return linear(x, embed) + 1.0",
     "cannot add a constant to a tensor", 20, 27),
    ("weight used as value", "return linear(x, embed)", "return embed", "weight 'embed' used directly", 20, 10),
    ("statement after return", "  return linear(x, embed)\n", "  return linear(x, embed)\n  y = x\n",
     "statement after return", 21, 3),
]


@pytest.mark.parametrize("name,old,new,fragment,line,col", CASES, ids=[c[0] for c in CASES])
def test_malformed_spec(name, old, new, fragment, line, col):
    assert old in TINY, f"case {name!r} does not apply to TINY"
    text = TINY.replace(old, new, 1)
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "tiny.kiln"))
    e = info.value
    assert fragment in e.message, e.render()
    assert e.pos is not None and (e.pos.file, e.pos.line, e.pos.col) == ("tiny.kiln", line, col), e.render()
    rendered = e.render()
    assert rendered.startswith(f"tiny.kiln:{line}:{col}: error: ")
    assert text.splitlines()[line - 1] in rendered  # the offending line is shown
    assert "^" in rendered.splitlines()[2]  # with a caret under it


def test_at_least_twenty_cases():
    assert len({c[3] for c in CASES}) >= 20


def test_config_errors_name_the_key_and_file():
    spec = parse_spec(TINY.replace("param vocab: int = 50", "param vocab: int = 50 <- vocab_size"), "tiny.kiln")
    with pytest.raises(SpecError) as info:
        check(spec, {"hidden_size": 3}, "/ckpt/config.json")
    assert "/ckpt/config.json: missing config key 'vocab_size'" in info.value.message
    with pytest.raises(SpecError) as info:
        check(spec, {"vocab_size": "many"}, "/ckpt/config.json")
    assert "/ckpt/config.json: key 'vocab_size' (parameter 'vocab') is 'many', expected an int" in info.value.message


# `drop` in a spec that extends another (models/llama.kiln as the base).
DROP_BASE = """\
spec moe_llama extends llama
param experts: int = 2
block expert[experts] {
  weights "model.layers.{layer}.experts.{expert}." {
    w1: [hidden, hidden] <- "w1.weight"
  }
  forward(x) {
    return linear(x, w1)
  }
}
block layer {
  drop w_gate, w_up, w_down
  weights "model.layers.{layer}." {
    router: [experts, hidden] <- "router.weight"
  }
  forward(x) {
    h = rmsnorm(x, attn_norm, eps=eps)
    x = x + linear(attention(linear(h, wq, bq), linear(h, wk, bk), linear(h, wv, bv), head_dim=head_dim), wo, bo)
    h = rmsnorm(x, mlp_norm, eps=eps)
    return x + moe(h, linear(h, router), experts=expert, top_k=1)
  }
}
"""
SMALL = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8)


def test_drop_removes_inherited_weights():
    plan = check(parse_spec(DROP_BASE, "moe.kiln"), SMALL)
    names = set(plan.weights)
    assert "layer.0.router" in names and "layer.1.expert.1.w1" in names
    assert not any(n.endswith(("w_gate", "w_up", "w_down")) for n in names)  # neither demanded nor loaded
    assert "layer.0.wq" in names  # what is not dropped is still inherited


DROP_CASES = [
    ("name the base lacks", "drop w_gate, w_up, w_down", "drop w_gate, w_up, w_dwn",
     "block 'layer' of spec 'llama' declares no 'w_dwn'", 12, 22),
    ("inherited weight still used", "drop w_gate, w_up, w_down", "drop w_gate, w_up, w_down, mlp_norm",
     "undefined name 'mlp_norm'", 19, 20),
    ("top-level name the base lacks", "param experts: int = 2", "drop nonsense\nparam experts: int = 2",
     "base spec 'llama' declares no parameter, weight or block 'nonsense'", 2, 6),
    ("top-level drop and redeclaration", "param experts: int = 2", "drop ffn\nparam ffn: int = 2\nparam experts: int = 2",
     "'ffn' is both dropped and declared", 3, 7),
    ("drop in a new block", "  forward(x) {\n    return linear(x, w1)", "  drop w9\n  forward(x) {\n    return linear(x, w1)",
     "block 'expert' is new in spec 'moe_llama'", 7, 8),
    ("drop without extends", "spec moe_llama extends llama", "spec moe_llama", "spec 'moe_llama' extends none", 12, 8),
]


@pytest.mark.parametrize("name, old, new, fragment, line, col", DROP_CASES, ids=[c[0] for c in DROP_CASES])
def test_drop_errors(name, old, new, fragment, line, col):
    assert old in DROP_BASE, name
    text = DROP_BASE.replace(old, new, 1)
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "moe.kiln"), SMALL)
    e = info.value
    assert fragment in e.message, e.render()
    assert e.pos is not None and (e.pos.file, e.pos.line, e.pos.col) == ("moe.kiln", line, col), e.render()


def test_unused_inherited_weight_suggests_drop():
    text = DROP_BASE.replace("drop w_gate, w_up, w_down", "drop w_gate, w_up")
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "moe.kiln"), SMALL)
    e = info.value
    assert e.message == "weight 'w_down' of block 'layer' is declared but never used"
    assert e.pos.file.endswith("llama.kiln")  # where it was declared
    assert e.hint == "it is inherited from llama.kiln: use it, or write `drop w_down` inside block 'layer' in moe.kiln"


def test_tensor_if_keeps_one_branch_per_block_copy():
    """`a if test else b` between tensors: per copy of the block, only the taken branch is
    built; a weight used only in the other branch is not an unused-weight error."""
    text = TINY.replace("    return x + linear(rmsnorm(x, norm), w)",
                        "    return x + linear(rmsnorm(x, norm), w) if layer == 0 else x * 2.0")
    plan = check(parse_spec(text, "tiny.kiln"))
    kinds = [i.kind.value for i in plan.program.instrs]
    assert kinds.count("rmsnorm") == 1 and kinds.count("scale") == 1  # layer 0 the MLP, layer 1 the doubling
    assert "select" not in kinds
    only_else = TINY.replace("    return x + linear(rmsnorm(x, norm), w)",
                             "    return x * 2.0 if layers > 1 else x + linear(rmsnorm(x, norm), w)")
    kinds = [i.kind.value for i in check(parse_spec(only_else, "tiny.kiln")).program.instrs]
    assert kinds.count("linear") == 1 and kinds.count("scale") == 2  # the logits' linear; both layers double


TENSOR_IF_CASES = [
    ("condition not a bool", "layer == 0 else x * 2.0", "hidden else x * 2.0",
     "the condition of a tensor `if` must be true or false, got 16", 14, 47),
    ("condition is a tensor", "layer == 0 else x * 2.0", "x else x * 2.0",
     "the condition of a tensor `if` must be a constant, not a tensor", 14, 47),
]


@pytest.mark.parametrize("name, old, new, fragment, line, col", TENSOR_IF_CASES, ids=[c[0] for c in TENSOR_IF_CASES])
def test_tensor_if_errors(name, old, new, fragment, line, col):
    base = TINY.replace("    return x + linear(rmsnorm(x, norm), w)",
                        "    return x + linear(rmsnorm(x, norm), w) if layer == 0 else x * 2.0")
    text = base.replace(old, new, 1)
    with pytest.raises(SpecError) as info:
        check(parse_spec(text, "tiny.kiln"))
    e = info.value
    assert fragment in e.message, e.render()
    assert (e.pos.file, e.pos.line, e.pos.col) == ("tiny.kiln", line, col), e.render()


def test_membership_in_constant_expressions():
    text = TINY.replace("param layers: int = 2", "param skip: list = [1]\nparam layers: int = 3 if 0 in skip or 2 not in skip else 1")
    assert check(parse_spec(text, "tiny.kiln")).params["layers"] == 3
