"""``clsp demo``: the whole loop on one machine, in one command.

A newcomer's first run must show the product working end to end without a GPU,
a network or any file to fetch, so the demo wires the real pieces together on
the embedded default (scikit-learn's digits, 16x16):

1. a small DDPM, trained by ``clsp diffusion train`` in-process (or reused from a
   cache directory, where an earlier shorter run is continued rather than redone);
2. the generation service, ``clsp serve`` with its in-process cache, as a
   subprocess on a free loopback port (its own process group, always stopped);
3. K positives per training image, requested ahead through the pool client, so
   the sampler runs with full batches while nothing else competes for the CPU;
4. a baseline (CLSP weight 0) and a CLSP model (weight 1) trained in-process on
   the same budget and seed; the CLSP arm's prefetcher pulls its positives from
   the service (cache hits, since step 3 warmed the cache);
5. a table, ``results.json`` and a PNG grid of anchors beside their candidates.

Nothing heavy is imported at module import (``clsp --help`` stays instant).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from clsp_positives.grid import GRID_SCALE, grid_anchors, write_grid
from clsp_positives.local_service import LocalServiceError, ServiceProcess
from clsp_positives.proto.model_settings import GENERATION_DEFAULTS_FILE, as_pool_applies
from clsp_positives.proto.params import GenerationParams
from clsp_positives.threads import resolve_threads

if TYPE_CHECKING:
    from clsp_positives.service.ddpm.train import DiffusionTrainConfig
    from clsp_positives.trainer.config import TrainConfig

RESULTS_NAME = "results.json"
GRID_NAME = "positives-grid.png"
SAMPLES_NAME = "ddpm-samples.png"
POSITIVES_NAME = "positives.npy"
SERVICE_LOG = "service.log"
MODEL_MARKER = "demo-model.json"
CACHE_ENV = "CLSP_CACHE_DIR"
MAX_THREADS = 8
"""The most torch threads the demo takes when not told (clsp_positives/threads.py)."""


class DemoError(RuntimeError):
    """A stage of the demo failed; the message says which and what to look at."""


# ------------------------------------------------------------------ budgets


@dataclass(frozen=True)
class Budget:
    """How much of each stage one demo run does (chosen for 2 CPU cores)."""

    name: str
    ddpm_steps: int  # target optimizer steps of the cached DDPM (a resume continues to it)
    ddpm_minutes: float  # wall-clock cap of the DDPM stage in one run
    k: int  # K positives per training image (the trainer draws one per epoch)
    positives_minutes: float  # time for generating them; fewer candidates when it runs out
    # Sampling steps per positive; None: the model's stored setting (clsp_generation.json)
    gen_steps: int | None
    # Budget of the calibration that follows DDPM training and stores the model's
    # generation settings (clsp_positives/closing_calibration.py)
    calibrate_minutes: float
    epochs: int  # contrastive epochs, the same for both arms
    linear_epochs: int  # epochs of the standard linear protocol at the end (linear acc)
    grid_k: int  # candidates per anchor shown in the PNG
    # Two levels with attention at the 8x8 bottleneck: the config that kept the
    # anchor's class best in the quality search, and 4x cheaper per step than "small".
    ddpm_preset: str = "tiny"
    ddpm_batch: int = 64
    ddpm_lr: float = 2e-4
    ddpm_sample_count: int = 64
    ddpm_sample_steps: int = 25
    batch_size: int = 128
    backbone: str = "resnet-tiny"
    method: str = "simclr"
    # The positive as one more InfoNCE positive of the anchor: a short-budget choice. The
    # paper's similarity form (pull z1 to z3 with 2 - 2cos) collapses this small SimCLR
    # model at its second epoch and recovers only after about a tenth of a 200-epoch run,
    # as the authors' own ResNet-50 runs do; within the demo's 40 epochs it is still
    # behind (docs/method.md, "Training dynamics").
    clsp_mode: str = "contrastive"
    proj_hidden_dim: int = 256
    grid_rows: int = 10  # one anchor per digit class

    def positives_params(self, k: int | None = None) -> GenerationParams:
        """What the demo asks of its service: the candidates, and the steps when the budget
        says; the model's calibrated settings decide the rest (the weight, the sampling
        mode, what of the anchor is mixed in: docs/method.md, "Positive quality")."""
        steps = {} if self.gen_steps is None else {"steps": self.gen_steps}
        return GenerationParams(k=k, **steps)


BUDGETS: dict[str, Budget] = {
    "full": Budget(
        name="full",
        ddpm_steps=2000,
        ddpm_minutes=6.0,
        k=2,
        positives_minutes=4.0,
        gen_steps=None,
        calibrate_minutes=2.0,
        epochs=40,
        linear_epochs=100,
        grid_k=8,
    ),
    "quick": Budget(
        name="quick",
        ddpm_steps=200,
        ddpm_minutes=1.5,
        k=1,
        positives_minutes=1.0,
        gen_steps=10,
        calibrate_minutes=0.05,  # its first setting only
        epochs=2,
        linear_epochs=20,
        grid_k=4,
        ddpm_sample_count=16,
        ddpm_sample_steps=10,
    ),
}


def default_cache_dir() -> Path:
    """``$CLSP_CACHE_DIR``, else ``$XDG_CACHE_HOME/clsp-positives``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "clsp-positives"


def _shown(path: Path) -> str:
    """A path for humans: relative to the working directory or to ~, never this machine's
    absolute layout (the output ends up pasted in docs)."""
    path = path.resolve()
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        with contextlib.suppress(ValueError):
            return prefix + str(path.relative_to(base.resolve()))
    return str(path)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind the stack like Ctrl-C does, so every ``finally`` (the one
    that stops the service above all) runs whichever way the demo is told to stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ stages


@dataclass
class ModelStage:
    dir: Path
    step: int
    seconds: float
    reused: bool
    preset: str


def ddpm_config(
    model_dir: Path, budget: Budget, *, seed: int, device: str, threads: int, progress: bool
) -> DiffusionTrainConfig:
    """The ``DiffusionTrainConfig`` of the demo's DDPM (recipes/digits-ddpm.yaml is the
    same run for ``clsp diffusion train --config``; a test keeps the two equal)."""
    from clsp_positives.service.ddpm.train import DiffusionTrainConfig

    return DiffusionTrainConfig(
        out=str(model_dir),
        dataset="digits",
        image_size=16,
        channels=1,
        preset=budget.ddpm_preset,
        steps=budget.ddpm_steps,
        minutes=budget.ddpm_minutes,
        batch_size=budget.ddpm_batch,
        lr=budget.ddpm_lr,
        lr_warmup=100,
        seed=seed,
        save_every=max(100, budget.ddpm_steps // 4),
        sample_count=budget.ddpm_sample_count,
        sample_steps=budget.ddpm_sample_steps,
        threads=threads,
        progress=progress,
        calibrate_minutes=budget.calibrate_minutes,
        # Older DiffusionTrainConfig versions train on the CPU only and have no device field.
        **({"device": device} if "device" in DiffusionTrainConfig.model_fields else {}),
    )


def ensure_model(
    cache_dir: Path,
    budget: Budget,
    *,
    device: str,
    threads: int,
    seed: int,
    progress: bool,
    retrain: bool,
    say: Callable[[str], None],
) -> ModelStage:
    """The cached DDPM when it has had at least this budget's steps; else train (resuming
    the cached run's state, so a quick run's model is continued, not thrown away)."""
    from clsp_positives.closing_calibration import calibrate_trained
    from clsp_positives.service.ddpm.train import train

    model_dir = cache_dir / "demo-model"
    marker = model_dir / MODEL_MARKER
    identity = {
        "dataset": "digits",
        "size": 16,
        "preset": budget.ddpm_preset,
        "batch_size": budget.ddpm_batch,
        "seed": seed,
    }
    config = ddpm_config(
        model_dir, budget, seed=seed, device=device, threads=threads, progress=progress
    )
    if retrain and model_dir.exists():
        shutil.rmtree(model_dir)
    done: dict[str, Any] = {}
    if marker.is_file():
        with contextlib.suppress(ValueError, OSError):
            done = json.loads(marker.read_text())
    if done and done.get("identity") != identity:
        say(f"the cached model in {_shown(model_dir)} was made with other options: retraining")
        shutil.rmtree(model_dir)
        done = {}
    if (
        done
        and int(done.get("target_steps", 0)) >= budget.ddpm_steps
        and (model_dir / "unet" / "config.json").is_file()
    ):
        say(
            f"reusing the DDPM in {_shown(model_dir)} ({done['step']} steps; --retrain to "
            "train a new one)"
        )
        if not (model_dir / GENERATION_DEFAULTS_FILE).is_file():  # cached before they were
            calibrate_trained(config, model_dir, say=say)
        return ModelStage(model_dir, int(done["step"]), 0.0, True, budget.ddpm_preset)
    say(
        f"training a {budget.ddpm_preset!r} DDPM on digits 16x16 for up to "
        f"{budget.ddpm_steps} steps or {budget.ddpm_minutes:g} min -> {_shown(model_dir)}"
    )
    t0 = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - t0
    say(
        f"DDPM: step {result.step} (this run: {result.step - result.start_step} steps in "
        f"{result.seconds:.0f} s, loss {result.loss:.4f}, {result.parameters / 1e6:.2f}M "
        "parameters)"
    )
    # A run stopped by the time cap still counts as this budget's model: rerunning the
    # demo should reuse it, not train again.
    marker.write_text(
        json.dumps(
            {"identity": identity, "step": result.step, "target_steps": budget.ddpm_steps}, indent=1
        )
        + "\n"
    )
    say(f"calibrating its generation settings for up to {budget.calibrate_minutes:g} min")
    calibrate_trained(config, model_dir, say=say)
    return ModelStage(model_dir, result.step, seconds, False, budget.ddpm_preset)


@dataclass
class GenerationStage:
    positives: Any  # uint8 [N, K, H, W, C]
    seconds: float
    requested: int
    cache_hits: int

    @property
    def per_s(self) -> float:
        return self.requested / self.seconds if self.seconds > 0 else 0.0


def generate_positives(
    url: str,
    images: Any,
    budget: Budget,
    *,
    progress: bool,
    say: Callable[[str], None],
    chunk: int = 64,
    in_flight: int = 4,
) -> GenerationStage:
    """Up to K candidates of every training image, through the pool client, before
    training: the sampler then works with full batches and the CLSP arm's requests are
    cache hits.

    One pass per candidate index over all images; a pass starts only when the last one's
    pace says it ends within ``positives_minutes``, so a busy machine trains with fewer
    candidates rather than overrunning the demo's time (at least one pass always runs).
    """
    import concurrent.futures

    import numpy as np
    from tqdm.auto import tqdm

    from clsp_positives.client import PoolClient

    n = len(images)
    params = budget.positives_params()
    out = np.zeros((n, budget.k, *images.shape[1:]), np.uint8)
    hits = done = 0
    budget_s = budget.positives_minutes * 60.0
    t0 = time.perf_counter()
    with (
        PoolClient(url, timeout_s=600.0) as client,
        tqdm(
            total=n * budget.k,
            unit="positive",
            desc="positives",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for k in range(budget.k):
            elapsed = time.perf_counter() - t0
            if k and elapsed + elapsed / k > budget_s:
                say(
                    f"{k} of {budget.k} candidates per image fit the "
                    f"{budget.positives_minutes:g} min budget of this stage on this machine: "
                    f"training with K={k}"
                )
                break
            starts = list(range(0, n, chunk))
            running: dict[concurrent.futures.Future[Any], int] = {}
            while starts or running:
                while starts and len(running) < in_flight:
                    s = starts.pop(0)
                    rows = np.ascontiguousarray(images[s : s + chunk])
                    which = np.full(len(rows), k, dtype=np.int64)
                    running[client.submit(rows, which, params)] = s
                finished, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                for fut in finished:
                    s = running.pop(fut)
                    answer = fut.result()
                    out[s : s + chunk, k] = answer.positives
                    hits += int(np.count_nonzero(answer.cache_hit))
                    bar.update(len(answer.positives))
            done = k + 1
    return GenerationStage(out[:, :done], time.perf_counter() - t0, n * done, hits)


def positives_quality(images: Any, labels: Any, positives: Any) -> dict[str, Any]:
    """Do the positives keep their anchor's class, and how far are they from it: a logistic
    regression fit on the training digits' pixels reads each positive's class, as
    ``clsp calibrate`` and the benchmarks do (trainer/positive_tools/quality.py)."""
    from clsp_positives.trainer.positive_tools.quality import (
        between_candidates,
        class_kept,
        fit_probe,
        to_anchor,
    )

    probe = fit_probe(images, labels)
    return {
        "class_kept": class_kept(probe, positives, labels),
        "probe_accuracy_on_anchors": class_kept(probe, images, labels),
        "mean_abs_to_anchor": to_anchor(positives, images),
        "mean_abs_between_candidates": (
            between_candidates(positives) if positives.shape[1] > 1 else None
        ),
    }


@dataclass
class ArmResult:
    name: str
    clsp_weight: float
    linear_acc: float | None  # the standard protocol's; None when it did not run
    probe_acc: float
    knn_acc: float
    epochs: int
    seconds: float
    positives_generated: int | None = None
    cache_hit_rate: float | None = None
    positives_per_s: float | None = None
    positive_fraction: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def arm_config(
    budget: Budget, *, seed: int, device: str, url: str | None, progress: bool
) -> TrainConfig:
    """The ``TrainConfig`` of one arm; ``url`` given means the CLSP arm
    (recipes/digits-demo-simclr-clsp.yaml is the CLSP arm of the full demo for
    ``clsp train --config``; a test keeps the two equal)."""
    from clsp_positives.trainer.config import TrainConfig

    clsp = url is not None
    return TrainConfig(
        dataset="digits",
        method=budget.method,
        backbone=budget.backbone,
        proj_hidden_dim=budget.proj_hidden_dim,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        optimizer="adamw",
        linear_epochs=budget.linear_epochs,
        seed=seed,
        device=device,
        progress=progress,
        clsp_weight=1.0 if clsp else 0.0,
        clsp_mode=budget.clsp_mode,
        positives=url,
        k=budget.k,
        prefetch=4,
        positives_strict=True,
        positives_timeout_s=120.0,
        **({} if budget.gen_steps is None else {"gen_steps": budget.gen_steps}),
    )


def train_arm(
    name: str,
    budget: Budget,
    *,
    seed: int,
    device: str,
    url: str | None,
    progress: bool,
    say: Callable[[str], None],
) -> ArmResult:
    """One ``clsp train`` run, in-process; ``url`` given means the CLSP arm."""
    from clsp_positives.trainer.train_loop import train

    clsp = url is not None
    config = arm_config(budget, seed=seed, device=device, url=url, progress=progress)
    t0 = time.perf_counter()
    result = train(config, echo=lambda line: say(f"[{name}] {line}"))
    seconds = time.perf_counter() - t0
    if result.final is None:
        raise DemoError(f"the {name} training ended without an evaluation")
    arm = ArmResult(
        name=name,
        clsp_weight=config.clsp_weight,
        linear_acc=result.final.linear_acc,
        probe_acc=float(result.final.probe_acc),
        knn_acc=float(result.final.knn_acc),
        epochs=budget.epochs,
        seconds=seconds,
        history=result.history,
    )
    if clsp:
        rates = [r["cache_hit_rate"] for r in result.history if "cache_hit_rate" in r]
        fractions = [r["positive_fraction"] for r in result.history if "positive_fraction" in r]
        arm.cache_hit_rate = float(sum(rates) / len(rates)) if rates else None
        arm.positive_fraction = float(sum(fractions) / len(fractions)) if fractions else None
    return arm


# ------------------------------------------------------------------ the run


@dataclass(frozen=True)
class DemoOptions:
    out: Path
    cache_dir: Path
    budget: Budget
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    retrain: bool = False
    progress: bool = True


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def results_table(results: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        title=f"clsp demo ({results['mode']}): digits 16x16, "
        f"{results['arms']['baseline']['epochs']} epochs per arm, seed "
        f"{results['seed']}"
    )
    for column in (
        "arm",
        "linear acc",
        "probe acc",
        "kNN acc",
        "positives generated",
        "cache-hit rate",
        "positives/s",
        "wall time",
    ):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm in results["arms"].values():
        gen = arm.get("positives_generated")
        rate = arm.get("positives_per_s")
        table.add_row(
            f"{arm['name']} (clsp-weight {arm['clsp_weight']:g})",
            _fmt_pct(arm["linear_acc"]),
            _fmt_pct(arm.get("probe_acc")),
            _fmt_pct(arm["knn_acc"]),
            "-" if gen is None else str(gen),
            _fmt_pct(arm.get("cache_hit_rate")),
            "-" if rate is None else f"{rate:.1f}",
            f"{arm['seconds']:.0f} s",
        )
    return table


def run_demo(options: DemoOptions, *, console: Any = None) -> dict[str, Any]:
    """Every stage, in order; the service is stopped whatever happens."""
    import numpy as np
    import torch
    from rich.console import Console

    console = console or Console()
    budget = options.budget
    started = time.perf_counter()
    stages: dict[str, float] = {}
    device = _resolve_device(options.device)
    threads = resolve_threads(options.threads, at_most=MAX_THREADS)
    torch.set_num_threads(threads)
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in (RESULTS_NAME, GRID_NAME, SAMPLES_NAME, POSITIVES_NAME):
        (out / stale).unlink(missing_ok=True)

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    def stage(number: int, title: str) -> None:
        console.rule(f"[bold][{number}/5] {title}")

    from clsp_positives.images import load_images

    data = load_images("digits", split="train", size=16)

    stage(1, "diffusion model")
    t0 = time.perf_counter()
    model = ensure_model(
        options.cache_dir,
        budget,
        device=device,
        threads=threads,
        seed=options.seed,
        progress=options.progress,
        retrain=options.retrain,
        say=say,
    )
    stages["diffusion_model"] = time.perf_counter() - t0
    samples = model.dir / "samples.png"
    if samples.is_file():
        shutil.copyfile(samples, out / SAMPLES_NAME)

    service = ServiceProcess(model.dir, log_path=out / SERVICE_LOG, device=device, threads=threads)
    try:
        with _stop_on_signals():
            stage(2, "generation service")
            t0 = time.perf_counter()
            service.start()
            stages["service_start"] = time.perf_counter() - t0
            info = _model_info(service.url)
            assert service.proc is not None
            say(
                f"clsp serve on {service.url} (pid {service.proc.pid}, model "
                f"{info['fingerprint'][:12]}, in-process cache, log: "
                f"{_shown(out / SERVICE_LOG)}), ready in {stages['service_start']:.0f} s"
            )

            asked = as_pool_applies(budget.positives_params(), info)
            stage(
                3,
                f"positives: {budget.k} per training image, {asked.steps} {asked.method} "
                f"steps, w={asked.interpolation_weight:g}, {asked.sampling}, "
                f"{asked.interpolate} (the model's calibrated settings)",
            )
            gen = generate_positives(
                service.url, data.images, budget, progress=options.progress, say=say
            )
            # The trainer draws among the candidates that exist (all of them cached).
            budget = replace(budget, k=gen.positives.shape[1])
            # The paper's offline layout too: `clsp train --positives-npy` takes it.
            np.save(out / POSITIVES_NAME, gen.positives)
            stages["positives"] = gen.seconds
            say(
                f"{gen.requested} positives for {len(data.images)} images in "
                f"{gen.seconds:.0f} s ({gen.per_s:.1f}/s, {gen.cache_hits} cache hits)"
            )
            quality = positives_quality(data.images, data.labels, gen.positives)
            say(
                f"they keep their anchor's class {quality['class_kept']:.0%} of the time "
                "(a logistic regression on the training digits' pixels; "
                f"{quality['probe_accuracy_on_anchors']:.0%} on the anchors themselves), "
                f"mean |positive - anchor| {quality['mean_abs_to_anchor']:.3f} on [0, 1]"
            )
            picks = grid_anchors(data.labels, budget.grid_rows)
            grid_k = max(budget.grid_k, budget.k)
            grid_answer = _grid_candidates(service.url, data.images[picks], budget, grid_k)
            grid_w, grid_h = write_grid(data.images[picks], grid_answer, out / GRID_NAME)
            metrics_after_gen = service.metrics()

            stage(4, "baseline (clsp-weight 0)")
            baseline = train_arm(
                "baseline",
                budget,
                seed=options.seed,
                device=device,
                url=None,
                progress=options.progress,
                say=say,
            )
            stages["baseline"] = baseline.seconds

            stage(5, "CLSP (clsp-weight 1, positives from the service)")
            clsp = train_arm(
                "clsp",
                budget,
                seed=options.seed,
                device=device,
                url=service.url,
                progress=options.progress,
                say=say,
            )
            stages["clsp"] = clsp.seconds
            metrics_end = service.metrics()
    finally:
        code = service.stop()
        if service.proc is not None:
            # uvicorn re-raises the SIGTERM it handled, after its graceful shutdown.
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
            say(f"service stopped ({how})")

    generated = int(metrics_end.get("clsp_positives_generated_total", 0))
    clsp.positives_generated = generated
    clsp.positives_per_s = gen.per_s
    served_hits = metrics_end.get("clsp_cache_hits_total", 0) - metrics_after_gen.get(
        "clsp_cache_hits_total", 0
    )
    served_misses = metrics_end.get("clsp_cache_misses_total", 0) - metrics_after_gen.get(
        "clsp_cache_misses_total", 0
    )
    if clsp.cache_hit_rate is None and served_hits + served_misses > 0:
        clsp.cache_hit_rate = served_hits / (served_hits + served_misses)
    results: dict[str, Any] = {
        "mode": budget.name,
        "seed": options.seed,
        "device": device,
        "threads": threads,
        "budget": asdict(budget),
        "model": {
            "preset": model.preset,
            "steps": model.step,
            "reused": model.reused,
            "seconds": model.seconds,
            "fingerprint": info["fingerprint"],
        },
        "generation": {
            "images": len(data.images),
            "k": budget.k,
            "k_requested": options.budget.k,
            "positives": gen.requested,
            "seconds": gen.seconds,
            "positives_per_s": gen.per_s,
            "cache_hits": gen.cache_hits,
            "params": json.loads(asked.canonical()),
            "quality": quality,
        },
        "service": {
            "url": service.url,
            "positives_generated": generated,
            "training_cache_hits": int(served_hits),
            "training_cache_misses": int(served_misses),
        },
        "arms": {a.name: asdict(a) for a in (baseline, clsp)},
        "grid": {
            "file": GRID_NAME,
            "width": grid_w,
            "height": grid_h,
            "rows": len(picks),
            "k": grid_k,
            "scale": GRID_SCALE,
        },
        "stages_seconds": stages,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / RESULTS_NAME).write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    console.print(results_table(results))
    how = "reused" if model.reused else f"trained in {model.seconds:.0f} s"
    say(
        f"diffusion model: {model.step} steps ({how}); positives: {gen.requested} in "
        f"{gen.seconds:.0f} s; total {results['wall_seconds'] / 60:.1f} min"
    )
    say(
        f"wrote {_shown(out / RESULTS_NAME)}, {_shown(out / GRID_NAME)} ({grid_w}x{grid_h}: "
        f"anchors | {grid_k} candidates each)"
    )
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return value.name
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _model_info(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/v1/model", timeout=30.0, trust_env=False).json()


def _grid_candidates(url: str, anchors: Any, budget: Budget, k: int) -> Any:
    """Candidates 0..k-1 of a few anchors (the first K are cache hits by now)."""
    from clsp_positives.client import PoolClient

    with PoolClient(url, timeout_s=600.0) as client:
        return client.positives(anchors, None, budget.positives_params(k=k)).positives


# ------------------------------------------------------------------ the command


def demo(
    quick: bool = typer.Option(False, "--quick", help="A reduced run (~2-3 min on 2 cores)."),
    out: Path = typer.Option(
        Path("demo-out"), "--out", help="Where results.json, the PNG grid and the service log go."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None,
        "--cache-dir",
        help=f"Where the trained DDPM is kept (default: ${CACHE_ENV} or ~/.cache/clsp-positives).",
    ),
    retrain: bool = typer.Option(
        False, "--retrain", help="Train a new DDPM even if one is cached."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the DDPM and of both trainings."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch CPU threads (default: OMP_NUM_THREADS, else the idle cores, at most 8).",
    ),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", min=1, help="Override the contrastive epochs of both arms."
    ),
    ddpm_steps: Optional[int] = typer.Option(
        None, "--ddpm-steps", min=1, help="Override the DDPM's target steps."
    ),
    ddpm_minutes: Optional[float] = typer.Option(
        None, "--ddpm-minutes", min=0.01, help="Override the DDPM time cap."
    ),
    k: Optional[int] = typer.Option(
        None, "--k", "--candidates", min=1, max=16, help="Override k, positives per image."
    ),
    gen_steps: Optional[int] = typer.Option(
        None, "--gen-steps", min=1, max=1000, help="Override the DDIM steps per positive."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Run the whole loop locally: DDPM, service, positives, baseline vs CLSP, results."""
    budget = BUDGETS["quick" if quick else "full"]
    overrides = {
        k: v
        for k, v in (
            ("epochs", epochs),
            ("ddpm_steps", ddpm_steps),
            ("ddpm_minutes", ddpm_minutes),
            ("k", k),
            ("gen_steps", gen_steps),
        )
        if v is not None
    }
    budget = replace(budget, **overrides)
    options = DemoOptions(
        out=out,
        cache_dir=cache_dir or default_cache_dir(),
        budget=budget,
        seed=seed,
        device=device,
        threads=threads,
        retrain=retrain,
        progress=progress,
    )
    from rich.console import Console

    # Off a terminal rich assumes 80 columns and would wrap the table; logs and CI want
    # it whole.
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        run_demo(options, console=console)
    except KeyboardInterrupt:
        typer.echo("clsp demo: interrupted; the service was stopped", err=True)
        raise typer.Exit(130) from None
    except (DemoError, LocalServiceError) as exc:
        typer.echo(f"clsp demo: {exc}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
