"""The learning rate's and the CLSP weight's schedules (trainer/schedules.py): ours per
step, the CLSP authors' per epoch from 1e-3 (docs/method.md, "The authors' recipe"), and
the CLSP weight's warm-up."""

from __future__ import annotations

import itertools
import math

import pytest

from clsp_positives.trainer.schedules import clsp_weight_share, lr_share

RUN = dict(steps_per_epoch=4, epochs=20, warmup_epochs=10, schedule="cosine")


def test_per_step_warmup_reaches_the_peak_at_its_last_step_then_cosine_to_zero() -> None:
    shares = [lr_share(s, **RUN) for s in range(80)]
    assert shares[0] == pytest.approx(1 / 40)
    assert shares[39] == 1.0
    assert shares[40] == pytest.approx(1.0)
    assert shares[60] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(shares[40:]))


def test_the_authors_per_epoch_warmup_starts_at_its_start_and_the_last_epoch_is_the_peak() -> None:
    peak, start = 0.5, 1e-3
    lr = [peak * lr_share(s, **RUN, unit="epoch", warmup_start=start / peak) for s in range(80)]
    per_epoch = lr[::4]
    assert all(lr[4 * e : 4 * e + 4] == [per_epoch[e]] * 4 for e in range(20))  # one per epoch
    assert per_epoch[0] == pytest.approx(start)
    assert per_epoch[1] == pytest.approx(start + (peak - start) / 9)
    assert per_epoch[9] == pytest.approx(peak)
    assert per_epoch[10] == pytest.approx(peak)  # the cosine's first epoch
    assert per_epoch[15] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_a_warmup_start_on_steps_and_a_constant_schedule() -> None:
    assert lr_share(0, **RUN, warmup_start=0.1) == pytest.approx(0.1)
    assert lr_share(39, **RUN, warmup_start=0.1) == pytest.approx(1.0)
    assert lr_share(79, **{**RUN, "schedule": "constant"}) == 1.0
    assert lr_share(0, **{**RUN, "warmup_epochs": 0}) == 1.0


def test_the_clsp_weight_rises_from_zero_over_its_epochs_then_stays() -> None:
    share = [clsp_weight_share(s, steps_per_epoch=4, warmup_epochs=2) for s in range(12)]
    assert share[0] == 0.0 and share[4] == pytest.approx(0.5) and share[8] == 1.0
    assert share[11] == 1.0
    assert clsp_weight_share(0, steps_per_epoch=4, warmup_epochs=0) == 1.0
