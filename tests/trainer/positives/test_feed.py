"""The feed that ``clsp train`` and ``PositivesStream`` share (trainer/positives/feed.py):
each epoch's candidate of every image, the trainer's look-ahead across epochs, the
library's defaults taken from ``TrainConfig``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.data.epochs import ShardedBatchSampler, epoch_candidates
from clsp_positives.trainer.positives.feed import (
    FeedSettings,
    PlannedFeed,
    open_feed,
    pinned_params,
)

PARAMS = GenerationParams(steps=3)


def bank(path: Path, n: int, k: int) -> str:
    """A bank whose positive of image i, candidate c, is filled with i * k + c."""
    table = (np.arange(n)[:, None] * k + np.arange(k)[None, :]).astype(np.uint8)
    np.save(path, np.broadcast_to(table[:, :, None, None, None], (n, k, 16, 16, 1)))
    return str(path)


def settings(**changes: Any) -> FeedSettings:
    return dataclasses.replace(FeedSettings.defaults(), **changes)


def test_the_planned_feed_stays_the_lookahead_ahead_across_epochs_with_each_epochs_candidates(
    tmp_path: Path,
) -> None:
    n, k, seed = 16, 4, 3
    npy = bank(tmp_path / "p.npy", n, k)
    sampler = ShardedBatchSampler(n, 4, seed=seed)  # 4 steps per epoch
    feed = open_feed(
        None, PARAMS, settings(seed=seed, k=k, lookahead=2, deadline_ms=0), size=n, offline_npy=npy
    )
    planned = PlannedFeed(feed, np.zeros((n, 16, 16, 1), np.uint8), sampler, epochs=2)
    try:
        for epoch in range(2):
            cands = epoch_candidates(seed, epoch, n, k)
            for step, idx in enumerate(sampler.plan(epoch).batches):
                got = planned.take(epoch, step)
                assert got.mask.all()
                assert got.images[:, 0, 0, 0].tolist() == (idx * k + cands[idx]).tolist()
                assert planned.submitted == min(epoch * 4 + step + 2, 7)  # never past the run
        assert planned.epoch_stats()["anchors"] == 2 * n
    finally:
        planned.close()


def test_a_batch_id_taken_in_any_order_of_indices_gets_those_indices_candidates(
    tmp_path: Path,
) -> None:
    """What PositivesStream relies on: any batch of indices, in a loader's own order."""
    n, k, seed = 10, 3, 5
    feed = open_feed(
        None, PARAMS, settings(seed=seed, k=k, deadline_ms=0), size=n,
        offline_npy=bank(tmp_path / "p.npy", n, k),
    )  # fmt: skip
    try:
        indices = np.array([9, 0, 4, 4])
        feed.submit(0, 2, indices, np.zeros((4, 16, 16, 1), np.uint8), steps_ahead=0)
        got = feed.take(0)
        cands = epoch_candidates(seed, 2, n, k)[indices]
        assert got.images[:, 0, 0, 0].tolist() == (indices * k + cands).tolist()
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\), got 3\.\.10"):
            feed.submit(1, 2, np.array([3, 10]), np.zeros((2, 16, 16, 1), np.uint8), steps_ahead=0)
    finally:
        feed.close()


def test_the_library_defaults_are_the_trainers() -> None:
    config = TrainConfig.model_construct()
    defaults = FeedSettings.defaults()
    assert defaults == FeedSettings.from_config(config)
    assert (defaults.lookahead, defaults.deadline_ms, defaults.k) == (
        TrainConfig.model_fields["prefetch"].default,
        TrainConfig.model_fields["positives_deadline_ms"].default,
        TrainConfig.model_fields["k"].default,
    )


def test_a_resumed_runs_pin_binds_unless_the_params_name_a_model_or_any_is_allowed() -> None:
    assert pinned_params(PARAMS, "m1", False).expect_model == "m1"
    named = PARAMS.model_copy(update={"expect_model": "m2"})
    assert pinned_params(named, "m1", False).expect_model == "m2"
    assert pinned_params(PARAMS, "m1", True).expect_model is None
