"""Sub-commands of the training side."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Nothing registered yet: ``train``, ``eval`` and ``generate`` come with the trainer."""
    del app
