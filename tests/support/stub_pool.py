"""A stand-in generation service for the trainer's fault tests.

A real FastAPI app under real uvicorn that speaks the real wire contract
(``proto.codec``) but "generates" instantly and deterministically, so fault
tests exercise the client's networking (kills, restarts, slowness, errors)
without a diffusion model. Behaviour comes from the environment at start and
can be changed at run time through ``POST /stub/config``.

Environment: ``STUB_DELAY_S`` (seconds per request), ``STUB_FAIL_STATUS`` (answer
every positives request with this status), ``STUB_TOKEN`` (require this bearer
token), ``STUB_READY`` (0: ``/readyz`` answers 503),
``STUB_SIZE``/``STUB_CHANNELS``/``STUB_SAMPLING``/``STUB_FINGERPRINT`` (what
``/v1/model`` reports; the fingerprint is also what answers carry and what
``params.expect_model`` is checked against, as the service does).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from clsp_positives.proto.codec import decode_request, encode_response, media_type
from clsp_positives.proto.errors import ProtocolError
from clsp_positives.proto.messages import ResponseArrays
from tests.support.servers import ServerProcess, free_port

STUB_FINGERPRINT = "stub-pool-v1"


def stub_positive(anchor_hwc: np.ndarray, candidate: int) -> np.ndarray:
    """The stub's 'positive' of one uint8 anchor: inverted and shifted by the candidate,
    so a test can tell which anchor and candidate an answer belongs to."""
    return ((255 - anchor_hwc.astype(np.int64) + 7 * int(candidate)) % 256).astype(np.uint8)


def create_app() -> FastAPI:
    app = FastAPI()
    config: dict[str, Any] = {
        "delay_s": float(os.environ.get("STUB_DELAY_S", "0")),
        "fail_status": int(os.environ.get("STUB_FAIL_STATUS", "0")),
        "ready": os.environ.get("STUB_READY", "1") != "0",
        "fingerprint": os.environ.get("STUB_FINGERPRINT", STUB_FINGERPRINT),
    }
    token = os.environ.get("STUB_TOKEN")
    counters = {"requests": 0, "items": 0}
    seen: set[bytes] = set()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        if not config["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/model")
    def model() -> dict[str, Any]:
        return {
            "fingerprint": config["fingerprint"],
            "sample_size": int(os.environ.get("STUB_SIZE", "16")),
            "channels": int(os.environ.get("STUB_CHANNELS", "1")),
            "scheduler": {},
            "device": "cpu",
            "dtype": "float32",
            "max_k": 64,
            "max_anchors": 4096,
            "sampling": os.environ.get("STUB_SAMPLING", "authors"),
        }

    @app.post("/stub/config")
    async def set_config(request: Request) -> dict[str, Any]:
        config.update(await request.json())
        return config

    @app.get("/stub/stats")
    def stats() -> dict[str, int]:
        return counters

    @app.post("/v1/positives")
    async def positives(request: Request) -> Response:
        counters["requests"] += 1
        if token and request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse(
                {"error": "unauthorized", "detail": "missing or wrong bearer token"},
                status_code=401,
            )
        if config["delay_s"]:
            await asyncio.sleep(config["delay_s"])
        if config["fail_status"]:
            return JSONResponse(
                {"error": "stub_failure", "detail": "configured to fail"},
                status_code=config["fail_status"],
            )
        body = await request.body()
        try:
            req = decode_request(body, request.headers.get("content-type"))
        except ProtocolError as exc:
            return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)
        expected = req.params.expect_model
        if expected is not None and expected != config["fingerprint"]:
            return JSONResponse(
                {"error": "model_mismatch", "detail": f"serves {config['fingerprint']}"},
                status_code=409,
            )
        if req.anchors.dtype != np.uint8:
            return JSONResponse(
                {"error": "invalid_tensor", "detail": "the stub takes uint8 anchors only"},
                status_code=400,
            )
        out = np.stack(
            [
                stub_positive(req.anchors[a], c)
                for a, c in zip(req.anchor_index, req.candidates, strict=True)
            ]
        )
        hits = np.zeros(len(out), np.uint8)
        for i, (a, c) in enumerate(zip(req.anchor_index, req.candidates, strict=True)):
            key = req.anchors[a].tobytes() + int(c).to_bytes(8, "little")
            hits[i] = key in seen
            seen.add(key)
        counters["items"] += len(out)
        if req.params.k is not None:
            out = out.reshape(req.num_anchors, req.params.k, *out.shape[1:])
            hits = hits.reshape(req.num_anchors, req.params.k)
        answer = ResponseArrays(out, hits, config["fingerprint"], req.params)
        accept = media_type(request.headers.get("accept")) or media_type(
            request.headers.get("content-type")
        )
        blob, kind = encode_response(answer, encoding=accept)
        return Response(blob, media_type=kind)

    return app


def stub_server(port: int | None = None, **env: str) -> ServerProcess:
    """A stub pool (not started) on ``port``; ``env`` sets STUB_* variables, e.g.
    ``stub_server(STUB_DELAY_S="0.5")``. Ready when ``/readyz`` answers."""
    repo = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    port = port or free_port()
    # A short graceful shutdown: a stub told to be slow must not hold a test's teardown.
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tests.support.stub_pool:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "1",
    ]
    return ServerProcess(cmd, port, health_path="/readyz", env={"PYTHONPATH": path, **env})


def configure(server: ServerProcess, **config: Any) -> dict[str, Any]:
    """Change a running stub's behaviour (delay_s, fail_status, ready)."""
    return httpx.post(server.url + "/stub/config", json=config, timeout=5, trust_env=False).json()


def counters(server: ServerProcess) -> dict[str, int]:
    """Requests and items the stub has answered since it started."""
    return httpx.get(server.url + "/stub/stats", timeout=5, trust_env=False).json()
