"""Sub-commands of the training side: ``train``, ``eval``, ``generate``, ``calibrate`` and
``checkpoint``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from clsp_positives.trainer import checkpoint_cli, train_cli
    from clsp_positives.trainer.positive_tools import calibrate_cli, generate_cli

    train_cli.register(app)
    generate_cli.register(app)
    calibrate_cli.register(app)
    checkpoint_cli.register(app)
