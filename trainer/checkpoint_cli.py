"""``clsp checkpoint convert``: rewrite a checkpoint of the first format, which
held NumPy objects, in the current one that loads without unpickling
(``trainer/checkpoint.py`` says why)."""

from __future__ import annotations

from typing import Optional

import typer

checkpoint_app = typer.Typer(
    name="checkpoint",
    help="Maintain training checkpoints.",
    no_args_is_help=True,
)


@checkpoint_app.command("convert")
def convert_command(
    checkpoint: str = typer.Argument(..., help="checkpoint.pt or the run's --out directory."),
    out: Optional[str] = typer.Option(
        None,
        help="Where to write the converted file (default: in place, "
        "keeping the original as checkpoint.pt.format1).",
    ),
) -> None:
    """Convert a format-1 checkpoint that you trust, so `clsp eval` and `--resume` accept it.

    Reading admits NumPy's array constructor and nothing else: a file that names
    other objects is refused unread."""
    from clsp_positives.trainer.checkpoint import convert_checkpoint

    try:
        written = convert_checkpoint(checkpoint, out)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"converted: {written}")


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoint_app)
