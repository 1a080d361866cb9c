"""The method benchmark's statistics (tests/bench/method_stats.py) and its oracle bank: the
benchmark itself is too long for the suite, but what it concludes rests on these."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.bench.method import oracle_bank
from tests.bench.method_stats import mean_std, paired_differences, summarise, t_interval


def test_t_interval_matches_the_textbook_value() -> None:
    # mean 2, sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.mean == pytest.approx(2.0)
    assert iv.high - iv.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.mean - iv.low == pytest.approx(iv.high - iv.mean)
    assert iv.excludes_zero is False
    assert t_interval([1.0, 1.2, 0.9, 1.1]).excludes_zero is True


def test_a_single_value_has_no_interval() -> None:
    iv = t_interval([0.3])
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.3, None, None, 1)
    assert mean_std([0.3]) == (0.3, 0.0)


def test_differences_pair_by_seed_whatever_the_order_and_skip_unshared_seeds() -> None:
    runs = [
        {"arm": "baseline", "seed": 1, "knn_acc": 0.50},
        {"arm": "clsp", "seed": 0, "knn_acc": 0.70},
        {"arm": "baseline", "seed": 0, "knn_acc": 0.60},
        {"arm": "clsp", "seed": 1, "knn_acc": 0.55},
        {"arm": "clsp", "seed": 2, "knn_acc": 0.99},  # no baseline with seed 2
    ]
    diffs = paired_differences(runs, "clsp", "baseline", "knn_acc")
    assert diffs == pytest.approx({0: 0.10, 1: 0.05})


def test_summarise_reports_means_differences_and_collapsed_seeds() -> None:
    runs = [
        {"arm": a, "seed": s, "linear_acc": lin, "knn_acc": knn, "collapsed": c, "z_std": 1.0}
        for a, s, lin, knn, c in (
            ("baseline", 0, 0.90, 0.80, False),
            ("baseline", 1, 0.92, 0.82, False),
            ("sim", 0, 0.80, 0.60, True),
            ("sim", 1, 0.84, 0.64, False),
        )
    ]
    base, sim = summarise(runs)
    assert base.arm == "baseline" and base.diff["knn_acc"] is None
    assert sim.mean["linear_acc"] == pytest.approx(0.82)
    assert sim.std["knn_acc"] == pytest.approx(math.sqrt(0.0008))
    assert sim.diff["knn_acc"].mean == pytest.approx(-0.19)
    assert sim.diffs_by_seed["knn_acc"] == pytest.approx({0: -0.20, 1: -0.18})
    assert sim.collapsed_seeds == [0] and base.collapsed_seeds == []


def test_the_oracle_bank_holds_other_images_of_the_anchors_class_reproducibly() -> None:
    labels = np.array([0, 1, 0, 1, 2, 0, 1, 1, 2], dtype=np.int64)
    picks = oracle_bank(labels, k=4, seed=3)
    assert picks.shape == (len(labels), 4)
    assert (labels[picks] == labels[:, None]).all()
    assert not (picks == np.arange(len(labels))[:, None]).any()
    assert (oracle_bank(labels, k=4, seed=3) == picks).all()
    assert not (oracle_bank(labels, k=4, seed=4) == picks).all()
