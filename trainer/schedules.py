"""What changes over a run, as pure functions of its position: the learning rate's share
of its peak and the CLSP weight's share of its value.

Both read only the optimizer step (and the run's shape), never a counter of their own:
a resumed run recomputes them from where it stands, so a checkpoint needs to carry
nothing for them (docs/design.md §8).
"""

from __future__ import annotations

import math
from typing import Literal

StepUnit = Literal["step", "epoch"]


def lr_share(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    schedule: Literal["cosine", "constant"],
    unit: StepUnit = "step",
    warmup_start: float | None = None,
) -> float:
    """The learning rate at optimizer ``step`` (from 0) as a share of the peak.

    A linear warm-up, then cosine to 0 or constant. With ``unit="step"`` it moves every
    step: the warm-up from peak / warm-up steps (or ``warmup_start``, a share of the
    peak) to the peak at its last step. With ``unit="epoch"`` it moves once per epoch as
    the CLSP authors' scheduler does: warm-up epoch e (from 0) of W at start + e x
    (1 - start) / (W - 1), so the W-th epoch trains at the peak, then
    1/2 (1 + cos(pi (e - W) / (E - W))) (docs/method.md, "The authors' recipe").
    """
    if unit == "epoch":
        index, total, warmup = step // steps_per_epoch, epochs, int(warmup_epochs)
    else:
        index, total = step, epochs * steps_per_epoch
        warmup = int(warmup_epochs * steps_per_epoch)
    if index < warmup:
        if warmup_start is None:
            return (index + 1) / warmup
        if warmup == 1:
            return 1.0
        return warmup_start + index * (1.0 - warmup_start) / (warmup - 1)
    if schedule == "constant":
        return 1.0
    progress = (index - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def clsp_weight_share(step: int, *, steps_per_epoch: int, warmup_epochs: float) -> float:
    """The CLSP weight at optimizer ``step`` (from 0) as a share of its value: rising
    linearly from 0 at the first step to 1 after ``warmup_epochs`` epochs, then 1; 1
    throughout without a warm-up (the authors' constant weight)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, step / (warmup_epochs * steps_per_epoch))
