"""The HTTP server: an OpenAI-compatible API, the rank extension, metrics and the chat page over
one `Engine`. `create_app(engine, settings)` returns the FastAPI app (tests run it in-process);
`flamingo serve` runs it under uvicorn.

Every refusal is an OpenAI-format error (`{"error": {"message", "type", "param", "code"}}`) with a
4xx status naming the field; anything else that goes wrong is logged and answered with a bare 500.
A client that disconnects cancels its request: the engine's iterator is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from flamingo.errors import UserError
from flamingo.inference.family import family_io
from flamingo.inference.prompt import context_length
from flamingo.serving.engine import Delta, Engine, EngineOverloaded, EngineRequest, EngineStopped
from flamingo.serving.input_processor import Fields, ProcessedPrompt
from flamingo.serving.limits import RequestError, ServerSettings
from flamingo.serving.media import HostResolver, MediaResolver, resolve_host
from flamingo.serving.openai_format import (
    ChatCompletionRequest, CompletionRequest, PromptSpec, RankRequest, SamplingFields, chat_prompt, check_candidates,
    check_unicode, collect_choices, completion_prompt, error_body, invalid_field, new_id, now, prepare_prompt,
    sampling_params, special_tokens, usage)

logger = logging.getLogger("flamingo.serving")
STATIC = Path(__file__).with_name("static")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/rank", "/v1/models", "/health", "/metrics", "/")
# (other paths are counted as "other": a label per unknown path would let clients grow the metrics without bound)
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
T = TypeVar("T")


class HttpMetrics:
    """HTTP-level counters, exposed at /metrics after the engine's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flamingo_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.disconnects = Counter("flamingo_http_client_disconnects",
                                   "requests whose client went away before the answer was complete",
                                   registry=self.registry)
        self.internal_errors = Counter("flamingo_http_internal_errors",
                                       "requests that failed inside the server (answered with 500)",
                                       registry=self.registry)


def _error_response(status: int, message: str, error_type: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware in front of everything: counts requests, and for /v1/* checks the API key
    and reads the body up to the size cap before any of it is parsed."""

    def __init__(self, app: Any, settings: ServerSettings, metrics: HttpMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 499  # stays so when the client leaves before any response

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._check_host(scope)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
                return
            if scope["path"].startswith("/v1/"):
                refusal = self._authorise(scope)
                if refusal is None:
                    receive, refusal = await self._read_body(scope, receive)
                if refusal is not None:
                    await refusal(scope, receive, counting_send)
                    return
            await self.app(scope, receive, counting_send)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _check_host(self, scope: dict) -> JSONResponse | None:
        allowed = self.settings.allowed_hosts
        if allowed is None:
            return None
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() in (a.lower() for a in allowed):  # host names are case-insensitive (RFC 3986)
            return None
        return _error_response(400, f"Host header: {host[:64]!r} is not served here (serving {', '.join(allowed)})",
                               param="Host", code="invalid_host")

    def _authorise(self, scope: dict) -> JSONResponse | None:
        if self.settings.api_key is None:
            return None
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        # the scheme is case-insensitive (RFC 9110 11.1: "bearer" is "Bearer"); the key is not
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(b" "), self.settings.api_key.encode()):
            return None
        return _error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               param="Authorization", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[Callable, JSONResponse | None]:
        cap = self.settings.max_body_bytes
        too_large = _error_response(413, f"request body: more than the limit of {cap} bytes", param="body",
                                    code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            return receive, too_large
        chunks, size = [], 0
        with anyio.move_on_after(self.settings.body_timeout_s) as timer:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left: let the app see the disconnect
                    return receive, None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > cap:
                    return receive, too_large
                if not message.get("more_body", False):
                    break
        if timer.cancelled_caught:
            return receive, _error_response(408, f"request body: not received within {self.settings.body_timeout_s} s",
                                            param="body", code="request_timeout")
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, whenever it comes

        return replay, None


class ClientDisconnected(Exception):
    """The client went away; its request was cancelled."""


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def _close(deltas: AsyncIterator[Delta]) -> None:
    """Close the engine's iterator (cancelling its sequences), even inside a cancelled scope."""
    close = getattr(deltas, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


class _Server:
    def __init__(self, engine: Engine, settings: ServerSettings, resolver: MediaResolver,
                 metrics: HttpMetrics) -> None:
        self.engine, self.settings, self.resolver, self.metrics = engine, settings, resolver, metrics
        model = engine.model
        self.family = family_io(model)
        self.tokenizer = model.tokenizer
        self.media_token = model.config.media_token
        self.end_of_chunk = model.config.end_of_chunk_token
        self.special = special_tokens(self.tokenizer, self.media_token, self.end_of_chunk)
        self.context = context_length(model)
        caps = [c for c in (settings.max_prompt_tokens, self.context) if c is not None]
        self.prompt_cap = min(caps) if caps else 4096
        self.created = now()

    # ------------------------------------------------------------------------ request checks
    def check_request(self, body: ChatCompletionRequest | CompletionRequest | RankRequest) -> None:
        """The checks every endpoint starts with: valid Unicode throughout, then the model's name."""
        check_unicode(body)
        self.check_model(body.model)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise RequestError(f"model: this server serves {self.settings.model_name!r}, not {name[:64]!r}",
                               "model", status=404, code="model_not_found")

    async def prepare(self, spec: PromptSpec, param: str, images_param: str, max_new_tokens: int,
                      new_tokens_param: str = "max_tokens") -> ProcessedPrompt:
        """The prompt through the engine's door (`prepare_prompt`)."""
        fields = Fields(param, images_param, tuple(where for _, where in spec.image_urls), new_tokens_param)
        return await prepare_prompt(self.engine.processor, self.resolver, self.settings, spec, fields, max_new_tokens,
                                    self.prompt_cap)

    # --------------------------------------------------------------------------- endpoints
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_request(body)
        params = sampling_params(body, self.settings, extra_stop=self.family.chat_stop_strings)
        spec = chat_prompt(body.messages, self.media_token, self.end_of_chunk, self.special,
                           render=lambda messages: self.family.chat_text(self.engine.model, messages))
        prompt = await self.prepare(spec, "messages", "messages", params.max_tokens)
        prompt.chat = True  # its prefix (the earlier turns) goes to the chats' budget of the prefix cache
        engine_request = EngineRequest(spec.text, prompt.images, params, new_id("chatcmpl"))
        return await self.respond(request, body, engine_request, prompt, chat=True)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_request(body)
        params = sampling_params(body, self.settings)
        spec = completion_prompt(body, self.media_token, self.end_of_chunk, self.special)
        prompt = await self.prepare(spec, "prompt", "images", params.max_tokens)
        engine_request = EngineRequest(spec.text, prompt.images, params, new_id("cmpl"))
        return await self.respond(request, body, engine_request, prompt, chat=False)

    async def rank(self, body: RankRequest, request: Request) -> Response:
        self.check_request(body)
        check_candidates(body.candidates, self.settings, self.special)
        spec = completion_prompt(body, self.media_token, self.end_of_chunk, self.special)
        lengths = self.engine.processor.candidates(body.candidates)
        if sum(lengths) > self.settings.max_rank_tokens:  # the work of a ranking: every candidate token is fed
            raise RequestError(f"candidates: {len(lengths)} candidates of {sum(lengths)} tokens in all, more than this "
                               f"server's limit of {self.settings.max_rank_tokens} (--max-rank-tokens)", "candidates",
                               code="rank_too_large")
        prompt = await self.prepare(spec, "prompt", "images", max(lengths), new_tokens_param="candidates")
        scores = await _until_disconnected(request, self.engine.rank(spec.text, prompt.images, body.candidates, prompt))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return JSONResponse({
            "id": new_id("rank"), "object": "rank", "created": now(), "model": self.settings.model_name,
            "results": [{"index": i, "candidate": body.candidates[i], "logprob": scores[i]} for i in order],
        })

    def models(self) -> dict:
        return {"object": "list", "data": [{
            "id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "flamingo",
            "media_token": self.media_token, "end_of_chunk_token": self.end_of_chunk,
            "context_length": self.context, "max_images": self.settings.max_images,
            "max_image_bytes": self.settings.max_image_bytes, "max_image_pixels": self.settings.max_image_pixels,
        }]}

    # -------------------------------------------------------------------------- responses
    async def respond(self, request: Request, body: SamplingFields, engine_request: EngineRequest,
                      prompt: ProcessedPrompt, chat: bool) -> Response:
        deltas = self.engine.generate(engine_request, prompt)  # may refuse at once (EngineOverloaded, UserError)
        handed_over = False
        try:
            if body.stream:
                first = await _until_disconnected(request, anext(deltas))
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                events = self.events(first, deltas, engine_request, chat, include_usage)
                handed_over = True
                return StreamingResponse(events, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(await _until_disconnected(request, self.collect(deltas, engine_request, chat)))
        finally:
            if not handed_over:
                await _close(deltas)

    async def collect(self, deltas: AsyncIterator[Delta], engine_request: EngineRequest, chat: bool) -> dict:
        n = engine_request.params.n
        texts, reasons, tokens = await collect_choices(deltas, n)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "finish_reason": reasons[i], "logprobs": None} for i in range(n)]
        else:
            choices = [{"index": i, "text": texts[i], "finish_reason": reasons[i], "logprobs": None}
                       for i in range(n)]
        return {"id": engine_request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": now(), "model": self.settings.model_name, "choices": choices, "usage": tokens}

    async def events(self, first: Delta, deltas: AsyncIterator[Delta], engine_request: EngineRequest, chat: bool,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, then usage (if asked) and [DONE]."""
        base = {"id": engine_request.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": now(), "model": self.settings.model_name}
        started: set[int] = set()
        prompt_tokens = completion_tokens = 0

        def chunk(delta: Delta) -> str:
            if chat:
                piece = {"content": delta.text}
                if delta.index not in started:
                    piece = {"role": "assistant", **piece}
                choice = {"index": delta.index, "delta": piece, "finish_reason": delta.finish_reason, "logprobs": None}
            else:
                choice = {"index": delta.index, "text": delta.text, "finish_reason": delta.finish_reason,
                          "logprobs": None}
            started.add(delta.index)
            return _sse({**base, "choices": [choice]})

        try:
            delta: Delta | None = first
            while delta is not None:
                if delta.text or delta.finish_reason is not None or delta.index not in started:
                    yield chunk(delta)
                if delta.finish_reason is not None:
                    prompt_tokens = delta.prompt_tokens
                    completion_tokens += delta.completion_tokens
                delta = await anext(deltas, None)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        except (UserError, EngineOverloaded) as err:  # the response has started: the error goes in the stream
            yield _sse(error_body(str(err), "invalid_request_error", getattr(err, "param", None)))
        except EngineStopped as err:
            yield _sse(error_body(str(err), "server_error", code="shutting_down"))
        except Exception:  # noqa: BLE001 - logged; the client gets no internals
            logger.exception("request %s failed while streaming", engine_request.request_id)
            self.metrics.internal_errors.inc()
            yield _sse(error_body("internal server error", "internal_error"))
        finally:
            await _close(deltas)
        yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, settings: ServerSettings | None = None, *,
               http_transport: Any = None, resolve_host: HostResolver = resolve_host) -> FastAPI:
    """The server over `engine`. `http_transport` (an httpx transport) and `resolve_host` replace
    the network and DNS for image URL fetches (tests)."""
    settings = settings or ServerSettings()
    metrics = HttpMetrics()
    resolver = MediaResolver(settings, http_transport, resolve_host)
    server = _Server(engine, settings, resolver, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()
            await resolver.aclose()

    app = FastAPI(title="flamingo", description="OpenAI-compatible API for a Flamingo model", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # the interactive docs load scripts from a CDN
    app.add_middleware(RequestGuard, settings=settings, metrics=metrics)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError) -> JSONResponse:
        return _error_response(err.status, err.message, err.error_type, err.param, err.code)

    @app.exception_handler(UserError)
    async def engine_refused(request: Request, err: UserError) -> JSONResponse:
        return _error_response(400, str(err), param=getattr(err, "param", None))

    @app.exception_handler(EngineOverloaded)
    async def overloaded(request: Request, err: EngineOverloaded) -> JSONResponse:
        return _error_response(429, "the server is busy (its request queue is full); retry shortly",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(EngineStopped)
    async def stopping(request: Request, err: EngineStopped) -> JSONResponse:
        return _error_response(503, str(err), "server_error", code="shutting_down")

    @app.exception_handler(ClientDisconnected)
    async def disconnected(request: Request, err: ClientDisconnected) -> Response:
        metrics.disconnects.inc()
        return Response(status_code=499)  # nobody reads it; the status is for the logs and metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return _error_response(400, "request body: not valid JSON", param="body", code="invalid_json")
        refusal = invalid_field(first)
        return _error_response(400, refusal.message, param=refusal.param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=err)
        metrics.internal_errors.inc()
        return _error_response(500, "internal server error", "internal_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/v1/rank")
    async def rank(body: RankRequest, request: Request) -> Response:
        """Close-ended mode (extension): candidates ranked by their log-likelihood after the prompt, best first."""
        return await server.rank(body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict:
        server.check_model(name)
        return server.models()["data"][0]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = generate_latest(engine.metrics.registry) + generate_latest(metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
