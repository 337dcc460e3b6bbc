"""Engine directories made by `kiln build`: their layout, and reading one back.

An engine directory holds everything needed to run without the checkpoint:

    manifest.json        spec name and sha256, Kiln / TensorRT versions, target archs, dtype,
                         limits, I/O tensors with their profile ranges
    config.json          the checkpoint's config (binds the spec's parameters again at load)
    spec/*.kiln          the spec and the specs it extends
    weights.safetensors  converted weights under Kiln's names, in the run dtype; a quantized
                         weight as its stored parts, "NAME:q", "NAME:scale", ... (its
                         QuantDesc is in the manifest's "quantization")
    tokenizer files      tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja
                         (copied from the checkpoint folder, or written from a GGUF file's metadata)
    kernels/*.cu         generated CUDA sources (cuda backend)
    network.py           generated TensorRT network module (tensorrt backend)
    model.engine         serialized TensorRT engine (tensorrt backend)

Writing one is runtime/build.py; `runtime/model.py` turns what `read_engine` returns into a
loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from kiln.dsl import Plan, load_spec, passes
from kiln.dsl.quant import QuantDesc, QWeight

FORMAT = 1
# Copied from a checkpoint folder into an engine directory (each when present): what
# `Tokenizer.from_folder` reads, chat template included. For a GGUF checkpoint the build
# writes the first four from the file's metadata (`Tokenizer.save`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model")


class BuildError(Exception):
    """A build or engine directory that cannot be made or read; one clear message."""


def is_engine_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(engine_dir: str | Path) -> dict:
    d = Path(engine_dir)
    path = d / "manifest.json"
    if not path.is_file():
        raise BuildError(f"{d} is not a Kiln engine directory (no manifest.json)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"invalid JSON in {path}:{e.lineno}:{e.colno}: {e.msg}") from None
    if m.get("format") != FORMAT:
        raise BuildError(f"{path}: engine format {m.get('format')!r}, this Kiln reads format {FORMAT}")
    for f in m["files"]:
        if not (d / f).is_file():
            raise BuildError(f"{d}: file '{f}' listed in manifest.json is missing")
    for s in m["spec"]["files"]:
        if _sha256(d / s["path"]) != s["sha256"]:
            raise BuildError(f"{d / s['path']} was changed after the build (sha256 differs from manifest.json)")
    return m


@dataclass
class EngineParts:
    """What an engine directory holds, read back: the checked plan, the manifest, and for the
    cuda backend the weights (aliases filled in), on `device`."""

    plan: Plan
    manifest: dict
    weights: dict[str, torch.Tensor] | None


def save_weights(plan: Plan, weights: dict, path: Path) -> None:
    """weights.safetensors: each weight that is no tie, a quantized one as its stored parts."""
    from safetensors.torch import save_file

    own = {}
    for n, t in weights.items():
        if plan.alias_target(n) != n:
            continue
        if isinstance(t, QWeight):
            own.update({f"{n}:{k}": v.contiguous() for k, v in t.tensors().items()})
        else:
            own[n] = t.contiguous()
    save_file(own, str(path), metadata={"format": "pt", "producer": "kiln build"})


def read_engine(engine_dir: str | Path, device: str = "cuda") -> EngineParts:
    from safetensors.torch import load_file

    d = Path(engine_dir)
    m = read_manifest(d)
    config = json.loads((d / "config.json").read_text())
    plan = passes.build(load_spec(d / m["spec"]["main"]), config, str(d / "config.json"))
    descs = {n: QuantDesc(**q) for n, q in m.get("quantization", {}).items()}
    if descs:
        plan = passes.run(plan, [passes.quantize("none", descs)])
    if m["backend"] == "tensorrt":
        return EngineParts(plan, m, None)
    stored = {n: t.to(device) for n, t in load_file(str(d / "weights.safetensors")).items()}
    weights: dict = {n: t for n, t in stored.items() if ":" not in n}
    for n, desc in descs.items():
        parts = {k.partition(":")[2]: t for k, t in stored.items() if k.partition(":")[0] == n}
        weights[n] = QWeight(desc, plan.weights[n].shape, **parts)
    for slot in plan.weights.values():
        if slot.source is not None and slot.name not in weights:
            weights[slot.name] = weights[plan.alias_target(slot.name)]
    return EngineParts(plan, m, weights)
