"""``clsp serve``: the generation service on uvicorn.

Its options are generated from ``ServiceSettings`` (one per field, defaults and
help included), so the command line can neither miss a field nor restate a
default (docs/design.md §8).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import typer

from clsp_positives.options import with_model_options
from clsp_positives.service.settings import ServiceSettings, env_var


@with_model_options(
    ServiceSettings,
    ServiceSettings.model_fields,
    notes={name: f"env {env_var(name)}" for name in ServiceSettings.model_fields},
)
def serve(given: dict[str, Any]) -> None:
    """Serve synthetic positives over HTTP (POST /v1/positives).

    Every option can also come from its environment variable, CLSP_<OPTION>
    (CLSP_MAX_BATCH=256; the token from CLSP_API_TOKEN): a flag wins over the
    variable, which wins over the default.
    """
    import uvicorn

    from clsp_positives.service.app import build_app

    try:
        settings = ServiceSettings.from_env(**given)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        app = build_app(settings)
    except (ValueError, OSError) as exc:  # a model that cannot load: say why, no traceback
        typer.echo(f"clsp serve: {exc}", err=True)
        raise typer.Exit(2) from None
    scraper = None
    if settings.metrics_port is not None:
        scraper = uvicorn.Server(
            uvicorn.Config(
                metrics_app(app.state.metrics),
                host=settings.host,
                port=settings.metrics_port,
                log_config=None,
                access_log=False,
            )
        )
        # In a thread of its own, where uvicorn installs no signal handlers: the main
        # server keeps SIGTERM/SIGINT and stops this one when it stops.
        threading.Thread(target=scraper.run, name="clsp-metrics", daemon=True).start()
    server = _server_class()(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,  # our own logging setup (plain or JSON) covers uvicorn too
            access_log=False,
            timeout_graceful_shutdown=60,
        )
    )
    try:
        server.run()
    finally:
        if scraper is not None:
            scraper.should_exit = True
    if not server.started:  # the port was taken, or the app failed to start
        raise typer.Exit(3)
    if app.state.service.warmup_abandoned:
        # Python would join the worker thread at exit, so wait out the compile it is
        # in; all that thread could still do is warm a model nobody will use.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def metrics_app(metrics: Any) -> Any:
    """``GET /metrics`` and nothing else: what the metrics port serves, tokenless, so
    a scraper can read the figures without reaching the API (docs/deployment.md)."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def render(request: Any) -> Response:
        payload, media = metrics.render()
        return Response(payload, media_type=media)

    return Starlette(routes=[Route("/metrics", render)])


def _server_class() -> type:
    import uvicorn

    class _StopExitsZero(uvicorn.Server):
        """uvicorn's server, minus the re-raise of the stop signal once it has shut down
        (uvicorn ends the process by the signal: exit -15): a shutdown that finished
        its work exits 0, as a Kubernetes rollout expects (docs/deployment.md)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return _StopExitsZero
