"""Safetensors checkpoints: round trips through save/open, and every bad-input error."""

import json
import struct

import pytest
import torch
from kiln.runtime.checkpoint import (
    CheckpointError,
    open_checkpoint,
    save_safetensors_checkpoint,
)


def random_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(16, generator=g).to(torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randint(-128, 127, (32, 16), generator=g, dtype=torch.int8),
        "model.layers.1.scale": torch.randint(0, 1000, (3,), generator=g, dtype=torch.int64),
        "model.norm.weight": torch.randn(16, generator=g),
    }


CONFIG = {"hidden_size": 16, "num_hidden_layers": 2, "vocab_size": 64}


def header_of(path):
    """The safetensors header, read directly from the file format (8-byte length + JSON)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def assert_round_trip(ckpt, tensors):
    assert ckpt.format == "safetensors"
    assert sorted(ckpt.names()) == sorted(tensors)
    for name, t in tensors.items():
        info = ckpt.info(name)
        assert info.shape == tuple(t.shape)
        assert info.dtype == str(t.dtype).removeprefix("torch.")
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_single_file_round_trip(tmp_path):
    tensors = random_tensors()
    save_safetensors_checkpoint(tmp_path, tensors, CONFIG)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config == CONFIG
    assert_round_trip(ckpt, tensors)
    assert {ckpt.file_of(n) for n in tensors} == {str(tmp_path / "model.safetensors")}


def test_sharded_round_trip(tmp_path):
    tensors = random_tensors(1)
    save_safetensors_checkpoint(tmp_path, tensors, CONFIG, shard_bytes=2048)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    ckpt = open_checkpoint(tmp_path)
    assert_round_trip(ckpt, tensors)
    for name in tensors:
        assert ckpt.file_of(name) == str(tmp_path / index["weight_map"][name])


def test_tied_tensors_are_saved(tmp_path):
    emb = torch.randn(8, 4)
    save_safetensors_checkpoint(tmp_path, {"a.weight": emb, "b.weight": emb}, CONFIG)
    ckpt = open_checkpoint(tmp_path)
    assert torch.equal(ckpt.get("a.weight"), emb) and torch.equal(ckpt.get("b.weight"), emb)


def test_unexpected_lists_unused_tensors(tmp_path):
    tensors = random_tensors()
    save_safetensors_checkpoint(tmp_path, tensors, CONFIG)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.unexpected([n for n in tensors if "layers.1" not in n]) == sorted(
        n for n in tensors if "layers.1" in n
    )


# --- errors -------------------------------------------------------------------------


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as e:
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            ckpt.get(name)
    return str(e.value)


def test_missing_path(tmp_path):
    assert "nowhere" in error_of(tmp_path / "nowhere")


def test_no_config(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    (tmp_path / "config.json").unlink()
    msg = error_of(tmp_path)
    assert "config.json" in msg and str(tmp_path) in msg


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    msg = error_of(tmp_path)
    assert "no weights" in msg and str(tmp_path) in msg


def test_invalid_config_json_names_line_and_column(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    (tmp_path / "config.json").write_text('{\n  "hidden_size": 16,\n  "vocab_size": ,\n}\n')
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads((tmp_path / "config.json").read_text())
    msg = error_of(tmp_path)
    assert f"config.json:{ref.value.lineno}:{ref.value.colno}" in msg


def test_index_names_missing_shard(tmp_path):
    tensors = random_tensors()
    save_safetensors_checkpoint(tmp_path, tensors, CONFIG, shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    first_tensor = next(n for n, f in index["weight_map"].items() if f == victim)
    msg = error_of(tmp_path)
    assert victim in msg and first_tensor in msg


def test_index_lists_tensor_missing_from_shard(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG, shard_bytes=2048)
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.7.ghost.weight"] = shard
    path.write_text(json.dumps(index))
    msg = error_of(tmp_path)
    assert "model.layers.7.ghost.weight" in msg and shard in msg


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_truncated_file_names_file_and_first_missing_tensor(tmp_path, cut):
    tensors = random_tensors()
    save_safetensors_checkpoint(tmp_path, tensors, CONFIG)
    path = tmp_path / "model.safetensors"
    header = header_of(path)
    header.pop("__metadata__", None)
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    data_size = len(raw) - cut - 8 - struct.unpack("<Q", raw[:8])[0]
    # the first tensor, in file order, whose bytes are no longer all there
    first_cut = min(
        (e["data_offsets"][0], n) for n, e in header.items() if e["data_offsets"][1] > data_size
    )[1]
    msg = error_of(tmp_path)
    assert "truncated" in msg and str(path) in msg and f"'{first_cut}'" in msg


def test_truncated_inside_header(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    msg = error_of(tmp_path)
    assert "truncated" in msg and str(path) in msg


def test_corrupt_header(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    path = tmp_path / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"#" * 12  # garbage where the JSON header starts
    path.write_bytes(bytes(raw))
    msg = error_of(tmp_path)
    assert "corrupt header" in msg and str(path) in msg


def test_header_offsets_disagree_with_shape(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["shape"] = [17]  # 17 floats do not fit its 16-float span
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))  # keep the data section where it was
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    msg = error_of(tmp_path)
    assert "model.norm.weight" in msg and str(path) in msg


def test_unknown_tensor_name(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    ckpt = open_checkpoint(tmp_path)
    for call in (ckpt.info, ckpt.get, ckpt.file_of):
        with pytest.raises(CheckpointError, match="lm_head.weight") as e:
            call("lm_head.weight")
        assert str(tmp_path) in str(e.value)
    assert "lm_head.weight" not in ckpt and "model.norm.weight" in ckpt


def test_non_gguf_file_is_rejected(tmp_path):
    save_safetensors_checkpoint(tmp_path, random_tensors(), CONFIG)
    msg = error_of(tmp_path / "model.safetensors")
    assert "model.safetensors" in msg
