"""Tokenizers and chat templates against transformers: the SmolLM2 GGUF, a Hugging Face
folder saved by transformers, and a SentencePiece GGUF written with gguf's writer."""

import json

import gguf
import numpy as np
import pytest
import torch
from kiln.runtime.checkpoint import open_checkpoint, save_safetensors_checkpoint
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

MODEL = default_model_path()

TEXTS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "  leading spaces, trailing   \t tabs\t\tand\n\nnewlines\r\n ",
    "naïve café, Übermaß, ½ ≠ ∞, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <not_special> tags",
    "",
    " ",
    "a" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Write a haiku\nabout rain."},
    ],
]


@pytest.fixture(scope="module")
def ckpt():
    return open_checkpoint(MODEL)


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(MODEL.parent, gguf_file=MODEL.name)


@pytest.mark.parametrize("add_special", [True, False])
def test_gguf_encode_matches_transformers(tok, hf_tok, add_special):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=add_special) == hf_tok.encode(
            text, add_special_tokens=add_special
        ), text


@pytest.mark.parametrize("skip", [True, False])
def test_gguf_decode_matches_transformers(tok, hf_tok, skip):
    for text in TEXTS:
        ids = hf_tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)


def test_gguf_special_ids_match_transformers(tok, hf_tok, ckpt):
    assert tok.vocab_size == len(hf_tok) == ckpt.config["vocab_size"]
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert hf_tok.eos_token_id in tok.eos_token_ids
    assert tok.eos_token_ids == {ckpt.config["eos_token_id"]}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_matches_transformers(tok, hf_tok, conversation, add_generation_prompt):
    ours = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    ref = hf_tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == ref


def test_chat_template_errors_are_clear(tok):
    def with_template(template):
        return Tokenizer(tok.backend, source="test-source", chat_template=template)

    raising = with_template("{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok")
    assert raising.apply_chat_template(CONVERSATIONS[0]) == "ok"
    with pytest.raises(TokenizerError, match="one message only") as e:
        raising.apply_chat_template(CONVERSATIONS[1])
    assert "test-source" in str(e.value)
    with pytest.raises(TokenizerError, match="line 2"):
        with_template("fine\n{% for m in messages %}{{ m }").apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(TokenizerError, match="no chat template"):
        with_template(None).apply_chat_template(CONVERSATIONS[0])
    # the sandbox refuses access to Python internals
    with pytest.raises(TokenizerError):
        with_template("{{ messages.__class__.__mro__ }}").apply_chat_template(CONVERSATIONS[0])


def test_strftime_now_is_available(tok):
    t = Tokenizer(tok.backend, source="x", chat_template="{{ strftime_now('%Y') }}")
    assert t.apply_chat_template([]).isdigit()


@pytest.mark.parametrize("text", [TEXTS[3], TEXTS[4], TEXTS[5] + TEXTS[3]])
def test_incremental_detokenizer_matches_full_decode(tok, text):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok)
    deltas = [det.feed(i) for i in ids]
    deltas.append(det.flush())
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    # some token ends in the middle of a character, so a delta was held back
    assert any(d == "" for d in deltas[:-1])


def test_incremental_detokenizer_after_prompt(tok):
    prompt = tok.encode("<|im_start|>user\nSay ")
    out = tok.encode("héllo 😀 wörld")
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(det.feed(i) for i in out) + det.flush()
    full = tok.decode(prompt + out)
    assert full.endswith(text) and text == full[len(tok.decode(prompt)) :]


def test_hf_folder_matches_transformers(tmp_path, hf_tok):
    hf_tok.save_pretrained(tmp_path)
    save_safetensors_checkpoint(tmp_path, {"w": torch.zeros(1)}, {"vocab_size": len(hf_tok)})
    eos_ids = [hf_tok.eos_token_id, hf_tok.convert_tokens_to_ids("<|endoftext|>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    tok = Tokenizer.from_checkpoint(open_checkpoint(tmp_path))
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == reloaded.encode(text) == hf_tok.encode(text), text
    assert tok.eos_token_ids == set(eos_ids)
    assert tok.bos_token_id == reloaded.bos_token_id
    for conversation in CONVERSATIONS:
        assert tok.apply_chat_template(conversation) == reloaded.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )


def test_hf_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# --- a SentencePiece ("llama" tokenizer model) GGUF written with gguf's writer -----------


def sentencepiece_gguf(path, with_merges):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "tokenizers are fun to test with the weather"] * 20
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    vocab = backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - len(specials)))
    if with_merges:
        merges = json.loads(backend.to_str())["model"]["merges"]
        w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("with_merges", [True, False])
def test_sentencepiece_gguf_matches_transformers(tmp_path, with_merges):
    path = sentencepiece_gguf(tmp_path / "sp.gguf", with_merges)
    tok = Tokenizer.from_checkpoint(open_checkpoint(path))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the quick brown fox", " hello  world", "ünïcode 😀 xyz", "Hello\nthere", "", "zzz"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.bos_token_id == ref.bos_token_id and tok.eos_token_ids == {ref.eos_token_id}


def test_unsupported_gguf_tokenizer_model(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    w.add_tokenizer_model("rwkv")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="'rwkv' is not supported"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")


def test_chat_content_parts_are_joined():
    from kiln.runtime.checkpoint import open_checkpoint
    from kiln.runtime.gguf_file import default_model_path
    from kiln.runtime.tokenizer import Tokenizer, TokenizerError

    tok = Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "Hi there"}])
    import pytest

    with pytest.raises(TokenizerError, match=r"messages\[0\]\.content\[0\]"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


@pytest.mark.parametrize("source", ["gguf", "sentencepiece"])
def test_saved_tokenizer_reads_back_the_same(tok, tmp_path, source):
    """What `kiln build` writes into an engine directory for a GGUF checkpoint (`Tokenizer.save`)
    is the same tokenizer when read back as a folder: ids, text, special tokens, chat template."""
    if source == "sentencepiece":
        tok = Tokenizer.from_checkpoint(open_checkpoint(sentencepiece_gguf(tmp_path / "sp.gguf", True)))
    folder = tmp_path / "saved"
    folder.mkdir()
    files = tok.save(folder)
    again = Tokenizer.from_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert again.encode(text, add_special_tokens=special) == ids, text
            assert again.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert (again.bos_token_id, again.eos_token_ids, again.special_tokens) == \
        (tok.bos_token_id, tok.eos_token_ids, tok.special_tokens)
    assert again.chat_template == tok.chat_template
    if tok.chat_template:
        for conversation in CONVERSATIONS:
            assert again.apply_chat_template(conversation) == tok.apply_chat_template(conversation)
