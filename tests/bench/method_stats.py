"""The statistics of the method benchmark (``tests/bench/method.py``), as pure functions.

Every arm trains with the same seeds as the baseline, so a seed's difference to the
baseline cancels what the seed alone does (its initialisation, data order and views);
the mean of those paired differences, with a t interval over the seeds, says whether an
arm's effect is larger than the seed-to-seed noise (docs/method.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("linear_acc", "knn_acc")


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval; ``low``/``high`` are None below two values."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class ArmSummary:
    """One arm over its seeds, and its paired difference to the baseline per metric."""

    arm: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    diff: dict[str, Interval | None]  # None for the baseline itself or with no shared seed
    diffs_by_seed: dict[str, dict[int, float]]
    collapsed_seeds: list[int]
    z_std: float | None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided t confidence interval of ``values`` (independent draws, here one
    paired difference per seed): mean +- t(n - 1) * sd / sqrt(n)."""
    from scipy.stats import t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean, sd = mean_std(values)
    n = len(values)
    if n < 2:
        return Interval(mean, None, None, n)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_differences(
    runs: Iterable[Mapping[str, Any]], arm: str, baseline: str, metric: str
) -> dict[int, float]:
    """``arm - baseline`` of ``metric`` for every seed both arms ran, by seed."""
    by_arm: dict[str, dict[int, float]] = {arm: {}, baseline: {}}
    for run in runs:
        if run["arm"] in by_arm:
            by_arm[run["arm"]][int(run["seed"])] = float(run[metric])
    shared = sorted(set(by_arm[arm]) & set(by_arm[baseline]))
    return {s: by_arm[arm][s] - by_arm[baseline][s] for s in shared}


def summarise(
    runs: Sequence[Mapping[str, Any]],
    *,
    baseline: str = "baseline",
    confidence: float = 0.95,
) -> list[ArmSummary]:
    """Per arm (in the order they first appear): mean and std of each metric over seeds,
    the paired difference to ``baseline`` with its t interval, and the seeds whose run
    warned of a collapse. ``runs`` are dicts with arm, seed, linear_acc, knn_acc, collapsed
    and optionally z_std."""
    arms = list(dict.fromkeys(run["arm"] for run in runs))
    out = []
    for arm in arms:
        mine = [run for run in runs if run["arm"] == arm]
        mean, std, diff, by_seed = {}, {}, {}, {}
        for metric in METRICS:
            mean[metric], std[metric] = mean_std([float(r[metric]) for r in mine])
            by_seed[metric] = (
                paired_differences(runs, arm, baseline, metric) if arm != baseline else {}
            )
            values = list(by_seed[metric].values())
            diff[metric] = t_interval(values, confidence) if values else None
        z = [float(r["z_std"]) for r in mine if r.get("z_std") is not None]
        out.append(
            ArmSummary(
                arm=arm,
                seeds=sorted(int(r["seed"]) for r in mine),
                mean=mean,
                std=std,
                diff=diff,
                diffs_by_seed=by_seed,
                collapsed_seeds=sorted(int(r["seed"]) for r in mine if r.get("collapsed")),
                z_std=mean_std(z)[0] if z else None,
            )
        )
    return out
