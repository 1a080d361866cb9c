"""The paper's offline positives: ``[N, K, H, W, C]`` uint8 in one ``.npy``, the
writer (``clsp generate``) and the reader (``--positives-npy``) side by side, so the
format and its sidecars are defined in one place (docs/design.md §5).

The writer fills the array in place through a memory map, and a sidecar
``.progress.npy`` records which rows are done, so an interrupted run (a crash, a
kill, a pool outage) continues where it stopped when rerun with the same
options. The data rows are flushed before the sidecar marks them, so a row is
never marked done without its images on disk; the reader refuses a file whose
sidecar still exists. A second sidecar, ``.meta.json``, records the options a
file was made with, so a rerun with other options cannot mix two kinds of rows,
and the model fingerprint, which the reader checks against the model the run
expects (docs/reliability.md, "Model pinning").
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clsp_positives.trainer.positives.pending import (
    PendingPositives,
    Urgency,
    answered,
    check_batch,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------- file and sidecars


def progress_path(npy: str | Path) -> Path:
    """The sidecar ``clsp generate`` keeps while a .npy is incomplete."""
    return Path(str(npy) + ".progress.npy")


def meta_path(out: str | Path) -> Path:
    """The sidecar describing what a .npy holds (kept after completion, for provenance)."""
    return Path(str(out) + ".meta.json")


def config_path(out: str | Path) -> Path:
    """The resolved ``clsp generate`` options a .npy was last run with
    (``clsp generate --config`` takes it back)."""
    return Path(str(out) + ".config.yaml")


def rows_done(npy: str | Path) -> tuple[int, int] | None:
    """(rows done, rows) of an incomplete .npy; None when it has no progress sidecar."""
    progress = progress_path(npy)
    if not progress.exists():
        return None
    done = np.load(progress)
    return int(done.sum()), len(done)


def finish(npy: str | Path) -> None:
    """Mark a .npy complete: without its progress sidecar the reader accepts it."""
    progress_path(npy).unlink()


# ---------------------------------------------------- writing: clsp generate


def _save_progress(path: Path, done: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, path)


def open_output(
    out: Path, shape: tuple[int, ...], meta: dict[str, Any], dtype: np.dtype | type = np.uint8
) -> tuple[np.memmap | None, np.ndarray]:
    """The output memmap and its done-rows array; ``None`` when ``out`` is already complete.
    ``dtype`` is uint8 for pictures, float16 for a latent model's latents (docs/latent.md).

    Refuses to touch a file made with other options (naming the difference)."""
    dtype = np.dtype(dtype)
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
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"{str(out)!r} holds {array.dtype} {list(array.shape)}, expected "
                f"{dtype.name} {list(shape)}: delete it and its sidecars to start over"
            )
        done = np.load(progress)
        if done.shape != (shape[0],):
            raise ValueError(f"{progress.name} does not match {str(out)!r}: delete both")
        return array, done
    out.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=shape)
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
                        f"{list(expected)}: its model does not match --image-size/"
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


# ----------------------------------------------- reading: --positives-npy


def bank_model(npy: str | Path) -> str | None:
    """The model fingerprint a bank's ``.meta.json`` names; None for a bank without
    the sidecar or with no model in it (made before banks recorded one)."""
    meta = meta_path(npy)
    if not meta.is_file():
        return None
    model = json.loads(meta.read_text()).get("model")
    return str(model) if model else None


def check_bank_model(npy: str | Path, model: str | None, expected: str | None) -> str | None:
    """A bank's model against the one the run expects (``--expect-model``, or the model a
    resumed run's checkpoint pinned): positives of another model never reach training,
    as with the pool (docs/reliability.md, "Model pinning"). Returns the bank's model."""
    if expected is None or model == expected:
        return model
    if model is None:
        log.warning(
            'offline positives %r do not name the model that made them (no "model" in '
            "%s): they cannot be checked against the expected model %s",
            str(npy),
            meta_path(npy).name,
            expected,
        )
        return None
    raise ValueError(
        f"offline positives {str(npy)!r} were made by model {model}, but this run expects "
        f"model {expected} (--expect-model, or the model its checkpoint pinned): use a bank "
        f"of model {expected}, or drop --expect-model / pass --allow-model-change to train "
        f"on this one"
    )


class OfflineNpySource:
    """The paper's pre-generated positives: ``[N, K, H, W, C]`` uint8, memory-mapped and
    indexed by data set index and candidate index."""

    enabled = True

    def __init__(self, path: str | Path, *, expect_model: str | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"offline positives {str(path)!r} do not exist: create them "
                "with `clsp generate --out FILE.npy`"
            )
        progress = rows_done(path)
        if progress is not None:
            raise ValueError(
                f"offline positives {str(path)!r} are incomplete ({progress[0]}"
                f" of {progress[1]} rows): rerun the same `clsp generate` to finish"
            )
        self.array = np.load(path, mmap_mode="r")
        if self.array.dtype != np.uint8 or self.array.ndim != 5:
            raise ValueError(
                f"offline positives must be uint8 [N, K, H, W, C], got "
                f"{self.array.dtype} {list(self.array.shape)} in {str(path)!r}"
                + (
                    " (a latents bank of `clsp generate --output latents`: train from "
                    "pictures, or decode it with the model's autoencoder first)"
                    if self.array.dtype == np.float16
                    else ""
                )
            )
        self.path = path
        self.model = check_bank_model(path, bank_model(path), expect_model)
        """The fingerprint of the model that made the bank (its ``.meta.json``), or None
        when the file does not say; epoch records and checkpoints carry it, as the pool
        source's pinned model."""

    @property
    def k(self) -> int:
        return int(self.array.shape[1])

    def submit(
        self,
        anchors: np.ndarray,
        indices: np.ndarray,
        candidates: np.ndarray,
        *,
        retry_for_s: float | None = None,
        urgency: Urgency | None = None,
    ) -> PendingPositives:
        """The rows at once; ``retry_for_s`` and ``urgency`` are moot (a file has nothing
        to retry and answers at once)."""
        check_batch(anchors, indices, candidates)
        n, k = self.array.shape[:2]
        indices = np.asarray(indices, dtype=np.int64)
        candidates = np.asarray(candidates, dtype=np.int64)
        if anchors.shape[1:] != self.array.shape[2:]:
            raise ValueError(
                f"offline positives are {list(self.array.shape[2:])} (H, W, C) but "
                f"the anchors are {list(anchors.shape[1:])}: generate the .npy "
                "with the training --image-size and --channels"
            )
        if len(indices) and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(
                f"data set index {int(indices.max())} is outside the {n} rows of "
                f"{str(self.path)!r}: was it generated for another data set/split?"
            )
        if len(candidates) and (candidates.min() < 0 or candidates.max() >= k):
            raise ValueError(
                f"candidate {int(candidates.max())} asked but {str(self.path)!r} "
                f"holds k={k}: pass --k {k} or fewer"
            )
        images = np.asarray(self.array[indices, candidates])
        return PendingPositives(
            anchors.shape, [(slice(0, len(anchors)), answered((images, 0, None)))]
        )

    def available(self) -> bool:
        return True

    def stats(self) -> dict[str, int]:
        return {"failovers": 0, "errors": 0, "retries": 0}

    def close(self) -> None:
        mm = getattr(self.array, "_mmap", None)
        self.array = np.empty((0, 0, 0, 0, 0), np.uint8)
        if mm is not None:
            mm.close()
