"""The collapse monitor on the CLSP authors' own logged curves (tests/data/authors_runs:
step, base loss and CLSP term of their released runs, docs/method.md "Training
dynamics"): their SimCLR-CLSP ResNet-50 runs collapse for the first ~5 % of training and
recover, their ResNet-18 runs never collapse, their MoCo-CLSP ResNet-50 dips in the CLSP
term only."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from clsp_positives.trainer.collapse_monitor import (
    Episode,
    Observation,
    find_episodes,
    infonce_collapsed,
    is_collapsed,
    nt_xent_collapsed,
    still_collapsed_late,
    summary_lines,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "authors_runs"
SIMCLR_BATCH, SIMCLR_STEPS_PER_EPOCH = 1024, 48  # 50000 CIFAR images / 1024, dropped last
MOCO_QUEUE, MOCO_STEPS_PER_EPOCH = 32768, 97  # recipes/cifar10-moco-clsp.yaml


def authors_observations(name: str, collapsed_value: float, steps_per_epoch: int) -> list:
    with (DATA / f"{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    base = next(k for k in rows[0] if k.startswith("loss_") and k != "loss_clsp")
    return [
        Observation(
            int(row["step"]) / steps_per_epoch,
            is_collapsed(float(row[base]), collapsed_value),
        )
        for row in rows
    ]


def simclr_episodes(name: str) -> list[Episode]:
    collapsed = nt_xent_collapsed(2 * SIMCLR_BATCH)
    return find_episodes(authors_observations(name, collapsed, SIMCLR_STEPS_PER_EPOCH))


@pytest.mark.parametrize(("dataset", "plateau_until"), [("cifar10", 45), ("cifar100", 12)])
def test_the_authors_simclr_resnet50_runs_collapse_once_early_and_recover(
    dataset: str, plateau_until: float
) -> None:
    (episode,) = simclr_episodes(f"simclr_clsp_{dataset}_resnet50")
    assert episode.recovered
    # From their second logged epoch, within the first ~5 % of their 1000 epochs.
    assert 1 <= episode.first <= 3
    assert plateau_until <= episode.last <= 50
    assert episode.recovered_at is not None and episode.recovered_at <= 55


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_the_authors_simclr_resnet18_runs_never_collapse(dataset: str) -> None:
    observations = authors_observations(
        f"simclr_clsp_{dataset}_resnet18",
        nt_xent_collapsed(2 * SIMCLR_BATCH),
        SIMCLR_STEPS_PER_EPOCH,
    )
    assert find_episodes(observations) == []
    # What one observation alone would have called a collapse: the chance-level loss of
    # the untrained network at its first logged steps.
    early = [o.epoch for o in observations if o.collapsed]
    assert all(epoch < 3 for epoch in early)


def test_the_authors_moco_resnet50_base_loss_never_reaches_its_collapsed_value() -> None:
    observations = authors_observations(
        "moco_clsp_cifar10_resnet50", infonce_collapsed(MOCO_QUEUE), MOCO_STEPS_PER_EPOCH
    )
    assert find_episodes(observations) == []


def test_collapsed_values_are_the_log_of_the_equal_logits() -> None:
    assert nt_xent_collapsed(2048) == pytest.approx(7.6241, abs=1e-4)  # their plateau
    assert infonce_collapsed(32768) == pytest.approx(math.log(32769))
    with pytest.raises(ValueError):
        nt_xent_collapsed(1)


def test_spread_embeddings_are_not_collapsed_whatever_the_loss() -> None:
    value = nt_xent_collapsed(256)
    assert is_collapsed(value * 1.005, value)
    assert not is_collapsed(value * 1.02, value)
    assert not is_collapsed(value, value, z_std=0.6, z_std_threshold=0.1)
    assert is_collapsed(value, value, z_std=0.05, z_std_threshold=0.1)
    assert not is_collapsed(math.nan, value)


def test_episodes_are_runs_of_collapsed_points_with_their_recovery() -> None:
    flags = [False, True, True, True, False, True, False, True, True]
    points = [Observation(e, c) for e, c in enumerate(flags)]
    points[0] = Observation(0, True)  # an untrained network's loss: not judged
    assert find_episodes(points) == [Episode(1, 3, 4), Episode(7, 8, None)]
    assert find_episodes(points, min_observations=1)[1] == Episode(5, 5, 6)
    assert find_episodes(points, first_epoch=2) == [Episode(2, 3, 4), Episode(7, 8, None)]
    lines = summary_lines(find_episodes(points))
    assert lines == [
        "collapsed from epoch 1 to 3, recovered at epoch 4",
        "collapsed from epoch 7 to 8, still collapsed at the end",
    ]
    assert summary_lines([]) == ["no collapse episode"]


def test_only_a_collapse_past_a_quarter_of_training_is_late() -> None:
    ongoing = [Episode(2, 10, None)]
    assert not still_collapsed_late(ongoing, epoch=10, epochs=100)
    assert still_collapsed_late(ongoing, epoch=25, epochs=100)
    assert not still_collapsed_late([Episode(2, 10, 11)], epoch=50, epochs=100)
    assert not still_collapsed_late([], epoch=90, epochs=100)
