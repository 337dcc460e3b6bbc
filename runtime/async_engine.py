"""`AsyncLLMEngine`: the engine behind an asyncio server.

`LLMEngine` is not thread-safe and its steps block (the reference backend computes on the
calling thread), so one background thread owns it: it takes commands (add, abort, stop) from
a queue, steps while there is work, and hands each step's outputs to the event loop with
`loop.call_soon_threadsafe`. Code on the event loop never touches the engine; it reads the
`EngineStats` snapshot the engine thread publishes after every step.

Admission is bounded: at most `max_num_seqs + max_waiting` sequences (a request with n
samples counts n) are in flight; one more raises `QueueFull` at once, before anything is
queued, so that a server can answer 429 instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class QueueFull(Exception):
    """Every seat and every waiting slot is taken: retry later (HTTP 429)."""


class EngineDead(Exception):
    """The engine thread is not running (shut down, or a step raised)."""


@dataclass(frozen=True)
class EngineStats:
    running: int = 0  # sequences in the running batch
    waiting: int = 0  # sequences queued in the scheduler (new or preempted)
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    preemptions: int = 0
    steps: int = 0
    prefix_query_tokens: int = 0  # so far: tokens admitted requests needed in the KV cache
    prefix_hit_tokens: int = 0  # so far: of those, tokens found in the prefix cache


@dataclass
class RequestStats:
    request_id: str
    arrival: float  # time.monotonic() seconds
    prompt_tokens: int = 0
    first_token: float | None = None
    finished: float | None = None
    generated_tokens: int = 0  # over all samples
    finish_reason: str | None = None  # of sample 0; "abort" when cancelled before the end

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (sample 0's pace for n > 1)."""
        if self.first_token is None or self.finished is None or self.generated_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.generated_tokens - 1)


class EngineHooks:
    """Metrics hooks; override what you need. on_step runs on the engine thread."""

    def on_step(self, stats: EngineStats) -> None:
        pass

    def on_request_done(self, stats: RequestStats) -> None:
        pass


class RequestStream:
    """One request's outputs as an async iterator. `close()` aborts it if still running
    (and is idempotent): always call it, e.g. in a `finally`."""

    def __init__(self, owner: "AsyncLLMEngine", request_id: str, seats: int, prompt_tokens: int):
        self.request_id = request_id
        self.stats = RequestStats(request_id, time.monotonic(), prompt_tokens)
        self._owner = owner
        self._seats = seats
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._engine_done = False  # the engine has finished (or never took) the request
        self._closed = False
        self._last: RequestOutput | None = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._last is not None and self._last.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # raise it again on the next call
            raise item
        self._last = item
        return item

    def _put(self, item: RequestOutput | BaseException) -> None:
        """On the event loop: an output of the engine (or the error that ended the request)."""
        if isinstance(item, RequestOutput):
            s = self.stats
            s.prompt_tokens = len(item.prompt_token_ids)
            s.generated_tokens = sum(len(c.token_ids) for c in item.outputs)
            if s.first_token is None and s.generated_tokens:
                s.first_token = time.monotonic()
            if item.finished:
                s.finish_reason = item.outputs[0].finish_reason if item.outputs else "error"
        if isinstance(item, BaseException) or item.finished:
            self._release()
        self._queue.put_nowait(item)

    def _release(self) -> None:
        if not self._engine_done:
            self._engine_done = True
            self._owner._retire(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._engine_done:
            self._owner._send(("abort", self.request_id))
            self.stats.finish_reason = "abort"
            self._release()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, hooks: EngineHooks | None = None):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_in_flight = engine.config.max_num_seqs + max_waiting  # sequences
        self.hooks = hooks or EngineHooks()
        self.stats = EngineStats(kv_pages_total=engine.pool.num_pages)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event loop only
        self._seats_used = 0  # event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle (event loop) -------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; outputs go to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncLLMEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current step; every open stream gets EngineDead."""
        if self._thread is None:
            return
        self._send(("stop",))
        await asyncio.to_thread(self._thread.join, timeout)
        self._fail_all(EngineDead("the engine was shut down"))

    # -- requests (event loop) --------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> RequestStream:
        """Queue a request; raises QueueFull at once when admission is full."""
        if not self.alive:
            raise EngineDead(f"the engine is not running{f': {self._error}' if self._error else ''}")
        if self._seats_used + params.n > self.max_in_flight:
            raise QueueFull(f"{self._seats_used} sequences in flight, the limit is {self.max_in_flight} "
                            f"({self.engine.config.max_num_seqs} running + {self.max_waiting} waiting)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = RequestStream(self, request_id, params.n, len(prompt) if isinstance(prompt, list) else 0)
        self._streams[request_id] = stream
        self._seats_used += params.n
        self._send(("add", request_id, prompt, params))
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.close()

    @property
    def num_in_flight(self) -> int:
        return self._seats_used

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _retire(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        self._seats_used -= stream._seats
        stream.stats.finished = time.monotonic()
        try:
            self.hooks.on_request_done(stream.stats)
        except Exception:  # a metrics bug must not break serving
            pass

    def _deliver(self, outputs: list[RequestOutput], errors: list[tuple[str, BaseException]]) -> None:
        for rid, err in errors:
            if (stream := self._streams.get(rid)) is not None:
                stream._put(err)
        for out in outputs:
            if (stream := self._streams.get(out.request_id)) is not None:
                stream._put(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream._put(error)

    # -- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                commands = [] if engine.has_unfinished() else [self._commands.get()]  # idle: block
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                errors: list[tuple[str, BaseException]] = []
                for cmd in commands:
                    if cmd[0] == "stop":
                        return
                    if cmd[0] == "add":
                        try:
                            engine.add_request(cmd[2], cmd[3], cmd[1])
                        except Exception as e:  # noqa: BLE001 - this request fails, the engine goes on
                            errors.append((cmd[1], e))
                    elif cmd[0] == "abort":
                        engine.abort(cmd[1])
                outputs = engine.step() if engine.has_unfinished() else []
                self._publish(outputs, errors)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            self._error = e
            self._call_loop(self._fail_all, EngineDead(f"the engine stopped: {type(e).__name__}: {e}"))

    def _publish(self, outputs: list[RequestOutput], errors: list) -> None:
        sched, pool = self.engine.scheduler, self.engine.pool
        self.stats = EngineStats(len(sched.running), len(sched.waiting), pool.num_used, pool.num_pages,
                                 sched.num_preemptions, self.stats.steps + 1, sched.prefix_query_tokens,
                                 sched.prefix_hit_tokens)
        try:
            self.hooks.on_step(self.stats)
        except Exception:
            pass
        if outputs or errors:
            self._call_loop(self._deliver, outputs, errors)

    def _call_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more
