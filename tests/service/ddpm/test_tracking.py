"""``clsp diffusion train``'s log: metrics.jsonl over resumed runs, curves.png, and with
``--tensorboard`` TensorBoard events read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.curves import PANEL_HEIGHT, PANEL_WIDTH, TITLE_HEIGHT
from clsp_positives.service.ddpm.tracking import diffusion_panels
from clsp_positives.tracking import INSTALL

TINY = [
    "--preset", "tiny", "--batch-size", "16", "--threads", "1", "--no-progress",
    "--sample-count", "4", "--sample-steps", "2", "--lr-warmup", "2", "--no-calibrate",
]  # fmt: skip


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, ["diffusion", "train", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_tensorboard_logs_the_loss_and_sample_grids_and_curves_cover_a_resume(
    tmp_path: Path,
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ddpm"
    _run("--out", str(out), "--steps", "4", "--save-every", "2", "--tensorboard", *TINY)
    _run("--out", str(out), "--steps", "6", "--save-every", "2", "--tensorboard", *TINY)

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {"train/loss", "train/lr", "train/images_per_s"} <= set(events.Tags()["scalars"])
    # A logging window lasts ~2 s and ends at the latest at each run's last step.
    losses = events.Scalars("train/loss")
    steps = [e.step for e in losses]
    assert 4 in steps and steps[-1] == 6 and steps == sorted(set(steps))
    assert all(0 < e.value < 10 for e in losses)
    # A grid at every checkpoint, the final one counted once: 4 samples of 16x16, 2x2.
    grids = events.Images("samples")
    assert [g.step for g in grids] == [2, 4, 6]
    assert {(g.width, g.height) for g in grids} == {(32, 32)}

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "start"] == [0, 4]
    windows = [r for r in records if r["event"] == "window"]
    assert [r["step"] for r in windows] == steps
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in windows])

    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG"
        assert img.size == (2 * PANEL_WIDTH, TITLE_HEIGHT + 2 * PANEL_HEIGHT)


def test_without_tensorboard_only_the_log_and_curves_are_written(tmp_path: Path) -> None:
    out = tmp_path / "ddpm"
    _run("--out", str(out), "--steps", "2", *TINY)
    assert not (out / "tensorboard").exists()
    assert (out / "metrics.jsonl").is_file()
    with Image.open(out / "curves.png") as img:
        img.verify()


def test_tensorboard_without_the_package_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "ddpm"
    result = CliRunner().invoke(
        app, ["diffusion", "train", "--out", str(out), "--steps", "2", "--tensorboard", *TINY]
    )
    assert result.exit_code == 2, result.output
    assert "--tensorboard needs the tensorboard package" in result.output
    assert INSTALL in result.output
    assert not (out / "train_state.pt").exists()


def test_a_resume_from_an_earlier_checkpoint_replaces_what_followed_it() -> None:
    records = [
        {"event": "start", "step": 0},
        {"event": "window", "step": 100, "loss": 0.5},
        {"event": "window", "step": 200, "loss": 0.4},
        {"event": "window", "step": 300, "loss": 0.3},  # stopped at 320, saved at 200
        {"event": "start", "step": 200},
        {"event": "window", "step": 250, "loss": 0.35},
    ]
    loss = diffusion_panels(records)[0].series[0]
    assert loss.points == ((100.0, 0.5), (200.0, 0.4), (250.0, 0.35))
