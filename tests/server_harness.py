"""Shared by the server tests: a tiny random-weight model with SmolLM2's real tokenizer (so chat
templates and text work while a step takes milliseconds), an offline `LLM` over the same model
(the oracle), a uvicorn server on 127.0.0.1 in a background thread, bounded in time, and a
`StepGate` through which a test decides when the engine may step (so that what a test checks
never depends on how fast this machine is)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from functools import lru_cache

import httpx
import uvicorn
from kiln.llm import LLM
from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.checkpoint import open_checkpoint
from kiln.runtime.engine import EngineConfig, LLMEngine
from kiln.runtime.gguf_file import default_model_path
from kiln.runtime.model import random_model
from kiln.runtime.server import ServedModel, ServerConfig, build_app
from kiln.runtime.tokenizer import Tokenizer

MAX_MODEL_LEN = 512
TINY = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rms_norm_eps=1e-5, max_position_embeddings=MAX_MODEL_LEN,
            tie_word_embeddings=True)


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.from_checkpoint(open_checkpoint(default_model_path()))


@lru_cache(maxsize=4)
def tiny_model(seed: int = 1):
    return random_model("llama", TINY, seed=seed)


def offline_llm(seed: int = 1, **engine_options) -> LLM:
    """`LLM` over the tiny model (LLM.__init__ loads a checkpoint; this model has none)."""
    llm = LLM.__new__(LLM)
    llm.tokenizer = tokenizer()
    llm.engine = LLMEngine(tiny_model(seed), llm.tokenizer,
                           EngineConfig(max_model_len=MAX_MODEL_LEN, **engine_options))
    return llm


class StepGate:
    """A gate that each step of an engine waits at before it runs, opened by the test.

    The gate holds a number of steps it will let through: `allow(n)` adds n, `open()` lets every
    step through, `close()` holds the next one, and `held()` closes it for a `with` block. While
    a step waits, the engine thread does nothing else: the adds and aborts the server sends queue
    up until the step is let through, so no request makes progress, while the server's event loop
    still admits, refuses, times out requests and notices clients that leave. `StepGate(0)`
    starts shut; `running` opens the gates of its models before it stops the server.
    """

    def __init__(self, steps: float = math.inf):
        self._cond = threading.Condition()
        self._allowed = steps  # steps still allowed through
        self.passed = 0  # steps let through so far

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def open(self) -> None:
        self.allow(math.inf)

    def close(self) -> None:
        with self._cond:
            self._allowed = 0

    @contextlib.contextmanager
    def held(self):
        self.close()
        try:
            yield self
        finally:
            self.open()

    def wrap(self, engine: LLMEngine) -> None:
        """Make every `engine.step()` pass this gate first (on this engine instance only)."""
        step = engine.step

        def gated_step():
            with self._cond:
                self._cond.wait_for(lambda: self._allowed > 0)
                self._allowed -= 1
                self.passed += 1
            return step()

        gated_step.gate = self
        engine.step = gated_step


def served(name: str = "tiny", seed: int = 1, max_waiting: int = 256, gate: StepGate | None = None,
           **engine_options) -> ServedModel:
    """A model to serve; with a gate, each of its engine's steps waits for the gate (see StepGate)."""
    engine_options.setdefault("max_model_len", MAX_MODEL_LEN)
    engine = LLMEngine(tiny_model(seed), tokenizer(), EngineConfig(**engine_options))
    if gate is not None:
        gate.wrap(engine)
    return ServedModel(name, AsyncLLMEngine(engine, max_waiting=max_waiting), tokenizer(), MAX_MODEL_LEN)


@contextlib.contextmanager
def running(models: list[ServedModel], config: ServerConfig | None = None, startup_s: float = 20.0):
    """Serve on a free port of 127.0.0.1; yields the base URL (http://127.0.0.1:PORT)."""
    app = build_app(models, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    _LOOPS[url] = server.servers[0].get_loop()
    try:
        yield url
    finally:
        _LOOPS.pop(url, None)
        for m in models:  # a step held at a gate would keep the engine thread from stopping
            if (gate := getattr(m.engine.engine.step, "gate", None)) is not None:
                gate.open()
        server.should_exit = True
        thread.join(15)
        sock.close()


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


async def until_health(url: str, ready, what: str, model: str = "tiny", timeout: float = 60.0) -> dict:
    """Poll /health (without blocking the event loop) until ready(the model's stats) holds."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as h:
        while True:
            stats = (await h.get(f"{url}/health")).json()["models"][model]
            if ready(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (after {timeout} s): {stats}\n{server_state(url)}")
            await asyncio.sleep(0.02)


_LOOPS: dict[str, asyncio.AbstractEventLoop] = {}  # url -> its server's event loop, for diagnostics
_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def server_state(url: str) -> str:
    """Where things wait, for a failure message: every thread's stack, the server loop's tasks,
    and the TCP states of the server's connections (from /proc/net/tcp)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"--- thread {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
             for ident, frame in sys._current_frames().items()]
    if (loop := _LOOPS.get(url)) is not None:
        async def tasks() -> str:
            out = io.StringIO()
            for t in asyncio.all_tasks():
                t.print_stack(limit=6, file=out)
            return out.getvalue()
        try:
            parts.append("--- server tasks\n" + asyncio.run_coroutine_threadsafe(tasks(), loop).result(5))
        except Exception as e:  # noqa: BLE001 - best effort
            parts.append(f"--- server tasks: {e!r}")
    port = url.rsplit(":", 1)[1]
    states: Counter = Counter()
    with contextlib.suppress(OSError):
        for line in open("/proc/net/tcp").read().splitlines()[1:]:
            f = line.split()
            if int(f[1].split(":")[1], 16) == int(port):  # the server's side of each connection
                states[_TCP_STATES.get(f[3], f[3])] += 1
    parts.append(f"--- server sockets on port {port}: {dict(states)}")
    return "\n".join(parts)


def wait_idle(url: str, model: str = "tiny", timeout: float = 60.0) -> dict:
    """Poll /health until the model has nothing running, waiting or holding KV pages."""
    deadline = time.monotonic() + timeout
    while True:
        stats = health(url)["models"][model]
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_pages_used"] == 0 \
                and stats["in_flight"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {stats}\n{server_state(url)}")
        time.sleep(0.05)


def metric(url: str, line_prefix: str) -> float:
    """The value of the first /metrics sample line starting with line_prefix (0 if absent)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class KilnServe:
    """`kiln serve ARGS` in a subprocess on a free loopback port (`new_session`: in its own session, so
    that a test can signal its process group), stopped on exit; entering waits for /health."""

    def __init__(self, *args: str, startup_s: float = 180, new_session: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--port", str(port),
                                      "--log-level", "warning", *args], start_new_session=new_session,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.startup_s = startup_s

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_s
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"kiln serve exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError("kiln serve did not come up")
            time.sleep(0.2)

    def __enter__(self) -> str:
        self.wait_healthy()
        return self.url

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
