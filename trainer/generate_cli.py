"""``clsp generate``: K candidates for every image of a data set, through the pool,
into the paper's offline layout ``[N, K, H, W, C]`` uint8 (docs/design.md §5).

The file format, its sidecars and the resumable writing are in
``trainer/positives/offline.py``, beside the reader; this module is the command.
The options it shares with ``clsp train`` (the generation params, ``--k``, the
token, the data set's folder) are generated from ``TrainConfig``, so both
commands name them alike and take one set of defaults (docs/design.md §8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from clsp_positives.options import describe_errors, with_model_options
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.positives.offline import (
    OfflineNpySource,
    fill,
    finish,
    open_output,
    progress_path,
    rows_done,
)

SHARED = ("data_root", "download", "token", "k")
SHARED += ("interpolation_weight", "gen_steps", "gen_eta", "gen_method", "gen_sampling")
SHARED += ("gen_interpolate", "gen_share_anchor", "gen_anchor_refresh")
"""``TrainConfig`` fields that are ``clsp generate`` options too."""


@with_model_options(TrainConfig, SHARED, envvars={"token": TOKEN_ENV})
def generate(
    dataset: str = typer.Option(
        ..., "--dataset", help="digits, digits-photos, cifar10, cifar100, stl10 or an image folder."
    ),
    out: Path = typer.Option(..., "--out", help="Output .npy ([N, K, H, W, C] uint8)."),
    positives: str = typer.Option(
        ..., "--positives", help="Generation pool: URL[,URL...] or dns+http://HOST:PORT."
    ),
    split: str = typer.Option("train", "--split"),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", "--size", help="Image side (default: the model's sample size)."
    ),
    channels: Optional[int] = typer.Option(
        None, "--channels", help="1 or 3 (default: the model's)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per request."),
    in_flight: int = typer.Option(4, "--in-flight", min=1, help="Requests in flight."),
    timeout_s: float = typer.Option(600.0, "--timeout-s", help="Longest wait for one request."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    grid: Optional[Path] = typer.Option(
        None,
        "--grid",
        help="Also write a PNG of anchors beside their k candidates (one anchor per class).",
    ),
    grid_rows: int = typer.Option(10, "--grid-rows", min=1, help="Anchors in the --grid PNG."),
    *,
    given: dict[str, Any],
) -> None:
    """Generate k synthetic positives per image into a resumable .npy (the paper's layout)."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from clsp_positives.client import PoolClient, PoolError
    from clsp_positives.images import load_images

    try:
        config = TrainConfig.model_validate(given)
        params = config.generation_params(k=config.k)
    except ValidationError as exc:
        raise typer.BadParameter(describe_errors(exc)) from None
    k = config.k
    try:
        client = PoolClient(positives, token=config.token, timeout_s=timeout_s)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positives") from None
    try:
        info = client.model_info()
        data = load_images(
            dataset,
            split=split,
            size=image_size or int(info["sample_size"]),
            channels=channels or int(info["channels"]),
            root=config.data_root,
            download=config.download,
        )
        images = data.images
        # The service's own sampling mode stands in for "not given", so the file
        # says how its positives were made (docs/design.md §1).
        params = params.resolved(info.get("sampling"))
        # Every row from the model the file names: generators of another model in the
        # pool refuse these requests and the client sends them elsewhere.
        params = params.model_copy(update={"expect_model": info.get("fingerprint")})
        meta = {
            "dataset": dataset,
            "split": split,
            "shape": [len(images), k, *images.shape[1:]],
            "params": json.loads(params.canonical()),
            "model": info.get("fingerprint"),
        }
        array, done = open_output(out, (len(images), k, *images.shape[1:]), meta)
        if array is None:
            typer.echo(f"{out} is already complete ({len(images)} x {k})")
            _write_grid(grid, out, data, grid_rows)
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
            f"wrote {out}: {len(images)} x {k} positives "
            f"({totals['rows']} rows this run, {totals['cache_hits']} cache hits, "
            f"{stats.failovers} failovers, {stats.errors} errors)"
        )
        _write_grid(grid, out, data, grid_rows)
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


def _write_grid(grid: Path | None, out: Path, data: Any, rows: int) -> None:
    """The finished bank's first image of each class (the first images when a set has no
    labels) beside its candidates, as ``clsp demo`` draws them."""
    if grid is None:
        return
    import numpy as np

    from clsp_positives.grid import grid_anchors, write_grid

    source = OfflineNpySource(out)  # the one reader of banks (no pickles, shape checked)
    bank = source.array
    labelled = data.labels >= 0
    picks = (
        grid_anchors(data.labels, rows)
        if labelled.all()
        else np.arange(min(rows, len(data.images)), dtype=np.int64)
    )
    width, height = write_grid(data.images[picks], np.asarray(bank[picks]), grid)
    source.close()
    typer.echo(f"wrote {grid} ({width}x{height}: {len(picks)} anchors x {bank.shape[1]})")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
