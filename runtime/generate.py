"""`kiln generate` / `kiln run`: one prompt through one model, streamed to the terminal; and
`ModelSource`, how every command (and `LLM`) turns a CHECKPOINT argument into a model, its
tokenizer and its config.

A CHECKPOINT is a Hugging Face folder, a `.gguf` file, an engine directory from `kiln build`,
or `default` (also: no CHECKPOINT), the embedded SmolLM2-135M-Instruct. `ModelSource.open`
reads only what is cheap (the config or GGUF header, the tokenizer) and checks the options
against it, so a bad argument is reported before the weights load; `.load()` loads them.

Generation uses the single-sequence driver, the batched sampler (so temperature / top-p /
top-k behave exactly as in the engine) and incremental detokenisation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import context_length, open_checkpoint, read_json
from .gguf_file import DEFAULT_MODEL_NAME, default_model_path
from .sampler import Sampler, SamplingRow, make_generator
from .sampling_params import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

if TYPE_CHECKING:
    from .model import LoadedModel

# The spec machinery (kiln.dsl, imported by .model and .engine_dir: ~0.2 s, its grammar is
# built then) is imported where it is used, so that the argument checks that need only a
# checkpoint's config and tokenizer answer before it.

DEFAULT_SOURCE = "default"  # the CHECKPOINT name of the embedded model


class GenerateError(Exception):
    """A bad argument of a command that loads a model (names the option), reported without a traceback."""


def resolve_source(source: str | Path | None) -> Path:
    """A CHECKPOINT argument as a path: None and `default` are the embedded model."""
    if source is None or str(source) == DEFAULT_SOURCE:
        return default_model_path()
    return Path(source)


def open_tokenizer(source: str | Path | None) -> Tokenizer:
    """The tokenizer of a CHECKPOINT argument: a folder with tokenizer.json, a .gguf file, or (None,
    `default`) the embedded model's."""
    path = resolve_source(source)
    return Tokenizer.from_folder(path) if path.is_dir() else Tokenizer.from_checkpoint(open_checkpoint(path))


def check_device(device: str, backend: str | None = None) -> None:
    """Refuse a device this machine does not have (or a backend it cannot run) before loading."""
    if backend == "cuda" and not device.startswith("cuda"):
        raise GenerateError(f"--backend cuda runs on a GPU: it needs --device cuda, not --device {device}")
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else "no CUDA GPU is visible")
        raise GenerateError(f"--device {device}: {why}; use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise GenerateError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def check_parallel(tp: int, ep: bool, device: str, backend: str | None, pp: int = 1) -> None:
    """Refuse, before loading, what tensor / pipeline parallelism cannot run yet (runtime/model.py
    says the rest)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise GenerateError(f"--tp {tp}: the number of tensor-parallel ranks must be a positive integer")
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise GenerateError(f"--pp {pp}: the number of pipeline stages must be a positive integer")
    if ep and tp == 1:
        raise GenerateError("--ep splits MoE experts across tensor-parallel ranks: it needs --tp N with N > 1")
    opt, what = parallel_option(tp, pp)
    gpu = backend == "cuda" and pp == 1 and not ep  # --tp N on GPUs: the cuda backend, one GPU per rank
    if backend not in (None, "reference") and not gpu:
        raise GenerateError(f"{opt}: {what} runs on the reference backend (CPU) only, not --backend {backend}; "
                            f"leave --backend out with {opt.split()[0]} (the cuda backend runs --tp N alone)")
    if not gpu and not device.startswith("cpu"):
        raise GenerateError(f"{opt}: {what} on --device {device} needs --backend cuda (the reference backend "
                            f"runs it on the CPU)")
    if gpu and device not in ("cuda", "cuda:0"):
        raise GenerateError(f"{opt} --backend cuda: rank r runs on cuda:r; give --device cuda, not --device {device}")


def parallel_option(tp: int, pp: int) -> tuple[str, str]:
    """The option(s) a parallel run was asked with ("--tp 2", "--pp 2", "--tp 2 --pp 2") and its name."""
    if pp == 1:
        return f"--tp {tp}", "tensor parallelism"
    if tp == 1:
        return f"--pp {pp}", "pipeline parallelism"
    return f"--tp {tp} --pp {pp}", "tensor x pipeline parallelism"


@dataclass
class ModelSource:
    """A checkpoint or engine directory, opened but not yet loaded."""

    path: Path
    name: str  # the name `kiln serve` gives it
    config: dict
    context_len: int | None  # positions per sequence the model (or engine) allows
    tokenizer: Tokenizer | None
    manifest: dict | None  # an engine directory's manifest.json
    options: dict  # spec, dtype, device, backend for load_model

    @classmethod
    def open(cls, source: str | Path | None, *, spec: str | None = None, dtype: str | None = None,
             device: str = "cpu", backend: str | None = None, tokenizer: bool | None = True,
             quantization: str | None = None, kv_cache_dtype: str | None = None,
             tensor_parallel_size: int = 1, expert_parallel: bool = False,
             pipeline_parallel_size: int = 1) -> "ModelSource":
        """`tokenizer`: True needs one (an error if the checkpoint has none), None takes one if present,
        False skips it. `dtype` None: fp32, or an engine directory's own; `backend` None: reference, or
        for an engine directory the one its device implies. `tensor_parallel_size` > 1 (`--tp`): the
        model split over that many CPU processes (`expert_parallel`, `--ep`: MoE experts whole per rank);
        `pipeline_parallel_size` > 1 (`--pp`): its layers in that many stages (x the tensor-parallel ranks)."""
        path = resolve_source(source)
        parallel = {}
        if tensor_parallel_size != 1 or expert_parallel or pipeline_parallel_size != 1:
            check_parallel(tensor_parallel_size, expert_parallel, device, backend, pipeline_parallel_size)
            parallel = dict(tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel)
            if pipeline_parallel_size != 1:
                parallel["pipeline_parallel_size"] = pipeline_parallel_size
        check_device(device, backend)
        name = model_name(source)
        if path.suffix.lower() == ".gguf" and path.is_file():  # a file: no engine directory
            return cls._open_checkpoint(path, name, spec, dtype, device, backend, tokenizer, quantization,
                                        kv_cache_dtype, parallel)
        from .engine_dir import is_engine_dir, read_manifest

        if is_engine_dir(path):
            manifest = read_manifest(path)
            if parallel:
                raise GenerateError(f"--tp / --pp do not apply to engine directory {path} (yet): parallelism "
                                    f"loads a checkpoint (a Hugging Face folder or .gguf file)")
            if kv_cache_dtype is not None:
                raise GenerateError(f"--kv-cache-dtype does not apply to engine directory {path} (yet): its KV "
                                    f"cache is the run dtype")
            if quantization is not None:
                raise GenerateError(f"--quantization does not apply to engine directory {path}: its weights were "
                                    f"fixed by `kiln build` (build it with --quantization {quantization})")
            if spec is not None:
                raise GenerateError(f"--spec does not apply to engine directory {path}: its spec "
                                    f"({manifest['spec']['name']}) was built in")
            if dtype is not None and dtype != manifest["dtype"]:
                raise GenerateError(f"--dtype {dtype}: engine directory {path} was built for {manifest['dtype']}; "
                                    f"rebuild it with --dtype {dtype}, or leave --dtype out")
            config = read_json(path / "config.json", "config")
            limits = [n for n in (context_length(config), manifest.get("max_seq_len")) if n]
            has_tok = (path / "tokenizer.json").is_file()
            if tokenizer and not has_tok:
                raise GenerateError(f"engine directory {path} has no tokenizer (tokenizer.json): rebuild it with "
                                    f"this Kiln's `kiln build`, or give token ids (`kiln run --tokens`)")
            tok = Tokenizer.from_folder(path) if has_tok and tokenizer is not False else None
            return cls(path, name, config, min(limits) if limits else None, tok, manifest,
                       dict(device=device))
        return cls._open_checkpoint(path, name, spec, dtype, device, backend, tokenizer, quantization,
                                    kv_cache_dtype, parallel)

    @classmethod
    def _open_checkpoint(cls, path, name, spec, dtype, device, backend, tokenizer, quantization,
                         kv_cache_dtype=None, parallel=None) -> "ModelSource":
        ckpt = open_checkpoint(path)  # a GGUF's header is parsed here once; load() finds it again
        tok = None
        if tokenizer is not False:
            try:
                tok = Tokenizer.from_checkpoint(ckpt)
            except TokenizerError:
                if tokenizer:
                    raise
        return cls(path, name, ckpt.config, context_length(ckpt.config), tok, None,
                   dict(spec=spec, dtype=dtype or "fp32", device=device, backend=backend or "reference",
                        quantization=quantization or "none", kv_cache_dtype=kv_cache_dtype or "auto",
                        **(parallel or {})))

    @property
    def max_num_seqs(self) -> int | None:
        """The most sequences per step the model takes (a TensorRT engine's --max-batch), if limited."""
        return self.manifest["max_batch"] if self.manifest and self.manifest["backend"] == "tensorrt" else None

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"] if self.manifest else self.options["dtype"]

    def load(self) -> LoadedModel:
        from .model import load_model

        return load_model(self.path, **self.options)

    def check_length(self, prompt_len: int, max_tokens: int, option: str = "--max-tokens") -> None:
        if self.context_len is not None and prompt_len + max_tokens > self.context_len:
            raise GenerateError(f"{option} {max_tokens}: the prompt's {prompt_len} tokens + {max_tokens} exceed the "
                                f"context length of {self.name} ({self.context_len} tokens)")


def open_draft(draft: str | Path | None, target: ModelSource | Tokenizer | None, *, dtype: str | None = None,
               device: str = "cpu", backend: str | None = None, spec: str | None = None,
               target_name: str = "the target") -> ModelSource:
    """The draft model of `--speculative draft`: opened like the target (same dtype, device and
    backend), refused unless it shares the target's tokenizer (`target`: its source or tokenizer)."""
    if draft is None:
        raise GenerateError("--speculative draft needs a draft model: --draft CHECKPOINT")
    source = ModelSource.open(draft, spec=spec, dtype=dtype, device=device, backend=backend, tokenizer=None)
    if isinstance(target, ModelSource):
        target, target_name = target.tokenizer, target.name
    mine, theirs = source.tokenizer, target
    probe = "Speculative decoding: the draft's tokens are the target's tokens. 0123 ü 你好"
    if mine is not None and theirs is not None and (
            mine.vocab_size != theirs.vocab_size or mine.encode(probe) != theirs.encode(probe)):
        raise GenerateError(f"--draft {draft}: its tokenizer differs from {target_name}'s (vocabulary "
                            f"{mine.vocab_size} vs {theirs.vocab_size}); a draft must share the target's tokenizer")
    return source


def model_name(source: str | Path | None) -> str:
    """What a checkpoint is called when served: the default model's name, a GGUF file's stem,
    a folder's name."""
    path = resolve_source(source)
    if source is None or str(source) == DEFAULT_SOURCE or path == default_model_path():
        return DEFAULT_MODEL_NAME
    return path.stem if path.suffix == ".gguf" else path.resolve().name


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    prefill_s: float
    decode_s: float
    spec: object | None = None  # runtime.speculative.SpecStats of a speculative run


def generate(loaded: LoadedModel, tokenizer: Tokenizer | None, prompt_ids: list[int], params: SamplingParams,
             on_text=None, on_token=None) -> Generation:
    """One sequence to completion. Without a tokenizer there is no text and only
    `params.stop_token_ids` stop it; `on_token(id)` sees every sampled token."""
    from .model import SingleSequence

    seq = SingleSequence(loaded, len(prompt_ids) + params.max_tokens)
    sampler = Sampler()
    gen = make_generator(params, loaded.device)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
    out: list[int] = []
    text = ""
    finish = "length"
    eos = tokenizer.eos_token_ids if tokenizer is not None and not params.ignore_eos else set()
    stops = set(params.stop_token_ids) | eos
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = seq.step(prompt_ids)
        t1 = time.perf_counter()
        while len(out) < params.max_tokens:
            token = int(sampler.sample(logits, [SamplingRow(params, prompt_ids, out, gen)]).tokens[0])
            out.append(token)
            if on_token:
                on_token(token)
            if token in stops:
                finish = "stop"
                break
            delta = detok.feed(token) if detok is not None else ""
            text += delta
            if on_text and delta:
                on_text(delta)
            if any(s in text for s in params.stop):
                text = text[: min(text.index(s) for s in params.stop if s in text)]
                finish = "stop"
                break
            if len(out) < params.max_tokens:
                logits = seq.step([token])
    tail = detok.flush() if finish == "length" and detok is not None else ""
    if on_text and tail:
        on_text(tail)
    return Generation(prompt_ids, out, text + tail, finish, t1 - t0, time.perf_counter() - t1)


def generate_speculative(loaded: LoadedModel, tokenizer: Tokenizer | None, prompt_ids: list[int],
                         params: SamplingParams, method: str, num_tokens: int, draft: LoadedModel | None = None,
                         on_text=None, on_token=None) -> Generation:
    """One sequence through the engine with speculative decoding (`method` "ngram" or "draft")."""
    from .engine import EngineConfig, LLMEngine

    cfg = EngineConfig(max_num_seqs=1, max_model_len=len(prompt_ids) + params.max_tokens, speculative=method,
                       num_speculative_tokens=num_tokens)
    engine = LLMEngine(loaded, tokenizer, cfg, draft=draft)
    t0 = time.perf_counter()
    engine.add_request(prompt_ids, params)
    t1, seen, out = None, 0, None
    with torch.no_grad():
        while engine.has_unfinished():
            for out in engine.step():
                t1 = t1 or time.perf_counter()
                c = out.outputs[0]
                for token in c.token_ids[seen:]:
                    if on_token:
                        on_token(token)
                seen = len(c.token_ids)
                if on_text and c.delta:
                    on_text(c.delta)
    c = out.outputs[0]
    return Generation(prompt_ids, list(c.token_ids), c.text, c.finish_reason, (t1 or t0) - t0,
                      time.perf_counter() - (t1 or t0), engine.spec_stats)


def generate_cli(args) -> int:
    """`kiln generate` and `kiln run`; everything that can be checked is checked before the weights load."""
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    tokens = getattr(args, "tokens", None)
    source = ModelSource.open(args.checkpoint, spec=getattr(args, "spec", None), dtype=getattr(args, "dtype", None),
                              device=args.device, backend=getattr(args, "backend", None),
                              tokenizer=None if tokens is not None else True,
                              quantization=getattr(args, "quantization", None),
                              kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                              tensor_parallel_size=getattr(args, "tp", None) or 1,
                              expert_parallel=getattr(args, "ep", False),
                              pipeline_parallel_size=getattr(args, "pp", None) or 1)
    parallel = source.options.get("tensor_parallel_size", 1) > 1 or source.options.get("pipeline_parallel_size", 1) > 1
    if parallel and (getattr(args, "speculative", None) or getattr(args, "draft", None)):
        raise GenerateError("--tp / --pp do not combine with --speculative / --draft yet")
    prompt_ids = _prompt_ids(args, source, tokens)
    source.check_length(len(prompt_ids), params.max_tokens)
    method = getattr(args, "speculative", None)
    if getattr(args, "draft", None) is not None and method is None:
        method = args.speculative = "draft"
    if method != "draft" and getattr(args, "draft", None) is not None:
        raise GenerateError(f"--draft goes with --speculative draft, not --speculative {method}")
    draft_source = open_draft(args.draft, source, dtype=getattr(args, "dtype", None), device=args.device,
                              backend=getattr(args, "backend", None)) if method == "draft" else None
    t_load = time.perf_counter()
    loaded = source.load()
    args.draft_model = draft_source.load() if draft_source is not None else None
    if tokens is not None and any(t >= loaded.plan.vocab_size for t in prompt_ids):
        raise GenerateError(f"--tokens: token ids must be < {loaded.plan.vocab_size} (the model's vocabulary), "
                            f"got {max(prompt_ids)}")
    t_loaded = time.perf_counter()
    try:
        return _stream(args, source, loaded, prompt_ids, params, t_loaded - t_load, tokens is not None)
    finally:
        if parallel:  # the other ranks' processes exit
            loaded.model.shutdown()


def _prompt_ids(args, source: ModelSource, tokens: list[int] | None) -> list[int]:
    if tokens is not None:
        prompt_ids = tokens
        vocab = source.config.get("vocab_size")
        if isinstance(vocab, int) and any(t >= vocab for t in prompt_ids):
            raise GenerateError(f"--tokens: token ids must be < {vocab} (the vocabulary of {source.name}), "
                                f"got {max(prompt_ids)}")
    elif args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        prompt_ids = source.tokenizer.encode(source.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    else:
        if args.system:
            raise GenerateError("--system goes with --chat (a plain --prompt has no roles)")
        prompt_ids = source.tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise GenerateError("the prompt encodes to no tokens")
    return prompt_ids


def _stream(args, source: ModelSource, loaded: LoadedModel, prompt_ids: list[int], params: SamplingParams,
            load_s: float, ids_out: bool) -> int:
    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if ids_out:  # token ids in, token ids out (comma-separated, as --tokens takes them)
        first = [True]

        def show_token(token: int) -> None:
            sys.stdout.write(("" if first[0] else ",") + str(token))
            sys.stdout.flush()
            first[0] = False

        g = _generate(args, loaded, source.tokenizer, prompt_ids, params, on_token=show_token)
    else:
        g = _generate(args, loaded, source.tokenizer, prompt_ids, params, on_text=show)
    n = len(g.token_ids)
    print()
    backend = source.options.get("backend") or ("engine " + source.manifest["backend"])
    print(f"[{loaded.plan.spec.name}, {backend}, {source.dtype}, {args.device}: load {load_s:.2f} s, "
          f"prompt {len(prompt_ids)} tokens in {g.prefill_s:.2f} s, {n} tokens in {g.decode_s:.2f} s "
          f"({n / g.decode_s if g.decode_s > 0 else 0:.1f} tok/s), finish: {g.finish_reason}"
          + (f", speculative {args.speculative}: acceptance length {g.spec.acceptance_length:.2f} "
             f"({g.spec.accepted}/{g.spec.drafted} drafts kept)" if g.spec is not None else "") + "]", file=sys.stderr)
    return 0



def _generate(args, loaded, tokenizer, prompt_ids, params, **callbacks) -> Generation:
    method = getattr(args, "speculative", None)
    if method is None:
        return generate(loaded, tokenizer, prompt_ids, params, **callbacks)
    return generate_speculative(loaded, tokenizer, prompt_ids, params, method, args.num_speculative_tokens,
                                getattr(args, "draft_model", None), **callbacks)
