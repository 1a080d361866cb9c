"""``clsp generate``: K candidates for every image of a data set, through the pool,
into the paper's offline layout ``[N, K, H, W, C]`` uint8 (docs/design.md §5).

The file format, its sidecars and the resumable writing are in
``trainer/positives/offline.py``, beside the reader; this module is the command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.offline import (
    fill,
    finish,
    open_output,
    progress_path,
    rows_done,
)

TOKEN_ENV = "CLSP_API_TOKEN"
"""The same variable `clsp serve` and `clsp train` read, so one secret serves all three."""


def generate(
    dataset: str = typer.Option(
        ..., "--dataset", help="digits, cifar10, cifar100, stl10 or an image folder."
    ),
    out: Path = typer.Option(..., "--out", help="Output .npy ([N, K, H, W, C] uint8)."),
    positives: str = typer.Option(
        ..., "--positives", help="Generation pool: URL[,URL...] or dns+http://HOST:PORT."
    ),
    data_root: Optional[str] = typer.Option(
        None, "--data-root", help="Folder of the torchvision data sets."
    ),
    split: str = typer.Option("train", "--split"),
    size: Optional[int] = typer.Option(
        None, "--size", help="Image size (default: the model's sample size)."
    ),
    channels: Optional[int] = typer.Option(
        None, "--channels", help="1 or 3 (default: the model's)."
    ),
    download: bool = typer.Option(False, "--download", help="Download the data set if missing."),
    token: Optional[str] = typer.Option(
        None, "--token", envvar=TOKEN_ENV, help=f"Bearer token of the pool (or {TOKEN_ENV})."
    ),
    candidates: int = typer.Option(8, "--candidates", min=1, help="K per image."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per request."),
    in_flight: int = typer.Option(4, "--in-flight", min=1, help="Requests in flight."),
    timeout_s: float = typer.Option(600.0, "--timeout-s", help="Longest wait for one request."),
    interpolation_weight: float = typer.Option(0.1, "--interpolation-weight"),
    gen_steps: int = typer.Option(100, "--gen-steps"),
    gen_eta: float = typer.Option(0.1, "--gen-eta"),
    gen_method: str = typer.Option("ddim", "--gen-method", help="ddim or ddpm."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Generate K synthetic positives per image into a resumable .npy (the paper's layout)."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from clsp_positives.images import load_images
    from clsp_positives.proto.params import describe_validation_error
    from clsp_positives.trainer.positives.client import PoolClient, PoolError

    try:
        params = GenerationParams(
            interpolation_weight=interpolation_weight,
            steps=gen_steps,
            eta=gen_eta,
            method=gen_method,
            k=candidates,
        )
    except ValidationError as exc:
        raise typer.BadParameter(describe_validation_error(exc)) from None
    try:
        client = PoolClient(positives, token=token, timeout_s=timeout_s)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positives") from None
    try:
        info = client.model_info()
        images = load_images(
            dataset,
            split=split,
            size=size or int(info["sample_size"]),
            channels=channels or int(info["channels"]),
            root=data_root,
            download=download,
        ).images
        meta = {
            "dataset": dataset,
            "split": split,
            "shape": [len(images), candidates, *images.shape[1:]],
            "params": json.loads(params.canonical()),
            "model": info.get("fingerprint"),
        }
        array, done = open_output(out, (len(images), candidates, *images.shape[1:]), meta)
        if array is None:
            typer.echo(f"{out} is already complete ({len(images)} x {candidates})")
            return
        with tqdm(
            total=len(done),
            initial=int(done.sum()),
            unit="img",
            disable=not progress,
            desc="generate",
        ) as bar:
            totals = fill(
                array,
                done,
                images,
                lambda a: client.submit(a, None, params),
                batch_size=batch_size,
                in_flight=in_flight,
                progress_file=progress_path(out),
                advance=lambda rows, hits: bar.update(rows),
            )
        del array
        finish(out)
        stats = client.stats()
        typer.echo(
            f"wrote {out}: {len(images)} x {candidates} positives "
            f"({totals['rows']} rows this run, {totals['cache_hits']} cache hits, "
            f"{stats.failovers} failovers, {stats.errors} errors)"
        )
    except (PoolError, ValueError, FileNotFoundError) as exc:
        progress = rows_done(out)
        done_note = (
            ""
            if progress is None
            else f" ({progress[0]} of {progress[1]} rows done; rerun to continue)"
        )
        typer.echo(f"clsp generate: {exc}{done_note}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
