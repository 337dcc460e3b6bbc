"""Raw access to model checkpoints: Hugging Face safetensors folders and GGUF files.

A `Checkpoint` answers, by Hugging Face tensor name, what a tensor is (`info`: shape,
dtype, file) and what it holds (`get`: a torch tensor, read lazily). It knows nothing
about model architectures; mapping checkpoint tensors onto a spec's weights is the
loader's job.

Bad input (missing files, truncated or corrupt safetensors, an index that lies, invalid
JSON) raises `CheckpointError`, whose message names the file and, where it applies,
the tensor or config key.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

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
    """A Hugging Face folder (config.json + safetensors) or a `.gguf` file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            from .gguf_file import GGUFCheckpoint

            return GGUFCheckpoint(p)
        raise CheckpointError(
            f"checkpoint {p} is a file but not a .gguf; give the Hugging Face folder instead"
        )
    if not (p / CONFIG_NAME).is_file():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (to load the GGUF, give the file: {ggufs[0]})" if ggufs else ""
        raise CheckpointError(f"no {CONFIG_NAME} in checkpoint folder {p}{hint}")
    return SafetensorsCheckpoint(p)


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
