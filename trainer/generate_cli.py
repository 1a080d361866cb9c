"""``clsp generate``: K candidates for every image of a data set, through the pool,
into the paper's offline layout ``[N, K, H, W, C]`` uint8 (docs/design.md §5).

The output is written in place through a memory map and a sidecar records
which rows are done, so an interrupted run (a crash, a kill, a pool outage)
continues where it stopped when rerun with the same options. The data rows are
flushed before the sidecar marks them, so a row is never marked done without
its images on disk.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positives.sources import progress_path

TOKEN_ENV = "CLSP_API_TOKEN"
"""The same variable `clsp serve` and `clsp train` read, so one secret serves all three."""


def meta_path(out: str | Path) -> Path:
    """The sidecar describing what a .npy holds (kept after completion, for provenance)."""
    return Path(str(out) + ".meta.json")


def _save_progress(path: Path, done: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, path)


def open_output(
    out: Path, shape: tuple[int, ...], meta: dict[str, Any]
) -> tuple[np.memmap | None, np.ndarray]:
    """The output memmap and its done-rows array; ``None`` when ``out`` is already complete.

    Refuses to touch a file made with other options (naming the difference)."""
    progress, meta_file = progress_path(out), meta_path(out)
    if out.exists():
        old = json.loads(meta_file.read_text()) if meta_file.exists() else None
        if old != meta:
            diff = (
                ("it has no " + meta_file.name)
                if old is None
                else ", ".join(
                    f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now"
                    for k in sorted(set(old) | set(meta))
                    if old.get(k) != meta.get(k)
                )
            )
            raise ValueError(
                f"{str(out)!r} exists but was not made by these options ({diff}): "
                "use another --out or delete it"
            )
        if not progress.exists():
            return None, np.ones(shape[0], bool)
        array = np.lib.format.open_memmap(out, mode="r+")
        if array.shape != shape or array.dtype != np.uint8:
            raise ValueError(
                f"{str(out)!r} holds {array.dtype} {list(array.shape)}, expected "
                f"uint8 {list(shape)}: delete it and its sidecars to start over"
            )
        done = np.load(progress)
        if done.shape != (shape[0],):
            raise ValueError(f"{progress.name} does not match {str(out)!r}: delete both")
        return array, done
    out.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=shape)
    done = np.zeros(shape[0], bool)
    _save_progress(progress, done)
    meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return array, done


def fill(
    array: np.memmap,
    done: np.ndarray,
    images: np.ndarray,
    submit: Callable[[np.ndarray], concurrent.futures.Future[Any]],
    *,
    batch_size: int,
    in_flight: int,
    progress_file: Path,
    advance: Callable[[int, int], None] = lambda rows, hits: None,
) -> dict[str, int]:
    """Generate every row not yet done, ``in_flight`` requests at a time; a failed request
    stops the run (after waiting for the others) with the progress saved."""
    k = array.shape[1]
    todo = np.flatnonzero(~done)
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    running: dict[concurrent.futures.Future[Any], np.ndarray] = {}
    totals = {"rows": 0, "cache_hits": 0}
    failure: BaseException | None = None
    next_chunk = 0
    while running or (next_chunk < len(chunks) and failure is None):
        while failure is None and next_chunk < len(chunks) and len(running) < in_flight:
            rows = chunks[next_chunk]
            running[submit(np.ascontiguousarray(images[rows]))] = rows
            next_chunk += 1
        finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
        for fut in finished:
            rows = running.pop(fut)
            try:
                answer = fut.result()
                expected = (len(rows), k, *array.shape[2:])
                if answer.positives.shape != expected:
                    raise ValueError(
                        f"the pool answered {list(answer.positives.shape)} for "
                        f"{list(expected)}: its model does not match --size/"
                        "--channels"
                    )
            except Exception as exc:
                failure = failure or exc
                continue
            array[rows] = answer.positives
            array.flush()
            done[rows] = True
            _save_progress(progress_file, done)
            hits = int(np.count_nonzero(answer.cache_hit))
            totals["rows"] += len(rows)
            totals["cache_hits"] += hits
            advance(len(rows), hits)
    if failure is not None:
        raise failure
    return totals


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
        progress_path(out).unlink()
        stats = client.stats()
        typer.echo(
            f"wrote {out}: {len(images)} x {candidates} positives "
            f"({totals['rows']} rows this run, {totals['cache_hits']} cache hits, "
            f"{stats.failovers} failovers, {stats.errors} errors)"
        )
    except (PoolError, ValueError, FileNotFoundError) as exc:
        done_note = ""
        if progress_path(out).exists():
            d = np.load(progress_path(out))
            done_note = f" ({int(d.sum())} of {len(d)} rows done; rerun to continue)"
        typer.echo(f"clsp generate: {exc}{done_note}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
