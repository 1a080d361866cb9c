"""``clsp train --data-workers N`` on image folders written by the test: positives
from a real ``clsp serve`` arrive for streamed anchors, and the trainer's peak memory
does not grow with the folder, while the in-memory load's does (docs/training.md,
"Large data sets")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.service import clsp_serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = [
    "--backbone", "resnet-tiny", "--proj-hidden-dim", "32", "--proj-dim", "16",
    "--epochs", "1", "--linear-epochs", "0", "--probe-epochs", "1", "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def write_folder(root: Path, n: int, side: int, channels: int, *, seed: int = 0) -> None:
    """``n`` random PNGs of ``side x side`` in 10 class folders (image i in class i % 10)."""
    rng = np.random.default_rng(seed)
    shape = (side, side) if channels == 1 else (side, side, channels)
    for i in range(n):
        folder = root / f"class-{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{i:05d}.png")


def clsp(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_streamed_folder_trains_with_positives_from_clsp_serve(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """2000 grey 16x16 PNGs, the tiny model's 16x16x1: one epoch reads them through two
    DataLoader workers and sends their anchors to the generator."""
    data = tmp_path / "folder"
    write_folder(data, 2000, 16, 1)
    out = tmp_path / "run"
    with clsp_serve(tiny_model_dir) as server:
        args = [
            "clsp_positives.cli", "train", "--dataset", str(data), "--data-workers", "2",
            "--image-size", "16", "--channels", "1", "--batch-size", "100",
            "--clsp-weight", "1", "--positives", server.url, "--k", "1",
            "--prefetch", "4", "--positives-deadline-ms", "3000", "--gen-steps", "2",
            "--out", str(out), *TINY_TRAIN,
        ]  # fmt: skip
        clsp(args, env={"OMP_NUM_THREADS": "1"})
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    epoch = next(r for r in records if r["event"] == "epoch")
    print(json.dumps(epoch), file=sys.stderr)
    assert start["train_size"] == 2000 and start["config"]["data_workers"] == 2
    assert epoch["steps"] == 20
    assert epoch["positive_fraction"] > 0, epoch
    assert epoch["loss_clsp"] > 0, epoch


def peak_kib(data: Path, workers: int, tmp_path: Path) -> int:
    """The trainer process's own peak resident memory (ru_maxrss) over a short run."""
    usage = tmp_path / f"rss-{data.name}-{workers}.json"
    args = [
        "tests.support.peak_rss", str(usage), "train", "--dataset", str(data),
        "--data-workers", str(workers), "--image-size", "64", "--subset", "128",
        "--batch-size", "32", *TINY_TRAIN,
    ]  # fmt: skip
    # glibc's malloc otherwise keeps freed activation buffers in its heap, by how many
    # batches ran: with a fixed mmap threshold the peak is what was live.
    clsp(args, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    return int(json.loads(usage.read_text())["self_kib"])


def test_the_streamed_trainer_peak_memory_does_not_grow_with_the_folder(tmp_path: Path) -> None:
    """Folders of 1000 and 4000 64x64 RGB PNGs per split (train and test): held in
    memory, 4000 per split is 98 MB of pixels, 74 MB more than 1000. Training reads the
    first 128 images (--subset keeps the steps few), the evaluation every test image:
    the streamed trainer decodes them in its workers and its peak stays where it was;
    the in-memory one holds both splits, and its peak grows by about those 74 MB (the
    check that the measurement would see a data set held in memory)."""
    sizes = (1000, 4000)
    for n in sizes:
        for split in ("train", "test"):
            write_folder(tmp_path / f"folder-{n}" / split, n, 64, 3, seed=n)
    raw_growth_kib = 2 * (sizes[1] - sizes[0]) * 64 * 64 * 3 / 1024
    peaks = {
        (workers, n): peak_kib(tmp_path / f"folder-{n}", workers, tmp_path)
        for workers in (2, 0)
        for n in sizes
    }
    print(f"peak RSS KiB (workers, images per split): {peaks}", file=sys.stderr)
    streamed = peaks[2, sizes[1]] - peaks[2, sizes[0]]
    in_memory = peaks[0, sizes[1]] - peaks[0, sizes[0]]
    assert in_memory > 0.6 * raw_growth_kib, peaks
    assert streamed < 0.25 * raw_growth_kib, peaks
