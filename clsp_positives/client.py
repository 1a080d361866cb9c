"""Client of a pool of generation services (docs/design.md §5, §9): ``Client`` (the
``PoolClient`` below) and ``AsyncClient`` for asyncio code, numpy in and out, torch-free
(``pip install "clsp-positives[client]"``), the one implementation the trainer uses too.

The trainer talks to several generators at once and must never stall on one
of them, so the client balances on its own side (least outstanding requests),
checks ``/readyz``, retries with backoff on another endpoint, and keeps a
circuit breaker per endpoint so that a dead generator costs one failed
connection per cool-down instead of one per request.

This is the trainer's only retry policy: a request makes at most
``max_attempts`` attempts, or, given ``retry_for_s`` (the strict wait of
docs/design.md §5), keeps making rounds of them until that much time has passed,
so that a pool which is down and comes back still delivers every positive.

All I/O runs on one asyncio loop in a background thread with one kept-alive
``httpx.AsyncClient``; callers on the training thread get
``concurrent.futures.Future`` objects and never block the loop. Endpoint state
is touched only on that loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np

from clsp_positives.proto.codec import decode_response, encode_request
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.messages import SAFETENSORS_MEDIA_TYPE, ResponseArrays
from clsp_positives.proto.params import GenerationParams

log = logging.getLogger(__name__)

T = TypeVar("T")

POSITIVES_PATH = "/v1/positives"
READY_PATH = "/readyz"
MODEL_PATH = "/v1/model"
_STATIC_SCHEMES = ("http", "https")
_DNS_PREFIX = "dns+"


class PoolError(RuntimeError):
    """The pool could not answer a request."""


class PoolUnavailable(PoolError):
    """No endpoint answered: every generator is down, open or failing."""


class PoolRequestRejected(PoolError):
    """A generator refused the request itself (4xx other than 429): retrying elsewhere
    would be refused the same way, so this is a configuration error to fix."""

    def __init__(self, status: int, code: str, detail: str, url: str) -> None:
        super().__init__(f"{url} refused the request ({status} {code}): {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.url = url


# ------------------------------------------------------------------ endpoints


@dataclass(frozen=True)
class EndpointSpec:
    """One item of ``--positives``: a fixed base URL, or ``dns+http://host:port`` whose
    host's A/AAAA records each become an endpoint (scaled-out replicas behind one name)."""

    scheme: str
    host: str
    port: int
    dns: bool

    @property
    def text(self) -> str:
        prefix = _DNS_PREFIX if self.dns else ""
        return f"{prefix}{self.scheme}://{_host_port(self.host, self.port)}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(spec: str | Sequence[str]) -> list[EndpointSpec]:
    """Parse ``URL[,URL...]``; raises ValueError naming the bad item."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError(
            "--positives is empty: give URL[,URL...], e.g. http://127.0.0.1:8000 "
            "or dns+http://generators:8000"
        )
    out: list[EndpointSpec] = []
    for item in items:
        dns = item.startswith(_DNS_PREFIX)
        parts = urlsplit(item[len(_DNS_PREFIX) :] if dns else item)
        if parts.scheme not in _STATIC_SCHEMES or not parts.hostname:
            raise ValueError(
                f"bad positives endpoint {item!r}: use http://HOST:PORT, "
                "https://HOST:PORT or dns+http://HOST:PORT"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                f"bad positives endpoint {item!r}: give the base URL only "
                f"(the client adds {POSITIVES_PATH})"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ValueError(
                f"bad positives endpoint {item!r}: the port is not a number in 1..65535"
            ) from None
        out.append(EndpointSpec(parts.scheme, parts.hostname, port, dns))
    return out


def resolve(spec: EndpointSpec) -> list[str]:
    """Base URLs of a spec: itself, or one per distinct address of its host."""
    if not spec.dns:
        return [f"{spec.scheme}://{_host_port(spec.host, spec.port)}"]
    infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    return [f"{spec.scheme}://{_host_port(a, spec.port)}" for a in addresses]


@dataclass
class _Endpoint:
    url: str
    source: str
    outstanding: int = 0
    failures: int = 0  # consecutive
    state: str = "closed"  # closed | open | half_open
    opened_at: float = 0.0
    probing: bool = False
    healthy: bool = True  # optimistic until /readyz says otherwise
    requests: int = 0
    errors: int = 0


@dataclass
class PoolStats:
    """Cumulative counters of one client (never reset; callers take differences)."""

    requests: int = 0
    errors: int = 0
    retries: int = 0
    failovers: int = 0
    endpoints: list[dict[str, Any]] = field(default_factory=list)


class _Retryable(Exception):
    def __init__(self, message: str, *, breaker: bool = True, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.retry_after = retry_after


# --------------------------------------------------------------------- client


class PoolClient:
    """Positives from a pool of generators; thread-safe, one background loop.

    ``timeout_s`` bounds one attempt; a request makes at most ``max_attempts``
    attempts, moving to another endpoint after each failure and backing off
    (``backoff_s`` doubling, jittered) only when it has to reuse one. A request with
    ``retry_for_s`` repeats such rounds, backing off between them the same way,
    until one succeeds or ``retry_for_s`` has passed since it was submitted.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        max_attempts: int = 4,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 2.0,
        health_interval_s: float = 1.0,
        resolve_interval_s: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        if timeout_s <= 0 or max_attempts < 1 or breaker_failures < 1:
            raise ValueError("timeout_s must be > 0, max_attempts and breaker_failures >= 1")
        self.specs = parse_endpoints(endpoints)
        self.token = token
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = breaker_cooldown_s
        self.health_interval_s = health_interval_s
        self.resolve_interval_s = resolve_interval_s
        self._stats = PoolStats()
        self._endpoints: dict[str, _Endpoint] = {}
        self._mismatched: set[str] = set()  # endpoints warned about serving another model
        self._tie = itertools.count()
        for spec in self.specs:
            try:
                urls = resolve(spec)
            except OSError as exc:
                raise ValueError(f"cannot resolve {spec.text}: {exc}") from None
            for url in urls:
                self._endpoints.setdefault(url, _Endpoint(url, spec.text))
        if not self._endpoints:
            raise ValueError(f"{','.join(s.text for s in self.specs)} resolved to no address")

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="clsp-pool-client", daemon=True)
        self._thread.start()
        self._started.wait(10)
        timeout = httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))
        limits = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=60,
        )

        async def setup() -> None:
            # trust_env=False: a proxy from the environment must never sit between the
            # trainer and generators on a private network.
            self._http = httpx.AsyncClient(
                timeout=timeout, limits=limits, headers=headers, trust_env=False
            )
            self._background = [asyncio.ensure_future(self._health_loop())]
            if any(s.dns for s in self.specs):
                self._background.append(asyncio.ensure_future(self._resolve_loop()))

        try:
            self._call(setup(), 10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            raise

    # ------------------------------------------------------------ public API

    def submit(
        self,
        anchors: np.ndarray,
        candidates: np.ndarray | None = None,
        params: GenerationParams | None = None,
        *,
        retry_for_s: float | None = None,
        latents: bool = False,
    ) -> concurrent.futures.Future[ResponseArrays]:
        """Send one request; the future holds the decoded answer or a PoolError.

        ``latents``: the anchors are a latent model's latents ``[N, c, h, w]``, sent as
        ``anchor_latents`` (docs/latent.md). With ``retry_for_s``, a request that the
        pool cannot answer now (every generator down, failing or busy) is retried
        until that many seconds have passed; a refusal (``PoolRequestRejected``)
        still ends it at once, and cancelling the future ends it too."""
        if self._closed:
            raise RuntimeError("PoolClient is closed")
        if retry_for_s is not None and retry_for_s < 0:
            raise ValueError(f"retry_for_s must be >= 0, got {retry_for_s}")
        body, content_type = encode_request(anchors, candidates, params, latents=latents)
        return asyncio.run_coroutine_threadsafe(
            self._post(body, content_type, retry_for_s), self._loop
        )

    def positives(
        self,
        anchors: np.ndarray,
        candidates: np.ndarray | None = None,
        params: GenerationParams | None = None,
        *,
        timeout: float | None = None,
        retry_for_s: float | None = None,
        latents: bool = False,
    ) -> ResponseArrays:
        """Blocking ``submit``; ``timeout`` defaults to every attempt timing out."""
        wait = timeout if timeout is not None else self._worst_case_s() + (retry_for_s or 0.0)
        future = self.submit(anchors, candidates, params, retry_for_s=retry_for_s, latents=latents)
        return future.result(wait)

    def model_info(self) -> dict[str, Any]:
        """``GET /v1/model`` of some live endpoint (fingerprint, sample size, channels)."""
        return self._call(self._get_json(MODEL_PATH), self._worst_case_s())

    def available(self) -> bool:
        """Whether some endpoint may take a request now (circuit closed, or due a probe)."""
        now = time.monotonic()
        return any(
            e.state == "closed"
            or (e.state == "open" and now - e.opened_at >= self.breaker_cooldown_s)
            for e in list(self._endpoints.values())
        )

    def stats(self) -> PoolStats:
        s = self._stats
        eps = [
            {
                "url": e.url,
                "state": e.state,
                "healthy": e.healthy,
                "outstanding": e.outstanding,
                "requests": e.requests,
                "errors": e.errors,
            }
            for e in list(self._endpoints.values())
        ]
        return PoolStats(s.requests, s.errors, s.retries, s.failovers, eps)

    @property
    def endpoint_urls(self) -> list[str]:
        return sorted(self._endpoints)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is in flight, close connections, stop and join the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._http.aclose()
            await self._loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            self._call(shutdown(), timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- loop

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    def _call(self, coro: Awaitable[T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def _worst_case_s(self) -> float:
        return self.max_attempts * (self.timeout_s + self.max_backoff_s) + 5.0

    # ------------------------------------------------------------ balancing

    def _pick(self, exclude: set[str]) -> _Endpoint | None:
        """An open endpoint whose cool-down is over gets the request as its half-open probe
        (one at a time); otherwise the closed endpoint with the least outstanding requests
        (ready ones first)."""
        now = time.monotonic()
        pool = [e for e in self._endpoints.values() if e.url not in exclude]
        due = [
            e for e in pool if e.state == "open" and now - e.opened_at >= self.breaker_cooldown_s
        ]
        if due:
            probe = min(due, key=lambda e: e.opened_at)
            probe.state, probe.probing = "half_open", True
            return probe
        closed = [e for e in pool if e.state == "closed"]
        usable = [e for e in closed if e.healthy] or closed
        if not usable:
            return None
        least = min(e.outstanding for e in usable)
        ties = [e for e in usable if e.outstanding == least]
        return ties[next(self._tie) % len(ties)]

    def _succeeded(self, ep: _Endpoint) -> None:
        if ep.state != "closed":
            log.info("generator %s is back: circuit closed", ep.url)
        ep.failures, ep.state, ep.probing, ep.healthy = 0, "closed", False, True

    def _failed(self, ep: _Endpoint, reason: str) -> None:
        ep.failures += 1
        ep.probing = False
        if ep.state == "half_open" or (
            ep.state == "closed" and ep.failures >= self.breaker_failures
        ):
            if ep.state == "closed":
                log.warning(
                    "generator %s failed %d times in a row (%s): circuit open for %.1f s",
                    ep.url,
                    ep.failures,
                    reason,
                    self.breaker_cooldown_s,
                )
            ep.state, ep.opened_at = "open", time.monotonic()
        elif ep.state == "open":
            ep.opened_at = time.monotonic()

    # ------------------------------------------------------------- requests

    async def _post(
        self, body: bytes, content_type: str, retry_for_s: float | None
    ) -> ResponseArrays:
        self._stats.requests += 1
        end = None if retry_for_s is None else time.monotonic() + retry_for_s
        round_ = 1
        while True:
            try:
                return await self._round(body, content_type, first=round_ == 1)
            except PoolUnavailable:
                left = 0.0 if end is None else end - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(left, self._backoff(round_)))
            round_ += 1

    async def _round(self, body: bytes, content_type: str, *, first: bool) -> ResponseArrays:
        """At most ``max_attempts`` attempts, each on another endpoint while one is left."""
        tried: set[str] = set()
        previous: str | None = None
        last = "no endpoint was tried"
        for attempt in range(self.max_attempts):
            ep = self._pick(tried)
            if ep is None:
                ep = self._pick(set())
                if ep is not None:  # every live endpoint already failed once: back off first
                    await asyncio.sleep(self._backoff(attempt))
            if ep is None:
                raise PoolUnavailable(
                    f"no generator can take the request ({last}); endpoints: {self._describe()}"
                )
            if attempt or not first:
                self._stats.retries += 1
                if previous is not None and ep.url != previous:
                    self._stats.failovers += 1
            try:
                return await self._attempt(ep, body, content_type)
            except _Retryable as exc:
                last = f"{ep.url}: {exc}"
                self._stats.errors += 1
                ep.errors += 1
                if exc.breaker:
                    self._failed(ep, str(exc))
                else:
                    ep.probing = False
                tried.add(ep.url)
                previous = ep.url
                if exc.retry_after:
                    await asyncio.sleep(min(exc.retry_after, self.max_backoff_s))
        raise PoolUnavailable(f"gave up after {self.max_attempts} attempts; last: {last}")

    async def _attempt(self, ep: _Endpoint, body: bytes, content_type: str) -> ResponseArrays:
        ep.outstanding += 1
        ep.requests += 1
        try:
            resp = await self._http.post(
                ep.url + POSITIVES_PATH,
                content=body,
                headers={"Content-Type": content_type, "Accept": SAFETENSORS_MEDIA_TYPE},
            )
        except httpx.HTTPError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            ep.probing = False  # cancelled: a probe that never ran decides nothing
            if ep.state == "half_open":
                ep.state = "open"
            raise
        finally:
            ep.outstanding -= 1
        if resp.status_code == 200:
            try:
                answer = decode_response(resp.content, resp.headers.get("content-type"))
            except ProtocolError as exc:
                raise _Retryable(f"malformed answer: {exc.detail}") from None
            self._succeeded(ep)
            return answer
        if resp.status_code == 429:
            self._succeeded(ep)  # alive, only busy: not a reason to open its circuit
            raise _Retryable(
                "429 queue full",
                breaker=False,
                retry_after=_retry_after(resp.headers.get("retry-after")),
            )
        code, detail = _error_body(resp)
        if resp.status_code == 504 and code == "deadline_exceeded":
            # Alive and answering; the request's own params.deadline_ms passed, so
            # another attempt, here or elsewhere, would be later still.
            self._succeeded(ep)
            raise PoolRequestRejected(resp.status_code, code, detail, ep.url)
        if resp.status_code >= 500 or resp.status_code in (404, 408, 502, 503, 504):
            raise _Retryable(f"HTTP {resp.status_code}: {resp.text[:200]}")
        if resp.status_code == 409 and code == "model_mismatch":
            # Another model's generator (a rolling update, a mixed pool): unavailable to
            # this request, not a refusal of it; the others may serve the right model.
            if ep.url not in self._mismatched:
                self._mismatched.add(ep.url)
                log.warning("generator %s skipped: %s", ep.url, detail)
            raise _Retryable(f"409 model_mismatch: {detail}")
        if resp.status_code == 401:
            detail += " (pass the pool's bearer token with --token)"
        raise PoolRequestRejected(resp.status_code, code, detail, ep.url)

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2 ** max(0, attempt - 1)))
        return base * (0.5 + random.random() / 2)

    def _describe(self) -> str:
        return ", ".join(f"{e.url} {e.state}" for e in self._endpoints.values())

    async def _get_json(self, path: str) -> dict[str, Any]:
        last = "no endpoint"
        for _ in range(self.max_attempts):
            ep = self._pick(set())
            if ep is None:
                break
            try:
                resp = await self._http.get(ep.url + path)
                resp.raise_for_status()
                self._succeeded(ep)
                return resp.json()
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                self._failed(ep, str(exc))
                last = f"{ep.url}: {exc}"
        raise PoolUnavailable(f"GET {path} failed: {last}")

    # ------------------------------------------------------ health, discovery

    async def _probe(self, ep: _Endpoint) -> None:
        """``/readyz`` of one endpoint. It never closes a circuit (a real request does, as
        the half-open probe), but an open endpoint that is still unreachable or not ready
        restarts its cool-down, so no real request is spent on a generator known down."""
        try:
            resp = await self._http.get(ep.url + READY_PATH, timeout=min(2.0, self.timeout_s))
            ep.healthy = resp.status_code == 200
            reason = f"{READY_PATH} answered {resp.status_code}"
        except httpx.HTTPError as exc:
            ep.healthy = False
            reason = f"{READY_PATH}: {type(exc).__name__}"
            if ep.state == "closed":
                self._failed(ep, reason)
        if not ep.healthy and ep.state == "open":
            ep.opened_at = time.monotonic()
            log.debug("generator %s still down (%s)", ep.url, reason)

    async def _check_all(self) -> None:
        eps = list(self._endpoints.values())
        await asyncio.gather(*(self._probe(e) for e in eps), return_exceptions=True)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            with contextlib.suppress(Exception):
                await self._check_all()

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            with contextlib.suppress(Exception):
                await self._reresolve()

    async def _reresolve(self) -> None:
        loop = asyncio.get_running_loop()
        for spec in (s for s in self.specs if s.dns):
            try:
                urls = set(await loop.run_in_executor(None, resolve, spec))
            except OSError as exc:
                log.warning("cannot re-resolve %s (%s); keeping its endpoints", spec.text, exc)
                continue
            if not urls:
                continue
            for url in urls - set(self._endpoints):
                log.info("found generator %s behind %s", url, spec.text)
                self._endpoints[url] = _Endpoint(url, spec.text)
            for url, ep in list(self._endpoints.items()):
                if ep.source == spec.text and url not in urls and ep.outstanding == 0:
                    log.info("generator %s left %s", url, spec.text)
                    del self._endpoints[url]


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def _error_body(resp: httpx.Response) -> tuple[str, str]:
    try:
        obj = resp.json()
        return str(obj.get("error", "error")), str(obj.get("detail", resp.text[:300]))
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return "error", resp.text[:300]


Client = PoolClient
"""The public name of ``PoolClient`` (``from clsp_positives import Client``)."""


class AsyncClient:
    """``Client`` for asyncio code: the same balancing, retries, failover and circuit
    breaking (one ``PoolClient`` underneath, on its own loop), awaited from yours."""

    def __init__(self, endpoints: str | Sequence[str], **options: Any) -> None:
        self._client = PoolClient(endpoints, **options)

    async def positives(
        self,
        anchors: np.ndarray,
        candidates: np.ndarray | None = None,
        params: GenerationParams | None = None,
        *,
        timeout: float | None = None,
        retry_for_s: float | None = None,
        latents: bool = False,
    ) -> ResponseArrays:
        """One request; ``timeout`` bounds the whole wait (cancelling the request)."""
        future = self._client.submit(
            anchors, candidates, params, retry_for_s=retry_for_s, latents=latents
        )
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def model_info(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._client.model_info)

    def available(self) -> bool:
        return self._client.available()

    def stats(self) -> PoolStats:
        return self._client.stats()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
