"""Raw access to model checkpoints: Hugging Face safetensors folders and GGUF files.

A `Checkpoint` answers, by Hugging Face tensor name, what a tensor is (`info`: shape,
dtype, file) and what it holds (`get`: a torch tensor, read lazily). It knows nothing
about model architectures; mapping checkpoint tensors onto a spec's weights is the
loader's job.

GGUF files are seen with Hugging Face names and shapes. Names: gguf's `TensorNameMap` maps
the Hugging Face names of every architecture it knows onto GGUF names
("model.layers.0.self_attn.q_proj" -> "blk.0.attn_q"). The mapping is many-to-one, so a
GGUF tensor answers to every one of its Hugging Face aliases: the loader asks for the
names its spec expects (`info`, `get`) and reports leftovers with `unexpected(used)`;
`names()` lists one canonical alias per tensor, for display. Shapes: GGUF lists dimensions
fastest-first (ggml order); we return them reversed, the Hugging Face order (`[out, in]`
for a linear weight). Values are dequantized to float32 (rotary rows stay as llama.cpp
permuted them: see gguf_file.unpermute_rope_rows).

Bad input (missing files, truncated or corrupt safetensors or GGUF, an index that lies,
invalid JSON) raises `CheckpointError`, whose message names the file and, where it
applies, the tensor or config key.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch
from kiln.dsl.quant import GGML_BLOCK, gguf_dequantize

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype -> (torch dtype name, bytes per element)
_ST_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message names the file (and tensor or key)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name ("bfloat16", ...) or, for GGUF, the ggml type name ("Q4_1")
    file: str


class Checkpoint:
    """Base of every checkpoint format: tensors by Hugging Face name plus a config dict."""

    path: Path
    format: str
    config: dict

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def file_of(self, name: str) -> str:
        return self.info(name).file

    def __contains__(self, name: str) -> bool:
        try:
            self.info(name)
        except CheckpointError:
            return False
        return True

    def unexpected(self, used: Iterable[str]) -> list[str]:
        """Names of the tensors that none of the names in `used` refers to.

        The loader's way to report unexpected tensors: a GGUF tensor answers to several
        Hugging Face aliases, so `set(names()) - used` is not right for every format.
        """
        return sorted(set(self.names()) - set(used))

    def _unknown(self, name: str, extra: str = "") -> CheckpointError:
        return CheckpointError(f"tensor '{name}' is not in checkpoint {self.path}{extra}")


# Config keys that state a model's context length (Hugging Face names; GGUF maps to the first).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length(config: dict | None) -> int | None:
    """The context length a checkpoint's config states, if any."""
    for key in CONTEXT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_json(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from `path`; invalid JSON names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{what} {path} is not UTF-8 text: {e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"invalid JSON in {path}:{e.lineno}:{e.colno}: {e.msg}"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos from a safetensors header, checked against the file size.

    Done before safetensors memory-maps the file, so a truncated download is reported
    with the first tensor whose bytes are missing instead of failing at first access.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"safetensors file {path} is truncated: {size} bytes, no header")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(
                    f"safetensors file {path} is truncated or corrupt: header claims {n} bytes, "
                    f"file has {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"safetensors file {path} has a corrupt header: {e}") from None

    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            st_dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"safetensors file {path} has a corrupt header entry for tensor '{name}'"
            ) from None
        if st_dtype not in _ST_DTYPES:
            raise CheckpointError(
                f"tensor '{name}' in {path} has unsupported dtype {st_dtype!r}"
            )
        dtype, itemsize = _ST_DTYPES[st_dtype]
        numel = 1
        for d in shape:
            numel *= d
        if begin < 0 or end - begin != numel * itemsize:
            raise CheckpointError(
                f"safetensors file {path} is corrupt: tensor '{name}' of shape {list(shape)} "
                f"{dtype} needs {numel * itemsize} bytes, header gives offsets [{begin}, {end}]"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, shape, dtype, str(path))
    for begin, end, name in sorted(spans):
        if end > data_size:
            raise CheckpointError(
                f"safetensors file {path} is truncated: tensor '{name}' needs bytes "
                f"[{begin}, {end}) of the data section, which has only {data_size}"
            )
    return infos


class SafetensorsCheckpoint(Checkpoint):
    """A Hugging Face folder: config.json plus one or sharded safetensors files."""

    format = "safetensors"

    def __init__(self, folder: Path):
        self.path = folder
        self.config = read_json(folder / CONFIG_NAME, "config")
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[str, object] = {}
        index_path = folder / INDEX_FILE
        if index_path.exists():
            self._load_index(index_path)
        elif (folder / SINGLE_FILE).exists():
            self._add_file(folder / SINGLE_FILE)
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}"
                )
            for file in files:
                self._add_file(file)

    def _add_file(self, file: Path) -> dict[str, TensorInfo]:
        infos = _read_safetensors_header(file)
        for name, info in infos.items():
            if name in self._infos:
                raise CheckpointError(
                    f"tensor '{name}' appears in both {self._infos[name].file} and {file}"
                )
            self._infos[name] = info
        return infos

    def _load_index(self, index_path: Path) -> None:
        index = read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"safetensors index {index_path} has no 'weight_map' object")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(str(shard), []).append(name)
        for shard, names in by_shard.items():
            file = self.path / shard
            if not file.is_file():
                raise CheckpointError(
                    f"shard {file} named by {index_path} (for tensor '{names[0]}') does not exist"
                )
            infos = self._add_file(file)
            for name in names:
                if name not in infos:
                    raise CheckpointError(
                        f"tensor '{name}' is listed in {index_path} under shard {file}, "
                        f"which does not contain it"
                    )

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise self._unknown(name) from None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        file = self.info(name).file
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(file, framework="pt")
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor '{name}' from {file}: {e}") from None


def open_checkpoint(path) -> Checkpoint:
    """A Hugging Face folder (config.json + safetensors) or a `.gguf` file.

    A GGUF file's parsed header is kept for the life of the process (keyed by the file's size
    and modification time): a command reads it for the tokenizer and again for the weights,
    and parsing it twice was a good part of the time to the first token."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            stat = p.stat()
            key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
            if key not in _GGUF_CACHE:
                ckpt = GGUFCheckpoint(p)
                if len(_GGUF_CACHE) >= 4:
                    _GGUF_CACHE.pop(next(iter(_GGUF_CACHE)))
                _GGUF_CACHE[key] = ckpt
            return _GGUF_CACHE[key]
        raise CheckpointError(
            f"checkpoint {p} is a file but not a .gguf; give the Hugging Face folder instead"
        )
    if not (p / CONFIG_NAME).is_file():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (to load the GGUF, give the file: {ggufs[0]})" if ggufs else ""
        raise CheckpointError(f"no {CONFIG_NAME} in checkpoint folder {p}{hint}")
    return SafetensorsCheckpoint(p)


_GGUF_CACHE: dict[tuple, Checkpoint] = {}


def save_safetensors_checkpoint(
    dir, tensors: dict[str, torch.Tensor], config: dict, shard_bytes: int | None = None
) -> Path:
    """Write config.json and model.safetensors, or shards + index when `shard_bytes` is set."""
    from safetensors.torch import save_file

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # safetensors refuses tensors that share storage (tied weights): copy repeats.
    seen: set[int] = set()
    plain: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        plain[name] = t

    if shard_bytes is None:
        save_file(plain, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return out

    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name, t in plain.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = t
        filled += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in plain.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out

# --- GGUF ------------------------------------------------------------------------------------

_SUFFIXES = (".weight", ".bias")
# gguf's table lists the names of many model families in no useful order; for display
# (`names()`) we prefer transformers' most common conventions: the layer stack under
# "model.layers" and the output projection "lm_head".
_HF_LAYERS = "model.layers"
_HF_HEAD = "lm_head"


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


class _Tensor(NamedTuple):
    name: str
    dims: tuple[int, ...]  # ggml order: fastest-varying first
    qtype: Any  # gguf.GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_bytes: int


class _Reader:
    """GGUF header parser over a memory map.

    gguf's own GGUFReader builds a numpy view per field part (per vocabulary string:
    ~100k of them for a 49k-token vocabulary) and took ~2 s to open the default model on
    a 2-core machine; here one pass of `struct` over the header takes a few tens of
    milliseconds, and array values are decoded only when someone reads them.
    """

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            with open(path, "rb") as f:
                # Copy-on-write, so that numpy views of it are writable and torch wraps them
                # without a copy or a warning; nothing writes to them (every dequantization makes
                # new tensors), and no write could reach the file.
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise self._bad(f"{e.strerror if isinstance(e, OSError) else e}") from None
        self.size = len(self.map)
        self.buf = memoryview(self.map)
        self.pos = 0
        if bytes(self._take(4)) != b"GGUF":
            raise self._bad("not a GGUF file (no GGUF magic)")
        (version,) = self._unpack("<I")
        if version & 0xFFFF == 0 and version:
            raise self._bad("big-endian GGUF files are not supported")
        if version not in _VERSIONS:
            raise self._bad(f"GGUF version {version} is not supported (supported: {_VERSIONS})")
        n_tensors, n_fields = self._unpack("<QQ")
        # field name -> (value type, value) for scalars; (ARRAY, (item type, count, offset)) for arrays
        self.fields: dict[str, tuple[int, Any]] = {}
        for _ in range(n_fields):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = (vtype, self._value(vtype, key))
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 8:
                raise self._bad(f"tensor '{name}' claims {n_dims} dimensions")
            dims = self._unpack(f"<{n_dims}Q")
            qtype_id, offset = self._unpack("<IQ")
            entries.append((name, dims, qtype_id, offset))
        alignment = self.scalar("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self._bad(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        self.tensors: dict[str, _Tensor] = {}
        for name, dims, qtype_id, offset in entries:
            try:
                qtype = gguf.GGMLQuantizationType(qtype_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self._bad(f"tensor '{name}' has unknown ggml type {qtype_id}") from None
            count = math.prod(dims)
            if count % block:
                raise self._bad(f"tensor '{name}': {count} values are not whole blocks of {block} ({qtype.name})")
            self.tensors[name] = _Tensor(name, tuple(int(d) for d in dims), qtype, data_start + offset,
                                         count // block * type_size)

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"cannot read GGUF file {self.path} (corrupt or truncated?): {why}")

    def _take(self, n: int) -> memoryview:
        if self.pos + n > self.size:
            raise self._bad(f"the header runs past the end of the file ({self.size} bytes)")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def _unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.pos + size > self.size:
            raise self._bad(f"the header runs past the end of the file ({self.size} bytes)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError as e:
            raise self._bad(f"a string at byte {self.pos - n} is not UTF-8: {e}") from None

    def _value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self._unpack("<" + _SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item, count = self._unpack("<IQ")
            start = self.pos
            if item in _SCALARS:
                self._take(count * struct.calcsize(_SCALARS[item]))
            elif item == _STRING:
                self._skip_strings(count)
            else:
                raise self._bad(f"metadata key '{key}': arrays of type {item} are not supported")
            return (item, count, start)
        raise self._bad(f"metadata key '{key}' has unknown value type {vtype}")

    def _skip_strings(self, count: int) -> None:
        # The hot loop of opening a file (every vocabulary string): locals only.
        unpack, buf, pos = struct.Struct("<Q").unpack_from, self.buf, self.pos
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = self.size + 1
        if pos > self.size:
            raise self._bad(f"the header runs past the end of the file ({self.size} bytes)")
        self.pos = pos

    def scalar(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None or field[0] == _ARRAY else field[1]

    def array(self, item: int, count: int, start: int) -> list:
        if item in _SCALARS:
            return np.frombuffer(self.map, dtype=_NUMPY[item], count=count, offset=start).tolist()
        out, unpack, buf, pos = [], struct.Struct("<Q").unpack_from, self.buf, start
        for _ in range(count):
            (n,) = unpack(buf, pos)
            out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        return out

    def raw(self, t: _Tensor) -> np.ndarray:
        """The tensor's bytes: a view of the file's copy-on-write map."""
        return np.frombuffer(self.map, dtype=np.uint8, count=t.n_bytes, offset=t.data_offset)


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self._reader = _Reader(self.path)
        self._tensors = self._reader.tensors
        self._arrays: dict[str, list] = {}  # decoded array values, by key
        # The header does not promise that tensor data lies inside the file.
        size = self._reader.size
        for t in sorted(self._tensors.values(), key=lambda t: t.data_offset):
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
        field = self._reader.fields.get(key)
        if field is None:
            return default
        vtype, value = field
        if vtype != _ARRAY:
            return value
        if key not in self._arrays:
            try:
                self._arrays[key] = self._reader.array(*value)
            except (struct.error, ValueError) as e:
                raise CheckpointError(f"cannot read metadata key '{key}' of {self.path}: {e}") from None
        return self._arrays[key]

    def metadata_length(self, key: str) -> int | None:
        """How many items the array under `key` holds, without decoding them (None if absent)."""
        field = self._reader.fields.get(key)
        return field[1][1] if field is not None and field[0] == _ARRAY else None

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
        n_tokens = self.metadata_length(Keys.Tokenizer.LIST)
        if n_tokens is not None:
            cfg["vocab_size"] = n_tokens
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
        return TensorInfo(name, tuple(reversed(t.dims)), t.qtype.name, str(self.path))

    def get(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in Hugging Face shape."""
        g = self._resolve(name)
        t = self._tensors[g]
        shape = tuple(reversed(t.dims))
        try:
            values = _dequantize(self._reader.raw(t), t.qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"tensor '{name}' ({g}) in {self.path} has type {t.qtype.name}, "
                "which gguf cannot dequantize"
            ) from None
        if values.numel() != math.prod(shape):
            raise CheckpointError(
                f"tensor '{name}' ({g}) in {self.path}: {values.numel()} values for shape {list(shape)}"
            )
        return values.reshape(shape)

    def blocks(self, name: str) -> tuple[torch.Tensor, str]:
        """A quantized tensor's ggml blocks as stored, [rows, bytes per row] uint8 (each row's
        blocks run along its `in` values), and its type name ("q4_1")."""
        g = self._resolve(name)
        t = self._tensors[g]
        rows = math.prod(t.dims[1:])
        return torch.from_numpy(self._reader.raw(t)).view(rows, -1), t.qtype.name.lower()


def _dequantize(raw: np.ndarray, qtype) -> torch.Tensor:
    """A tensor's bytes -> float32 values (flat), bit-identical to gguf.quants.dequantize.

    The common types are done here in whole-tensor torch ops, each pass over the float32
    output a vectorised copy or in-place multiply-add: gguf's numpy code splits every tensor
    into groups of rows and took ~0.8 s for the default model's 135M weights on a 2-core
    machine, this ~0.23 s (of which ~0.1 s is the kernel mapping the 540 MB of output).
    Other types go through gguf.
    """
    kind = qtype.name
    data = torch.from_numpy(raw)
    if kind == "F32":
        return data.view(torch.float32).clone()
    if kind == "F16":
        return data.view(torch.float16).float()
    if kind == "BF16":
        return data.view(torch.bfloat16).float()
    if kind.lower() in GGML_BLOCK:  # the block arithmetic lives with the formats (dsl/quant.py)
        return gguf_dequantize(data, kind.lower())
    from gguf.quants import dequantize

    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, qtype), dtype=np.float32).reshape(-1))

