"""The ``clsp`` command line.

Each component registers its own sub-commands, so this file only wires them
together. Heavy imports (torch, diffusers) happen inside the commands, which
keeps ``clsp --help`` instant and lets a torch-free client install use it.
"""

from __future__ import annotations

import typer

from clsp_positives import __version__

app = typer.Typer(
    name="clsp",
    help="CLSP positives: generate synthetic positives for contrastive learning, "
    "serve them, and train with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clsp-positives {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """CLSP positives."""


def _register_components() -> None:
    from clsp_positives import demo
    from clsp_positives.service import cli as service_cli
    from clsp_positives.trainer import cli as trainer_cli

    service_cli.register(app)
    trainer_cli.register(app)
    demo.register(app)


_register_components()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
