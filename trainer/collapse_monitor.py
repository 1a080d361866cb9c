"""Collapse episodes: when a run's projections collapsed, and whether they came back.

The CLSP authors' own ResNet-50 runs collapse for the first ~5% of training (SimCLR's
loss sits at log(2B - 1), the CLSP term at 0) and then recover and end above the
baseline (docs/method.md, "Training dynamics"). A warning on the dip alone would call
those runs failures, so a run is judged by its episodes: a collapse that recovered is
a transient, one still there at the end is lasting.

The flag reads a signal the authors' logs carry too: the base loss at its collapsed
value, which for a contrastive loss is the log of the number of candidates each row is
normalised over (every logit equal). Where the embeddings' spread (``z_std``) is known
it must be low as well: an untrained network's loss is at that value too, but its
embeddings are spread. Pure functions, no torch: the tests feed the authors' logged
curves through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REL_TOL = 0.01
"""How close to its collapsed value the base loss must be (relative): 1 %. The authors'
collapsed ResNet-50 runs sit within 0.01 % of log(2047); their healthy runs leave 1 %
within the first few epochs."""

MIN_OBSERVATIONS = 2
"""Collapsed observations in a row that make an episode: one alone is the chance-level
loss of a network that has barely learnt yet (the authors' ResNet-18 at its 100th step)."""

FIRST_EPOCH = 1.0
"""Observations before one whole epoch of training are not judged: an untrained
network's loss is at the collapsed value too (every run's step 0)."""

LATE_FRACTION = 0.25
"""A run still collapsed after this fraction of its epochs is past the authors' longest
episode (ResNet-50, recovered by 12.5 % of training) by a factor of two: only then is
the collapse worth acting on (docs/method.md, "Training dynamics")."""


@dataclass(frozen=True)
class Observation:
    """One point of a run: its epoch (fractional where logged per step) and whether the
    projections were collapsed then."""

    epoch: float
    collapsed: bool


@dataclass(frozen=True)
class Episode:
    """Consecutive collapsed observations: first and last collapsed epoch, and the epoch
    of the first healthy observation after them (None: still collapsed at the end)."""

    first: float
    last: float
    recovered_at: float | None

    @property
    def recovered(self) -> bool:
        return self.recovered_at is not None

    def describe(self) -> str:
        span = f"collapsed from epoch {_epoch(self.first)} to {_epoch(self.last)}"
        if self.recovered_at is None:
            return f"{span}, still collapsed at the end"
        return f"{span}, recovered at epoch {_epoch(self.recovered_at)}"


def _epoch(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


def nt_xent_collapsed(rows: int) -> float:
    """NT-Xent's value with every embedding equal: each of ``rows`` rows normalised over
    the ``rows - 1`` others, all logits equal (log(2B - 1) for SimCLR's 2B views)."""
    if rows < 2:
        raise ValueError(f"NT-Xent needs at least 2 rows, got {rows}")
    return math.log(rows - 1)


def infonce_collapsed(negatives: int, positives: int = 1) -> float:
    """MoCo's InfoNCE with every embedding equal: one positive among ``positives +
    negatives`` equal logits."""
    if negatives < 0 or positives < 1:
        raise ValueError(f"need negatives >= 0 and positives >= 1, got {negatives}, {positives}")
    return math.log(negatives + positives)


def is_collapsed(
    base_loss: float,
    collapsed_value: float,
    *,
    z_std: float | None = None,
    z_std_threshold: float | None = None,
    rel_tol: float = REL_TOL,
) -> bool:
    """The base loss within ``rel_tol`` of its collapsed value and, where both are
    given, the embeddings' spread below ``z_std_threshold``."""
    if not math.isfinite(base_loss):
        return False
    near = abs(base_loss - collapsed_value) <= rel_tol * abs(collapsed_value)
    if z_std is not None and z_std_threshold is not None:
        return near and z_std < z_std_threshold
    return near


def find_episodes(
    observations: Iterable[Observation],
    *,
    min_observations: int = MIN_OBSERVATIONS,
    first_epoch: float = FIRST_EPOCH,
) -> list[Episode]:
    """Maximal runs of at least ``min_observations`` collapsed observations from
    ``first_epoch`` on (epochs counted as epochs of training done), in epoch order, each
    with the epoch it recovered at (or None)."""
    points = sorted((o for o in observations if o.epoch >= first_epoch), key=lambda o: o.epoch)
    found: list[Episode] = []
    run: list[Observation] = []
    for point in [*points, None]:
        if point is not None and point.collapsed:
            run.append(point)
            continue
        if len(run) >= min_observations:
            recovered = None if point is None else point.epoch
            found.append(Episode(run[0].epoch, run[-1].epoch, recovered))
        run = []
    return found


def still_collapsed_late(episodes: Sequence[Episode], epoch: float, epochs: int) -> bool:
    """True when the last episode has not recovered and ``epoch`` is past
    ``LATE_FRACTION`` of the run: the point at which to change the setting."""
    return bool(episodes) and not episodes[-1].recovered and epoch >= LATE_FRACTION * epochs


def summary_lines(episodes: Sequence[Episode]) -> list[str]:
    """One line per episode for a run's summary; one line when there was none."""
    if not episodes:
        return ["no collapse episode"]
    return [episode.describe() for episode in episodes]
