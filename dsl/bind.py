"""Binding a spec's parameters to a Hugging Face config.json.

Each parameter tries its config keys in order (dotted paths reach into nested
objects such as `rope_scaling.factor`); the first key present and not null wins.
With `null=none` after the keys, the first key present wins even when it is null, and binds
none: config.json's `"key": null` then means "none", a missing key the default (a softcap
set to null is off, a missing one takes the class's default cap).
A binding without a trailing `?` is required whenever a config is given; without a
config (`kiln check SPEC`) every parameter takes its default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from . import ir
from .errors import SpecError
from .exprs import evaluate


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, normalised from HF's `rope_scaling` / `rope_parameters`.
    yarn / longrope: `factor` None means HF's max_position_embeddings / original (dsl/rope.resolve)."""

    kind: str  # linear | dynamic | llama3 | yarn | longrope
    factor: float | None = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn, longrope: multiplies cos and sin (None: from factor)
    mscale: float | None = None  # yarn (DeepSeek style attention factor)
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dims
    short_factor: tuple[float, ...] | None = None  # longrope, rotary_dim / 2 entries each
    long_factor: tuple[float, ...] | None = None


ROPE_KINDS = ("linear", "dynamic", "llama3", "yarn", "longrope")
ROPE_ALIASES = {"su": "longrope"}  # the name early longrope configs use


class ConfigError(SpecError):
    """A config.json that does not fit the spec (the file is named in the message)."""


_MISSING = object()


def lookup(config: Mapping[str, Any], path: str, missing: Any = None) -> Any:
    """The value at a dotted key path, or `missing` where the config has no such key."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return missing
        node = node[part]
    return node


def bound_key(p: ir.Param, config: Mapping[str, Any] | None) -> tuple[str, Any] | None:
    """(key, value) of the config key that binds p: the first present and not null, or with
    `null=none` the first present (its value may be None); None where no key binds."""
    if config is None:
        return None
    for k in p.keys:
        v = lookup(config, k, _MISSING)
        if v is _MISSING or (v is None and not p.null_is_none):
            continue
        return k, v
    return None


def bind_params(spec: ir.Spec, config: Mapping[str, Any] | None,
                config_file: str = "config.json") -> dict[str, Any]:
    """Every parameter's value. Defaults may use other parameters in any order (a child spec's
    new parameter can feed an inherited default); a cycle is an error."""
    params = {p.name: p for p in spec.params}
    env: dict[str, Any] = {}
    active: list[str] = []

    class Lazy(Mapping):
        def __getitem__(self, name: str) -> Any:
            if name not in env:
                if name not in params:
                    raise KeyError(name)
                bind(params[name])
            return env[name]

        def __contains__(self, name: object) -> bool:
            return name in params

        def __iter__(self):
            return iter(params)

        def __len__(self) -> int:
            return len(params)

    def bind(p: ir.Param) -> None:
        if p.name in active:
            cycle = " -> ".join(active[active.index(p.name):] + [p.name])
            raise SpecError(f"parameter defaults refer to each other in a cycle: {cycle}", p.pos)
        active.append(p.name)
        raw, key = None, None
        if config is not None:
            found = bound_key(p, config)
            if found is not None:
                key, raw = found
            if key is None and p.keys and not p.key_optional:
                raise ConfigError(
                    f"{config_file}: missing config key '{' or '.join(p.keys)}' "
                    f"(parameter '{p.name}')", p.pos,
                    "add the key to config.json, or end the binding with ? to fall back to the default")
        if key is None:
            raw = evaluate(p.default, Lazy())
            where = f"default of parameter '{p.name}'"
        else:
            where = f"{config_file}: key '{key}' (parameter '{p.name}')"
        env[p.name] = coerce(p, raw, where)
        active.pop()

    for p in spec.params:
        if p.name not in env:
            bind(p)
    return {name: env[name] for name in params}


def check_requires(spec: ir.Spec, params: Mapping[str, Any], config: Mapping[str, Any] | None,
                   config_file: str = "config.json") -> None:
    """Every `require` of the spec holds for these bound parameters; the first that does not is a
    ConfigError at its condition that names the config keys it read, their values and the file."""
    by_name = {p.name: p for p in spec.params}
    for r in spec.requires:
        ok = evaluate(r.test, params)
        if not isinstance(ok, bool):
            raise SpecError(f"the condition of a require must be true or false, got {ok!r}", r.pos,
                            "compare or negate it, e.g. `not flag`, `x == 0`, `x != none`")
        if ok:
            continue
        read = _sources(r.test, by_name, params, config)
        where = config_file if config is not None else "the parameters' defaults (no config)"
        raise ConfigError(f"{where}: {r.message} ({'; '.join(read)})", r.pos,
                          f"the spec requires `{r.text}`: it does not implement what this config asks for, "
                          "so it refuses the config rather than compute something else")


def _sources(e: ir.Expr, params: Mapping[str, ir.Param], values: Mapping[str, Any],
             config: Mapping[str, Any] | None) -> list[str]:
    """'key 'k' = v (parameter p)' for each parameter a condition reads, following defaults to the
    keys they came from."""
    out: list[str] = []
    seen: set[str] = set()

    def names(x) -> list[str]:
        if isinstance(x, ir.Name):
            return [x.id]
        found = []
        for child in getattr(x, "__dict__", {}).values():
            for c in (child if isinstance(child, tuple) else (child,)):
                if isinstance(c, tuple):  # a Call's kwargs: (name, expr, pos)
                    c = c[1]
                if hasattr(c, "pos"):
                    found += names(c)
        return found

    def visit(name: str) -> None:
        p = params.get(name)
        if p is None or name in seen:
            return
        seen.add(name)
        found = bound_key(p, config)
        if found is not None:
            out.append(f"key '{found[0]}' = {_show(found[1])} (parameter '{name}')")
            return
        missing = f"no key {' or '.join(repr(k) for k in p.keys)}, so " if p.keys and config is not None else ""
        out.append(f"{missing}parameter '{name}' = {_show(values.get(name))} (its default)")
        for n in names(p.default):
            visit(n)

    for n in names(e):
        visit(n)
    return out or ["the condition reads no parameter"]


def _show(v: Any) -> str:
    if v is None:
        return "none"
    try:
        text = json.dumps(v)  # as config.json spells it
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def coerce(p: ir.Param, v: Any, where: str) -> Any:
    if v is None:
        if p.optional:
            return None
        raise SpecError(f"{where} is none but '{p.name}' has type {p.type}", p.pos,
                        f"declare it as {p.type}? to allow none")
    t = p.type
    if t == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{where} is {v!r}, expected an int", p.pos)
        return v
    if t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SpecError(f"{where} is {v!r}, expected a float", p.pos)
        return float(v)
    if t == "bool":
        if not isinstance(v, bool):
            raise SpecError(f"{where} is {v!r}, expected true or false", p.pos)
        return v
    if t == "str":
        if not isinstance(v, str):
            raise SpecError(f"{where} is {v!r}, expected a string", p.pos)
        return v
    if t == "list":
        if not isinstance(v, list):
            raise SpecError(f"{where} is {v!r}, expected a list", p.pos)
        return v
    if t == "rope_scaling":
        return rope_scaling(v, p, where)
    raise SpecError(f"unknown parameter type '{t}'", p.pos)  # the parser rejects these earlier


def rope_scaling(v: Any, p: ir.Param, where: str) -> RopeScaling | None:
    if isinstance(v, RopeScaling):
        return v
    if not isinstance(v, Mapping):
        raise SpecError(f"{where} is {v!r}, expected an object like rope_scaling", p.pos)
    kind = v.get("rope_type", v.get("type", "default"))
    kind = ROPE_ALIASES.get(kind, kind)
    if kind == "default":
        return None
    if kind not in ROPE_KINDS:
        raise SpecError(f"{where}: rope type '{kind}' is not supported", p.pos,
                        "supported: default, " + ", ".join(ROPE_KINDS))
    fields: dict[str, Any] = {}
    for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "attention_factor", "mscale", "mscale_all_dim"):
        if v.get(name) is not None:
            if isinstance(v[name], bool) or not isinstance(v[name], (int, float)):
                raise SpecError(f"{where}: '{name}' is {v[name]!r}, expected a number", p.pos)
            fields[name] = float(v[name])
    if v.get("original_max_position_embeddings") is not None:
        fields["original_max_position_embeddings"] = int(v["original_max_position_embeddings"])
    if kind == "llama3" and "original_max_position_embeddings" not in fields:
        raise SpecError(f"{where}: llama3 rope scaling needs original_max_position_embeddings", p.pos)
    if kind in ("yarn", "longrope"):
        fields.setdefault("factor", None)  # HF: max_position_embeddings / original
        for name in ("beta_fast", "beta_slow"):  # HF: `or 32` / `or 1`
            if not fields.get(name, 1.0):
                del fields[name]
    if kind == "yarn" and v.get("truncate") is not None:
        if not isinstance(v["truncate"], bool):
            raise SpecError(f"{where}: 'truncate' is {v['truncate']!r}, expected true or false", p.pos)
        fields["truncate"] = v["truncate"]
    if kind == "longrope":
        for name in ("short_factor", "long_factor"):
            f = v.get(name)
            if not isinstance(f, list) or not f or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in f):
                raise SpecError(f"{where}: longrope rope scaling needs '{name}', a list of numbers", p.pos)
            fields[name] = tuple(float(x) for x in f)
        if len(fields["short_factor"]) != len(fields["long_factor"]):
            raise SpecError(f"{where}: longrope short_factor and long_factor differ in length", p.pos)
    return RopeScaling(kind, **fields)
