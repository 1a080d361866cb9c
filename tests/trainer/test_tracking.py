"""What ``clsp train`` logs besides metrics.jsonl: TensorBoard event files read back with
TensorBoard's own reader, ``curves.png``, and the error of a run that asks for TensorBoard
without the package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.curves import (
    COLUMNS,
    PANEL_HEIGHT,
    PANEL_WIDTH,
    TITLE_HEIGHT,
    read_records,
    write_curves,
)
from clsp_positives.images import load_images
from clsp_positives.tracking import INSTALL
from clsp_positives.trainer.positives.pending import PositivesBatch
from clsp_positives.trainer.tracking import positives_grid, train_panels

FAST = [
    "--dataset", "digits", "--backbone", "resnet-tiny", "--proj-hidden-dim", "32",
    "--linear-epochs", "2", "--knn-k", "10", "--device", "cpu", "--no-progress",
]  # fmt: skip
N, BATCH = 64, 16  # 4 steps per epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.fixture
def positives_npy(tmp_path: Path) -> Path:
    """K = 2 offline positives per image: the image and its mirror."""
    images = load_images("digits").images[:N]
    path = tmp_path / "positives.npy"
    np.save(path, np.ascontiguousarray(np.stack([images, images[:, :, ::-1]], axis=1)))
    return path


def test_tensorboard_logs_steps_epochs_evaluations_and_a_grid(
    tmp_path: Path, positives_npy: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = [
        "train", *FAST, "--subset", str(N), "--batch-size", str(BATCH), "--epochs", "2",
        "--eval-every", "1", "--clsp-weight", "0.5", "--positives-npy", str(positives_npy),
        "--k", "2", "--positives-strict", "--out", str(out),
        "--tensorboard", "--log-every", "3", "--log-images-every", "2",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    step_tags = {f"train/{t}" for t in ("loss", "loss_base", "loss_clsp", "z_std", "lr")}
    step_tags |= {f"positives/{t}" for t in ("positive_fraction", "cache_hit_rate")}
    step_tags |= {"positives/wait_seconds", "train/z_std_positives"}
    assert step_tags <= scalars, sorted(scalars)
    # Every third of the run's 8 optimizer steps.
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]
    assert all(np.isfinite(e.value) and e.value > 0 for e in events.Scalars("train/loss"))
    assert [e.value for e in events.Scalars("positives/positive_fraction")] == [1.0, 1.0]

    records = _records(out)
    epochs = [r for r in records if r["event"] == "epoch"]
    evals = [r for r in records if r["event"] == "eval"]
    # The epoch records as metrics.jsonl has them, at the step that ends each epoch.
    logged = events.Scalars("epoch/loss")
    assert [e.step for e in logged] == [4, 8]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in epochs])
    assert "epoch/linear_acc" not in scalars, "evaluation numbers go under eval/"
    # Every numeric key each evaluation returned, whatever it is called, at its epoch's end.
    assert len(evals) == 2 and "knn_acc" in evals[0]
    for key in {k for r in evals for k in r} - {"event", "epoch"}:
        logged = events.Scalars(f"eval/{key}")
        assert [e.step for e in logged] == [4 * (r["epoch"] + 1) for r in evals if key in r]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in evals if key in r])

    # One grid, at the second epoch: 8 anchors, each beside its positive.
    assert events.Tags()["images"] == ["positives/anchors_and_positives"]
    (grid,) = events.Images("positives/anchors_and_positives")
    assert grid.step == 8
    assert (grid.width, grid.height) == (2 * 64 + 8, 8 * 64 + 7 * 2)

    assert "config" in " ".join(events.Tags()["tensors"])
    # The run's collapse episodes as text at its last step, and its flags per epoch.
    (text,) = events.Tensors("summary/collapse_episodes/text_summary")
    assert text.step == 8 and b"collapse episode" in text.tensor_proto.string_val[0]
    assert [e.value for e in events.Scalars("epoch/collapsed")] == [r["collapsed"] for r in epochs]
    width, height = _png_size(out / "curves.png")
    assert (width, height) == (COLUMNS * PANEL_WIDTH, TITLE_HEIGHT + 3 * PANEL_HEIGHT)


def test_a_baseline_run_draws_its_curves_without_tensorboard(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *FAST, "--subset", str(N), "--batch-size", str(BATCH), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out / "tensorboard").exists()
    # loss, accuracy, spread and learning rate; no positives, so no positives panels.
    assert _png_size(out / "curves.png") == (2 * PANEL_WIDTH, TITLE_HEIGHT + 2 * PANEL_HEIGHT)


def test_tensorboard_without_the_package_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    out = tmp_path / "run"
    args = ["train", *FAST, "--subset", str(N), "--batch-size", str(BATCH), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--tensorboard"])
    assert result.exit_code == 2, result.output
    assert "--tensorboard needs the tensorboard package" in result.output
    assert INSTALL in result.output
    assert not (out / "metrics.jsonl").exists(), "the run started before failing"


def test_tensorboard_without_out_is_refused(tmp_path: Path) -> None:
    args = ["train", *FAST, "--subset", str(N), "--batch-size", str(BATCH), "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--tensorboard"])
    assert result.exit_code == 2
    assert "--tensorboard writes into --out DIR/tensorboard" in result.output


def test_importing_the_trainers_imports_no_tensorboard() -> None:
    code = (
        "import sys, clsp_positives.trainer.train_loop, clsp_positives.service.ddpm.train\n"
        "print(sorted(m for m in sys.modules if 'tensorboard' in m))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]"


def test_panels_count_a_resumed_epoch_once_and_show_every_accuracy() -> None:
    records = [
        {"event": "start"},
        {"event": "epoch", "epoch": 0, "loss": 3.0, "loss_clsp": 0.0, "lr": 0.1, "z_std": 0.9},
        {"event": "epoch", "epoch": 1, "loss": 9.0, "loss_clsp": 0.0, "lr": 0.1, "z_std": 0.9},
        {"event": "start"},  # resumed from the checkpoint of epoch 0: epoch 1 again
        {"event": "epoch", "epoch": 1, "loss": 2.0, "loss_clsp": 0.0, "lr": 0.1, "z_std": 0.8},
        {"event": "eval", "epoch": 1, "linear_acc": 0.5, "knn_acc": 0.4, "probe_acc": 0.6},
    ]
    panels = {p.title: p for p in train_panels(records)}
    (loss,) = panels["loss"].series  # a baseline: no CLSP term to show
    assert loss.points == ((1.0, 3.0), (2.0, 2.0))
    accuracy = {s.name: s.points for s in panels["evaluation accuracy"].series}
    assert accuracy == {
        "knn_acc": ((2.0, 0.4),),
        "linear_acc": ((2.0, 0.5),),
        "probe_acc": ((2.0, 0.6),),
    }
    assert not any(s.points for s in panels["positives"].series)


def test_curves_of_a_log_cut_short_and_of_an_empty_one(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"event": "epoch", "epoch": 0, "loss": 1.0}\n{"event": "epo')
    assert read_records(log) == [{"event": "epoch", "epoch": 0, "loss": 1.0}]
    one = write_curves(train_panels(read_records(log)), tmp_path / "a.png", title="t", x_label="x")
    assert _png_size(one) == (PANEL_WIDTH, TITLE_HEIGHT + PANEL_HEIGHT)
    empty = write_curves([], tmp_path / "b.png", title="t", x_label="x")
    assert _png_size(empty)[1] == TITLE_HEIGHT + PANEL_HEIGHT


def test_the_grid_shows_only_arrived_positives_and_goes_rgb_for_mixed_channels() -> None:
    anchors = np.full((4, 16, 16, 1), 10, np.uint8)
    images = np.full((4, 16, 16, 3), 200, np.uint8)
    none = PositivesBatch(images=images, mask=np.zeros(4, bool), cache_hits=0)
    assert positives_grid(anchors, none) is None
    two = PositivesBatch(images=images, mask=np.array([0, 1, 0, 1], bool), cache_hits=0)
    grid = positives_grid(anchors, two)
    assert grid.shape == (2 * 64 + 2, 2 * 64 + 8, 3)
    assert grid[0, 0].tolist() == [10, 10, 10] and grid[0, -1].tolist() == [200, 200, 200]
