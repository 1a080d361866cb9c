"""``clsp train`` and ``clsp eval``: thin wrappers that validate options into a
``TrainConfig`` and call the training loop or the evaluation.

``clsp train``'s options are generated from ``TrainConfig`` (one per field, its
default and help included), so the model is the only place they are defined
(docs/design.md §8). ``--config FILE`` is the command's own option, not a field:
it fills what the flags leave out from a YAML or JSON file (``config_file.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer

from clsp_positives.config_file import CONFIG_HELP
from clsp_positives.options import with_model_options
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.trainer.config import TrainConfig


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@with_model_options(TrainConfig, TrainConfig.model_fields, envvars={"token": TOKEN_ENV})
def train_command(
    config_file: Optional[Path] = typer.Option(
        None, "--config", help=CONFIG_HELP, show_default=False
    ),
    *,
    given: dict[str, Any],
) -> None:
    """Train a contrastive model, optionally with synthetic positives from a pool."""
    from clsp_positives.config_file import OptionsError, announcement, resolve_options
    from clsp_positives.trainer.config_file import COMMAND, CONFIG_NAME
    from clsp_positives.trainer.train_loop import train

    try:
        config = resolve_options(TrainConfig, config_file, given, command=COMMAND)
    except OptionsError as exc:
        _fail(str(exc))
    if os.environ.get("RANK", "0") == "0":  # once under torchrun: rank 0 writes the file too
        path = Path(config.out) / CONFIG_NAME if config.out else None
        typer.echo(announcement(config.stored(), command=COMMAND, path=path))
    _use_idle_cores()
    try:
        result = train(config, echo=typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if result.final is not None:
        f = result.final
        typer.echo(f"final: {accuracies(f)} ({f.train_size} train / {f.test_size} test images)")


def _use_idle_cores() -> None:
    """torch's CPU threads: ``OMP_NUM_THREADS`` when set (torchrun sets 1 per rank),
    else the cores idle now, never more than torch's current count (its default in a
    fresh process): threads on busy cores wait on each other (clsp_positives/threads.py;
    docs/demo.md, "Budgets")."""
    import torch

    from clsp_positives.threads import resolve_threads

    torch.set_num_threads(resolve_threads(None, at_most=torch.get_num_threads()))


def accuracies(result: Any) -> str:
    """An ``EvalResult`` in words: the standard protocol's linear accuracy (when it ran),
    then the fast probe's and kNN's."""
    parts = [] if result.linear_acc is None else [f"linear accuracy {result.linear_acc:.2%}"]
    parts += [f"probe accuracy {result.probe_acc:.2%}", f"kNN accuracy {result.knn_acc:.2%}"]
    return ", ".join(parts)


def eval_command(
    checkpoint: str = typer.Argument(..., help="checkpoint.pt or the run's --out directory."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: auto)."),
    data_root: Optional[str] = typer.Option(None, help="Override the run's --data-root."),
    linear_epochs: Optional[int] = typer.Option(
        None,
        min=0,
        help="Epochs of the standard linear protocol (default: the run's; 0: skip it).",
    ),
    probe_epochs: Optional[int] = typer.Option(
        None, min=1, help="Epochs of the fast probe (default: the run's)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear accuracy (the standard protocol), fast-probe and weighted kNN accuracy of a
    checkpoint's frozen backbone."""
    import sys

    from clsp_positives.trainer.train_loop import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(
            checkpoint,
            device=device,
            data_root=data_root,
            linear_epochs=linear_epochs,
            probe_epochs=probe_epochs,
            progress=sys.stderr.isatty(),  # tqdm writes to stderr: --json stays clean
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        typer.echo(accuracies(result))


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
