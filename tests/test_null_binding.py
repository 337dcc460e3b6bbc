"""`<- key? null=none`: config.json's `"key": null` binds none, a missing key the default (without
`null=none`, null counts as missing). Gemma 2's softcaps: null turns a cap off, missing means
transformers' default (attention 50.0, final 30.0)."""

from __future__ import annotations

import pytest
import transformers
from kiln.dsl import SpecError, check, load_spec, parse_spec
from kiln.dsl.bind import ConfigError, bind_params

from tests.configs import FAMILY_CONFIGS

SPEC = """spec n
param vocab: int = 50 <- vocab_size
param cap: float? = 30.0 <- cap? null=none
param plain: float? = 30.0 <- plain?
param two: float? = 4.0 <- first | second? null=none
param nested: int? = 7 <- outer.inner?   null =  none
REQUIRE
weights {
  embed: [vocab, 16] <- "embed.weight"
}
forward(tokens) {
  return linear(embedding(tokens, embed), embed)
}
"""


def spec(require: str = ""):
    return parse_spec(SPEC.replace("REQUIRE", require), "n.kiln")


@pytest.mark.parametrize("config,want", [
    ({}, dict(cap=30.0, plain=30.0, two=4.0, nested=7)),  # missing: the defaults
    ({"cap": None, "plain": None, "outer": {"inner": None}}, dict(cap=None, plain=30.0, nested=None)),
    ({"cap": 2.5, "plain": 1.5, "outer": {"inner": 3}}, dict(cap=2.5, plain=1.5, nested=3)),
    ({"outer": {}}, dict(nested=7)),
    ({"first": None, "second": 9.0}, dict(two=None)),  # the first key present wins, null or not
    ({"second": None}, dict(two=None)),
    ({"second": 9.0}, dict(two=9.0)),
])
def test_null_binds_none_and_missing_the_default(config, want):
    got = bind_params(spec(), dict(config, vocab_size=50))
    assert {k: got[k] for k in want} == want


def test_null_is_named_in_a_require_error():
    s = spec('require cap != none, "a cap is needed"')
    with pytest.raises(ConfigError) as e:
        check(s, {"vocab_size": 50, "cap": None}, "/m/config.json")
    assert "/m/config.json: a cap is needed (key 'cap' = none (parameter 'cap'))" in e.value.message
    check(s, {"vocab_size": 50}, "/m/config.json")  # missing: the default 30.0


def test_null_is_none_needs_an_optional_type():
    with pytest.raises(SpecError) as e:
        parse_spec(SPEC.replace("param cap: float?", "param cap: float").replace("REQUIRE", ""), "n.kiln")
    assert "n.kiln:3:" in str(e.value)
    assert "'null=none' binds none, but parameter 'cap' has type float" in str(e.value)
    assert "declare it as float? to allow none" in str(e.value)


@pytest.mark.parametrize("caps,attn,final", [
    ({}, 50.0, 30.0),  # transformers' defaults
    ({"attn_logit_softcapping": None, "final_logit_softcapping": None}, None, None),
    ({"attn_logit_softcapping": None}, None, 30.0),
    ({"final_logit_softcapping": None, "attn_logit_softcapping": 3.0}, 3.0, None),
])
def test_gemma2_softcaps_follow_transformers(caps, attn, final):
    base = {k: v for k, v in FAMILY_CONFIGS["gemma2"].items() if not k.endswith("_softcapping")}
    config = dict(base, **caps)
    hf = transformers.Gemma2Config(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    assert (hf.attn_logit_softcapping, hf.final_logit_softcapping) == (attn, final)
    plan = check(load_spec("gemma2"), config)
    kinds = [i.kind.value for i in plan.program.instrs]
    assert {i.attrs.softcap for i in plan.program.instrs if i.kind.value == "attention"} == {attn}
    assert ("softcap" in kinds) == (final is not None)
    if final is not None:
        assert plan.program.instrs[-1].attrs.cap == final
