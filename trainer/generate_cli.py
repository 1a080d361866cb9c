"""Sub-commands of the trainer (filled in by the trainer work)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    del app
