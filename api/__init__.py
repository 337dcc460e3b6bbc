"""Kiln: LLM inference where a model architecture is a spec file.

The Python API follows the conventions of vLLM and TensorRT-LLM's LLM API:

    from kiln import LLM, SamplingParams

The packages are kiln.dsl (spec language), kiln.codegen (kernels, networks) and
kiln.runtime (weights, KV cache, scheduler, backends).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `kiln --help` and the spec tools start fast.
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from kiln.runtime.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
