"""`require CONDITION, "message"`: a spec refuses a config.json option it does not implement,
at load time (check()), with an error naming the config keys, their values, the config file and
the require's line, instead of running a different model in silence."""

from __future__ import annotations

import pytest
import transformers
from kiln.dsl import SpecError, check, load_spec, parse_spec
from kiln.dsl.bind import ConfigError

from tests.configs import FAMILY_CONFIGS, cfg

CONFIG = "/models/x/config.json"

BASE = """\
spec g
param vocab: int = 50 <- vocab_size
param hidden: int = 16
param qk_norm: bool = false <- qk_layernorm?
param window: int? = none <- sliding_window?
param use_sliding: bool = false <- use_sliding_window?
param derived: bool = qk_norm and true
REQUIRE
weights {
  embed: [vocab, hidden] <- "embed.weight"
}
forward(tokens) {
  return linear(embedding(tokens, embed), embed)
}
"""


def spec(require: str, file: str = "g.kiln"):
    return parse_spec(BASE.replace("REQUIRE", require), file)


def error(fn, *args) -> SpecError:
    with pytest.raises(SpecError) as e:
        fn(*args)
    return e.value


# ---- the declaration and its static errors


def test_require_parses_and_passes():
    s = spec('require not qk_norm, "q/k norm is not implemented"\n'
             'require named: not use_sliding or window != none,  # a comment, with a comma (\n'
             '  "use_sliding_window needs sliding_window"')
    assert [(r.name, r.text, r.message) for r in s.requires] == [
        (None, "not qk_norm", "q/k norm is not implemented"),
        ("named", "not use_sliding or window != none", "use_sliding_window needs sliding_window"),
    ]
    assert (s.requires[1].pos.line, s.requires[1].pos.col) == (9, 16)
    check(s)  # the defaults meet both
    check(s, {"vocab_size": 50, "use_sliding_window": True, "sliding_window": 4}, CONFIG)


# (name, require line, message fragment, line, col)
STATIC = [
    ("message not a string", 'require not qk_norm, 3', "the message of a require must be a string", 8, 22),
    ("message a name", 'require not qk_norm, qk_norm', "the message of a require must be a string", 8, 22),
    ("empty message", 'require not qk_norm, "  "', "the message of a require is empty", 8, 22),
    ("number condition", 'require hidden + 1, "m"', "must be true or false, not a number", 8, 9),
    ("string condition", 'require "qk_norm", "m"', "must be true or false, not a str", 8, 9),
    ("list condition", 'require [qk_norm], "m"', "must be true or false, not a list", 8, 9),
    ("int parameter", 'require hidden, "m"', "must be true or false, not a number", 8, 9),
    ("undefined name", 'require not qk_nrom, "m"', "undefined name 'qk_nrom' in a require", 8, 13),
    ("tensor op", 'require linear(hidden) > 0, "m"', "unknown function 'linear' in a require", 8, 9),
    ("reserved name", 'require if: true, "m"', "'if' is a reserved word and cannot name a require", 8, 9),
    ("name clash", 'require hidden: true, "m"', "'hidden' is already declared as a parameter", 8, 9),
    ("no message", 'require qk_norm', "a require is `require CONDITION, \"message\"`", 9, 1),
    ("no comma", 'require not qk_norm "m"', "syntax error: unexpected '\"m\"'", 8, 21),
    ("no condition", 'require, "m"', "a require is `require CONDITION, \"message\"`", 8, 8),
]


@pytest.mark.parametrize("name,line,fragment,lineno,col", STATIC, ids=[c[0] for c in STATIC])
def test_static_errors(name, line, fragment, lineno, col):
    e = error(spec, line)
    assert fragment in e.message, str(e)
    assert (e.pos.file, e.pos.line, e.pos.col) == ("g.kiln", lineno, col), str(e)
    assert str(e).startswith(f"g.kiln:{lineno}:{col}: error:")
    assert "^" in str(e)  # the source line and a caret


def test_require_is_top_level_only():
    text = BASE.replace("REQUIRE", 'block b {\n  require true, "m"\n}')
    e = error(parse_spec, text, "g.kiln")
    assert "a require is `require CONDITION, \"message\"` (a top-level declaration)" in e.message
    assert (e.pos.line, e.pos.col) == (9, 3)
    text = BASE.replace("REQUIRE", "").replace("forward(tokens) {", 'forward(tokens) {\n  require true, "m"')
    e = error(parse_spec, text, "g.kiln")
    assert e.message.startswith("syntax error") and (e.pos.line, e.pos.col) == (13, 11)


def test_non_bool_condition_at_check_time():
    s = spec('require [1, 2][window], "m"')  # the kind is known only once bound
    e = error(check, s, {"vocab_size": 50, "sliding_window": 1}, CONFIG)
    assert "the condition of a require must be true or false, got 2" in e.message
    assert str(e).startswith("g.kiln:8:9: error:")


# ---- an unmet require


def test_unmet_require_names_key_value_file_and_line():
    s = spec('require not qk_norm, "per-head q/k LayerNorm (qk_layernorm) is not implemented"')
    e = error(check, s, {"vocab_size": 50, "qk_layernorm": True}, CONFIG)
    assert isinstance(e, ConfigError)
    text = str(e)
    first = text.splitlines()[0]
    assert first.startswith("g.kiln:8:9: error: /models/x/config.json: per-head q/k LayerNorm")
    assert "key 'qk_layernorm' = true (parameter 'qk_norm')" in first
    assert "   8 | require not qk_norm," in text
    assert "       |         ^^^^^^^^^^^" in text  # under the condition
    assert "hint: the spec requires `not qk_norm`" in text


def test_unmet_require_follows_defaults_to_their_keys():
    s = spec('require not derived, "m"')
    e = error(check, s, {"vocab_size": 50, "qk_layernorm": True}, CONFIG)
    assert "parameter 'derived' = true (its default)" in e.message
    assert "key 'qk_layernorm' = true (parameter 'qk_norm')" in e.message


def test_unmet_require_with_two_keys():
    s = spec('require not use_sliding or window != none, "use_sliding_window needs a sliding_window"')
    e = error(check, s, {"vocab_size": 50, "use_sliding_window": True}, CONFIG)
    assert "key 'use_sliding_window' = true (parameter 'use_sliding')" in e.message
    assert "no key 'sliding_window', so parameter 'window' = none (its default)" in e.message


def test_unmet_require_on_the_defaults():
    s = spec('require qk_norm, "m"')
    e = error(check, s)
    assert "the parameters' defaults (no config): m" in e.message


def test_require_runs_before_the_graph_is_checked():
    """A refused config stops at the require, not at a shape or weight error further on."""
    s = spec('require vocab < 100, "at most 100 tokens"')
    e = error(check, s, {"vocab_size": 10 ** 9}, CONFIG)
    assert "at most 100 tokens" in e.message


# ---- extends


def test_requires_are_inherited():
    s = parse_spec('spec child extends gemma\narchitectures "X"\n', "child.kiln")
    assert [r.text for r in s.requires] == [r.text for r in load_spec("gemma").requires]
    e = error(check, s, cfg("gemma", "X", head_dim=16, use_bidirectional_attention=True), CONFIG)
    assert "bidirectional attention" in e.message
    assert e.pos.file.endswith("gemma.kiln")  # the line that declares it, in the base


def test_child_adds_replaces_and_drops_named_requires():
    s = parse_spec('spec child extends gemma\narchitectures "X"\n'
                   'require gelu_mlp: mlp_act != "relu", "no relu"\n'
                   'require hidden > 1, "hidden"\n', "child.kiln")
    base = load_spec("gemma").requires
    assert [r.name for r in s.requires] == [r.name for r in base] + [None]
    assert next(r for r in s.requires if r.name == "gelu_mlp").message == "no relu"
    check(s, cfg("gemma", "X", head_dim=16, hidden_act="silu"), CONFIG)  # replaced: silu is fine now
    dropped = parse_spec('spec child extends gemma\narchitectures "X"\ndrop gelu_mlp\n', "child.kiln")
    assert "gelu_mlp" not in [r.name for r in dropped.requires]
    assert len(dropped.requires) == len(base) - 1


def test_drop_needs_a_named_require():
    e = error(parse_spec, 'spec child extends gemma\narchitectures "X"\ndrop no_such_guard\n', "child.kiln")
    assert "declares no parameter, weight or block 'no_such_guard'" in e.message
    assert "named require" in str(e)
    assert (e.pos.line, e.pos.col) == (3, 6)


def test_dropped_and_redeclared_require_is_an_error():
    e = error(parse_spec, 'spec child extends gemma\narchitectures "X"\ndrop gelu_mlp\n'
              'require gelu_mlp: true, "m"\n', "child.kiln")
    assert "'gelu_mlp' is both dropped and declared" in e.message


# ---- the shipped specs: every test config passes, each unsupported option is refused


def hf(config: dict) -> dict:
    """The config as transformers writes it (every default filled in), as `verify` saves it."""
    return dict(transformers.AutoConfig.for_model(**config).to_dict(), architectures=config["architectures"])


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_family_configs_meet_every_require(name):
    check(load_spec(name.split("-")[0]), hf(FAMILY_CONFIGS[name]), CONFIG)


MPT = FAMILY_CONFIGS["mpt"]
GPT2 = FAMILY_CONFIGS["gpt2"]

# (spec, config, config key named in the error, message fragment)
REFUSED = [
    ("gpt2", dict(GPT2, scale_attn_weights=False), "scale_attn_weights", "scale_attn_weights=false"),
    ("gpt2", dict(GPT2, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx",
     "divided by the layer number"),
    ("mpt", dict(MPT, attn_config={"alibi": False}), "attn_config.alibi", "MPT without ALiBi"),
    ("mpt", dict(MPT, attn_config={"alibi_bias_max": 16}), "attn_config.alibi_bias_max", "alibi_bias_max"),
    ("mpt", dict(MPT, attn_config={"qk_ln": True}), "attn_config.qk_ln", "q/k LayerNorm"),
    ("mpt", dict(MPT, no_bias=False), "no_bias", "MPT with biases"),
    ("mpt", dict(MPT, logit_scale=0.5), "logit_scale", "logit_scale is not implemented"),
    ("phi", cfg("phi", "PhiForCausalLM", qk_layernorm=True, layer_norm_eps=1e-5), "qk_layernorm", "q/k LayerNorm"),
    ("cohere", cfg("cohere", "CohereForCausalLM", use_qk_norm=True, layer_norm_eps=1e-5), "use_qk_norm", "q/k LayerNorm"),
    ("phi3", cfg("phi3", "Phi3ForCausalLM", rms_norm_eps=1e-5, rope_scaling={"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 32}),
     "rope_scaling", "rope_scaling type 'yarn'"),
    ("qwen2_moe", dict(FAMILY_CONFIGS["qwen2_moe"], num_experts=0), "num_experts", "num_experts = 0"),
    ("qwen3_moe", dict(FAMILY_CONFIGS["qwen3_moe"], use_sliding_window=True, sliding_window=8,
                       max_window_layers=2), "max_window_layers", "use_sliding_window with max_window_layers"),
    ("gemma", dict(FAMILY_CONFIGS["gemma"], use_bidirectional_attention=True), "use_bidirectional_attention",
     "bidirectional attention"),
    ("gemma2", dict(FAMILY_CONFIGS["gemma2"], use_bidirectional_attention=True), "use_bidirectional_attention",
     "bidirectional attention"),
    ("gemma3", dict(FAMILY_CONFIGS["gemma3"], use_bidirectional_attention=True), "use_bidirectional_attention",
     "bidirectional attention"),
    ("gemma", dict(FAMILY_CONFIGS["gemma"], hidden_act="silu"), "hidden_act", "other than tanh-GELU"),
]


@pytest.mark.parametrize("name,config,key,fragment", REFUSED,
                         ids=[f"{c[0]}-{c[2]}" for c in REFUSED])
def test_shipped_spec_refuses_unsupported_option(name, config, key, fragment):
    e = error(check, load_spec(name), config, CONFIG)
    assert isinstance(e, ConfigError)
    assert fragment in e.message, str(e)
    assert f"key '{key}' = " in e.message, str(e)
    assert CONFIG in e.message
    assert e.pos.file.endswith(".kiln") and e.pos.line > 0
    assert "| require" in str(e) or "|   " in str(e)  # the require's source line


def test_mpt_without_alibi_is_an_error_not_wrong_numbers():
    """The model case: an MPT config with learned positions instead of ALiBi used to run ALiBi."""
    e = error(check, load_spec("mpt"), dict(MPT, attn_config={"alibi": False, "clip_qkv": 0.1}), CONFIG)
    assert "key 'attn_config.alibi' = false (parameter 'use_alibi')" in e.message
    assert str(e).startswith(f"{load_spec('mpt').file}:")


def test_gemma2_runs_its_hidden_activation():
    """Gemma 2 drops Gemma's hidden_act require: its MLP runs hidden_activation."""
    assert "gelu_mlp" not in [r.name for r in load_spec("gemma2").requires]
    check(load_spec("gemma2"), dict(FAMILY_CONFIGS["gemma2"], hidden_act="silu", hidden_activation="silu"), CONFIG)
