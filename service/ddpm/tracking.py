"""What ``clsp diffusion train`` logs beside the model: ``metrics.jsonl`` (one record per
logging window, the window the progress bar shows), ``curves.png`` drawn from it at the
end, and with ``--tensorboard`` the same scalars and sample grids as TensorBoard events.

The records accumulate over resumed runs of the same ``--out``, so the curves cover
the whole training (docs/training.md, "What a run logs").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clsp_positives.curves import CURVES_NAME, Panel, read_records, series, write_curves
from clsp_positives.tracking import TENSORBOARD_DIR, add_image, open_writer, summary_writer_class

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
OPTION = "--tensorboard"


def check_tracking(tensorboard: bool) -> None:
    """Before the data and the model: a run that asks for TensorBoard without the
    package fails at once, naming the install command."""
    if tensorboard:
        summary_writer_class(OPTION)


class DiffusionLog:
    """The run's ``metrics.jsonl`` and, when asked, its TensorBoard writer."""

    def __init__(self, out: Path, *, tensorboard: bool, start_step: int) -> None:
        self.out = out
        self.path = out / METRICS_FILE
        out.mkdir(parents=True, exist_ok=True)
        self.writer = (
            open_writer(
                out / TENSORBOARD_DIR,
                purge_step=start_step + 1 if start_step else None,
                option=OPTION,
            )
            if tensorboard
            else None
        )
        self.sampled_at: int | None = None
        self.write({"event": "start", "step": start_step})

    @property
    def wants_samples(self) -> bool:
        """Sample grids cost DDIM sampling: only a run that logs them makes them."""
        return self.writer is not None

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def window(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        """One logging window: its mean loss, the learning rate and the speed at its end."""
        record = {"step": step, "loss": loss, "lr": lr, "images_per_s": images_per_s}
        self.write({"event": "window", **record})
        if self.writer is not None:
            for key in ("loss", "lr", "images_per_s"):
                self.writer.add_scalar(f"train/{key}", record[key], step)

    def quality(self, step: int, scores: Mapping[str, float]) -> None:
        """One FID/KID evaluation of the EMA model's samples (docs/training.md, "Sample
        quality: FID and KID"): a ``quality`` record, and ``quality/KEY`` scalars."""
        self.write({"event": "quality", "step": step, **scores})
        if self.writer is not None:
            for key, value in scores.items():
                self.writer.add_scalar(f"quality/{key}", value, step)
            self.writer.flush()

    def samples(self, step: int, grid: np.ndarray | None) -> None:
        """A grid of the EMA model's samples (``samples.png``'s layout) at ``step``."""
        if self.writer is None or grid is None or self.sampled_at == step:
            return
        add_image(self.writer, "samples", grid, step)
        self.writer.flush()
        self.sampled_at = step

    def close(self) -> Path | None:
        """Close the writer and draw ``curves.png``; a drawing failure is only logged."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        try:
            return write_curves(
                diffusion_panels(read_records(self.path)) if self.path.is_file() else [],
                self.out / CURVES_NAME,
                title=f"clsp diffusion train: {self.out.name}",
                x_label="step",
            )
        except Exception as exc:
            log.warning("could not draw %s: %s", self.out / CURVES_NAME, exc)
            return None


def diffusion_panels(records: list[dict[str, Any]]) -> list[Panel]:
    """``curves.png``'s panels from the window records, over optimizer steps. A run
    resumes from its last checkpoint: what a stopped run logged past it is dropped at
    the resumed run's start record, so the steps it trains again count once."""
    windows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("event") == "start":
            windows = {s: w for s, w in windows.items() if s <= int(r.get("step", 0))}
        elif r.get("event") == "window" and "step" in r:
            windows[int(r["step"])] = r
    rows = [windows[s] for s in sorted(windows)]
    return [
        Panel("loss (mean over a logging window)", (series("loss", rows, "step", "loss"),)),
        Panel("learning rate", (series("lr", rows, "step", "lr"),)),
        Panel("images per second", (series("images/s", rows, "step", "images_per_s"),)),
    ]
