"""Start the generation service under uvicorn and talk to it, for the service tests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from clsp_positives.proto.codec import decode_response, encode_request
from clsp_positives.proto.messages import ResponseArrays
from tests.support.servers import ServerProcess, free_port, uvicorn_app

FACTORY = "clsp_positives.service.app:create_app_from_env"


def start_service(
    model_dir: str,
    *,
    redis_url: str | None = None,
    token: str | None = None,
    threads: int = 1,
    **settings: Any,
) -> ServerProcess:
    """A real uvicorn running the service; ready once /readyz answers 200 (warm-up done).

    ``settings`` become ``CLSP_<NAME>`` variables (see ``ServiceSettings.from_env``).
    """
    env = {
        "CLSP_MODEL": str(model_dir),
        "CLSP_WARMUP_STEPS": "1",
        "OMP_NUM_THREADS": str(threads),
        "CLSP_LOG_LEVEL": "warning",
    }
    if redis_url:
        env["CLSP_REDIS"] = redis_url
    if token:
        env["CLSP_API_TOKEN"] = token
    env.update({f"CLSP_{k.upper()}": str(v) for k, v in settings.items()})
    return uvicorn_app(FACTORY, env=env, health_path="/readyz").start(timeout=180)


def clsp_serve(
    model_dir: object,
    redis_url: str | None = None,
    *,
    args: Sequence[str] = ("--max-batch", "8", "--max-wait-ms", "20"),
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """A ``clsp serve`` process as a user starts it (not started yet), on a free port of
    127.0.0.1, one torch thread, a one-step warm-up; ``env`` adds variables (a cache
    secret, a token)."""
    port = free_port()
    cmd = [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *args]
    if redis_url:
        cmd += ["--redis", redis_url]
    base = {"OMP_NUM_THREADS": "1", "CLSP_WARMUP_STEPS": "1", "CLSP_LOG_LEVEL": "warning"}
    return ServerProcess(cmd, port, health_path="/readyz", env={**base, **(env or {})})


@contextmanager
def running(
    servers: Sequence[ServerProcess], timeout: float = 180
) -> Iterator[list[ServerProcess]]:
    """Start ``servers`` side by side (each pays its own model load and warm-up) and stop
    every one of them afterwards, also when one failed to start."""
    try:
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as ex:
            errors = [f.exception() for f in [ex.submit(s.start, timeout) for s in servers]]
        if any(errors):
            raise next(e for e in errors if e)
        yield list(servers)
    finally:
        for s in servers:
            s.stop()


def anchors_u8(n: int, seed: int, size: int = 16, channels: int = 1) -> np.ndarray:
    """Distinct random uint8 anchors [n, H, W, C]; a new seed gives new cache keys."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def post_positives(
    client: httpx.Client,
    anchors: np.ndarray,
    params: Mapping[str, Any],
    *,
    token: str | None = None,
    encoding: str = "application/x-safetensors",
    candidates: np.ndarray | None = None,
    path: str = "/v1/positives",
    accept: str | None = None,
    latents: bool = False,
) -> tuple[httpx.Response, ResponseArrays | None]:
    body, ctype = encode_request(
        anchors, candidates, dict(params), encoding=encoding, latents=latents
    )
    headers = {"Content-Type": ctype, **auth(token)}
    if accept:
        headers["Accept"] = accept
    r = client.post(path, content=body, headers=headers)
    if r.status_code != 200:
        return r, None
    return r, decode_response(r.content, r.headers["content-type"])


async def apost_positives(
    client: httpx.AsyncClient,
    anchors: np.ndarray,
    params: Mapping[str, Any],
    *,
    token: str | None = None,
) -> tuple[httpx.Response, ResponseArrays | None]:
    body, ctype = encode_request(anchors, None, dict(params))
    r = await client.post(
        "/v1/positives", content=body, headers={"Content-Type": ctype, **auth(token)}
    )
    if r.status_code != 200:
        return r, None
    return r, decode_response(r.content, r.headers["content-type"])


def scrape(base_url: str, token: str | None = None) -> dict[str, float]:
    """Every sample of /metrics as ``name{k=v,...}`` (sorted labels) -> value."""
    r = httpx.get(base_url + "/metrics", headers=auth(token), timeout=10)
    r.raise_for_status()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def total(metrics: Mapping[str, float], prefix: str) -> float:
    """Sum of every sample whose name (with labels) starts with ``prefix``."""
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))
