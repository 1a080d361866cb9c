"""Sub-commands of the generation side: ``serve`` and ``diffusion train``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from clsp_positives.service.ddpm.cli import diffusion_app
    from clsp_positives.service.serve_cli import serve

    app.command("serve")(serve)
    app.add_typer(diffusion_app, name="diffusion")
