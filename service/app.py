"""The HTTP service (docs/design.md §4): ``create_app(settings, generator, cache)``.

Routes, middleware, exception handlers and the app's lifecycle only. Handlers stay
thin: ``requests.RequestValidator`` reads, validates and keys a request,
``positives.PositivesService`` looks up the cache, hands the misses to the batcher and
writes what was generated back, and the handler encodes the answer. Everything that
is the caller's fault is a ``ProtocolError`` and becomes a 4xx JSON ``ErrorBody``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clsp_positives.proto.codec import encode_response
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.messages import ErrorBody
from clsp_positives.proto.model_settings import GENERATION_DEFAULTS_FILE
from clsp_positives.proto.openapi import build_openapi
from clsp_positives.service.batcher import BatcherClosed, QueueFull
from clsp_positives.service.cache import PositivesCache, build_cache, cache_secret, is_cluster_url
from clsp_positives.service.metrics import ServiceMetrics, route_label
from clsp_positives.service.positives import PositivesService
from clsp_positives.service.requests import (
    RequestDefaults,
    RequestValidator,
    response_encoding,
    wait_for_disconnect,
)
from clsp_positives.service.settings import ServiceSettings

if TYPE_CHECKING:
    from clsp_positives.service.sampling.generator import PositivesGenerator

log = logging.getLogger("clsp.service")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Routes that answer without the token: probes must work before secrets are mounted."""

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "unavailable",
    504: "deadline_exceeded",
}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ErrorBody(error=code, detail=detail).model_dump(), status_code=status, headers=headers
    )


# ------------------------------------------------------------------ the edge


class EdgeMiddleware:
    """Pure ASGI: bearer-token check and per-route request metrics.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that ``receive`` reaches the
    handler untouched and it can notice a client that hangs up.
    """

    def __init__(self, app: Any, *, token: str | None, metrics: ServiceMetrics) -> None:
        self.app = app
        self.expected = token.encode() if token else None
        self.metrics = metrics

    def _authorized(self, scope: dict[str, Any]) -> bool:
        assert self.expected is not None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credential.strip(), self.expected)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = route_label(path)
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_PATHS and not self._authorized(scope):
                reply = error_response(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                    headers={"WWW-Authenticate": 'Bearer realm="clsp"'},
                )
                await reply(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


def _openapi_document(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``/openapi.json`` serves the wire contract of ``proto.openapi``: the routes stay
    out of FastAPI's own schema, whose guess from the handlers would not be it."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi()
        return app.openapi_schema

    return build


# ---------------------------------------------------------------- the app


def create_app(
    settings: ServiceSettings,
    generator: PositivesGenerator,
    cache: PositivesCache,
    *,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The FastAPI app of one generator; its metrics live in a registry of their own."""
    metrics = metrics or ServiceMetrics()
    service = PositivesService(settings, generator, cache, metrics)
    validator = RequestValidator(settings, generator)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        warm = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            await service.stop_warm_up(warm)
            await service.stop()
            log.info("stopped: in-flight batches finished")

    from clsp_positives import __version__

    app = FastAPI(title="CLSP positives", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.state.metrics = metrics
    app.openapi = _openapi_document(app)  # type: ignore[method-assign]

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(429, "queue_full", f"{exc}", {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BatcherClosed)
    async def _closed(request: Request, exc: BatcherClosed) -> JSONResponse:
        return error_response(503, "unavailable", str(exc), {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, detail, dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            ".".join(map(str, e.get("loc", ()))) + ": " + e.get("msg", "") for e in exc.errors()
        ]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            500, "internal_error", "the server failed; this is not your input's fault, retry later"
        )

    async def positives(request: Request) -> Response:
        body = await validator.read_body(request)
        content_type = request.headers.get("content-type")
        prepared = await validator.prepare_async(body, content_type)
        encoding = response_encoding(request.headers.get("accept"), content_type)
        t0 = time.perf_counter()
        result = await service.positives(prepared, lambda: wait_for_disconnect(request))
        if result is None:  # nobody is listening; the status is only for the metrics
            return Response(status_code=499)
        payload, media = encode_response(result, encoding=encoding)
        items, hits = int(result.cache_hit.size), int(result.cache_hit.sum())
        seconds = round(time.perf_counter() - t0, 4)
        log.info(
            "positives: %d items, %d cache hits, %.3f s",
            items,
            hits,
            seconds,
            extra={"items": items, "hits": hits, "seconds": seconds},
        )
        return Response(payload, media_type=media)

    for path in ("/v1/positives", "/positives"):
        app.add_api_route(path, positives, methods=["POST"], include_in_schema=False)

    @app.get("/v1/model", include_in_schema=False)
    async def model_info() -> JSONResponse:
        info = generator.model_info(
            max_k=settings.max_k,
            max_anchors=settings.max_anchors,
            sampling=validator.defaults.sampling,
        )
        return JSONResponse(info.model_dump(mode="json"))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", "model": service.fingerprint})
        return error_response(503, "not_ready", service.not_ready_reason, {"Retry-After": "1"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        payload, media = metrics.render()
        return Response(payload, media_type=media)

    app.add_middleware(EdgeMiddleware, token=settings.token, metrics=metrics)
    return app


def build_generator(settings: ServiceSettings) -> PositivesGenerator:
    from clsp_positives.service.sampling.generator import PositivesGenerator

    return PositivesGenerator.from_dir(
        settings.model, device=settings.device, dtype=settings.dtype, compile=settings.compile
    )


def build_app(settings: ServiceSettings) -> FastAPI:
    """Load the model named by ``settings`` and build its app with the configured cache."""
    from clsp_positives.service.logs import configure_logging

    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    # What the flags, CLSP_* variables and defaults resolved to (docs/design.md §8).
    log.info("settings: %s", json.dumps(settings.public(), sort_keys=True))
    generator = build_generator(settings)
    secret = cache_secret(settings.cache_secret, settings.token)
    if settings.redis and not (settings.cache_secret or settings.token):
        log.warning(
            "no CLSP_CACHE_SECRET (nor token): this generator's cache MAC key is random, "
            "so the other generators of a pool cannot use its Redis entries; set the same "
            "CLSP_CACHE_SECRET on all of them"
        )
    cache = build_cache(
        settings.redis,
        mac_key=secret.key,
        cache_mb=settings.cache_mb,
        timeout_s=settings.redis_timeout_s,
        backoff_max_s=settings.redis_backoff_max_s,
    )
    log.info(
        "model %s loaded from %s on %s/%s; cache: %s",
        generator.fingerprint,
        settings.model,
        settings.device,
        settings.dtype,
        cache_kind(settings),
    )
    log.info("cache values are MACed with a key from %s", secret.source)
    log_generation_defaults(settings, generator)
    return create_app(settings, generator, cache)


def cache_kind(settings: ServiceSettings) -> str:
    """The cache a service runs, for its start-up line (docs/reliability.md)."""
    if not settings.redis:
        return f"in-process LRU of {settings.cache_mb:g} MB"
    return "redis cluster" if is_cluster_url(settings.redis) else "redis"


def log_generation_defaults(settings: ServiceSettings, generator: PositivesGenerator) -> None:
    """Say at start-up which params requests that leave them unset get, and from where
    (docs/design.md §6); warn when they were measured on other weights."""
    defaults = RequestDefaults.of(settings, generator)
    stored = defaults.stored
    if stored is None:
        log.info(
            "generation defaults: the params' own (no %s in the model folder), sampling %s",
            GENERATION_DEFAULTS_FILE,
            defaults.sampling,
        )
        return
    log.info(
        "generation defaults from the model's %s: %s (a request's own params win)",
        GENERATION_DEFAULTS_FILE,
        json.dumps({**stored.stored(), "sampling": defaults.sampling}, sort_keys=True),
    )
    measured = stored.measured
    if measured is not None and measured.model not in (None, generator.fingerprint):
        log.warning(
            "%s was measured on model %s, not on the %s loaded: the weights changed since; "
            "rerun clsp calibrate --write",
            GENERATION_DEFAULTS_FILE,
            measured.model,
            generator.fingerprint,
        )


def create_app_from_env() -> FastAPI:
    """uvicorn factory (``uvicorn --factory clsp_positives.service.app:create_app_from_env``):
    settings from ``CLSP_*`` variables through ``ServiceSettings.from_env``, the path
    ``clsp serve`` takes too, so both resolve every field alike."""
    return build_app(ServiceSettings.from_env())
