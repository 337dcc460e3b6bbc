"""`kiln serve`: load one or more models and serve them over the OpenAI API (server.py).

    kiln serve model.gguf                              # served as "model"
    kiln serve --model small=a.gguf --model big=hf_dir --port 8000 --api-key KEY

Arguments are declared here without importing FastAPI, so that `kiln --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class ServeError(Exception):
    """A bad `kiln serve` argument, reported without a traceback."""


# Config keys that state a model's context length (Hugging Face names; GGUF maps to the first).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", nargs="?",
                   help="HF folder or .gguf file, served under its file or folder name "
                        "(default, when no --model either: the embedded SmolLM2)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="serve the checkpoint at PATH under NAME (repeatable: several models at once)")
    p.add_argument("--random-weights", metavar="CONFIG",
                   help="also serve a model of this config.json's shape with random weights, named after the "
                        "file (for benchmarks); its tokenizer: --tokenizer")
    p.add_argument("--tokenizer", metavar="CHECKPOINT",
                   help="a .gguf file or a folder with tokenizer.json: the tokenizer of --random-weights "
                        "(default: the embedded SmolLM2's)")
    p.add_argument("--spec", help="spec (default: chosen by each checkpoint's architecture)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KILN_API_KEY, or none)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", choices=["reference", "cuda"])
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per batch (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="sequences that may wait for a seat; beyond that requests get 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's, at most 4096)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--num-pages", type=int, default=None, help="KV cache pages (default: from memory)")
    p.add_argument("--kv-memory-fraction", type=float, default=0.8,
                   help="CUDA: share of the free GPU memory (after weights) for the KV cache")
    p.add_argument("--max-tokens-per-step", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; then 504 (or an error event)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def model_sources(checkpoint: str | None, pairs: list[str], random_weights: str | None = None) -> dict[str, str]:
    """{name: path} from the positional checkpoint and the --model NAME=PATH pairs."""
    sources: dict[str, str] = {}
    if checkpoint is None and not pairs and not random_weights:
        from .gguf_file import default_model_path
        checkpoint = str(default_model_path())
    if checkpoint is not None:
        path = Path(checkpoint)
        sources[path.stem if path.suffix == ".gguf" else path.resolve().name] = checkpoint
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ServeError(f"--model expects NAME=PATH, got {pair!r}")
        if name in sources:
            raise ServeError(f"model name {name!r} is given twice")
        sources[name] = path
    return sources


def cmd_serve(args) -> int:
    from .tokenizer import TokenizerError

    try:
        app, summary = _build(args)
    except (ServeError, TokenizerError) as e:
        print(f"kiln serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    print(summary, file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0


def _build(args):
    from .async_engine import AsyncLLMEngine
    from .engine import EngineConfig, LLMEngine
    from .server import ServedModel, ServerConfig, build_app

    for flag in ("port", "max_waiting", "page_size", "max_body_bytes", "max_tokens_per_step"):
        if getattr(args, flag) < 0 or (flag != "max_waiting" and getattr(args, flag) == 0):
            raise ServeError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.request_timeout <= 0:
        raise ServeError(f"--request-timeout must be positive, got {args.request_timeout}")
    max_num_seqs = args.max_num_seqs or (64 if args.device.startswith("cuda") else 8)
    loaders = {name: (path, lambda path=path: _load_checkpoint(path, args))
               for name, path in model_sources(args.checkpoint, args.model, args.random_weights).items()}
    if args.random_weights:
        name = Path(args.random_weights).stem
        if name in loaders:
            raise ServeError(f"model name {name!r} (from --random-weights) is given twice")
        loaders[name] = (f"{args.random_weights} (random weights)", lambda: _load_random(args))
    models, lines = [], []
    for name, (what, load) in loaders.items():
        loaded, tokenizer, config = load()
        native = next((int(v) for k in _CONTEXT_KEYS if isinstance(v := config.get(k), int)), None)
        max_len = args.max_model_len or min(native or 4096, 4096)
        if native is not None and max_len > native:
            raise ServeError(f"--max-model-len {max_len} exceeds the context length of {what} ({native})")
        engine = LLMEngine(loaded, tokenizer, EngineConfig(
            page_size=args.page_size, num_pages=args.num_pages, kv_memory_fraction=args.kv_memory_fraction,
            max_num_seqs=max_num_seqs,
            max_tokens_per_step=args.max_tokens_per_step, max_model_len=max_len))
        if engine.pool.num_pages * args.page_size < max_len:
            raise ServeError(f"the KV cache of {name!r} ({engine.pool.num_pages} pages x {args.page_size}) cannot "
                             f"hold one sequence of --max-model-len {max_len}")
        models.append(ServedModel(name, AsyncLLMEngine(engine, max_waiting=args.max_waiting), tokenizer, max_len))
        lines.append(f"  {name}: {what} (max_model_len {max_len}; {engine.capacity})")
    config = ServerConfig(api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                          request_timeout=args.request_timeout)
    auth = "API key required" if args.api_key else "no API key"
    summary = "\n".join([f"kiln serve: http://{args.host}:{args.port}/v1 ({auth}); models:", *lines])
    return build_app(models, config), summary


def _load_checkpoint(path: str, args):
    from .model import load_model
    from .tokenizer import Tokenizer

    loaded = load_model(path, spec=args.spec, dtype=args.dtype, device=args.device, backend=args.backend)
    return loaded, Tokenizer.from_checkpoint(loaded.checkpoint), loaded.checkpoint.config


def _load_random(args):
    from .checkpoint import open_checkpoint, read_json
    from .gguf_file import default_model_path
    from .model import random_model, spec_for_config
    from .tokenizer import Tokenizer

    path = Path(args.random_weights)
    if not path.is_file():
        raise ServeError(f"--random-weights: config file not found: {path}")
    config = read_json(path, "config file")
    source = Path(args.tokenizer or default_model_path())  # first: it fails faster than the weights
    tokenizer = Tokenizer.from_folder(source) if source.is_dir() else Tokenizer.from_checkpoint(open_checkpoint(source))
    loaded = random_model(args.spec or spec_for_config(config, str(path)), config, dtype=args.dtype,
                          device=args.device, backend=args.backend)
    if tokenizer.vocab_size > loaded.plan.vocab_size:
        raise ServeError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the vocabulary of "
                         f"{path} ({loaded.plan.vocab_size}): pass a --tokenizer that fits")
    return loaded, tokenizer, config
