"""Sub-commands of the training side: ``train``, ``eval`` and ``generate``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from clsp_positives.trainer import generate_cli, train_cli

    train_cli.register(app)
    generate_cli.register(app)
