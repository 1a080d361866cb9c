"""``clsp diffusion ...``: train the diffusion models the service samples from."""

from __future__ import annotations

import typer

diffusion_app = typer.Typer(
    help="Train and inspect the diffusion models the service samples from.", no_args_is_help=True
)
