"""``clsp generate`` against a real stub pool: the paper's layout, resuming after a
kill, refusing to mix options, and a clear failure when the pool is down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.grid import GRID_GAP, GRID_SCALE, GRID_SEP, grid_size
from clsp_positives.images import load_images
from clsp_positives.trainer.positives.offline import OfflineNpySource, meta_path, progress_path
from tests.support.servers import free_port
from tests.support.stub_pool import counters, stub_positive, stub_server

K = 2


def args(url: str, out: Path, *extra: str, old_names: bool = False) -> list[str]:
    """The command line; ``old_names``: the flags as they were first named."""
    return [
        "generate",
        "--dataset",
        "digits",
        "--size" if old_names else "--image-size",
        "16",
        "--channels",
        "1",
        "--positives",
        url,
        "--candidates" if old_names else "--k",
        str(K),
        "--out",
        str(out),
        "--gen-steps",
        "3",
        "--no-progress",
        *extra,
    ]


def check_complete(out: Path) -> None:
    images = load_images("digits", size=16, channels=1).images
    source = OfflineNpySource(out)  # refuses an unfinished file
    assert source.array.shape == (len(images), K, 16, 16, 1)
    rows = np.random.default_rng(0).choice(len(images), 40, replace=False)
    for i in rows:
        for c in range(K):
            np.testing.assert_array_equal(source.array[i, c], stub_positive(images[i], c))
    source.close()


def test_generate_writes_the_paper_layout_and_knows_when_it_is_done(tmp_path: Path) -> None:
    out = tmp_path / "pos.npy"
    runner = CliRunner()
    with stub_server() as server:
        result = runner.invoke(app, args(server.url, out, "--batch-size", "256"))
        assert result.exit_code == 0, result.output
        assert "wrote" in result.output
        check_complete(out)
        assert not progress_path(out).exists() and meta_path(out).exists()
        again = runner.invoke(app, args(server.url, out))
        assert again.exit_code == 0 and "already complete" in again.output
        other = runner.invoke(app, args(server.url, out, "--gen-steps", "4"))
        assert other.exit_code == 1 and "not made by these options" in other.output


def test_the_file_records_the_pools_sampling_mode_when_none_is_asked(tmp_path: Path) -> None:
    """Params without ``sampling`` get the service's mode, so the file's metadata must say
    that mode, not the client's idea of the default."""
    for mode in ("model", "authors"):
        out = tmp_path / f"{mode}.npy"
        with stub_server(STUB_SAMPLING=mode) as server:
            result = CliRunner().invoke(app, args(server.url, out))
        assert result.exit_code == 0, result.output
        assert json.loads(meta_path(out).read_text())["params"]["sampling"] == mode


def test_grid_shows_one_anchor_per_class_beside_its_candidates(tmp_path: Path) -> None:
    out, png = tmp_path / "pos.npy", tmp_path / "grid.png"
    with stub_server() as server:
        result = CliRunner().invoke(app, args(server.url, out, "--grid", str(png)))
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(png))
    assert grid.shape == grid_size(10, K, tile=16)[::-1]  # ten digit classes
    data = load_images("digits", size=16, channels=1)
    first = int(np.flatnonzero(data.labels == 3)[0])  # row 3: the first 3
    side = 16 * GRID_SCALE
    y, x = 3 * (side + GRID_SEP), side + GRID_GAP + side + GRID_SEP  # its candidate 1
    tile = grid[y : y + side : GRID_SCALE, x : x + side : GRID_SCALE]
    np.testing.assert_array_equal(tile, stub_positive(data.images[first], 1)[..., 0])


def test_every_row_comes_from_the_model_the_file_names(tmp_path: Path) -> None:
    """A pool of two models: the bank is pinned to the one its metadata records."""
    out = tmp_path / "pos.npy"
    with (
        stub_server(STUB_FINGERPRINT="model-a") as a,
        stub_server(STUB_FINGERPRINT="model-b") as b,
    ):
        result = CliRunner().invoke(app, args(f"{a.url},{b.url}", out, "--batch-size", "64"))
        assert result.exit_code == 0, result.output
        model = json.loads(meta_path(out).read_text())["model"]
        other = b if model == "model-a" else a
        assert model in ("model-a", "model-b") and counters(other)["items"] == 0
    check_complete(out)


def test_generate_resumes_after_being_killed(tmp_path: Path) -> None:
    out = tmp_path / "pos.npy"
    with stub_server(STUB_DELAY_S="0.3") as server:
        cmd = [
            sys.executable,
            "-m",
            "clsp_positives.cli",
            *args(server.url, out, "--batch-size", "100", "--in-flight", "1"),
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(Path.cwd())},
            start_new_session=True,
        )
        try:
            end = time.monotonic() + 60  # bound only
            while not (progress_path(out).exists() and np.load(progress_path(out)).sum() >= 300):
                assert proc.poll() is None and time.monotonic() < end, "no progress"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        done = np.load(progress_path(out))
        assert 300 <= done.sum() < len(done)
        served = counters(server)["items"]
        # The old flag names are the same options: the run continues.
        rerun = args(server.url, out, "--batch-size", "500", old_names=True)
        result = CliRunner().invoke(app, rerun)
        assert result.exit_code == 0, result.output
        redone = counters(server)["items"] - served
        assert redone == (len(done) - done.sum()) * K  # only the missing rows were asked for
    check_complete(out)


def test_generate_with_the_pool_down_fails_clearly_and_keeps_progress(tmp_path: Path) -> None:
    out = tmp_path / "pos.npy"
    result = CliRunner().invoke(
        app, args(f"http://127.0.0.1:{free_port()}", out, "--timeout-s", "2")
    )
    assert result.exit_code == 1
    assert "clsp generate:" in result.output and "GET /v1/model" in result.output
    with stub_server(STUB_FAIL_STATUS="503") as server:
        result = CliRunner().invoke(app, args(server.url, out))
    assert result.exit_code == 1 and "rerun to continue" in result.output
    assert progress_path(out).exists()


def test_generation_params_are_checked_before_the_pool_is_asked(tmp_path: Path) -> None:
    """The bounds are GenerationParams' own (via TrainConfig); the error names the flag."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: never reached
    result = CliRunner().invoke(app, args(url, tmp_path / "pos.npy", "--gen-eta", "2"))
    assert result.exit_code == 2
    assert "--gen-eta: Input should be less than or equal to 1" in result.output
