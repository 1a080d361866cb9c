"""What ``clsp train`` shows besides ``metrics.jsonl``: TensorBoard scalars and grids
(``--tensorboard``), and ``curves.png``, drawn from ``metrics.jsonl`` after every epoch.

The loop hands over what it has already computed (the step's loss terms and projection
spread, the prefetcher's counters, the epoch and evaluation records), so nothing is
measured twice and ``metrics.jsonl`` stays the record of the run (docs/training.md,
"What a run logs"). Only the main rank logs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clsp_positives.curves import CURVES_NAME, Panel, read_records, series, write_curves
from clsp_positives.tracking import TENSORBOARD_DIR, add_image, open_writer, summary_writer_class

if TYPE_CHECKING:
    from clsp_positives.trainer.config import TrainConfig
    from clsp_positives.trainer.methods import StepLoss
    from clsp_positives.trainer.positives.feed import PlannedFeed
    from clsp_positives.trainer.positives.pending import PositivesBatch

log = logging.getLogger("clsp.train")

GRID_ROWS = 8
"""Anchors in the epoch's grid (each beside its positive)."""
STEP_LOSSES = {"loss": "loss", "loss_base": "base", "loss_clsp": "clsp"}
"""Tag name -> the ``StepLoss`` field it logs (the names of the epoch record)."""


def check_tracking(config: TrainConfig) -> None:
    """Fail at the start of a run, not after it trained, when ``--tensorboard`` cannot
    write: no ``--out`` to write into, or no tensorboard package (the install command)."""
    if not config.tensorboard:
        return
    if config.out is None:
        raise ValueError("--tensorboard writes into --out DIR/tensorboard: give --out DIR")
    summary_writer_class()


class TrainTracker:
    """The TensorBoard writer of one run, and what it keeps for the epoch's grid."""

    def __init__(self, writer: Any, config: TrainConfig, steps_per_epoch: int) -> None:
        self.writer = writer
        self.log_every = config.log_every
        self.images_every = config.log_images_every
        self.steps_per_epoch = steps_per_epoch
        self._last: tuple[np.ndarray, PositivesBatch] | None = None

    @classmethod
    def open(
        cls, config: TrainConfig, out_dir: Path | None, *, steps_per_epoch: int, start_epoch: int
    ) -> TrainTracker | None:
        """The run's tracker, or None when it does not log to TensorBoard."""
        if not config.tensorboard or out_dir is None:
            return None
        first_step = start_epoch * steps_per_epoch + 1
        writer = open_writer(
            out_dir / TENSORBOARD_DIR, purge_step=first_step if start_epoch else None
        )
        writer.add_text("config", f"```\n{json.dumps(config.stored(), indent=2)}\n```", 0)
        return cls(writer, config, steps_per_epoch)

    def step(
        self,
        global_step: int,
        out: StepLoss,
        lr: float,
        feed: PlannedFeed | None,
        anchors: np.ndarray,
        positives: PositivesBatch | None,
    ) -> None:
        """After optimizer step ``global_step`` (1-based, counted over the run): the
        step's loss terms and spread, the learning rate and the positives' figures of
        the epoch so far, every ``log_every`` steps. Reading the loss waits for the
        device, so it happens only then."""
        if positives is not None:
            self._last = (anchors, positives)  # references only: the epoch's grid
        if global_step % self.log_every:
            return
        add = self.writer.add_scalar
        values = {tag: getattr(out, field) for tag, field in STEP_LOSSES.items()}
        values.update(z_std=out.z_std, z_std_positives=out.z_std_positives)
        for tag, value in values.items():
            if value is not None and math.isfinite(number := float(value.detach())):
                add(f"train/{tag}", number, global_step)
        add("train/lr", lr, global_step)
        if feed is not None:
            for tag, value in feed.running_stats().items():
                add(f"positives/{tag}", value, global_step)

    def epoch(self, record: dict[str, Any], evaluation: dict[str, Any] | None) -> None:
        """The epoch's record as ``metrics.jsonl`` has it (every number, all ranks'),
        the evaluation's numbers if one ran, and every ``log_images_every`` epochs a
        grid of anchors beside the positives of the epoch's last step that had one."""
        epoch = int(record["epoch"])
        at = (epoch + 1) * self.steps_per_epoch
        evaluated = evaluation or {}
        for key, value in record.items():
            if key not in evaluated and (number := _scalar(value)) is not None:
                self.writer.add_scalar(f"epoch/{key}", number, at)
        for key, value in evaluated.items():
            if (number := _scalar(value)) is not None:
                self.writer.add_scalar(f"eval/{key}", number, at)
        if self.images_every and (epoch + 1) % self.images_every == 0 and self._last:
            grid = positives_grid(*self._last)
            if grid is not None:
                add_image(self.writer, "positives/anchors_and_positives", grid, at)
        self._last = None
        self.writer.flush()

    def summary(self, lines: list[str], epochs: int) -> None:
        """The run's closing text (its collapse episodes, trainer/collapse_monitor.py)
        at its last step."""
        self.writer.add_text(
            "summary/collapse_episodes", "\n\n".join(lines), epochs * self.steps_per_epoch
        )

    def close(self) -> None:
        self.writer.close()


def _scalar(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def positives_grid(anchors: np.ndarray, positives: PositivesBatch) -> np.ndarray | None:
    """Up to ``GRID_ROWS`` anchors whose positive arrived, each beside it
    (clsp_positives/grid.py's layout); None when none arrived. A positive of another
    channel count is shown as it came: the grid goes to RGB for both."""
    from clsp_positives.grid import grid_image

    rows = np.flatnonzero(np.asarray(positives.mask, dtype=bool))[:GRID_ROWS]
    if rows.size == 0:
        return None
    shown, pos = np.asarray(anchors)[rows], positives.images[rows]
    if shown.shape[-1] != pos.shape[-1]:
        shown, pos = (np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in (shown, pos))
    return grid_image(shown, pos[:, None])


def train_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """The panels of ``curves.png`` from the records of ``metrics.jsonl``, over epochs
    (1-based); a resumed run's repeated epoch counts once, its last record."""
    epochs = {int(r["epoch"]): r for r in records if r.get("event") == "epoch" and "epoch" in r}
    evals = {int(r["epoch"]): r for r in records if r.get("event") == "eval" and "epoch" in r}
    rows = [{**r, "x": e + 1} for e, r in sorted(epochs.items())]
    eval_rows = [{**r, "x": e + 1} for e, r in sorted(evals.items())]
    with_clsp = any(r.get("loss_clsp") for r in rows)
    losses = ("loss", "loss_base", "loss_clsp") if with_clsp else ("loss",)
    accuracy_keys = sorted({k for r in eval_rows for k in r if k.endswith("_acc")})
    return [
        Panel("loss", tuple(series(k, rows, "x", k) for k in losses)),
        Panel("evaluation accuracy", tuple(series(k, eval_rows, "x", k) for k in accuracy_keys)),
        Panel(
            "projection spread (~1 healthy, 0 collapsed)",
            (
                series("z_std", rows, "x", "z_std"),
                series("positives", rows, "x", "z_std_positives"),
            ),
        ),
        Panel("learning rate (end of epoch)", (series("lr", rows, "x", "lr"),)),
        Panel(
            "positives",
            (
                series("arrived", rows, "x", "positive_fraction"),
                series("cache hits", rows, "x", "cache_hit_rate"),
            ),
        ),
        Panel("waiting for positives (s per epoch)", (series("wait", rows, "x", "wait_seconds"),)),
    ]


def write_train_curves(out_dir: Path, metrics_name: str = "metrics.jsonl") -> Path | None:
    """``DIR/curves.png`` from ``DIR/metrics.jsonl``. A drawing failure is logged, never
    raised: a picture must not end a long run."""
    metrics = out_dir / metrics_name
    if not metrics.is_file():
        return None
    try:
        return write_curves(
            train_panels(read_records(metrics)),
            out_dir / CURVES_NAME,
            title=f"clsp train: {out_dir.name}",
            x_label="epoch",
        )
    except Exception as exc:
        log.warning("could not draw %s: %s", out_dir / CURVES_NAME, exc)
        return None
