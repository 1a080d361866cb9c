"""``clsp train`` and ``clsp eval``: thin wrappers that validate options into a
``TrainConfig`` and call the training loop or the evaluation.

``clsp train``'s options are generated from ``TrainConfig`` (one per field, its
default and help included), so the model is the only place they are defined
(docs/design.md §8). ``--config FILE`` is the command's own option, not a field:
it fills what the flags leave out from a YAML or JSON file (``config_file.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from clsp_positives.options import describe_errors, flag, with_model_options
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.trainer.config import TrainConfig


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@with_model_options(TrainConfig, TrainConfig.model_fields, envvars={"token": TOKEN_ENV})
def train_command(
    config_file: Optional[Path] = typer.Option(
        None,
        "--config",
        help="YAML or JSON file of options (field names as keys, e.g. a recipe in recipes/ "
        "or a run's DIR/config.yaml); flags given here override it.",
        show_default=False,
    ),
    *,
    given: dict[str, Any],
) -> None:
    """Train a contrastive model, optionally with synthetic positives from a pool."""
    from pydantic import ValidationError

    from clsp_positives.trainer.config_file import ConfigFileError, merged, read_config_file
    from clsp_positives.trainer.train_loop import train

    from_file: dict[str, Any] = {}
    if config_file is not None:
        try:
            from_file = read_config_file(config_file)
        except ConfigFileError as exc:
            _fail(str(exc))

    def name_of(field: str) -> str:
        if field in from_file and field not in given:
            return f"{field} (in {config_file})"
        return flag(field)

    try:
        config = TrainConfig.model_validate(merged(from_file, given))
    except ValidationError as exc:
        _fail(describe_errors(exc, name_of))
    try:
        result = train(config, echo=typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if result.final is not None:
        f = result.final
        typer.echo(
            f"final: linear accuracy {f.linear_acc:.2%}, kNN accuracy {f.knn_acc:.2%} "
            f"({f.train_size} train / {f.test_size} test images)"
        )


def eval_command(
    checkpoint: str = typer.Argument(..., help="checkpoint.pt or the run's --out directory."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: auto)."),
    data_root: Optional[str] = typer.Option(None, help="Override the run's --data-root."),
    linear_epochs: Optional[int] = typer.Option(None, help="Linear probe epochs."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear probe and weighted kNN accuracy of a checkpoint's frozen backbone."""
    from clsp_positives.trainer.train_loop import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(
            checkpoint, device=device, data_root=data_root, linear_epochs=linear_epochs
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        typer.echo(f"linear accuracy {result.linear_acc:.2%}, kNN accuracy {result.knn_acc:.2%}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
