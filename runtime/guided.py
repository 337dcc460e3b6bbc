"""Constrained (guided) decoding: the glue between requests and the llguidance grammar engine.

A request's `SamplingParams.guided` (a `GuidedDecodingParams`, vLLM's fields: json, regex,
choice, grammar, json_object) is compiled once into an llguidance grammar (`GrammarCompiler`,
cached per grammar text); each sequence then owns an `LLMatcher` that advances on every
accepted token. Before a step samples, `GuidedDecoder.start_masks` computes the allowed-token
bitmask of every constrained row that will sample ([M, ceil(V/32)] int32, bit t%32 of word t//32
set = token t allowed) on a worker thread, with llguidance's own thread pool (it drops the GIL),
while the engine thread runs the model's forward; on a GPU the worker also copies them to the
device on a stream of its own. The sampler waits for them only when it needs them and masks the
rows' logits to -inf on the logits' device (`apply_token_bitmask`: one generated kernel on a GPU).

Why llguidance rather than xgrammar: one abi3 wheel with no dependencies (xgrammar pulls triton,
transformers and apache-tvm-ffi and ships one wheel per CPython), masks in tens of microseconds
with no per-grammar precompilation, and it reads JSON schema, regex, Lark and GBNF.

JSON is generated compact (no optional whitespace: a small model otherwise can spend its whole
budget on newlines); a schema may override that with llguidance's `x-guidance` options.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Options of llguidance's JSON compiler unless a schema's "x-guidance" says otherwise.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_JSON_OBJECT = {"type": "object"}  # OpenAI's response_format {"type": "json_object"}


class GuidedError(ValueError):
    """A grammar, schema, regex or choice list that cannot constrain decoding; names the field."""


@dataclass(frozen=True)
class GuidedDecodingParams:
    """Exactly one constraint, with vLLM's names: `json` (a JSON schema, dict or string),
    `regex`, `choice` (a list of strings), `grammar` (EBNF: Lark or llama.cpp's GBNF), or
    `json_object=True` (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise GuidedError(f"guided decoding takes exactly one of json, regex, choice, grammar, json_object; "
                              f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise GuidedError(f"guided json must be a JSON schema (an object or its text), got "
                              f"{type(self.json).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise GuidedError(f"guided {name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or \
                    any(not isinstance(c, str) or not c for c in self.choice):
                raise GuidedError("guided choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))  # hashable: the compile cache's key

    @classmethod
    def from_value(cls, value) -> "GuidedDecodingParams":
        """A GuidedDecodingParams, or a dict of its fields (SamplingParams(guided={"json": ...}))."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise GuidedError(f"guided: unknown field(s) {sorted(unknown)}; expected one of "
                                  f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise GuidedError(f"guided must be a GuidedDecodingParams or a dict, got {type(value).__name__}")

    def key(self) -> tuple:
        j = self.json if not isinstance(self.json, dict) else json.dumps(self.json, sort_keys=True)
        return (j, self.regex, self.choice, self.grammar, self.json_object)


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of the package
        raise GuidedError("guided decoding needs the llguidance package: pip install llguidance") from None
    return llguidance


class GrammarCompiler:
    """Compiles GuidedDecodingParams into llguidance grammars for one tokenizer (thread-safe,
    LRU-cached). `vocab_size` is the model's (the logits' width, which may exceed the
    tokenizer's: tokens past the tokenizer are never allowed)."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256):
        llg = _llg()
        eos = sorted(tokenizer.eos_token_ids)
        # Building the token trie costs ~0.3 s for a 49k vocabulary: once per engine.
        self.lltok = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                     eos_token=eos if eos else None)
        self.vocab_size = vocab_size
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._size = cache_size
        self._lock = threading.Lock()

    def compile(self, guided: GuidedDecodingParams) -> str:
        """The llguidance grammar of `guided`; GuidedError (naming the kind) when it is invalid or
        unsatisfiable."""
        key = guided.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = self._build(guided)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, g: GuidedDecodingParams) -> str:
        llg = _llg()
        kind = "json" if g.json is not None or g.json_object else "regex" if g.regex is not None else \
            "choice" if g.choice is not None else "grammar"
        try:
            if kind == "json":
                schema = ANY_JSON_OBJECT if g.json_object else g.json
                if isinstance(schema, str):
                    schema = json.loads(schema)
                if not isinstance(schema, dict):
                    raise GuidedError(f"guided json: a JSON schema must be an object, got {type(schema).__name__}")
                grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
            elif kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(g.regex)
            elif kind == "choice":
                grammar = llg.grammar_from("choice", list(g.choice))
            else:
                grammar = llg.grammar_from("grammar", g.grammar)  # Lark, or GBNF converted to Lark
        except GuidedError:
            raise
        except (ValueError, TypeError) as e:
            raise GuidedError(f"guided {kind}: {e}") from None
        error = llg.LLMatcher.validate_grammar(grammar, self.lltok)
        if error:
            raise GuidedError(f"guided {kind}: {error.strip()}")
        return grammar

    def matcher(self, guided: GuidedDecodingParams):
        """A fresh matcher for one sequence (raises GuidedError on a bad grammar)."""
        m = _llg().LLMatcher(self.lltok, self.compile(guided), log_level=0)
        if m.is_error():
            raise GuidedError(f"guided decoding: {m.get_error()}")
        return m


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear (in place, on logits' device).
    `bitmask` [M, ceil(V/32)] int32 (little-endian words: viewed as bytes, token t is bit t%8 of
    byte t//8), `rows` [M] int64. On a GPU, fp32 logits: one generated kernel
    (codegen/sampling_kernels.py); else these torch ops, its reference."""
    vocab = logits.shape[1]
    if logits.is_cuda and logits.dtype == torch.float32 and bitmask.shape[1] == mask_words(vocab):
        from kiln.codegen.sampling_kernels import TokenMaskSpec, token_mask

        token_mask(TokenMaskSpec(vocab, origin="guided decoding: the allowed-token mask"), logits, rows,
                   bitmask.contiguous())
        return
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [M, 4W]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    allowed = ((as_bytes[:, :, None] >> shifts) & 1).reshape(as_bytes.shape[0], -1)[:, :vocab]  # [M, V]
    sub = logits.index_select(0, rows)
    sub.masked_fill_(allowed == 0, float("-inf"))
    logits.index_copy_(0, rows, sub)


@dataclass
class GuidedMask:
    """The masks of one step's constrained rows: row indices into the step's logits and their
    bitmasks, on the logits' device (the copy was issued without blocking the host)."""

    rows: torch.Tensor  # [M] int64
    bitmask: torch.Tensor  # [M, W] int32

    def apply(self, logits: torch.Tensor) -> None:
        apply_token_bitmask(logits, self.rows, self.bitmask)


class PendingMask:
    """Masks being computed on the worker thread; `result()` waits for them. On a GPU the worker
    also copies them to the device, on a stream of its own while the model's forward still runs;
    `result()` orders the calling (engine) thread's stream after that copy."""

    def __init__(self, future: Future | None, device: torch.device):
        self._future, self._device = future, device

    def result(self) -> GuidedMask | None:
        if self._future is None:
            return None
        rows, bits, copied = self._future.result()
        if copied is not None:  # the copy's event: the sampler's stream waits for it, and the
            stream = torch.cuda.current_stream(self._device)  # allocator keeps the copies for it
            stream.wait_event(copied)
            rows.record_stream(stream)
            bits.record_stream(stream)
        return GuidedMask(rows, bits)


class GuidedDecoder:
    """Per engine: the compiler, one worker thread for masks, and llguidance's executor."""

    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # llguidance's mask threads (KILN_GUIDED_THREADS). Few: its idle workers spin a while before they
        # sleep, and with its default (80% of the CPUs) they took the cores the engine thread's host work
        # needs. On the H200 machine (16 CPUs), 64 JSON requests: 12 threads +14.4% a decode step against
        # free requests, 4 threads -0.2%, 2 threads +5.7% (the masks then outlast the forward).
        threads = int(os.environ.get("KILN_GUIDED_THREADS", min(4, max(1, (os.cpu_count() or 4) // 4))))
        self._executor = _llg().LLExecutor(threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-guided")
        # Bitmask buffers (pinned on a GPU run), grown to the most rows seen, used in turn: a step's
        # host-to-device copy of one is finished before the buffer comes round again, because the
        # engine reads every step's sampled tokens on the host before it starts the next step.
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._turn = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def matcher(self, guided: GuidedDecodingParams):
        return self.compiler.matcher(guided)

    def start_masks(self, matchers: list[tuple[int, object]]) -> PendingMask:
        """Begin computing the masks of (row, matcher) pairs; nothing to do -> an empty PendingMask.
        The matchers must not advance until `result()` returned."""
        if not matchers:
            return PendingMask(None, self.device)
        return PendingMask(self._worker.submit(self._compute, matchers), self.device)

    def _compute(self, matchers: list[tuple[int, object]]) -> tuple[torch.Tensor, torch.Tensor, object]:
        words = mask_words(self.vocab_size)
        pin = self.device.type == "cuda"
        self._turn ^= 1
        buf = self._buffers[self._turn]
        if buf is None or buf.shape[0] < len(matchers):  # llguidance writes each given row whole: no zeroing
            buf = self._buffers[self._turn] = torch.empty((max(64, len(matchers)), words), dtype=torch.int32,
                                                          pin_memory=pin)
        bits = buf[:len(matchers)]
        # llguidance writes each row in place, on its own threads, without the GIL.
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, (_, m) in enumerate(matchers)],
                                               bits.data_ptr(), words * 4, len(matchers))
        rows = torch.tensor([r for r, _ in matchers], dtype=torch.int64)
        if not pin:
            return rows, bits, None
        # to the device now, beside the forward (the engine thread's stream is busy with it)
        with torch.cuda.stream(self._copy_stream):
            rows = rows.pin_memory().to(self.device, non_blocking=True)
            bits = bits.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        return rows, bits, copied

    @staticmethod
    def advance(matcher, token: int) -> str | None:
        """Feed an accepted token; None, "complete" (the grammar admits nothing more) or an error."""
        if not matcher.consume_token(token):
            return f"guided decoding: token {token} was rejected by the grammar: {matcher.get_error()}"
        return "complete" if matcher.is_stopped() else None

    def close(self) -> None:
        self._worker.shutdown(wait=False)
