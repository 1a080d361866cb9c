"""Sub-commands of the generation side: ``serve`` and ``diffusion train``."""

from __future__ import annotations

import typer

diffusion_app = typer.Typer(help="Train and inspect the diffusion models the service samples from.",
                            no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(diffusion_app, name="diffusion")
