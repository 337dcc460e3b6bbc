"""An architecture is a spec file, not Python: models/ holds only specs, and no Python
source of the engine names a model family (so no family can have a special case)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE_DIRS = ("api", "dsl", "codegen", "runtime")

# "Word-ish": not preceded by a letter, so `gpt_neox`, `Qwen2` and `GemmaForCausalLM` match
# too. Two names that contain "llama" are not families and are allowed:
# - `llama3` is a rope scaling kind (transformers' rope_type "llama3"), a formula that other
#   families' configs use as well, so the rope code must spell it;
# - `llama.cpp` is the program whose GGUF conventions (permuted Q/K rows) the loader undoes.
# And `coherent` / `coherence` (memory coherence) are words, not Cohere.
FAMILY = re.compile(
    r"(?<![a-z])(llama(?!3|\.cpp)|mistral|mixtral|qwen|gemma|phi-?3|neox|gpt-?2|starcoder|olmo|granite|cohere(?!n)|gpt-?j)", re.IGNORECASE)


def test_models_holds_only_specs():
    files = [p for p in (ROOT / "models").rglob("*") if p.is_file()]
    assert files, "models/ is empty"
    others = [str(p.relative_to(ROOT)) for p in files if p.suffix != ".kiln"]
    assert not others, f"models/ must hold only *.kiln spec files: {others}"


def test_engine_sources_name_no_family():
    hits = []
    for d in ENGINE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = FAMILY.search(line)
                if m:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()!r}")
    assert not hits, "model family names in engine sources:\n" + "\n".join(hits)


def test_the_pattern_finds_family_names():
    """The check above can fail: it sees the spellings a family takes in code."""
    for text in ("LlamaForCausalLM", "if arch == 'mistral':", "Qwen2Config", "gemma_norm",
                 "phi3_rope", "Phi-3", "gpt_neox", "MIXTRAL", "gpt2", "GPT-2", "llama2", "Starcoder2Config", "Olmo2", "GraniteConfig", "CohereForCausalLM", "GPTJForCausalLM"):
        assert FAMILY.search(text), text
    for text in ("rope kind llama3", "llama.cpp permutes rows", "phi", "graph", "gpt3", "a coherent load", "coherence"):
        assert not FAMILY.search(text), text


def test_no_module_imports_jax():
    pattern = re.compile(r"^\s*(import jax|from jax\b)", re.MULTILINE)
    sources = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
    assert sources
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"JAX imported by {offenders}"
    deps = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'"jax', deps), "JAX in pyproject.toml dependencies"
