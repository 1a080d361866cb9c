"""TensorBoard event files, for the runs that ask for them (``--tensorboard``).

tensorboard is an optional extra (``tracking``): nothing imports it until a run asks
for logging, and a run that asks without it installed fails before it trains, with the
command that installs it, rather than after an hour of training. ``clsp train``
(trainer/tracking.py) and ``clsp diffusion train`` (service/ddpm/train.py) both open
their writer here, so this module imports neither side (docs/design.md §3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"
"""The event files' folder inside a run's output directory."""
INSTALL = 'pip install "clsp-positives[tracking]"'


class TrackingUnavailable(ValueError):
    """Logging was asked for, but the tensorboard package is not installed.

    A ValueError, like the other option errors the commands turn into one line."""


def summary_writer_class(option: str = "--tensorboard") -> Any:
    """torch's ``SummaryWriter``, imported now; ``TrackingUnavailable`` naming the install
    command when tensorboard is missing. Call it at the start of a run."""
    try:
        # torch's writer imports tensorboard itself; importing it first here makes a
        # missing package our clear error whether or not torch's module is loaded yet.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TrackingUnavailable(
            f"{option} needs the tensorboard package, which is not installed: {INSTALL}"
        ) from exc
    return SummaryWriter


def open_writer(
    log_dir: Path, *, purge_step: int | None = None, option: str = "--tensorboard"
) -> Any:
    """A ``SummaryWriter`` on ``log_dir``. ``purge_step``: a resumed run's first step,
    so that what a stopped run logged past its last checkpoint is hidden, not doubled."""
    writer_class = summary_writer_class(option)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return writer_class(log_dir=str(log_dir), purge_step=purge_step or None)


def add_image(writer: Any, tag: str, image: Any, step: int) -> None:
    """A uint8 ``[H, W]`` or ``[H, W, C]`` image (C = 1 or 3), as the grids are made."""
    hwc = image[..., None] if image.ndim == 2 else image
    writer.add_image(tag, hwc, step, dataformats="HWC")
