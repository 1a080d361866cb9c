"""``clsp serve``: the generation service on uvicorn."""

from __future__ import annotations

import os
from typing import Optional

import typer

from clsp_positives.service.settings import TOKEN_ENV


def serve(
    model: str = typer.Option(..., "--model", help="Model directory (diffusers layout)."),
    redis: Optional[str] = typer.Option(
        None, "--redis", help="Redis URL, e.g. redis://host:6379/0; without it: in-process LRU."
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most items per sampler call."),
    max_wait_ms: float = typer.Option(
        10.0, "--max-wait-ms", help="Longest wait for a batch to fill."
    ),
    max_queue: int = typer.Option(4096, "--max-queue", help="Most waiting items before 429."),
    max_anchors: int = typer.Option(1024, "--max-anchors", help="Most anchors per request."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body."),
    max_k: int = typer.Option(64, "--max-k", help="Largest k / candidate index + 1."),
    max_cost: int = typer.Option(256_000, "--max-cost", help="Most steps x items per request."),
    token: Optional[str] = typer.Option(
        None, "--token", help=f"Bearer token (better: set {TOKEN_ENV})."
    ),
    cache_ttl: int = typer.Option(
        7 * 24 * 3600, "--cache-ttl", help="Seconds a cached positive lives."
    ),
    cache_mb: float = typer.Option(256.0, "--cache-mb", help="Size of the in-process LRU."),
    log_json: bool = typer.Option(False, "--log-json", help="JSON log lines."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve synthetic positives over HTTP (POST /v1/positives)."""
    import uvicorn

    from clsp_positives.service.app import build_app
    from clsp_positives.service.settings import ServiceSettings

    try:
        # Flags win; CLSP_* variables fill what has no flag (e.g. CLSP_REDIS_TIMEOUT_S).
        settings = ServiceSettings.from_env(
            model=model,
            redis=redis,
            host=host,
            port=port,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            max_anchors=max_anchors,
            max_body_mb=max_body_mb,
            max_k=max_k,
            max_cost=max_cost,
            token=token or os.environ.get(TOKEN_ENV) or None,
            cache_ttl=cache_ttl,
            cache_mb=cache_mb,
            log_json=log_json,
            log_level=log_level,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        app = build_app(settings)
    except (ValueError, OSError) as exc:  # a model that cannot load: say why, no traceback
        typer.echo(f"clsp serve: {exc}", err=True)
        raise typer.Exit(2) from None
    # log_config=None: our own logging setup (plain or JSON) covers uvicorn too.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=60,
    )
