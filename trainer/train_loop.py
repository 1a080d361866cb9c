"""The training loop: data plan -> positives prefetch -> batched augmentation
-> method step, with evaluation, checkpoints and a JSON-lines metrics log.

While step b trains, the anchors of steps b+1..b+L are already with the
generation pool (the plan of every epoch is known ahead, so the lookahead also
crosses into the next epoch). A step takes whatever positives arrived by its
deadline; anchors without one are masked out of the CLSP term.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clsp_positives.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from clsp_positives.streamed import StreamedImages
from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.backbones import BACKBONES, build_backbone
from clsp_positives.trainer.collapse_monitor import (
    LATE_FRACTION,
    Observation,
    find_episodes,
    is_collapsed,
    summary_lines,
)
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.config_file import write_run_config
from clsp_positives.trainer.data.augment import AugmentConfig, BatchAugment
from clsp_positives.trainer.data.epochs import IndexedImages, ShardedBatchSampler
from clsp_positives.trainer.data.streamed import StreamedBatches, pixel_stats
from clsp_positives.trainer.eval.evaluation import EvalResult, evaluate_backbone
from clsp_positives.trainer.methods import ContrastiveMethod, MethodConfig, build_method
from clsp_positives.trainer.schedules import clsp_weight_share, lr_share
from clsp_positives.trainer.tracking import TrainTracker, check_tracking, write_train_curves

if TYPE_CHECKING:  # the positives path (httpx) is imported only when a run uses it
    from clsp_positives.trainer.positives.feed import PlannedFeed
    from clsp_positives.trainer.positives.pending import PositivesBatch

log = logging.getLogger("clsp.train")

METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainResult:
    epochs: int
    final: EvalResult | None
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None


class MetricsLog:
    """JSON-lines events on the main rank: one line per epoch, eval and the summary."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Positives from a model of another channel count, made to fit the data."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1:
        return np.repeat(images, channels, axis=-1)
    if channels == 1:
        gray = images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"positives have {c} channels, the data set {channels}")


def _build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = config.resolved_lr(), config.resolved_weight_decay()
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)


def _build_schedule(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    start = config.lr_warmup_start
    share_of_peak = None if start is None else start / config.resolved_lr()

    def factor(step: int) -> float:
        return lr_share(
            step,
            steps_per_epoch=steps_per_epoch,
            epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            schedule=config.schedule,
            unit=config.lr_step_unit,
            warmup_start=share_of_peak,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)


def _open_positives(
    config: TrainConfig,
    images: IndexedImages | StreamedBatches | np.ndarray,
    sampler: ShardedBatchSampler,
    pinned: str | None = None,
) -> PlannedFeed | None:
    """The feed of positives the options ask for, or None for the baseline. ``pinned``,
    the model a resumed run's checkpoint kept, binds as ``--expect-model`` does (which
    wins) unless ``--allow-model-change`` (docs/reliability.md, "Model pinning"). The
    feed is the one ``PositivesStream`` runs too (trainer/positives/feed.py)."""
    if config.clsp_weight <= 0:
        if config.positives or config.positives_npy:
            log.warning("--clsp-weight is 0 (the baseline): the positives source is not used")
        return None
    if not (config.positives or config.positives_npy):
        raise ValueError(
            "--clsp-weight > 0 needs synthetic positives: pass --positives URL[,URL...] "
            "or --positives-npy FILE (or set --clsp-weight 0 for the baseline)"
        )
    from clsp_positives.trainer.positives.feed import FeedSettings, PlannedFeed, open_feed

    feed = open_feed(
        config.positives,
        config.generation_params(),
        FeedSettings.from_config(config),
        size=len(images),
        offline_npy=config.positives_npy,
        token=config.token,
        pinned=pinned,
    )
    return PlannedFeed(feed, images, sampler, epochs=config.epochs)


def _pinned_model(feed: PlannedFeed | None, resumed: str | None) -> str | None:
    """The model a checkpoint keeps: the source's (the pool's pinned model, a bank's),
    or, for a run without positives, what its own checkpoint had."""
    if feed is None:
        return resumed
    return feed.model


def _sum_stats(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Positive statistics of all ranks as one epoch record."""
    if not per_rank or not per_rank[0]:
        return {}
    out: dict[str, Any] = {}
    for key in ("wait_seconds", "missing", "failovers", "errors"):
        vals = [r.get(key) for r in per_rank if r.get(key) is not None]
        if vals:
            out[key] = float(max(vals)) if key == "wait_seconds" else int(sum(vals))
    for key in ("positive_fraction", "cache_hit_rate"):
        vals = [r.get(key) for r in per_rank if r.get(key) is not None]
        if vals:
            out[key] = float(np.mean(vals))
    # The pool's model as each rank pinned it: one fingerprint, or several if ranks disagree.
    models = sorted({r["model"] for r in per_rank if r.get("model")})
    if models:
        out["model"] = models[0] if len(models) == 1 else models
    return out


def collapse_warning(record: dict[str, Any], config: TrainConfig) -> str | None:
    """The warning for an epoch whose projections collapsed, or None.

    A collapsed projection maps every image to (nearly) one point: the base
    loss stops falling (NT-Xent sits at log(2B - 1)) and nothing else says so.
    ``z_std`` (losses.z_std) is ~1 for spread features and ~0 collapsed; below
    ``config.collapse_z_std`` the run is named collapsed (docs/design.md §5).
    Early in a run a collapse may be the transient the CLSP authors' own ResNet-50
    runs show (docs/method.md, "Training dynamics"): the warning then says so and
    defers what to try to ``LATE_FRACTION`` of the epochs; from there on it says
    what to try now.
    """
    threshold = config.collapse_z_std
    low = {
        key: record[key]
        for key in ("z_std", "z_std_positives")
        if key in record and record[key] < threshold
    }
    if not low:
        return None
    spread = ", ".join(f"{key} {value:.3f}" for key, value in low.items())
    if config.clsp_weight > 0 and config.clsp_mode == "similarity":
        cause = (
            f"the similarity CLSP term (--clsp-weight {config.clsp_weight:g} x (2 - 2cos) to "
            "the positive) is cheapest with every embedding the same"
        )
    else:
        cause = "the base loss found the constant map (temperature or learning rate)"
    epoch = record["epoch"] + 1
    knobs = (
        "a lower --clsp-weight, --clsp-weight-warmup-epochs, --clsp-mode contrastive, or "
        "another --temperature (or a lower --lr)"
    )
    said = (
        f"the projections collapsed at epoch {epoch} ({spread} < --collapse-z-std "
        f"{threshold:g}; ~1 is healthy): likely {cause}."
    )
    late_from = math.ceil(LATE_FRACTION * config.epochs)
    if epoch >= late_from:
        return f"{said} At {epoch} of {config.epochs} epochs, try {knobs}."
    return (
        f"{said} The CLSP authors' own ResNet-50 runs collapse like this for their first "
        '~5% of training and recover (docs/method.md, "Training dynamics"), so the run '
        f"goes on; only if it is still collapsed at epoch {late_from} ({LATE_FRACTION:.0%} "
        f"of the run) try {knobs}."
    )


def collapse_record(
    record: dict[str, Any], method: ContrastiveMethod, config: TrainConfig, world_size: int
) -> dict[str, Any]:
    """The epoch's collapse signals for its record: the base loss's collapsed value and
    whether the epoch was collapsed by the monitor's rule, which asks for the loss at
    that value and the spread low (trainer/collapse_monitor.py)."""
    rows = config.batch_size * world_size
    inside = config.clsp_weight > 0 and config.clsp_mode == "contrastive"
    positives = round(record.get("positive_fraction", 0.0) * rows) if inside else 0
    value = method.collapsed_base_loss(rows, positives)
    flag = is_collapsed(
        record["loss_base"], value, z_std=record["z_std"], z_std_threshold=config.collapse_z_std
    )
    return {"loss_collapsed": value, "collapsed": int(flag)}


def evaluate_method(
    method: ContrastiveMethod,
    config: TrainConfig,
    train_data: Any,
    test_data: Any,
    preprocess: BatchAugment,
    *,
    final: bool = False,
    progress: bool = False,
) -> EvalResult:
    """kNN and the fast probe; at the ``final`` evaluation also the standard linear
    protocol (``config.linear_epochs`` epochs, 0: none), which costs a forward pass over
    the training set per epoch (docs/training.md, "Evaluation")."""
    from clsp_positives.trainer.data.streamed import pixels

    return evaluate_backbone(
        method.backbone,
        pixels(train_data),
        train_data.labels,
        pixels(test_data),
        test_data.labels,
        train_data.classes,
        preprocess,
        k=config.knn_k,
        tau=config.knn_tau,
        probe_epochs=config.probe_epochs,
        linear_epochs=config.linear_epochs if final else 0,
        seed=config.seed,
        autocast=config.amp and preprocess.device.type == "cuda",
        progress=progress,
    )


def load_datasets(config: TrainConfig, ctx: DistributedContext) -> tuple[Any, Any]:
    """The labelled train and test splits: in memory (``ImageSet``), or with
    ``--data-workers N`` an image folder's streamed sets (``StreamedImages``, nothing
    decoded yet; docs/training.md, "Large data sets")."""
    if config.data_workers > 0:
        from clsp_positives.streamed import open_streamed

        def stream(split: str) -> Any:
            return open_streamed(
                config.dataset,
                split=split,
                size=config.image_size,
                channels=config.channels,
                workers=config.data_workers,
                pin_memory=ctx.device.type == "cuda",
            )

        return _first(stream("train"), config.subset), stream("test")
    from clsp_positives.images import ImageSet, load_images

    def load(split: str) -> ImageSet:
        return load_images(
            config.dataset,
            split=split,
            size=config.image_size,
            channels=config.channels,
            root=config.data_root,
            download=config.download and ctx.is_main,
        )

    if config.download and ctx.distributed:
        if ctx.is_main:
            load("train"), load("test")
        barrier()
    train_set, test_set = load("train"), load("test")
    return _first(train_set, config.subset), test_set


def load_pretraining_set(config: TrainConfig, ctx: DistributedContext, train_set: Any) -> Any:
    """The images the contrastive loss trains on: the labelled ``train_set``, or with
    ``--train-split train+unlabeled`` STL-10's training images followed by its unlabeled
    ones (the evaluation keeps ``train_set``). Loaded after ``load_datasets``, whose
    download fetched every split, so no rank downloads here."""
    if config.train_split == "train":
        return train_set
    from clsp_positives.images import load_images

    images = load_images(
        config.dataset,
        split=config.train_split,
        size=config.image_size,
        channels=config.channels,
        root=config.data_root,
    )
    return _first(images, config.subset)


def _first(images: Any, n: int | None) -> Any:
    """The first ``n`` images of a set (``--subset``); all of them for None."""
    from clsp_positives.images import ImageSet

    if n is None or n >= len(images.labels):
        return images
    if not isinstance(images, ImageSet):
        return images.first(n)  # a streamed set
    return ImageSet(
        images=images.images[:n], labels=images.labels[:n], classes=images.classes, name=images.name
    )


def _training_batches(
    config: TrainConfig, data: Any, sampler: ShardedBatchSampler, epochs: range
) -> IndexedImages | StreamedBatches:
    """Where the steps get their batches, and the feed its anchors (``anchors``): the
    in-memory set itself, or a streamed set's loader, ``--prefetch`` batches ahead."""
    if isinstance(data, StreamedImages):
        return StreamedBatches(data, sampler, epochs=epochs, lookahead=config.prefetch)
    return IndexedImages(data)


def train(config: TrainConfig, *, echo: Any = print) -> TrainResult:
    """Run ``clsp train``: returns the final evaluation and the per-epoch records."""
    ctx = init_distributed(config.device)
    try:
        result = _train(config, ctx, echo)
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    shutdown_distributed()
    return result


def _train(config: TrainConfig, ctx: DistributedContext, echo: Any) -> TrainResult:
    dev = ctx.device
    check_tracking(config)  # before the data: a run that cannot log fails at once
    _seed_everything(config.seed + ctx.rank)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown --backbone {config.backbone!r}; choose one of {BACKBONES}")
    train_set, test_set = load_datasets(config, ctx)
    pretrain_set = load_pretraining_set(config, ctx, train_set)
    (n, size, _, channels), mean, std = pixel_stats(pretrain_set)
    sampler = ShardedBatchSampler(
        n, config.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=config.seed
    )
    # Same initial weights, queue and support set on every rank; rank-specific RNG after.
    _seed_everything(config.seed)
    backbone, feature_dim = build_backbone(config.backbone, in_channels=channels, image_size=size)
    method = build_method(MethodConfig.from_train_config(config), backbone, feature_dim, n).to(dev)
    _seed_everything(config.seed + ctx.rank)
    model: torch.nn.Module = method
    if ctx.distributed:
        with warnings.catch_warnings():
            # torch >= 2.14 renames broadcast_buffers; the older name works on both.
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(
                method,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                broadcast_buffers=False,
            )
    optimizer = _build_optimizer(config, method)
    schedule = _build_schedule(config, optimizer, sampler.steps_per_epoch)
    augment = BatchAugment(
        size, mean, std, device=dev, views=view_configs(config), seed=config.seed
    )
    autocast = config.amp and dev.type == "cuda"

    out_dir = Path(config.out) if config.out else None
    metrics = MetricsLog(out_dir / METRICS_NAME if out_dir and ctx.is_main else None)
    start_epoch = 0
    pinned: str | None = None  # the positives' model a resumed run keeps
    if config.resume:
        if out_dir is None:
            raise ValueError("--resume needs --out DIR (the run to continue)")
        path = out_dir / ckpt.CHECKPOINT_NAME
        if path.is_file():
            state = ckpt.load_checkpoint(path, map_location=dev)
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            start_epoch = int(state["epoch"]) + 1
            ckpt.restore_rng_state(state["rng"][min(ctx.rank, len(state["rng"]) - 1)])
            pinned = state.get(ckpt.PINNED_MODEL)  # absent from older checkpoints: no pin
            if ctx.is_main:
                echo(f"resumed from {path} at epoch {start_epoch}")
                if pinned and config.clsp_weight > 0 and config.expect_model is None:
                    echo(
                        f"positives pinned to model {pinned}, as before the resume: a "
                        "source of another model is not used (--allow-model-change takes any)"
                        if not config.allow_model_change
                        else f"--allow-model-change: positives of any model, not only {pinned}"
                    )
        elif ctx.is_main:
            echo(f"--resume: no checkpoint in {out_dir}, starting from scratch")

    # Before the positives feed: a streamed set's loader forks its workers here,
    # before the pool client starts its threads.
    data = _training_batches(config, pretrain_set, sampler, range(start_epoch, config.epochs))
    feed = _open_positives(config, data, sampler, pinned)
    tracker = None
    if ctx.is_main:
        tracker = TrainTracker.open(
            config, out_dir, steps_per_epoch=sampler.steps_per_epoch, start_epoch=start_epoch
        )
    show = config.progress if config.progress is not None else sys.stderr.isatty()
    history: list[dict[str, Any]] = []
    final: EvalResult | None = None
    # Dip and late warnings, one each (collapse_warning), and the monitor's observations.
    warned: set[bool] = set()
    observations: list[Observation] = []
    if ctx.is_main and out_dir is not None:
        write_run_config(config, out_dir)  # --config DIR/config.yaml repeats the run
    if ctx.is_main:
        metrics.write(
            {
                "event": "start",
                "world_size": ctx.world_size,
                "device": str(dev),
                "train_size": n,
                "start_epoch": start_epoch,
                "config": config.stored(),
            }
        )
    try:
        for epoch in range(start_epoch, config.epochs):
            record = _run_epoch(
                epoch,
                config,
                ctx,
                method,
                model,
                optimizer,
                schedule,
                augment,
                data,
                sampler,
                feed,
                channels,
                autocast,
                show and ctx.is_main,
                tracker,
            )
            record.update(collapse_record(record, method, config, ctx.world_size))
            observations.append(Observation(epoch + 1, bool(record["collapsed"])))
            evaluate_now = epoch == config.epochs - 1 or (
                config.eval_every > 0 and (epoch + 1) % config.eval_every == 0
            )
            if evaluate_now and ctx.is_main:
                final = evaluate_method(
                    method,
                    config,
                    train_set,
                    test_set,
                    augment,
                    final=epoch == config.epochs - 1,
                    progress=show,
                )
                record.update(final.as_dict())
                metrics.write({"event": "eval", "epoch": epoch, **final.as_dict()})
            if ctx.is_main:
                metrics.write(record)
                history.append(record)
                if tracker is not None:
                    tracker.epoch(record, final.as_dict() if evaluate_now and final else None)
                if out_dir is not None:
                    pinned = _pinned_model(feed, pinned)
                    _save(out_dir, config, method, optimizer, schedule, epoch, ctx, pinned)
                    write_train_curves(out_dir, METRICS_NAME)
            elif out_dir is not None:
                gather_objects(ckpt.rng_state())
            barrier()
            if ctx.is_main:
                echo(_epoch_line(record))
                warning = collapse_warning(record, config)
                late = epoch + 1 >= math.ceil(LATE_FRACTION * config.epochs)
                # The dip once and the late state once: a run that is still collapsed
                # at the late mark hears it again, with what to try now. Through echo
                # only, beside the epoch lines: a logger record as well would print it
                # twice on the terminal (logging's last-resort handler writes to stderr).
                if warning is not None and late not in warned and True not in warned:
                    warned.add(late)
                    echo(f"warning: {warning}")
                    metrics.write(
                        {
                            "event": "collapse",
                            "epoch": epoch,
                            "late": late,
                            "threshold": config.collapse_z_std,
                            "message": warning,
                            **{k: record[k] for k in ("z_std", "z_std_positives") if k in record},
                        }
                    )
        episodes = find_episodes(observations)
        if tracker is not None:
            tracker.summary(summary_lines(episodes), config.epochs)
    finally:
        if feed is not None:
            feed.close()
        if isinstance(data, StreamedBatches):
            data.close()
        if tracker is not None:
            tracker.close()
    if ctx.is_main and final is not None:
        summary = {"event": "summary", "epochs": config.epochs, **final.as_dict()}
        summary["collapse_episodes"] = [asdict(e) for e in episodes]
        metrics.write(summary)
    if ctx.is_main and episodes:
        for line in summary_lines(episodes):
            echo(f"collapse: {line}")
    return TrainResult(epochs=config.epochs, final=final, history=history, out_dir=out_dir)


def _save(
    out_dir: Path,
    config: TrainConfig,
    method: ContrastiveMethod,
    optimizer: Any,
    schedule: Any,
    epoch: int,
    ctx: DistributedContext,
    pinned: str | None = None,
) -> None:
    rngs = gather_objects(ckpt.rng_state())
    ckpt.save_checkpoint(
        out_dir / ckpt.CHECKPOINT_NAME,
        {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "epoch": epoch,
            "rng": rngs,
            "config": config.stored(),
            "world_size": ctx.world_size,
            ckpt.PINNED_MODEL: pinned,
        },
    )


def _epoch_line(r: dict[str, Any]) -> str:
    parts = [f"epoch {r['epoch'] + 1}", f"loss {r['loss']:.4f}"]
    if "z_std" in r:
        parts.append(f"z_std {r['z_std']:.3f}")
    if "z_std_positives" in r:
        parts.append(f"z_std positives {r['z_std_positives']:.3f}")
    if "positive_fraction" in r:
        parts.append(f"positives {r['positive_fraction']:.0%}")
    if "cache_hit_rate" in r:
        parts.append(f"cache hits {r['cache_hit_rate']:.0%}")
    if "wait_seconds" in r:
        parts.append(f"wait {r['wait_seconds']:.2f}s")
    if "linear_acc" in r:
        parts.append(f"linear {r['linear_acc']:.2%}")
    if "probe_acc" in r:
        parts.append(f"probe {r['probe_acc']:.2%} kNN {r['knn_acc']:.2%}")
    parts.append(f"{r['epoch_seconds']:.1f}s")
    return " | ".join(parts)


def _spread_sums(
    z_std: torch.Tensor | None, z_std_positives: torch.Tensor | None, dev: torch.device
) -> list[torch.Tensor]:
    """A step's share of the epoch's spread sums: its z_std, and its positives'
    z_std with a count of 1 when that is defined (at least 2 arrived), else 0s.
    Stays on the device: no step waits for it."""
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    base = zero if z_std is None else torch.nan_to_num(z_std.double(), nan=0.0)
    if z_std_positives is None:
        return [base, zero, zero]
    defined = torch.isfinite(z_std_positives).double()
    return [base, torch.nan_to_num(z_std_positives.double(), nan=0.0), defined]


def positive_view(
    positives: PositivesBatch, augment: BatchAugment, channels: int, *, keep_empty: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The third view of a step and the rows of its anchors (docs/design.md §5).

    Only the positives that arrived are augmented and forwarded: a missing one is
    never read, so it reaches neither the network nor its BatchNorm statistics.
    With none arrived there is no third view, except under DDP (``keep_empty``):
    there an empty view goes on, so that the method still joins its ranks'
    collectives without forwarding anything.
    """
    rows = np.flatnonzero(np.asarray(positives.mask, dtype=bool))
    if rows.size == 0 and not keep_empty:
        return None, None
    present = torch.from_numpy(rows).to(augment.device)
    if rows.size == 0:
        size = augment.size
        return torch.empty(0, channels, *size, device=augment.device), present
    images = np.ascontiguousarray(_match_channels(positives.images[rows], channels))
    return augment(torch.from_numpy(images), view=2), present


def view_configs(config: TrainConfig) -> tuple[AugmentConfig, AugmentConfig]:
    """The two views' augmentations (the positive takes the second's): the SimCLR
    pipeline, plus the blur and solarisation the config asks of each."""
    return (
        AugmentConfig(blur_p=config.view1_blur, solarize_p=config.view1_solarize),
        AugmentConfig(blur_p=config.view2_blur, solarize_p=config.view2_solarize),
    )


def _run_epoch(
    epoch: int,
    config: TrainConfig,
    ctx: DistributedContext,
    method: ContrastiveMethod,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    augment: BatchAugment,
    data: IndexedImages | StreamedBatches,
    sampler: ShardedBatchSampler,
    feed: PlannedFeed | None,
    channels: int,
    autocast: bool,
    show: bool,
    tracker: TrainTracker | None = None,
) -> dict[str, Any]:
    dev = ctx.device
    plan = sampler.plan(epoch)
    total_steps = config.epochs * len(plan.batches)  # for schedules such as MoCo's momentum
    # Views depend only on (seed, rank, epoch): a resumed run draws the same ones.
    augment.reseed(int(np.random.default_rng([config.seed, ctx.rank, epoch]).integers(2**62)))
    method.train()
    # loss, base, clsp, steps, z_std, z_std of the positives and the steps that had one
    sums = torch.zeros(7, dtype=torch.float64, device=dev)
    started = time.perf_counter()
    with _progress(show, f"epoch {epoch + 1}/{config.epochs}", len(plan)) as tick:
        for step, indices in enumerate(plan.batches):
            # The batch first: a streamed set's loader then holds batch step + L,
            # whose anchors the feed sends the pool now.
            anchors = data.batch(indices).images
            v3 = present = positives = None
            if feed is not None:
                positives = feed.take(epoch, step)
                v3, present = positive_view(
                    positives, augment, channels, keep_empty=ctx.distributed
                )
            images = torch.from_numpy(anchors)
            v1, v2 = augment(images, view=0), augment(images, view=1)
            method.set_clsp_scale(
                clsp_weight_share(
                    epoch * len(plan.batches) + step,
                    steps_per_epoch=len(plan.batches),
                    warmup_epochs=config.clsp_weight_warmup_epochs,
                )
            )
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(v1, v2, v3, present)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            schedule.step()
            method.after_step((epoch * len(plan.batches) + step + 1) / total_steps)
            sums += torch.stack(
                [
                    out.loss.detach().double(),
                    out.base.double(),
                    out.clsp.double(),
                    torch.ones((), dtype=torch.float64, device=dev),
                    *_spread_sums(out.z_std, out.z_std_positives, dev),
                ]
            )
            if tracker is not None:
                lr = float(schedule.get_last_lr()[0])
                tracker.step(epoch * len(plan) + step + 1, out, lr, feed, anchors, positives)
            if tick is not None:
                tick(f"loss {out.loss.item():.3f}")
    sums = all_reduce_sum(sums)
    steps = max(1.0, float(sums[3]))
    record: dict[str, Any] = {
        "event": "epoch",
        "epoch": epoch,
        "loss": float(sums[0]) / steps,
        "loss_base": float(sums[1]) / steps,
        "loss_clsp": float(sums[2]) / steps,
        "lr": float(schedule.get_last_lr()[0]),
        "steps": len(plan),
        "epoch_seconds": time.perf_counter() - started,
        "z_std": float(sums[4]) / steps,
    }
    if config.clsp_weight_warmup_epochs > 0:
        record["clsp_weight"] = method.clsp_weight  # as the epoch's last step had it
    if float(sums[6]) > 0:
        record["z_std_positives"] = float(sums[5]) / float(sums[6])
    if feed is not None:
        record.update(_sum_stats(gather_objects(feed.epoch_stats())))
    if ctx.distributed:
        # The ranks' shards must be disjoint: count what more than one rank trained on.
        seen = np.concatenate(gather_objects(np.concatenate(plan.batches)))
        record["images_seen"] = len(seen)
        record["shard_overlap"] = len(seen) - len(np.unique(seen))
    if not math.isfinite(record["loss"]):
        raise FloatingPointError(f"the loss is {record['loss']} at epoch {epoch + 1}: lower --lr")
    return record


def evaluate_checkpoint(
    path: str | Path,
    *,
    device: str | None = None,
    data_root: str | None = None,
    linear_epochs: int | None = None,
    probe_epochs: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """``clsp eval``: rebuild the run's backbone from the checkpoint's config
    and evaluate it on the run's data set, as a run's final evaluation (the standard
    linear protocol included unless ``linear_epochs`` is 0)."""
    from clsp_positives.distributed import resolve_device

    dev = resolve_device(device)
    state = ckpt.load_checkpoint(path, map_location=dev)
    changes: dict[str, Any] = {"resume": False, "out": None, "device": str(dev)}
    if data_root is not None:
        changes["data_root"] = data_root
    if linear_epochs is not None:
        changes["linear_epochs"] = linear_epochs
    if probe_epochs is not None:
        changes["probe_epochs"] = probe_epochs
    config = TrainConfig(**{**state["config"], **changes, "download": False})
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=dev)
    train_set, test_set = load_datasets(config, ctx)
    # The run's normalisation and queue size came from the images it trained on.
    pretrain_set = load_pretraining_set(config, ctx, train_set)
    (n, size, _, channels), mean, std = pixel_stats(pretrain_set)
    backbone, feature_dim = build_backbone(config.backbone, in_channels=channels, image_size=size)
    method = build_method(MethodConfig.from_train_config(config), backbone, feature_dim, n).to(dev)
    method.load_state_dict(state["model"])
    preprocess = BatchAugment(size, mean, std, device=dev, seed=config.seed)
    return evaluate_method(
        method, config, train_set, test_set, preprocess, final=True, progress=progress
    )
