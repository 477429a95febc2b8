"""The HTTP application: OpenAI's ``/v1/embeddings``, ctxvec's ``/v1/encode``, models, health, metrics.

``create_app(pipeline, settings)`` returns a Starlette (ASGI) app around one ``InferenceWorker``
(Starlette rather than FastAPI on top of it: the bodies are read and checked here, by pydantic,
so FastAPI's layers would only add to every request's cost).
Every request passes one door first (``Door``): the API key, the drain on shutdown (503), the
count of requests in flight, one log line and the request metrics. Every refusal is an error in
OpenAI's shape (``schemas.ApiError``); the server never answers a malformed request with a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctxvec.validation import is_int, is_real
from ctxvec.pipeline import Pipeline, TokenVectors
from ctxvec.serve.metrics import Metrics
from ctxvec.serve.schemas import (
    ApiError, EmbeddingsRequest, EncodeRequest, TextsRequest, parse, read_json, vector_payload)
from ctxvec.serve.worker import InferenceWorker, Job, QueueFull, TooBig

log = logging.getLogger("ctxvec.serve")

INLINE_TOKENIZE_CHARS = 4096  # requests up to this size are tokenized on the event loop (~1 ms)
TOKENIZING_AT_ONCE = 1  # larger ones: in a thread, this many at a time
# Answers of up to this many numbers are written on the event loop (~10 ms as JSON floats); larger
# ones in a thread, so that one big answer (/v1/encode's can be hundreds of MB) never stalls the
# others, /health or a shutdown.
INLINE_ANSWER_VALUES = 65_536


@dataclass(frozen=True)
class ServeSettings:
    """The server's limits (``ctxvec serve --help`` has them as flags).

    Attributes:
        batch_tokens: padded tokens per forward pass (None: the pipeline's budget, 2048 for bf16
            on a CPU with AMX, else 1024).
        max_queue_tokens: tokens that may wait for the model; past it, 429 with Retry-After.
        max_inputs: texts in one request; past it, 413.
        max_request_bytes: bytes of one request body; past it, 413.
        timeout: seconds a request may wait for its vectors; past it, 503.
        api_key: when set, every endpoint but /health wants ``Authorization: Bearer <key>``.
        streams: batches computed side by side under load (None: one per CPU thread; 1: one
            batch at a time on all threads; see ``serve.worker``).
    """

    batch_tokens: int | None = None
    max_queue_tokens: int = 262_144
    max_inputs: int = 2048
    max_request_bytes: int = 16 * 2**20
    timeout: float = 60.0
    api_key: str | None = None
    streams: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "max_queue_tokens", "max_inputs", "max_request_bytes"):
            if (name != "batch_tokens" or self.batch_tokens is not None) and (
                    not is_int(getattr(self, name)) or getattr(self, name) < 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not is_real(self.timeout) or self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}.")
        if self.streams is not None and (not is_int(self.streams) or self.streams < 1):
            raise ValueError(f"streams must be a positive integer, got {self.streams!r}.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string.")


class ServerState:
    """What the door and the endpoints share: the worker, the metrics, the drain."""

    def __init__(self, pipeline: Pipeline, settings: ServeSettings) -> None:
        self.pipeline, self.settings = pipeline, settings
        self.metrics = Metrics()
        batch_tokens = pipeline.batch_tokens if settings.batch_tokens is None else settings.batch_tokens
        self.worker = InferenceWorker(pipeline, batch_tokens, settings.max_queue_tokens,
                                      events=self.metrics.events(), streams=settings.streams)
        self.draining = False
        self.in_flight = 0  # requests received and not yet answered (the Door counts them)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.names = {pipeline.name, pipeline.name.rstrip("/").rsplit("/", 1)[-1]}
        # Large requests are tokenized in threads, one at a time: a 16 MB body of words takes ~30 s
        # and ~3 GB to tokenize, and forty of them at once (Starlette's threads) would not fit.
        self.tokenizing = asyncio.Semaphore(TOKENIZING_AT_ONCE)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class Door:
    """ASGI middleware every request passes: API key, drain, in-flight count, log line, metrics."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, start, status = scope["path"], time.perf_counter(), [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self._refusal(scope)
        self.state.in_flight += 1
        try:
            if refusal is not None:
                await _error(refusal)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.state.in_flight -= 1
            seconds = time.perf_counter() - start
            endpoint = path if path in ENDPOINTS else "other"
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.state.metrics.latency.labels(endpoint).observe(seconds)
            # the path as sent (still percent-encoded): a decoded %0A could forge a log line
            raw = scope.get("raw_path") or path.encode("unicode_escape")
            log.info("%s %s %d %.1f ms", scope["method"], raw.decode("ascii", "backslashreplace"), status[0],
                     1000 * seconds)

    def _refusal(self, scope) -> ApiError | None:
        key = self.state.settings.api_key
        if key is not None and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")  # the bytes as sent
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):  # constant time
                return ApiError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'.",
                                type="authentication_error", code="invalid_api_key")
        if self.state.draining:
            return ApiError(503, "the server is shutting down; send the request to another replica.",
                            type="server_error", code="shutting_down")
        return None


ENDPOINTS = ("/v1/embeddings", "/v1/encode", "/v1/models", "/health", "/metrics")


def create_app(pipeline: Pipeline, settings: ServeSettings | None = None) -> Starlette:
    """The server's ASGI app for ``pipeline`` (loaded and warmed up by the caller)."""
    state = ServerState(pipeline, settings or ServeSettings())

    async def embeddings(request: Request) -> Response:
        req = parse(EmbeddingsRequest, await read_json(request, state.settings.max_request_bytes))
        dim = pipeline.dim
        if req.dimensions is not None and req.dimensions > dim:
            raise ApiError(400, f"dimensions: {req.dimensions} is more than the model's {dim}.", param="dimensions")
        job = await _submit(state, request, req, "embed")
        vectors = np.stack(await _wait(state, request, job))  # (n, D)
        if req.dimensions is not None:  # the first k values, normalised again
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

        def answer() -> dict:
            data = [{"object": "embedding", "index": i, "embedding": vector_payload(v, req.encoding_format),
                     "truncated": e.truncated, "n_tokens": len(e.ids)}
                    for i, (v, e) in enumerate(zip(vectors, job.encoded))]
            return {"object": "list", "data": data, "model": pipeline.name, "usage": _usage(job)}

        return await _answer(answer, vectors.size)

    async def encode(request: Request) -> Response:
        req = parse(EncodeRequest, await read_json(request, state.settings.max_request_bytes))
        job = await _submit(state, request, req, "encode")
        results: list[TokenVectors] = await _wait(state, request, job)

        def answer() -> dict:
            data = [{"object": "token_vectors", "index": i, "text": r.text, "tokens": r.tokens, "ids": r.ids,
                     "special": r.special, "truncated": r.truncated, "n_tokens_full": r.n_tokens_full,
                     "shape": list(r.vectors.shape), "vectors": _matrix(r.vectors, req.encoding_format)}
                    for i, r in enumerate(results)]
            return {"object": "list", "data": data, "model": pipeline.name, "usage": _usage(job)}

        return await _answer(answer, sum(r.vectors.size for r in results))

    async def models(request: Request) -> Response:
        return _json({"object": "list", "data": [{
            "id": pipeline.name, "object": "model", "created": 0, "owned_by": "ctxvec", "dimensions": pipeline.dim,
            "max_tokens": pipeline.max_len, "precision": pipeline.precision, "description": pipeline.description}]})

    async def health(request: Request) -> Response:
        if not state.worker.alive:
            raise ApiError(503, "the inference worker has stopped; restart the server.", type="server_error",
                           code="worker_stopped")
        return _json({"status": "ok", "model": pipeline.name, "precision": pipeline.precision})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err)

    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
        return _error(ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}.", code=kind))

    async def bug(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(ApiError(500, "the server failed to answer this request; it is logged.", type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        state.worker.start()
        yield
        await asyncio.to_thread(state.worker.stop)

    routes = [Route("/v1/embeddings", embeddings, methods=["POST"]), Route("/v1/encode", encode, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: bug})
    app.state.ctxvec = state
    app.add_middleware(Door, state=state)
    return app


async def _submit(state: ServerState, request: Request, req: TextsRequest, kind: str) -> Job:
    """Check the request against the model and the limits, tokenize it, queue it."""
    if req.model is not None and req.model not in state.names:
        raise ApiError(404, f"model {req.model!r} is not served here; this server serves "
                            f"{state.pipeline.name!r}.", param="model", code="model_not_found")
    texts = req.texts
    limit = state.settings.max_inputs
    if len(texts) > limit:
        raise ApiError(413, f"input has {len(texts):,} texts, more than the server's limit of {limit:,} "
                            "(--max-inputs); send them in several requests.", param="input", code="too_many_inputs")
    tokenize = state.pipeline.tokenizer.tokenize
    if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS:  # a thread hand-off costs more than the work
        encoded = tokenize(texts)
    else:
        async with state.tokenizing:
            encoded = await run_in_threadpool(tokenize, texts)
    if not req.truncate:
        for i, e in enumerate(encoded):
            if e.truncated:
                raise ApiError(400, f"input[{i}] has {e.n_tokens_full} tokens, more than the model's limit "
                                    f"of {state.pipeline.max_len} (truncate is false).", param=f"input[{i}]",
                               code="input_too_long")
    try:
        return state.worker.submit(kind, texts, encoded)  # type: ignore[arg-type]
    except TooBig as err:
        raise ApiError(413, str(err), param="input", code="too_many_tokens") from None
    except QueueFull as err:
        raise ApiError(429, str(err), type="rate_limit_error", code="overloaded",
                       headers={"Retry-After": str(err.retry_after)}) from None


async def _wait(state: ServerState, request: Request, job: Job) -> list:
    """The job's results; its texts are dropped if the client goes away or the time runs out.

    Nothing polls: the wait ends on the first of the results, the client's disconnect (the
    next ASGI message once the body is read) and the deadline."""
    result = asyncio.wrap_future(job.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, timeout=state.settings.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if result in done:
        if result.cancelled():  # the worker stopped (a shutdown past its drain time) before the texts ran
            raise ApiError(503, "the server is shutting down; send the request to another replica.",
                           type="server_error", code="shutting_down")
        return result.result()
    if gone in done:
        state.worker.cancel(job, "disconnected")
        raise ApiError(499, "the client went away.", code="client_closed_request")
    state.worker.cancel(job, "timeout")
    raise ApiError(503, f"the request waited {state.settings.timeout:g} s for the model (--timeout); "
                        "retry later or with fewer texts.", type="server_error", code="timeout")


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(job: Job) -> dict[str, int]:
    tokens = job.tokens
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def _matrix(vectors: np.ndarray, encoding: str) -> list[list[float]] | str:
    return vector_payload(vectors.reshape(-1), encoding) if encoding == "base64" else vectors.tolist()


async def _answer(payload: Callable[[], dict], values: int) -> Response:
    """The JSON answer ``payload()`` of ``values`` numbers: on the event loop if small, else in a thread."""
    if values <= INLINE_ANSWER_VALUES:
        return _json(payload())
    return await run_in_threadpool(lambda: _json(payload()))


def _json(payload: dict) -> Response:
    body = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type="application/json")
