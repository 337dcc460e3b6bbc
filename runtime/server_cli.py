"""`kiln serve`: load one or more models and serve them over the OpenAI API (server.py).

    kiln serve                                         # the embedded model, served as "SmolLM2-135M-Instruct"
    kiln serve model.gguf                              # served as "model"
    kiln serve --model small=a.gguf --model big=hf_dir --port 8000 --api-key KEY
    kiln serve hf_dir --lora sql=adapters/sql --lora chat=adapters/chat   # adapters served as models
    kiln serve hf_dir --tp 2 --pp 2                    # split over 4 processes (docs/parallelism.md)

Its arguments are declared with the other commands' in kiln.cli. Everything that can be
refused is refused before a model loads: argument ranges while parsing, then each
checkpoint's config and tokenizer, --max-model-len against each model's context length, and
the listening address (bound before the weights load, and handed to uvicorn).

With --tp / --pp this process is rank 0 (it serves HTTP and schedules; each step it broadcasts
the batch to the worker processes, runtime/distributed.py). The workers stop when the server
does (SIGINT, SIGTERM, a failed start); a worker that dies fails the requests in flight with a
503 naming it, and the server exits with status 1.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from pathlib import Path


class ServeError(Exception):
    """A bad `kiln serve` argument, reported without a traceback."""


def model_sources(checkpoint: str | None, pairs: list[str], random_weights: str | None = None) -> dict[str, str]:
    """{name: source} from the positional checkpoint and the --model NAME=PATH pairs."""
    from .generate import DEFAULT_SOURCE, model_name

    sources: dict[str, str] = {}
    if checkpoint is None and not pairs and not random_weights:
        checkpoint = DEFAULT_SOURCE
    if checkpoint is not None:
        sources[model_name(checkpoint)] = checkpoint
    for pair in pairs:
        name, _, path = pair.partition("=")
        if name in sources:
            raise ServeError(f"model name {name!r} is given twice")
        sources[name] = path
    return sources


def cmd_serve(args) -> int:
    import uvicorn

    planned = _plan(args)  # checkpoints opened (configs, tokenizers), limits checked; no weights yet
    sock = listen(args.host, args.port)  # then the address: a taken port is refused before any model loads
    loaded: list = []  # every model loaded: a split one's worker processes are stopped however serving ends
    engines: list = []
    server = None
    try:
        app, summary = _load(args, planned, loaded, engines)
        print(summary, file=sys.stderr)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10)
        server = _watching_server(uvicorn.Server, config, [e for e in engines if _parallel(e.engine.loaded)])
        server.run(sockets=[sock])
    finally:
        sock.close()
        for m in loaded:
            if _parallel(m):
                m.model.shutdown()
    if server is not None and server.died:
        print(f"kiln serve: {server.died}; the server stopped", file=sys.stderr)
        return 1
    for sig in reversed(server.signals if server is not None else []):  # as uvicorn would, once the workers stopped
        signal.raise_signal(sig)
    return 0


def _parallel(loaded) -> bool:
    from .distributed import ParallelModel

    return isinstance(loaded.model, ParallelModel)


def _watching_server(base, config, engines: list):
    """uvicorn's Server, which also stops when the engine of a split model (--tp / --pp) has died: a
    rank was lost (or a step raised, and the ranks may disagree), so nothing more can run; every
    request in flight got a 503 naming the cause."""
    import contextlib

    class Server(base):
        died: str | None = None
        signals: list = []  # SIGINT / SIGTERM that stopped it, raised again by cmd_serve after the cleanup

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn raises the signals it caught again as it returns: a SIGTERM would end this
            # process before cmd_serve's `finally` stopped the workers; keep them for later instead
            with super().capture_signals():
                try:
                    yield
                finally:
                    caught = getattr(self, "_captured_signals", [])
                    self.signals = list(caught)
                    caught.clear()

        async def on_tick(self, counter: int) -> bool:
            for e in engines:
                error = e._error  # set when the engine thread's step raised (async_engine.py _run)
                if error is not None and self.died is None:
                    self.died = f"the engine of the split model stopped: {type(error).__name__}: {error}"
                    self.should_exit = True
            return await super().on_tick(counter)

    return Server(config)


def check_parallel_options(args) -> None:
    """--tp / --pp: what a split model cannot serve yet is refused by name, before anything loads
    (ranges: by the parser; the backend and device: generate.check_parallel, as `kiln generate`)."""
    from .generate import check_parallel, parallel_option

    tp, pp = getattr(args, "tp", 1) or 1, getattr(args, "pp", 1) or 1
    if tp == 1 and pp == 1:
        return
    check_parallel(tp, False, args.device, args.backend, pp)
    opt, what = parallel_option(tp, pp)
    flag = opt.split()[0]
    if getattr(args, "quantization", None):
        raise ServeError(f"{opt} with --quantization {args.quantization}: quantized weights are not split across "
                         f"ranks yet; leave --quantization out with {flag}")
    if getattr(args, "kv_cache_dtype", None) not in (None, "auto"):
        raise ServeError(f"{opt} with --kv-cache-dtype {args.kv_cache_dtype}: the split KV cache runs in the run "
                         f"dtype only; leave --kv-cache-dtype out with {flag}")
    if getattr(args, "lora", None):
        raise ServeError(f"{opt} with --lora: LoRA adapters are not split across ranks yet")
    if getattr(args, "speculative", None) or getattr(args, "draft", None):
        raise ServeError(f"{opt} with --speculative / --draft: speculative decoding does not run on a split "
                         f"model yet")
    if args.random_weights:
        raise ServeError(f"{opt} with --random-weights: each rank loads its shard from a checkpoint (a Hugging "
                         f"Face folder or .gguf file); serve one instead")
    if len(args.model) + (args.checkpoint is not None) > 1:
        raise ServeError(f"{opt}: {what} serves one model (one process group per server), got "
                         f"{len(args.model) + (args.checkpoint is not None)}")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (what uvicorn would bind, done here so that the error
    comes before the models load and no other process can take the port meanwhile)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _plan(args) -> list:
    """[(name, what, max_model_len, max_num_seqs or None, load)] for every model to serve; everything
    but the weights."""
    from .engine import DEFAULT_MAX_MODEL_LEN
    from .generate import check_device

    check_parallel_options(args)
    check_device(args.device, args.backend)
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    sources = model_sources(args.checkpoint, args.model, args.random_weights)
    if args.random_weights:
        name = Path(args.random_weights).stem
        if name in sources:
            raise ServeError(f"model name {name!r} (from --random-weights) is given twice")
    # Open every checkpoint (config, tokenizer) and check the limits before loading any weights.
    opened = []
    for name, source in sources.items():
        opened.append((name, *_open_checkpoint(source, args)))
    if args.random_weights:
        opened.append((Path(args.random_weights).stem, *_open_random(args)))
    loras = getattr(args, "lora", [])
    if loras and len(opened) != 1:
        raise ServeError(f"--lora: adapters need exactly one served model, got {len(opened)}")
    for pair in loras:  # the folders now; whether they fit the model once it is loaded
        lname, _, lpath = pair.partition("=")
        if not (Path(lpath) / "adapter_config.json").is_file():
            raise ServeError(f"--lora {pair}: {lpath!r} is not a PEFT adapter folder (no adapter_config.json)")
        if lname in sources or lname in [n for n, *_ in opened]:
            raise ServeError(f"--lora {pair}: the name {lname!r} is already a served model")
    planned = []
    for name, what, context_len, max_seqs, load in opened:
        max_len = args.max_model_len or min(context_len or DEFAULT_MAX_MODEL_LEN[kind], DEFAULT_MAX_MODEL_LEN[kind])
        if context_len is not None and max_len > context_len:
            raise ServeError(f"--max-model-len {max_len} exceeds the context length of {what} ({context_len})")
        if args.num_pages is not None and args.num_pages * args.page_size < max_len:
            raise ServeError(f"--num-pages {args.num_pages} x --page-size {args.page_size} cannot hold one "
                             f"sequence of --max-model-len {max_len}")
        planned.append((name, what, max_len, args.max_num_seqs or max_seqs, load))
    return planned


def _load(args, planned: list, loaded_models: list | None = None, engines: list | None = None):
    """The app and its summary; each model loaded (and its AsyncLLMEngine) is appended to
    `loaded_models` (and `engines`) as it comes, for the caller to stop however this ends."""
    from .async_engine import AsyncLLMEngine
    from .engine import EngineConfig, LLMEngine
    from .server import ServedModel, ServerConfig, build_app

    lines = []
    for name, what, max_len, max_seqs, load in planned:
        method = getattr(args, "speculative", None) or ("draft" if getattr(args, "draft", None) else None)
        draft = None
        if method == "draft":
            from .generate import GenerateError, open_draft
            if len(planned) != 1:
                raise ServeError(f"--draft: a draft model goes with exactly one served model, got {len(planned)}")
        loaded, tokenizer = load()
        if loaded_models is not None:
            loaded_models.append(loaded)
        if method == "draft":
            try:
                draft = open_draft(args.draft, tokenizer, dtype=args.dtype, device=args.device, backend=args.backend,
                                   target_name=what).load()
            except GenerateError as e:
                raise ServeError(str(e)) from None
        engine = LLMEngine(loaded, tokenizer, EngineConfig(
            page_size=args.page_size, num_pages=args.num_pages, kv_memory_fraction=args.kv_memory_fraction,
            max_num_seqs=max_seqs, max_tokens_per_step=args.max_tokens_per_step, max_model_len=max_len,
            enable_prefix_caching=getattr(args, "prefix_caching", True), speculative=method,
            state_snapshots=getattr(args, "state_snapshots", None),
            num_speculative_tokens=getattr(args, "num_speculative_tokens", 4)),
            context_len=max_len, draft=draft)
        from .lora import LoraError
        for pair in getattr(args, "lora", []):
            try:
                engine.load_lora(*pair.split("=", 1))
            except LoraError as e:
                raise ServeError(f"--lora {pair}: {e}") from None
        if engine.pool.num_pages * args.page_size < max_len:
            raise ServeError(f"the KV cache of {name!r} ({engine.pool.num_pages} pages x {args.page_size}) cannot "
                             f"hold one sequence of --max-model-len {max_len}")
        graphs = ""
        if getattr(args, "enforce_eager", False):
            eager = getattr(loaded.model, "disable_graphs", None)  # (a backend without graphs runs eagerly anyway)
            if eager is not None:
                eager()
        else:  # the CUDA graphs captured now, not at the first requests of each size (0 for a backend without)
            t0 = time.perf_counter()
            made = engine.capture_graphs()
            graphs = f"; {made} CUDA graphs captured in {time.perf_counter() - t0:.1f} s" if made else ""
        served = ServedModel(name, AsyncLLMEngine(engine, max_waiting=args.max_waiting), tokenizer, max_len)
        if engines is not None:
            engines.append(served.engine)
        tp, pp = getattr(args, "tp", 1) or 1, getattr(args, "pp", 1) or 1
        split = f"; tp {tp} x pp {pp}: {tp * pp} processes" if _parallel(loaded) else ""
        lines.append((served, f"  {name}: {what} (max_model_len {max_len}; {engine.capacity}{split}{graphs})"))
    config = ServerConfig(api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                          request_timeout=args.request_timeout)
    auth = "API key required" if args.api_key else "no API key"
    summary = "\n".join([f"kiln serve: http://{args.host}:{args.port}/v1 ({auth}); models:", *(s for _, s in lines)])
    return build_app([m for m, _ in lines], config), summary


def _open_checkpoint(source: str, args):
    """(path, context length, most sequences per step or None, loader) of a checkpoint, opened
    (config, tokenizer) but not loaded."""
    from .generate import ModelSource

    opened = ModelSource.open(source, spec=args.spec, dtype=args.dtype, device=args.device, backend=args.backend,
                              quantization=getattr(args, "quantization", None),
                              kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
                              tensor_parallel_size=getattr(args, "tp", 1) or 1,
                              pipeline_parallel_size=getattr(args, "pp", 1) or 1)
    if args.max_num_seqs is not None and opened.max_num_seqs is not None and args.max_num_seqs > opened.max_num_seqs:
        raise ServeError(f"--max-num-seqs {args.max_num_seqs}: {opened.path} was built for {opened.max_num_seqs} "
                         f"sequences per step (kiln build --max-batch)")
    return str(opened.path), opened.context_len, opened.max_num_seqs, lambda: (opened.load(), opened.tokenizer)


def _open_random(args):
    from .checkpoint import context_length, read_json
    from .generate import open_tokenizer
    from .model import random_model, spec_for_config

    path = Path(args.random_weights)
    if not path.is_file():
        raise ServeError(f"--random-weights: config file not found: {path}")
    config = read_json(path, "config file")
    spec = args.spec or spec_for_config(config, str(path))
    tokenizer = open_tokenizer(args.tokenizer)
    vocab = config.get("vocab_size")
    if isinstance(vocab, int) and tokenizer.vocab_size > vocab:
        raise ServeError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the vocabulary of "
                         f"{path} ({vocab}): pass a --tokenizer that fits")

    def load():
        loaded = random_model(spec, config, dtype=args.dtype or "fp32", device=args.device,
                              backend=args.backend or "reference",
                              quantization=getattr(args, "quantization", None) or "none",
                              kv_cache_dtype=getattr(args, "kv_cache_dtype", None) or "auto")
        if tokenizer.vocab_size > loaded.plan.vocab_size:
            raise ServeError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the vocabulary of "
                             f"{path} ({loaded.plan.vocab_size}): pass a --tokenizer that fits")
        return loaded, tokenizer

    return f"{path} (random weights)", context_length(config), None, load
