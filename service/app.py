"""The HTTP service (docs/design.md §4): ``create_app(settings, generator, cache)``.

Handlers stay thin: decode and validate with ``proto.codec``, look up the cache
once, hand the misses to the batcher, write what was generated back, encode.
Everything that is the caller's fault is a ``ProtocolError`` and becomes a 4xx
JSON ``ErrorBody``; the cache can only ever make a request uncached, not fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clsp_positives.proto.codec import ModelShapes, decode_request, encode_response, media_type
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.keys import canonical_anchors, canonical_latents, positive_key
from clsp_positives.proto.messages import (
    JSON_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    RequestArrays,
    ResponseArrays,
)
from clsp_positives.proto.openapi import build_openapi
from clsp_positives.proto.params import AnchorSpace, Output, SamplerGroup
from clsp_positives.service.batcher import (
    Batcher,
    BatcherClosed,
    BatchStats,
    DeadlineExceeded,
    Item,
    QueueFull,
)
from clsp_positives.service.cache import PositivesCache, build_cache, cache_secret
from clsp_positives.service.metrics import ServiceMetrics, route_label
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


_INLINE_DECODE_BYTES = 1 << 20


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request with its canonical anchors and one cache key per item."""

    request: RequestArrays
    canonical: np.ndarray  # float32 [N, C, H, W] pictures, or [N, c, h, w] latents
    keys: list[bytes]
    deadline: float = math.inf  # time.monotonic() of params.deadline_ms, inf for none
    cost: int = 0  # request_cost: sampler item-steps, autoencoder passes included


class BatchGroup(NamedTuple):
    """What items must share to share a sampler call: the sampler's settings and
    whether their anchors are pictures or latents (a latent model encodes the first)."""

    sampler: SamplerGroup
    anchor_space: AnchorSpace


def request_cost(
    items: int, steps: int, *, encodes: int, decodes: int, autoencoder_cost: int
) -> int:
    """Sampler item-steps a request asks for (``ServiceSettings.max_cost``): each item
    runs every step, and a latent model's autoencoder passes count ``autoencoder_cost``
    each (docs/latent.md)."""
    return items * steps + (encodes + decodes) * autoencoder_cost


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


# ------------------------------------------------------------ the service


class PositivesService:
    """The request flow of ``POST /v1/positives`` and the app's lifecycle."""

    def __init__(
        self,
        settings: ServiceSettings,
        generator: PositivesGenerator,
        cache: PositivesCache,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.generator = generator
        self.cache = cache
        self.metrics = metrics
        self.fingerprint = generator.fingerprint
        self.shapes = ModelShapes((generator.channels, *generator.sample_hw), generator.latent_chw)
        # One worker thread per device: batches never compete for it, and the
        # event loop keeps answering while it samples.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="clsp-sampler")
        self.batcher = Batcher(
            self._run_batch,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            executor=self.executor,
            on_batch=self._on_batch,
            on_expired=metrics.expired_dropped.inc,
        )
        self.ready = False
        self.not_ready_reason = "the model is warming up"
        metrics.watch_cache(lambda: cache.stats)
        metrics.watch_queue(lambda: self.batcher.queued, lambda: self.batcher.in_flight)
        # The GPU's memory and utilisation join /metrics when the generator's device
        # (resolved, so `auto` counts) is CUDA; a CPU generator exports none.
        metrics.watch_device(generator.device)

    # ---------------------------------------------------------- worker side

    def _run_batch(
        self,
        group: Hashable,
        anchors: np.ndarray,
        keys: list[bytes],
        interpolation_weights: np.ndarray,
    ) -> np.ndarray:
        call = cast(BatchGroup, group)  # what _generate submits items under
        warm = len(self.generator.paths_run)  # one worker thread: nothing else samples now
        images = self.generator.sample_keyed(
            anchors,
            keys,
            interpolation_weights,
            anchor_space=call.anchor_space,
            **call.sampler._asdict(),
        )
        if len(self.generator.paths_run) > warm:
            self.metrics.cold_calls.inc()
            log.warning("a sampler call paid for a path the warm-up did not run")
        return images

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch_size.observe(stats.size)
        self.metrics.sampler_seconds.observe(stats.seconds)
        if stats.error is None:
            self.metrics.generated.inc(stats.size)
        else:
            self.metrics.sampler_errors.inc()
            log.error("sampler call of %d items failed: %r", stats.size, stats.error)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """``PositivesGenerator.warmup`` in the worker thread before /readyz says ready,
        so that no request pays for a first call and ready means 'can serve now'."""
        t0 = time.perf_counter()
        try:
            warm_call_s = await asyncio.get_running_loop().run_in_executor(
                self.executor,
                lambda: self.generator.warmup(
                    steps=self.settings.warmup_steps,
                    sampling=self.settings.sampling,
                    batch_sizes=self.warmup_batch_sizes,
                ),
            )
        except Exception as exc:
            self.not_ready_reason = f"warm-up batch failed: {exc!r}"
            log.exception("warm-up batch failed; /readyz stays 503")
            return
        # the call-time model's first point, until real calls measure their own
        cost = max(self.warmup_batch_sizes) * self.settings.warmup_steps
        self.batcher.call_times.add(cost, warm_call_s)
        self.ready = True
        log.info("ready: model %s warmed up in %.2f s", self.fingerprint, time.perf_counter() - t0)

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """One item, and when compiled a full batch too: a compiled generator compiles
        once per batch bucket, and full batches are what a loaded service runs."""
        if self.generator.compiled and self.settings.max_batch > 1:
            return (1, self.settings.max_batch)
        return (1,)

    async def stop(self) -> None:
        self.ready = False
        self.not_ready_reason = "the service is shutting down"
        await self.batcher.close(drain=True)
        self.executor.shutdown(wait=True)
        await self.cache.close()

    # ------------------------------------------------------------- requests

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise ProtocolError(
                    f"Content-Length {declared!r} is not a number", code="invalid_body"
                ) from None
            if size > limit:
                raise self._too_large(size)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise self._too_large(size, partial=True)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, size: int, partial: bool = False) -> ProtocolError:
        what = "more than" if partial else ""
        return ProtocolError(
            f"body is {what} {size} bytes; the limit is {self.settings.max_body_bytes} "
            f"({self.settings.max_body_mb:g} MB): send fewer anchors per request",
            code="body_too_large",
            status=413,
        )

    def prepare(self, body: bytes, content_type: str | None) -> PreparedRequest:
        """Decode, validate, check the cost budget, canonicalise and key every item.

        ``params.sampling`` None becomes the service's ``sampling`` here, before any
        key is made, so the key, the batcher group and the response all carry the
        mode the positives were made with (docs/design.md §2).
        """
        s = self.settings
        received = time.monotonic()
        req = decode_request(
            body,
            content_type,
            model=self.shapes,
            max_anchors=s.max_anchors,
            max_k=s.max_k,
        )
        req = dataclasses.replace(req, params=req.params.resolved(s.sampling))
        items = len(req.candidates)
        latent_model = self.shapes.latent_chw is not None
        encodes = req.num_anchors if latent_model and req.anchor_space == "image" else 0
        decodes = items if latent_model and req.params.output == "images" else 0
        cost = request_cost(
            items,
            req.params.steps,
            encodes=encodes,
            decodes=decodes,
            autoencoder_cost=s.autoencoder_cost,
        )
        if cost > s.max_cost:
            coding = (
                f" + {encodes + decodes} autoencoder passes x {s.autoencoder_cost}"
                if encodes + decodes
                else ""
            )
            raise ProtocolError(
                f"request asks for {items} positives x {req.params.steps} steps{coding} = "
                f"{cost} sampler item-steps; the limit is {s.max_cost}: send fewer anchors, "
                "a smaller k or fewer steps",
                code="cost_too_high",
                status=413,
            )
        try:
            self.generator.check_params(req.params)
        except ValueError as exc:  # UnsupportedSchedulerError: these params, this model
            raise ProtocolError(
                f"invalid params for this model: {exc}", code="invalid_params", status=422
            ) from None
        expected = req.params.expect_model
        if expected is not None and expected != self.fingerprint:
            raise ProtocolError(
                f"this generator serves model {self.fingerprint}, the request expects "
                f"{expected}: send it to a generator of that model, or drop expect_model",
                code="model_mismatch",
                status=409,
            )
        space = req.anchor_space
        canon = (
            canonical_latents(req.anchors) if space == "latent" else canonical_anchors(req.anchors)
        )
        keys = [
            positive_key(self.fingerprint, req.params, canon[a], int(c), space)
            for a, c in zip(req.anchor_index, req.candidates, strict=True)
        ]
        ms = req.params.deadline_ms
        deadline = received + ms / 1000 if ms else math.inf
        return PreparedRequest(req, canon, keys, deadline, cost)

    async def prepare_async(self, body: bytes, content_type: str | None) -> PreparedRequest:
        # Large bodies decode and hash in a helper thread so the loop keeps serving.
        if len(body) > _INLINE_DECODE_BYTES:
            return await asyncio.to_thread(self.prepare, body, content_type)
        return self.prepare(body, content_type)

    async def positives(
        self, prepared: PreparedRequest, disconnected: Callable[[], Awaitable[Any]]
    ) -> ResponseArrays | None:
        """Cache lookup, batched generation of the misses, cache write.

        Returns None when the client went away before its positives were ready.
        Positives whose deadline passed first come back as zeros, marked in
        ``expired``, and are neither cached nor counted as served; a request with
        none to give is a 504.
        """
        req, keys = prepared.request, prepared.keys
        params = req.params
        m = len(keys)
        images: list[np.ndarray | None] = [None] * m
        hit = np.zeros(m, np.uint8)
        if params.cache == "use":
            found = await self.cache.get_many(self.fingerprint, keys)
            shape, dtype = self._value_layout(params.output)
            for i, image in enumerate(found):
                if image is not None and image.shape == shape and image.dtype == dtype:
                    images[i] = image
                    hit[i] = 1
        missing = [i for i in range(m) if images[i] is None]
        expired = np.zeros(m, np.uint8)
        if missing:
            generated = await self._generate(prepared, missing, disconnected)
            if generated is None:
                return None
            made = []
            for i, image in zip(missing, generated, strict=True):
                if image is None:
                    expired[i] = 1
                else:
                    images[i] = image
                    made.append(i)
            if params.cache != "bypass" and made:
                await self.cache.set_many(
                    self.fingerprint,
                    [(keys[i], images[i]) for i in made],
                    self.settings.cache_ttl,
                )
        late = int(expired.sum())
        if late:
            self.metrics.expired.inc(late)
            if late == m:
                raise ProtocolError(
                    f"params.deadline_ms ({params.deadline_ms:g} ms) passed before any of the "
                    f"{m} positives could be generated: the generators are busier than that; "
                    "allow more time, or ask again",
                    code="deadline_exceeded",
                    status=504,
                )
            shape, dtype = self._value_layout(params.output)
            for i in np.flatnonzero(expired):
                images[i] = np.zeros(shape, dtype)
        positives = np.stack(images)  # type: ignore[arg-type]
        if params.k is not None:
            positives = positives.reshape(req.num_anchors, params.k, *positives.shape[1:])
            hit = hit.reshape(req.num_anchors, params.k)
            expired = expired.reshape(req.num_anchors, params.k)
        self.metrics.served.inc(m - late)
        return ResponseArrays(positives, hit, self.fingerprint, params, expired if late else None)

    def _value_layout(self, output: Output) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one positive as generated, so as cached: a value of
        any other layout is a miss."""
        if output == "latents" and self.shapes.latent_chw is not None:
            return self.shapes.latent_chw, np.dtype(np.float32)
        c, h, w = self.shapes.image_chw
        return (h, w, c), np.dtype(np.uint8)

    async def _generate(
        self,
        prepared: PreparedRequest,
        missing: list[int],
        disconnected: Callable[[], Awaitable[Any]],
    ) -> list[np.ndarray | None] | None:
        """The positives of items ``missing``, None for each whose deadline passed
        first; None in all when the client went away."""
        req, canon, keys = prepared.request, prepared.canonical, prepared.keys
        params = req.params
        group = BatchGroup(params.group(), req.anchor_space)
        cost = prepared.cost / len(keys)  # item-steps, as ServiceSettings.max_cost counts
        items = [
            Item(
                keys[i],
                canon[req.anchor_index[i]],
                float(params.interpolation_weight),
                group,
                deadline=prepared.deadline,
                priority=params.priority,
                cost=cost,
            )
            for i in missing
        ]
        try:
            ticket = self.batcher.submit(items)
        except QueueFull:
            self.metrics.rejected.inc()
            raise
        if ticket.deduplicated:
            self.metrics.deduplicated.inc(ticket.deduplicated)
        waiting = asyncio.ensure_future(asyncio.wait(set(ticket.futures)))
        hangup = asyncio.ensure_future(disconnected())
        # At its deadline a request answers with what is done (the batcher sized its
        # calls to end by then); it stops waiting also for items it shares with a request
        # that has more time (the batcher keeps those for the latter).
        timeout = prepared.deadline - time.monotonic()
        try:
            await asyncio.wait(
                {waiting, hangup},
                timeout=None if math.isinf(timeout) else max(timeout, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if hangup.done():
                return None
            return [_result_or_expired(f) for f in ticket.futures]
        finally:
            for task in (waiting, hangup):
                task.cancel()
            dropped = self.batcher.release(ticket)
            if dropped and hangup.done():
                self.metrics.dropped.inc(dropped)
                log.info("client went away: %d queued items dropped", dropped)
            elif dropped:  # this request's deadline passed while they waited
                self.metrics.expired_dropped.inc(dropped)


def _result_or_expired(future: asyncio.Future) -> np.ndarray | None:
    """A finished item's positive, None when its deadline passed (in the queue, or
    while this request waited); a sampler failure raises."""
    if not future.done():
        return None
    try:
        return future.result()
    except DeadlineExceeded:
        return None


def response_encoding(accept: str | None, content_type: str | None) -> str:
    """The first of our two encodings that ``Accept`` names, else the request's own."""
    for part in (accept or "").split(","):
        kind = media_type(part)
        if kind in (SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE):
            return kind
    kind = media_type(content_type)
    return kind if kind in (SAFETENSORS_MEDIA_TYPE, JSON_MEDIA_TYPE) else JSON_MEDIA_TYPE


async def _wait_for_disconnect(request: Request) -> None:
    # After the body is read, the server's receive() only returns on hang-up.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        warm = asyncio.create_task(service.warm_up())
        try:
            yield
        finally:
            if not warm.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await warm
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
        body = await service.read_body(request)
        content_type = request.headers.get("content-type")
        prepared = await service.prepare_async(body, content_type)
        encoding = response_encoding(request.headers.get("accept"), content_type)
        t0 = time.perf_counter()
        result = await service.positives(prepared, lambda: _wait_for_disconnect(request))
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
    async def model() -> JSONResponse:
        info = generator.model_info(
            max_k=settings.max_k, max_anchors=settings.max_anchors, sampling=settings.sampling
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
    import json

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
        "redis" if settings.redis else f"in-process LRU of {settings.cache_mb:g} MB",
    )
    log.info("cache values are MACed with a key from %s", secret.source)
    return create_app(settings, generator, cache)


def create_app_from_env() -> FastAPI:
    """uvicorn factory (``uvicorn --factory clsp_positives.service.app:create_app_from_env``):
    settings from ``CLSP_*`` variables through ``ServiceSettings.from_env``, the path
    ``clsp serve`` takes too, so both resolve every field alike."""
    return build_app(ServiceSettings.from_env())
