"""Response bodies of the server: OpenAI JSON for whole responses, and server-sent events.

A stream is `data: {chunk}` events then `data: [DONE]`; a failure after the headers went out
(timeout, engine stopped) becomes an event `data: {"error": {...}}` before `[DONE]`, as vLLM
does. `EventStream` watches the connection while it sends, so that a client that goes away
has its request aborted at once, even while the request still waits for a seat.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from starlette.responses import Response

from .async_engine import EngineDead, RequestStream
from .outputs import CompletionOutput, RequestOutput
from .server_protocol import APIError
from .tokenizer import Tokenizer
from .tool_calls import ToolPlan


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else reason if reason in ("stop", "length") else "stop"


async def wait_disconnect(receive) -> None:
    """Returns when the client has gone (the request body must have been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_by(stream: RequestStream, deadline: float) -> RequestOutput:
    """The stream's next output by `deadline` (time.monotonic()), else asyncio.TimeoutError. Not
    asyncio.wait_for: before Python 3.12 it returns the result when the output arrives in the same loop
    turn as a cancellation of the caller, losing the cancellation. EventStream cancels its pump when the
    client leaves; a lost cancel left the pump awaiting the next output of a request no one would close
    (tests/test_server.py test_disconnects_free_every_page, about one run in three)."""
    task = asyncio.ensure_future(anext(stream))
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


class EventStream(Response):
    """An SSE response that closes (aborts) its request when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        self.events, self.stream = events, stream
        self.status_code, self.background = 200, None

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = []
        try:  # whatever happens from here on (even a failed first send), the request is closed
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
            tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(wait_disconnect(receive))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.stream.close()
            await self.events.aclose()


class Renderer:
    """Builds one request's response (or chunks) in the OpenAI shape of its endpoint."""

    def __init__(self, prefix: str, model: str, tokenizer: Tokenizer, chat: bool, token_ids: bool,
                 logprobs: int | None, tools: ToolPlan | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.token_ids, self.logprobs = token_ids, logprobs
        self.tools = tools  # chat with tools: replies are parsed into tool_calls (runtime/tool_calls.py)
        self._streamers: dict[int, object] = {}

    # -- whole responses --------------------------------------------------------------------
    def response(self, final: RequestOutput) -> dict:
        choices = []
        for c in final.outputs:
            lp = self._logprobs(c.token_ids, c.logprobs, 0)
            choice = {"index": c.index}
            finish = _finish_reason(c.finish_reason)
            if self.chat and self.tools is not None:
                content, calls = self.tools.result(c.text)
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = [call.openai() for call in calls]
                finish = self.tools.finish_reason(calls, finish)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choice.update(logprobs=lp, finish_reason=finish, stop_reason=c.stop_reason)
            if self.token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage(final)}

    def _usage(self, out: RequestOutput) -> dict:
        gen = sum(len(c.token_ids) for c in out.outputs)
        return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": gen,
                "total_tokens": len(out.prompt_token_ids) + gen}

    # -- streams ----------------------------------------------------------------------------
    def _event(self, choices: list[dict], **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return "data: " + _dumps({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                  "choices": choices, **extra}) + "\n\n"

    async def events(self, stream: RequestStream, deadline: float, usage: bool, n: int) -> AsyncIterator[str]:
        sent = [0] * n  # tokens already sent, per choice
        done = [False] * n
        offsets = [0] * n  # text offset, for completions logprobs
        try:
            if self.chat:
                yield self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(n)])
            while True:
                out = await _next_by(stream, deadline)
                choices = [ch for c in out.outputs if (ch := self._chunk_choice(c, sent, done, offsets))]
                if choices:
                    yield self._event(choices)
                if out.finished:
                    break
            if out.error:
                yield _error_event(APIError(400, out.error))
            elif usage:
                yield self._event([], usage=self._usage(out))
        except asyncio.TimeoutError:  # builtin TimeoutError from 3.11 on, its own class before
            yield _error_event(APIError(504, "the request timed out", "timeout_error", code="timeout"))
        except EngineDead as e:
            yield _error_event(APIError(503, str(e), "server_error", code="engine_dead"))
        except ValueError as e:  # the engine refused the request
            yield _error_event(APIError(400, str(e)))
        except Exception as e:  # noqa: BLE001 - the headers are sent: report it in the stream
            yield _error_event(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
        yield "data: [DONE]\n\n"

    def _chunk_choice(self, c: CompletionOutput, sent: list[int], done: list[bool], offsets: list[int]) -> dict | None:
        i = c.index
        start, end = sent[i], len(c.token_ids)
        finish = _finish_reason(c.finish_reason)
        if done[i] or not (c.delta or end > start or finish):
            return None
        sent[i], done[i] = end, finish is not None
        # The engine thread appends to c.logprobs: slice exactly the tokens of this output.
        lp = self._logprobs(c.token_ids[start:end], None if c.logprobs is None else c.logprobs[start:end],
                            offsets[i])
        if lp is not None and not self.chat:
            offsets[i] += sum(len(t) for t in lp["tokens"])
        choice = {"index": i}
        if self.chat and self.tools is not None:
            streamer = self._streamers.setdefault(i, self.tools.streamer())
            if finish:
                content, calls_delta, calls = streamer.finish(c.text)
                finish = self.tools.finish_reason(calls, finish)
            else:
                content, calls_delta = streamer.feed(c.text)
            choice["delta"] = {**({"content": content} if content else {}),
                               **({"tool_calls": calls_delta} if calls_delta else {})}
            if not choice["delta"] and not finish and not (self.token_ids or lp is not None):
                return None  # held back: nothing to say yet
        elif self.chat:
            choice["delta"] = {"content": c.delta} if c.delta or not finish else {}
        else:
            choice["text"] = c.delta
        choice.update(logprobs=lp, finish_reason=finish)
        if finish:
            choice["stop_reason"] = c.stop_reason
        if self.token_ids:
            choice["token_ids"] = c.token_ids[start:end]
        return choice

    # -- logprobs ---------------------------------------------------------------------------
    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _top(self, entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[: self.logprobs or 0]

    def _logprobs(self, ids: list[int], entries: list[dict[int, float]] | None, offset: int) -> dict | None:
        if entries is None or self.logprobs is None:
            return None
        if self.chat:
            def item(t, lp):
                s = self._text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**item(t, e[t]), "top_logprobs": [item(k, v) for k, v in self._top(e)]}
                                for t, e in zip(ids, entries)]}
        tokens = [self._text(t) for t in ids]
        starts = []
        for s in tokens:
            starts.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(ids, entries)],
                "top_logprobs": [{self._text(k): v for k, v in self._top(e)} for e in entries],
                "text_offset": starts}


def _error_event(err: APIError) -> str:
    return "data: " + _dumps(err.body()) + "\n\n"
