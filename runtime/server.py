"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLMEngine.

    app = build_app([ServedModel("name", AsyncLLMEngine(engine), tokenizer, max_model_len=4096)])

Routes: POST /v1/completions and /v1/chat/completions (streaming as server-sent events
`data: {...}` ... `data: [DONE]`, or one JSON body), GET /v1/models, /health, /metrics;
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter {"lora_name"}
(vLLM's): a loaded adapter is listed and requested as a model of its own (runtime/lora.py).
Protection: bounded admission (429), a per-request deadline (504, or an error event in a
stream), a body size limit (413), prompt and max_tokens checked against the model's context
length (400), an optional API key (401). A client that disconnects has its request aborted,
which frees its KV pages. Every error body is OpenAI's `{"error": {...}}` (see server_protocol).
Constrained decoding (response_format, guided_*) and tool calling (tools, tool_choice): see
runtime/guided.py and runtime/tool_calls.py; grammars are compiled before a request is queued,
so a bad one is a 400.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncLLMEngine, EngineDead, QueueFull, RequestStream
from .guided import GuidedDecodingParams, GuidedError
from .lora import LoraError, UnknownLora
from .outputs import RequestOutput
from .server_metrics import ServerMetrics
from .server_protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    guided_params,
    parse_body,
    sampling_params,
    unsupported,
)
from .server_stream import EventStream, Renderer, wait_disconnect
from .tokenizer import Tokenizer, TokenizerError
from .tool_calls import ToolError, ToolPlan, check_tools, forced_schema, template_format, tools_system_prompt

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServedModel:
    name: str
    engine: AsyncLLMEngine
    tokenizer: Tokenizer
    max_model_len: int  # prompt + generated tokens
    created: int = field(default_factory=lambda: int(time.time()))
    lora: str | None = None  # a LoRA adapter of the engine's model, served under its own name

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.loaded.plan.vocab_size  # fixed at load time


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0  # seconds from arrival to the last token


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: API key and body size on /v1, and responses counted by status."""

    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if path.startswith("/v1"):
            headers = dict(scope["headers"])
            key = self.config.api_key
            if key is not None and headers.get(b"authorization", b"") != f"Bearer {key}".encode():
                return await _error_response(APIError(401, "invalid or missing API key: send 'Authorization: "
                                                      "Bearer KEY'", "authentication_error", code="invalid_api_key"),
                                             scope, receive, counted_send)
            limit = self.config.max_body_bytes
            length = headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > limit:
                return await _error_response(_too_large(limit), scope, receive, counted_send)
            seen = 0
            inner = receive

            async def receive():  # a chunked body has no content-length: count what arrives
                nonlocal seen
                message = await inner()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
                return message

        await self.app(scope, receive, counted_send)


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
              "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", param="body", code="body_too_large")


async def _error_response(err: APIError, scope, receive, send):
    await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)


def build_app(models: Sequence[ServedModel], config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    if not models:
        raise ValueError("build_app needs at least one model")
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ValueError(f"model names must be unique, got {[m.name for m in models]}")
    metrics = ServerMetrics()
    for m in models:
        m.engine.hooks = metrics.hooks(m.name)

    @asynccontextmanager
    async def lifespan(app):
        for m in models:
            m.engine.start()
        try:
            yield
        finally:
            for m in models:
                await m.engine.shutdown()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, config=config, metrics=metrics)
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(_BodyTooLarge)
    async def _body_error(request, e):
        return JSONResponse(_too_large(config.max_body_bytes).body(), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        return JSONResponse(APIError(400, f"{where}: {err.get('msg')}", param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), code=str(e.status_code)).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    def adapters() -> dict[str, ServedModel]:
        """LoRA adapters served as models: a request naming one runs its base with it."""
        return {a: replace(m, name=a, lora=a) for m in models for a in m.engine.engine.lora.names}

    def pick(name: str | None) -> ServedModel:
        if name is None:
            if len(models) == 1:
                return models[0]
            raise APIError(400, f"model is required; served models: {sorted(by_name)}", param="model")
        if name not in by_name:
            if (lora := adapters().get(name)) is not None:
                return lora
            raise APIError(404, f"model {name!r} does not exist; served models: {sorted(by_name)}"
                           f"{f', LoRA adapters: {sorted(adapters())}' if adapters() else ''}",
                           param="model", code="model_not_found")
        return by_name[name]

    def lora_body(body: bytes, fields: tuple[str, ...]) -> tuple[ServedModel, list[str]]:
        try:
            data = json.loads(body or b"null")
        except ValueError as e:
            raise APIError(400, f"malformed JSON body: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        for f in fields:
            if not isinstance(data.get(f), str) or not data[f]:
                raise APIError(400, f"{f}: a non-empty string is required", param=f)
        base = data.get("model")
        if base is not None and base not in by_name:
            raise APIError(404, f"model {base!r} is not a served base model; served: {sorted(by_name)}",
                           param="model", code="model_not_found")
        return pick(base), [data[f] for f in fields]

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        served, (name, path) = lora_body(await request.body(), ("lora_name", "lora_path"))
        if name in by_name or name in adapters():
            raise APIError(400, f"lora_name: {name!r} is already a served model or adapter", param="lora_name")
        try:  # off the event loop; the engine thread sees the old adapter set or the new one
            await asyncio.to_thread(served.engine.engine.load_lora, name, path)
        except LoraError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path") from None
        return JSONResponse({"status": "ok", "message": f"LoRA adapter {name!r} loaded from {path}"})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        served, (name,) = lora_body(await request.body(), ("lora_name",))
        try:
            served.engine.engine.unload_lora(name)
        except UnknownLora as e:
            raise APIError(404, str(e), param="lora_name", code="lora_not_found") from None
        except ValueError as e:  # in use
            raise APIError(400, str(e), param="lora_name") from None
        return JSONResponse({"status": "ok", "message": f"LoRA adapter {name!r} unloaded"})

    @app.get("/health")
    async def health():
        body = {name: {**m.engine.stats.__dict__, "in_flight": m.engine.num_in_flight, "alive": m.engine.alive}
                for name, m in by_name.items()}
        ok = all(m.engine.alive for m in models)
        return JSONResponse({"status": "ok" if ok else "error", "models": body}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "kiln",
             "max_model_len": m.max_model_len} for m in models] + [
            {"id": a.name, "object": "model", "created": a.created, "owned_by": "kiln",
             "max_model_len": a.max_model_len, "root": a.engine.engine.lora.adapters[a.name].path, "parent": m.name}
            for m in models for a in (replace(m, name=n) for n in m.engine.engine.lora.names)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival = time.monotonic()
        req: CompletionRequest = parse_body(CompletionRequest, await request.body())
        served = pick(req.model)
        unsupported(req, echo=False, suffix=None)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n})", param="best_of")
        prompt_ids = _completion_prompt(req.prompt, served)
        max_tokens = _max_tokens(served, len(prompt_ids), req.max_tokens, "prompt",
                                 COMPLETIONS_DEFAULT_MAX_TOKENS)
        guided = await _compiled(served, guided_params(req))
        params = sampling_params(req, max_tokens, req.logprobs, guided)
        params.lora = served.lora
        render = Renderer("cmpl", served.name, served.tokenizer, False, req.return_token_ids, params.logprobs)
        return await _run(request, served, prompt_ids, params, render, req, arrival + config.request_timeout)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.monotonic()
        req: ChatRequest = parse_body(ChatRequest, await request.body())
        served = pick(req.model)
        guided = await _compiled(served, guided_params(req))
        plan, tools, forced = await _tool_plan(req, served)
        if forced is not None:
            if guided is not None:
                raise APIError(400, "tool_choice 'required' or a named function cannot be combined with "
                               "response_format or guided_* fields", param="tool_choice")
            guided = forced
        prompt_ids = _chat_prompt(req, served, tools)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        field_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = _max_tokens(served, len(prompt_ids), limit, "messages", None, field_name)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, guided)
        params.lora = served.lora
        render = Renderer("chatcmpl", served.name, served.tokenizer, True, req.return_token_ids, params.logprobs,
                          tools=plan)
        return await _run(request, served, prompt_ids, params, render, req, arrival + config.request_timeout)

    return app


def _completion_prompt(prompt, served: ServedModel) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one request "
                           "per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = served.tokenizer.encode(prompt)
    else:
        ids = prompt
        if bad := [t for t in ids if not 0 <= t < served.vocab_size]:
            raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary [0, {served.vocab_size})",
                           param="prompt")
    if not ids:
        raise APIError(400, "prompt is empty", param="prompt")
    return ids


async def _compiled(served: ServedModel, guided: GuidedDecodingParams | None,
                    param: str | None = None) -> GuidedDecodingParams | None:
    """`guided` once its grammar compiled (off the event loop; the engine reuses the cached grammar);
    a grammar that is invalid or unsatisfiable -> 400."""
    if guided is None:
        return None
    try:
        decoder = served.engine.engine.guided_decoder()
        await asyncio.to_thread(decoder.compiler.compile, guided)
    except GuidedError as e:
        param = param or _guided_field(guided)
        raise APIError(400, f"{param}: {e}", param=param) from None
    return guided


def _guided_field(guided: GuidedDecodingParams) -> str:
    return "response_format" if guided.json is not None or guided.json_object else \
        f"guided_{'regex' if guided.regex is not None else 'choice' if guided.choice is not None else 'grammar'}"


async def _tool_plan(req: ChatRequest, served: ServedModel):
    """(ToolPlan or None, the tools to render, the forcing constraint or None) of a chat request."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None, None
    if choice == "none":
        return None, None, None  # the model is not told about the tools, and nothing is parsed
    choice = "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump()
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    decoder = served.engine.engine.guided_decoder()

    def compile_schema(schema: dict) -> None:
        decoder.compiler.compile(GuidedDecodingParams(json=schema))

    try:
        schemas = await asyncio.to_thread(check_tools, tools, choice, compile_schema)
    except ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
    forced = forced_schema(schemas, choice, req.parallel_tool_calls is not False)
    if forced is not None:
        forced = await _compiled(served, GuidedDecodingParams(json=forced), param="tool_choice")
    fmt, _ = template_format(served.tokenizer.chat_template)
    return ToolPlan(fmt, frozenset(schemas), choice), tools, forced


def _chat_prompt(req: ChatRequest, served: ServedModel, tools: list[dict] | None = None) -> list[int]:
    if not req.messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    messages = []
    for i, m in enumerate(req.messages):  # text parts are joined (and other parts refused) by the tokenizer
        msg = m.model_dump(exclude_none=True)
        msg.setdefault("content", "")
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_template_tool_call(c, i, j) for j, c in enumerate(msg["tool_calls"])]
        messages.append(msg)
    extra = {}
    if tools:
        if template_format(served.tokenizer.chat_template)[1]:
            extra["tools"] = tools  # the template renders them in its own words
        else:  # a template without tools: tell the model in a system message, Hermes style
            prompt = tools_system_prompt(tools)
            if messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
                messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}
            else:
                messages.insert(0, {"role": "system", "content": prompt})
    try:
        text = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
    except (TokenizerError, TypeError, ValueError) as e:  # the template refused these messages
        raise APIError(400, f"messages: {e}", param="messages") from None
    return served.tokenizer.encode(text, add_special_tokens=False)


def _template_tool_call(call, i: int, j: int):
    """An assistant message's OpenAI tool call as chat templates expect it: arguments as an object
    (OpenAI sends JSON text), as transformers' and vLLM's preprocessing do."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise APIError(400, f"messages[{i}].tool_calls[{j}].function.name is required",
                       param=f"messages[{i}].tool_calls[{j}]")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                           param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
    return {**call, "function": {**fn, "arguments": args}}


def _max_tokens(served: ServedModel, num_prompt: int, requested: int | None, prompt_field: str,
                default: int | None, field_name: str = "max_tokens") -> int:
    """The request's max_tokens, checked against the context length (vLLM's rule); when not
    given, `default` (None: all the room the prompt leaves)."""
    limit = served.max_model_len
    if num_prompt >= limit:
        raise APIError(400, f"{prompt_field}: the prompt has {num_prompt} tokens; the maximum context length of "
                       f"{served.name!r} is {limit} tokens, which leaves no room to generate",
                       param=prompt_field, code="context_length_exceeded")
    if requested is None:
        return limit - num_prompt if default is None else min(default, limit - num_prompt)
    if requested < 1:
        raise APIError(400, f"{field_name} must be >= 1, got {requested}", param=field_name)
    if num_prompt + requested > limit:
        raise APIError(400, f"{field_name} ({requested}) + prompt ({num_prompt} tokens) exceeds the maximum "
                       f"context length of {served.name!r} ({limit} tokens)", param=field_name,
                       code="context_length_exceeded")
    return requested


def _admit(served: ServedModel, prompt_ids: list[int], params) -> RequestStream:
    if params.n > served.engine.max_in_flight:
        raise APIError(400, f"n must be <= {served.engine.max_in_flight} on this server, got {params.n}", param="n")
    try:
        return served.engine.add_request(prompt_ids, params, uuid.uuid4().hex)
    except QueueFull as e:
        raise APIError(429, f"server busy, retry later: {e}", "rate_limit_error", code="queue_full") from None
    except EngineDead as e:
        raise APIError(503, str(e), "server_error", code="engine_dead") from None


async def _run(request: Request, served: ServedModel, prompt_ids, params, render: Renderer, req, deadline: float):
    stream = _admit(served, prompt_ids, params)
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return EventStream(render.events(stream, deadline, usage, params.n), stream)
    try:
        final = await _collect(stream, request.receive, deadline)
    finally:
        stream.close()
    if final is None:  # the client went away: nobody reads this
        return Response(status_code=499)
    if final.error:
        raise APIError(400, final.error, param="max_tokens")
    return JSONResponse(render.response(final))


async def _collect(stream: RequestStream, receive, deadline: float) -> RequestOutput | None:
    """The final output, or None if the client disconnected first; APIError 504 after the deadline."""

    async def last() -> RequestOutput:
        out = None
        async for out in stream:
            pass
        return out

    consume = asyncio.ensure_future(last())
    gone = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({consume, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if consume in done:
            try:
                return consume.result()
            except EngineDead as e:
                raise APIError(503, str(e), "server_error", code="engine_dead") from None
            except ValueError as e:  # the engine refused the request
                raise APIError(400, str(e)) from None
        if gone in done:
            return None
        raise APIError(504, "the request timed out", "timeout_error", code="timeout")
    finally:
        for t in (consume, gone):
            t.cancel()
        await asyncio.gather(consume, gone, return_exceptions=True)
