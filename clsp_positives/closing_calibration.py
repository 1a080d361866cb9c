"""The calibration that ends ``clsp diffusion train``: the generation settings a freshly
trained model keeps the anchor's class with, measured and stored beside its weights.

A small model sampled with the authors' settings keeps its anchor's class a third of
the time; with x0 clipped and the anchor's low-resolution skips mixed in, most of the
time (docs/method.md, "Positive quality"). Which weight is best depends on the model,
so training measures it: ``clsp calibrate --write`` against a ``clsp serve`` of the new
model, the same commands a user runs by hand (docs/training.md, "Choosing w: clsp
calibrate"), and the chosen setting lands in the model folder's ``clsp_generation.json``
for every pool of the model to apply (docs/design.md §6).

It sits at the package's root, beside the demo, because it joins the two sides: the
service's training and the trainer's ``clsp calibrate`` (docs/design.md §3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clsp_positives.proto.model_settings import GENERATION_DEFAULTS_FILE
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.ddpm.config import DiffusionTrainConfig

CALIBRATION_DIR = "calibration"
"""Where in the model folder the calibration's table, plot and service log go."""

BASE = GenerationParams(sampling="authors-clipped", interpolate="bottleneck+low-skips")
"""What every setting of the grid shares: the sampling that keeps small models' classes
(docs/method.md, "Positive quality"); every field is passed explicitly, so a file left by
an earlier calibration never changes what is measured."""

WEIGHTS = (0.1, 0.3, 0.5)
"""The grid's interpolation weights: the paper's, and the two above it between which
small models' most diverse class-keeping weight lay (docs/method.md)."""

STEPS = (50,)
"""Sampling steps measured: half the authors' 100, the most docs/method.md measured on
small models (25 steps kept the class 0.04-0.10 less often)."""

ANCHORS = 200
"""Held-out anchors per setting: class kept within about ±0.05 (a binomial's 95% half
width at 0.85)."""


def calibrate_args(config: DiffusionTrainConfig, model_dir: Path, url: str) -> list[str]:
    """``clsp calibrate``'s arguments for the model just trained, served at ``url``."""
    from clsp_positives.options import flag
    from clsp_positives.trainer.positive_tools.calibrate_cli import CALIBRATED

    args = [
        "calibrate",
        "--dataset",
        config.dataset,
        "--positives",
        url,
        "--out",
        str(model_dir / CALIBRATION_DIR),
        "--write",
        "--model-dir",
        str(model_dir),
        "--interpolation-weight",
        ",".join(f"{w:g}" for w in WEIGHTS),
        "--gen-steps",
        ",".join(str(s) for s in STEPS),
        "--anchors",
        str(ANCHORS),
        "--budget",
        f"{config.calibrate_minutes * 60:g}",
        "--no-progress",
    ]
    for option, name in CALIBRATED.names.items():
        value, named = getattr(BASE, name), flag(option)
        if isinstance(value, bool):
            args.append(named if value else "--no-" + named[2:])
        elif value is not None:
            args += [named, str(value)]
    if config.data_root is not None:
        args += ["--data-root", config.data_root]
    if config.image_size is not None:
        args += ["--image-size", str(config.image_size)]
    return args


def calibrate_trained(
    config: DiffusionTrainConfig, model_dir: Path, *, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Serve ``model_dir``, run the calibration against it, and return what it stored
    (the file's content), or None when it could not run; ``say`` gets every line of it
    and, on failure, how to run it by hand. Training's result stands either way."""
    import importlib.util
    import json

    from clsp_positives.local_service import LocalServiceError, ServiceProcess
    from clsp_positives.threads import resolve_threads

    if importlib.util.find_spec("sklearn") is None:
        say(
            "calibration skipped: clsp calibrate needs the trainer extra (pip install "
            "'clsp-positives[trainer]'); the model is saved, calibrate it where that is installed"
        )
        return None
    folder = model_dir / CALIBRATION_DIR
    service = ServiceProcess(
        model_dir,
        log_path=folder / "service.log",
        device=config.device,
        threads=resolve_threads(config.threads, at_most=8),
    )
    by_hand = (
        f"clsp serve --model {model_dir} --port 8000, then, once it is ready, clsp calibrate "
        f"--dataset {config.dataset} --positives http://127.0.0.1:8000 --out {folder} "
        f"--write --model-dir {model_dir}"
    )
    try:
        service.start()
        args = calibrate_args(config, model_dir, service.url)
        done = subprocess.run(
            [sys.executable, "-m", "clsp_positives.cli", *args],
            # Wide enough that the CLI never wraps an error inside a phrase.
            env={**os.environ, "COLUMNS": "1000"},
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
    except LocalServiceError as exc:
        say(f"calibration skipped: {exc}\nrun it by hand: {by_hand}")
        return None
    finally:
        service.stop()
    for line in done.stdout.splitlines():
        say(line)
    if done.returncode != 0:
        reason = message(done.stderr) or f"clsp calibrate exited with {done.returncode}"
        say(f"calibration skipped: {reason}\nrun it by hand: {by_hand}")
        return None
    return json.loads((model_dir / GENERATION_DEFAULTS_FILE).read_text())


def message(stderr: str) -> str:
    """A command's error text without the box its CLI draws around it."""
    lines = (line.strip(" │╭╮╰╯─\t") for line in stderr.splitlines())
    return " ".join(line for line in lines if line and not line.startswith("Usage:"))
