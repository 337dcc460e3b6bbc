"""Tokenizers for Hugging Face folders and GGUF files, plus chat templates.

Everything runs through the `tokenizers` library. A Hugging Face folder brings its own
`tokenizer.json`; a GGUF file only stores a vocabulary (plus merges, scores, token types)
under ggml's `tokenizer.ggml.*` keys, from which we build the same pipeline that
transformers builds for that file. Chat templates are rendered like transformers does:
a sandboxed Jinja2 environment with `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .checkpoint import Checkpoint, CheckpointError, read_json

# ggml token types (gguf.TokenType); kept as ints so this module imports without gguf
_CONTROL, _USER_DEFINED = 3, 4


class TokenizerError(Exception):
    """A tokenizer or chat template that cannot be built or applied; names the source."""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(
        self,
        backend: _Backend,
        *,
        source: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.source = source
        self.special_tokens = {
            k: v
            for k, v in dict(
                bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token
            ).items()
            if v is not None
        }
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        eos = {backend.token_to_id(eos_token)} if eos_token is not None else set()
        self.eos_token_ids: set[int] = {i for i in eos | set(extra_eos_ids) if i is not None}
        self.chat_template = chat_template

    # --- construction ---------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "Tokenizer":
        if ckpt.format == "gguf":
            return cls.from_gguf(ckpt)
        return cls.from_folder(ckpt.path)

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}: text prompts need the checkpoint's tokenizer "
                                 f"(Hugging Face's tokenizer.json beside config.json)")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load {path}: {e}") from None
        cfg = _optional_json(folder / "tokenizer_config.json")
        gen = _optional_json(folder / "generation_config.json")

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (jinja := folder / "chat_template.jinja").is_file():
            template = jinja.read_text(encoding="utf-8")

        tokens = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        gen_eos = gen.get("eos_token_id")
        extra_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        # As transformers does: an explicit add_bos/add_eos flag rebuilds the post-processor.
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            _set_post_processor(
                backend, tokens["bos_token"] if cfg.get("add_bos_token") else None,
                tokens["eos_token"] if cfg.get("add_eos_token") else None,
            )
        return cls(backend, source=str(folder), extra_eos_ids=extra_eos, chat_template=template, **tokens)

    @classmethod
    def from_gguf(cls, ckpt) -> "Tokenizer":
        """From a GGUF file's `tokenizer.ggml.*` metadata (a GGUFCheckpoint or a path)."""
        from gguf.vocab import BpeVocab, SentencePieceVocab

        from .checkpoint import GGUFCheckpoint

        if not isinstance(ckpt, GGUFCheckpoint):
            ckpt = GGUFCheckpoint(ckpt)
        meta = ckpt.metadata
        source = str(ckpt.path)
        kind = meta("tokenizer.ggml.model")
        tokens = meta("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"GGUF file {source} has no tokenizer (tokenizer.ggml.tokens)")
        types = meta("tokenizer.ggml.token_type") or []
        merges = meta("tokenizer.ggml.merges")
        # `tokenizer.ggml.model` names a vocabulary type; gguf's vocab classes spell them.
        if kind == BpeVocab.tokenizer_model:
            backend = _byte_level_bpe(tokens, types, merges, source)
            default_add_bos = False
        elif kind == SentencePieceVocab.tokenizer_model:
            scores = meta("tokenizer.ggml.scores")
            unk = meta("tokenizer.ggml.unknown_token_id")
            prefix = meta("tokenizer.ggml.add_space_prefix", True)
            backend = _sentencepiece_bpe(tokens, types, merges, scores, unk, prefix, source)
            default_add_bos = True  # ggml's default for this vocabulary type
        else:
            raise TokenizerError(
                f"GGUF file {source}: tokenizer model {kind!r} is not supported yet "
                f"(supported: {BpeVocab.tokenizer_model!r} byte-level BPE, "
                f"{SentencePieceVocab.tokenizer_model!r} SentencePiece BPE)"
            )

        def token(key: str) -> str | None:
            i = meta(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        _set_post_processor(
            backend,
            bos if meta("tokenizer.ggml.add_bos_token", default_add_bos) else None,
            eos if meta("tokenizer.ggml.add_eos_token", False) else None,
        )
        # ggml also stops generation at end-of-turn / end-of-message tokens.
        extra = [meta(f"tokenizer.ggml.{k}") for k in ("eot_token_id", "eom_token_id")]
        return cls(
            backend, source=source, bos_token=bos, eos_token=eos,
            unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
            extra_eos_ids=[i for i in extra if i is not None],
            chat_template=meta("tokenizer.chat_template"),
        )

    def save(self, folder) -> list[str]:
        """Write this tokenizer as a Hugging Face folder that `from_folder` reads back to the same
        tokenizer (what `kiln build` puts in an engine directory for a GGUF checkpoint, whose
        tokenizer lives in its metadata): tokenizer.json with the post-processor as built,
        the special tokens, the chat template and every end-of-sequence id. Returns the file names."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": sorted(self.eos_token_ids)}, indent=2) + "\n")
        files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            files.append("chat_template.jinja")
        return files

    # --- encoding -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    # --- chat -----------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation rendered with the model's chat template, as transformers renders it."""
        import jinja2

        if not self.chat_template:
            raise TokenizerError(f"tokenizer of {self.source} has no chat template")
        template = _compile(self.chat_template, self.source)
        variables = {**self.special_tokens, **kwargs}
        messages = [_text_content(m, i) for i, m in enumerate(messages)]
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            line = f" line {e.lineno}:" if getattr(e, "lineno", None) else ""
            raise TokenizerError(f"chat template of {self.source}:{line} {e.message or e}") from None


def _text_content(message: dict, i: int) -> dict:
    """OpenAI-style content parts ([{"type": "text", "text": ...}]) joined into one string:
    chat templates expect a string."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise TokenizerError(f"messages[{i}].content[{j}]: only text parts are supported")
        parts.append(part["text"])
    return {**message, "content": "".join(parts)}


def _optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None


def _set_post_processor(backend: _Backend, bos: str | None, eos: str | None) -> None:
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = single + " " + " ".join([*([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(dict.fromkeys(special))
    )


def _parse_merges(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"GGUF file {source}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    return pairs


def _add_typed_tokens(backend: _Backend, tokens: list[str], types: list[int], allowed=None) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens,
    so that both are matched whole in text (as ggml and transformers do)."""
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == _CONTROL and (allowed is None or set(t) <= allowed)
    ]
    user_defined = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    vocab = backend.get_vocab() if user_defined else {}  # get_vocab costs ~40 ms on a 49k vocabulary
    user = [AddedToken(t, special=False, normalized=False) for t in user_defined if t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _byte_level_bpe(tokens, types, merges, source) -> _Backend:
    """Byte-level BPE over the GGUF vocabulary (the classic byte-level pre-tokenizer regex)."""
    if merges is None:
        raise TokenizerError(f"GGUF file {source}: byte-level BPE vocabulary without tokenizer.ggml.merges")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet (rare) is respelled byte by byte.
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    backend = _Backend(models.BPE(vocab=vocab, merges=_parse_merges(merges, source), fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a converter mislabel; adding it would
    # grow the vocabulary past the model's embedding (transformers skips them too).
    _add_typed_tokens(backend, tokens, types, allowed=alphabet)
    return backend


def _sentencepiece_bpe(tokens, types, merges, scores, unk_id, add_prefix, source) -> _Backend:
    """SentencePiece BPE (byte fallback, "▁" for spaces), as transformers rebuilds it."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is not None:
        pairs = _parse_merges(merges, source)
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise TokenizerError(f"GGUF file {source}: SentencePiece vocabulary without merges or scores")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_typed_tokens(backend, tokens, types)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary: every split of a token into two vocabulary
    pieces, best token score first (what SentencePiece BPE applies)."""
    rank = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score in zip(tokens, scores):
        local = [(t[:k], t[k:], score) for k in range(1, len(t)) if t[:k] in rank and t[k:] in rank]
        found.extend(sorted(local, key=lambda m: (rank[m[0]], rank[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


@lru_cache(maxsize=16)
def _compile(template: str, source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template of {source}: line {e.lineno}: {e.message}") from None


class IncrementalDetokenizer:
    """Text deltas for a stream of token ids, never splitting a multi-byte character.

    Each step decodes a short window ending at the new token twice: up to the last
    emitted token (`read_offset`) and through the new one, and emits the difference
    unless it ends in U+FFFD (bytes of a character still to come). The window starts at
    `prefix_offset`, a few tokens back, so decoders that depend on context (a leading
    space, byte fallback) see it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 5, 0)

    def _delta(self, force: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)  # noqa: E731
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""

    def feed(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(force=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of the stream)."""
        return self._delta(force=True) if self.read_offset < len(self.ids) else ""
