"""The collapse check of ``clsp train`` on digits with the tiny backbone, on
the CPU: a run pushed into collapse says so once (one terminal line, metrics.jsonl)
and a healthy baseline stays quiet."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from clsp_positives.images import load_images
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.train_loop import collapse_warning, train

N = 512
FAST = dict(
    dataset="digits", backbone="resnet-tiny", proj_hidden_dim=64, linear_epochs=2, knn_k=20,
    device="cpu", progress=False, subset=N, batch_size=64, epochs=3,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(config: TrainConfig) -> tuple[list[dict], list[str]]:
    lines: list[str] = []
    train(config, echo=lines.append)
    assert config.out is not None
    text = (Path(config.out) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()], lines


def _positives(tmp_path: Path) -> Path:
    """Offline positives that are honest ones: each image itself and its mirror."""
    images = load_images("digits").images[:N]
    npy = tmp_path / "positives.npy"
    np.save(npy, np.ascontiguousarray(np.stack([images, images[:, :, ::-1]], axis=1)))
    return npy


def test_the_similarity_term_with_a_large_weight_collapses_and_the_run_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The paper's similarity form collapses SimCLR on digits at weight 1 within
    # a few epochs of the full set; weight 10 gets there in 3 epochs of 512 images.
    config = TrainConfig(
        **FAST, clsp_weight=10, positives_npy=str(_positives(tmp_path)), k=2,
        positives_strict=True, out=str(tmp_path / "run"),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="clsp.train"):
        records, lines = _run(config)
    epochs = [r for r in records if r["event"] == "epoch"]
    spread = [r["z_std"] for r in epochs]
    assert spread[-1] < config.collapse_z_std < spread[0] and spread[-1] < spread[0] / 3
    assert all(r["z_std_positives"] == pytest.approx(r["z_std"], abs=0.05) for r in epochs)

    collapses = [r for r in records if r["event"] == "collapse"]
    assert len(collapses) == 1  # once per run, though later epochs stay collapsed
    first_low = next(r["epoch"] for r in epochs if r["z_std"] < config.collapse_z_std)
    assert collapses[0]["epoch"] == first_low
    assert collapses[0]["z_std"] == spread[first_low]
    assert collapses[0]["threshold"] == config.collapse_z_std
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1
    for knob in ("--clsp-weight", "--clsp-mode contrastive", "--temperature", "similarity"):
        assert knob in warnings[0]
    assert warnings[0] == f"warning: {collapses[0]['message']}"
    # Printed once on the terminal: no logger record as well (on the CLI, logging's
    # last-resort handler would print it a second time, on stderr).
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3 and all("z_std " in line for line in epoch_lines)
    # The monitor's episodes (trainer/collapse_monitor.py): the base loss sits at
    # log(2B - 1) with the spread low from the first collapsed epoch to the end.
    assert all(r["loss_collapsed"] == pytest.approx(np.log(2 * 64 - 1)) for r in epochs)
    flagged = [r["epoch"] + 1 for r in epochs if r["collapsed"]]
    assert flagged and flagged[-1] == 3
    (summary,) = [r for r in records if r["event"] == "summary"]
    (episode,) = summary["collapse_episodes"]
    assert episode["last"] == 3 and episode["recovered_at"] is None
    assert (
        f"collapse: collapsed from epoch {episode['first']} to 3, still collapsed at the end"
        in lines
    )


def test_a_healthy_baseline_does_not_warn(tmp_path: Path) -> None:
    # At temperature 0.5 this baseline's z_std is about 0.77; at the default 0.2
    # about 0.54 (both far from a collapse's ~0.07), so the margin below is kept
    # on the first.
    config = TrainConfig(**FAST, temperature=0.5, out=str(tmp_path / "run"))
    records, lines = _run(config)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert all(r["z_std"] > 3 * config.collapse_z_std for r in epochs)
    assert all("z_std_positives" not in r for r in epochs)
    assert not [r for r in records if r["event"] == "collapse"]
    assert not [line for line in lines if line.startswith("warning:")]
    assert not any(r["collapsed"] for r in epochs)
    assert [r["collapse_episodes"] for r in records if r["event"] == "summary"] == [[]]
    assert not [line for line in lines if line.startswith("collapse:")]


def test_an_early_dip_defers_what_to_try_and_a_late_one_says_it_now() -> None:
    similarity = TrainConfig(clsp_weight=1.0, epochs=100)
    early = collapse_warning({"epoch": 4, "z_std": 0.05}, similarity)
    assert early is not None and "first ~5% of training and recover" in early
    assert "still collapsed at epoch 25" in early
    late = collapse_warning({"epoch": 24, "z_std": 0.05}, similarity)
    assert late is not None and "recover" not in late
    assert "At 25 of 100 epochs, try a lower --clsp-weight" in late


def test_the_warning_names_the_likely_cause_and_zero_turns_it_off() -> None:
    record = {"epoch": 4, "z_std": 0.05, "z_std_positives": 0.5}
    similarity = TrainConfig(clsp_weight=1.0)
    message = collapse_warning(record, similarity)
    assert message is not None and "epoch 5" in message
    assert "z_std 0.050" in message and "z_std_positives" not in message
    assert "similarity CLSP term" in message
    baseline = collapse_warning(record, TrainConfig())
    assert baseline is not None and "similarity CLSP term" not in baseline
    assert "--temperature" in baseline
    assert collapse_warning(record, TrainConfig(collapse_z_std=0.0)) is None
    assert collapse_warning({"epoch": 0, "z_std": 0.9}, similarity) is None
