"""Kiln: LLM inference where a model architecture is a spec file.

The Python API follows the conventions of vLLM and TensorRT-LLM's LLM API; the
packages are kiln.dsl (spec language), kiln.codegen (kernels, networks) and
kiln.runtime (weights, KV cache, scheduler, backends).
"""

__version__ = "0.1.0"
