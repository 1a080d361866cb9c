"""The standard linear protocol (trainer/eval/linear_protocol.py): it learns a separable
problem, is a pure function of its seed, trains on views re-augmented every epoch and
never changes the backbone; and ``clsp train`` / ``clsp eval`` report its ``linear_acc``
beside the fast probe's ``probe_acc``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.trainer.data.augment import BatchAugment
from clsp_positives.trainer.data.epochs import channel_stats
from clsp_positives.trainer.eval.linear_protocol import (
    SOLO_LEARN,
    ProtocolSettings,
    decay_epochs,
    linear_protocol,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_BATCHES = ProtocolSettings(batch_size=32)


def _colour_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 RGB images whose class is their bright channel, with pixel noise: any crop or
    flip of an image keeps its class, and the channel means separate the classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    images = rng.integers(0, 60, size=(n, 8, 8, 3))
    images[np.arange(n), :, :, labels] += 150
    return images.astype(np.uint8), labels.astype(np.int64)


class _PooledBackbone(nn.Module):
    """Channel means through a random linear map and a BatchNorm: linear features,
    so the classes stay separable, with weights and running statistics to keep frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mix = nn.Linear(3, 6)
        self.norm = nn.BatchNorm1d(6)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.norm(self.mix(self.pool(x)))


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, BatchAugment]:
    train_x, train_y = _colour_classes(300, seed=0)
    test_x, test_y = _colour_classes(100, seed=1)
    mean, std = channel_stats(train_x)
    return train_x, train_y, test_x, test_y, BatchAugment(8, mean, std)


def test_the_schedule_is_solo_learns_steps_at_60_and_80_percent() -> None:
    assert decay_epochs(100) == [60, 80]
    assert decay_epochs(10) == [6, 8]
    assert decay_epochs(1) == [1]
    assert (SOLO_LEARN.lr, SOLO_LEARN.momentum, SOLO_LEARN.weight_decay) == (0.1, 0.9, 0.0)
    assert SOLO_LEARN.batch_size == 256 and SOLO_LEARN.crop_scale == (0.08, 1.0)


def test_learns_a_separable_problem_and_leaves_the_backbone_frozen() -> None:
    train_x, train_y, test_x, test_y, pre = _data()
    torch.manual_seed(0)
    backbone = _PooledBackbone()
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = linear_protocol(
        backbone, train_x, train_y, test_x, test_y, 3, pre, epochs=15, settings=SMALL_BATCHES
    )
    assert result.accuracy > 0.95, result
    assert result.losses[-1] < result.losses[0]
    assert len(result.losses) == 15 and result.predictions.shape == (100,)
    # Frozen: every weight and running statistic bitwise the same, every forward in eval
    # mode, and the caller's mode given back.
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert backbone.modes and not any(backbone.modes)
    assert backbone.training
    assert all(p.grad is None for p in backbone.parameters())


def test_is_a_pure_function_of_its_seed() -> None:
    train_x, train_y, test_x, test_y, pre = _data()
    backbone = nn.Flatten()

    def run(seed: int):
        return linear_protocol(
            backbone, train_x, train_y, test_x, test_y, 3, pre, epochs=3, seed=seed
        )

    torch.manual_seed(1)
    a = run(0)
    torch.manual_seed(2)  # the global RNG plays no part
    state = torch.random.get_rng_state()
    b = run(0)
    assert torch.equal(torch.random.get_rng_state(), state)  # and is left alone
    assert a.losses == b.losses and torch.equal(a.predictions, b.predictions)
    assert run(1).losses != a.losses


def test_every_epoch_sees_new_crops_and_flips_of_the_same_images() -> None:
    train_x, train_y, test_x, test_y, pre = _data()
    seen: dict[int, torch.Tensor] = {}
    linear_protocol(
        nn.Flatten(),
        train_x,
        train_y,
        test_x,
        test_y,
        3,
        pre,
        epochs=2,
        on_epoch=lambda epoch, features: seen.__setitem__(epoch, features.clone()),
    )
    plain = pre.plain(torch.from_numpy(train_x)).flatten(1)
    assert seen[0].shape == seen[1].shape == plain.shape
    # Image by image (data set order), the two epochs' views differ from each other
    # and from the un-augmented image, for (nearly) every image.
    differs = (seen[0] - seen[1]).abs().amax(dim=1) > 1e-4
    assert differs.float().mean() > 0.95
    assert ((seen[0] - plain).abs().amax(dim=1) > 1e-4).float().mean() > 0.9
    # Only geometry changes: a crop and a flip never leave the image's value range.
    assert seen[0].min() >= plain.min() - 1e-4 and seen[0].max() <= plain.max() + 1e-4


def test_needs_an_epoch_and_labels() -> None:
    train_x, train_y, test_x, test_y, pre = _data()
    with pytest.raises(ValueError, match="at least 1 epoch"):
        linear_protocol(nn.Flatten(), train_x, train_y, test_x, test_y, 3, pre, epochs=0)
    with pytest.raises(ValueError, match="labelled"):
        linear_protocol(nn.Flatten(), train_x[:0], train_y[:0], test_x, test_y, 3, pre, epochs=1)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clsp_train_reports_linear_acc_at_the_end_and_probe_acc_at_every_evaluation(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    args = [
        "train", "--dataset", "digits", "--backbone", "resnet-tiny", "--proj-hidden-dim", "32",
        "--subset", "256", "--batch-size", "64", "--epochs", "2", "--eval-every", "1",
        "--linear-epochs", "3", "--probe-epochs", "10", "--knn-k", "20", "--device", "cpu",
        "--no-progress", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    final_line = result.output.strip().splitlines()[-1]
    assert final_line.startswith("final: linear accuracy ")
    assert "probe accuracy" in final_line and "kNN accuracy" in final_line

    records = _records(out)
    evals = [r for r in records if r["event"] == "eval"]
    # The per-epoch evaluation is the cheap one; the final one adds the standard protocol.
    assert [("linear_acc" in r, "probe_acc" in r, "knn_acc" in r) for r in evals] == [
        (False, True, True),
        (True, True, True),
    ]
    summary = records[-1]
    assert summary["event"] == "summary"
    assert 0.0 <= summary["linear_acc"] <= 1.0 and summary["probe_acc"] > 0.3
    assert f"linear {summary['linear_acc']:.2%} | probe" in result.output

    # clsp eval repeats the final evaluation, the protocol included, from the checkpoint.
    evaluated = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads(evaluated.output.strip().splitlines()[-1])
    assert again["linear_acc"] == pytest.approx(summary["linear_acc"])
    assert again["probe_acc"] == pytest.approx(summary["probe_acc"])
    skipped = CliRunner().invoke(
        app, ["eval", str(out), "--device", "cpu", "--linear-epochs", "0", "--json"]
    )
    assert skipped.exit_code == 0, skipped.output
    assert "linear_acc" not in json.loads(skipped.output.strip().splitlines()[-1])
