"""``clsp serve``: the generation service on uvicorn."""

from __future__ import annotations

import typer


def serve(model: str = typer.Option(..., "--model", help="Model directory.")) -> None:
    """Serve synthetic positives over HTTP (not implemented yet)."""
    raise typer.Exit("clsp serve is not implemented yet")
