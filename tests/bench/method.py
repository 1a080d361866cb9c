"""Method benchmark: is CLSP's effect on the trained encoder real, and where does it come from?
(not a test; prints a table and writes results.json, a PNG and optionally docs/method.md)

Every arm trains the same SimCLR encoder (resnet-tiny, batch 128, AdamW, the rest
``TrainConfig``'s defaults) for the same epochs with the same seeds, in-process through
``train(TrainConfig(...))``, with its positives read from an offline bank
(``--positives-npy``), so the arms differ only in their positives and the CLSP term:

1. a DDPM, trained on a CPU budget with quality.py's code (or ``--model-dir``/``--skip-train``);
2. a bank of k positives per training image, made ONCE through a real ``clsp serve`` the
   way ``clsp generate`` makes one (the authors' settings: w = 0.1, DDIM, eta 0; ``--gen-steps``),
   and a w = 0 bank the same way (only the anchor's bottleneck);
3. an oracle bank: k real training images of the anchor's class (labels read only here);
4. the arms, over ``--seeds`` seeds: baseline, CLSP (similarity, the paper's form, and
   contrastive), oracle, w = 0, and the joint-forward variants;
5. per arm the mean and std over seeds, and the paired difference to the baseline with its
   t confidence interval (tests/bench/method_stats.py; how to read it: docs/method.md).

Banks, the DDPM and finished runs are kept in ``--out`` keyed by what made them; ``--reuse``
takes them instead of redoing them.

    .venv/bin/python tests/bench/method.py                               # ~30 min, all cores
    .venv/bin/python tests/bench/method.py --dataset digits-photos --image-size 32
    .venv/bin/python tests/bench/method.py --seeds 2 --epochs 1 --ddpm-minutes 0.5 \\
        --gen-steps 5 --subset 256 --linear-epochs 5 \\
        --arms baseline,clsp-contrastive,oracle-contrastive                # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clsp_positives.proto.params import Interpolate, Sampling

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.bench.*, when run as a script
    sys.path.insert(0, str(REPO))

from tests.bench import method_stats as stats  # noqa: E402
from tests.bench import quality  # noqa: E402

RESULTS_NAME = "results.json"
DDPM_MARKER = "method-ddpm.json"
DOCS = REPO / "docs" / "method.md"


# ------------------------------------------------------------------ arms and banks


@dataclass(frozen=True)
class Arm:
    """One way of training: which bank its positives come from (None: no CLSP term)."""

    name: str
    bank: str | None
    clsp_mode: str | None = None
    joint: bool = False


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("baseline", None),
        Arm("clsp-similarity", "clsp", "similarity"),
        Arm("clsp-contrastive", "clsp", "contrastive"),
        Arm("oracle-similarity", "oracle", "similarity"),
        Arm("oracle-contrastive", "oracle", "contrastive"),
        Arm("w0-contrastive", "w0", "contrastive"),
        Arm("clsp-contrastive-joint", "clsp", "contrastive", joint=True),
        Arm("baseline-joint", None, joint=True),
        Arm("clip-contrastive", "clip", "contrastive"),
        Arm("lowskip-contrastive", "lowskip", "contrastive"),
        Arm("lowskip-similarity", "lowskip", "similarity"),
        # The diversity levers of docs/method.md, "More diverse positives": each the
        # lowskip bank with one setting changed.
        Arm("eta05-contrastive", "lowskip-eta05", "contrastive"),
        Arm("eta1-contrastive", "lowskip-eta1", "contrastive"),
        Arm("ddpm-contrastive", "lowskip-ddpm", "contrastive"),
        Arm("until05-contrastive", "lowskip-until05", "contrastive"),
        Arm("until03-contrastive", "lowskip-until03", "contrastive"),
    )
}
BASELINE = "baseline"


@dataclass(frozen=True)
class BankSpec:
    """A bank the generator makes: its interpolation weight (None: ``--interpolation-weight``,
    the authors' 0.1), sampling mode and what of the anchor is mixed in. ``clip`` differs
    from ``clsp`` only in x0 being clipped to [-1, 1] inside the loop (``authors-clipped``),
    ``lowskip`` from ``clip`` only in also mixing the anchor's low-resolution skips
    (docs/design.md §1)."""

    weight: float | None
    sampling: Sampling = "authors"
    interpolate: Interpolate = "bottleneck"
    eta: float = 0.0
    method: str = "ddim"
    interpolate_until: float = 1.0


GENERATED_BANKS = {
    "clsp": BankSpec(None),
    "w0": BankSpec(0.0),
    "clip": BankSpec(None, "authors-clipped"),
    "lowskip": BankSpec(None, "authors-clipped", "bottleneck+low-skips"),
    "lowskip-eta05": BankSpec(None, "authors-clipped", "bottleneck+low-skips", eta=0.5),
    "lowskip-eta1": BankSpec(None, "authors-clipped", "bottleneck+low-skips", eta=1.0),
    "lowskip-ddpm": BankSpec(None, "authors-clipped", "bottleneck+low-skips", method="ddpm"),
    "lowskip-until05": BankSpec(
        None, "authors-clipped", "bottleneck+low-skips", interpolate_until=0.5
    ),
    "lowskip-until03": BankSpec(
        None, "authors-clipped", "bottleneck+low-skips", interpolate_until=0.3
    ),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=("digits", "digits-photos"))
    p.add_argument("--image-size", type=int, default=None, help="default: the set's native size")
    p.add_argument("--subset", type=int, default=None, help="train on the first N images only")
    p.add_argument("--out", default=None, help="default: runs/method-<dataset>")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, the same for every arm")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--linear-epochs",
        type=int,
        default=None,
        help="epochs of the standard linear protocol (default: TrainConfig's)",
    )
    p.add_argument("--k", type=int, default=4, help="candidates per training image in a bank")
    p.add_argument("--gen-steps", type=int, default=50, help="DDIM steps (the authors use 100)")
    p.add_argument("--interpolation-weight", type=float, default=0.1)
    p.add_argument("--oracle-seed", type=int, default=0, help="seed of the oracle bank's draws")
    p.add_argument("--model-dir", default=None, help="default: <out>/ddpm")
    p.add_argument("--skip-train", action="store_true", help="use --model-dir as it is")
    p.add_argument("--ddpm-minutes", type=float, default=10.0, help="DDPM budget (CPU minutes)")
    p.add_argument("--ddpm-threads", type=int, default=1, help="threads of the DDPM training")
    p.add_argument("--reuse", action="store_true", help="reuse the DDPM, banks and runs in --out")
    p.add_argument(
        "--threads", type=int, default=None, help="default: OMP_NUM_THREADS, else the idle cores"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--write-docs", action="store_true", help="(re)write --docs' results section")
    p.add_argument("--docs", default=str(DOCS), help="the page --write-docs writes")
    p.add_argument(
        "--section",
        default=None,
        help="the page's section --write-docs writes (default: --dataset)",
    )
    args = p.parse_args(argv)
    args.out = Path(args.out or f"runs/method-{args.dataset}")
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(args.arm_names) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if BASELINE not in args.arm_names:
        args.arm_names.insert(0, BASELINE)  # every difference is to it
    return args


def short_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


# ------------------------------------------------------------------ the DDPM


def ensure_ddpm(
    args: argparse.Namespace, model_dir: Path, size: int, channels: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """quality.py's CPU-budget training into ``model_dir``; skipped with ``--skip-train``, or
    with ``--reuse`` when the model there was trained with these options. A ``--model-dir``
    given is trained further (quality.py's resume); the default one starts afresh, so that
    every benchmark's DDPM has had the same budget."""
    ddpm_args = quality.parse_args([])
    ddpm_args.minutes = args.ddpm_minutes
    ddpm_args.threads = args.ddpm_threads
    identity = {
        "dataset": args.dataset,
        "size": size,
        "channels": channels,
        "minutes": ddpm_args.minutes,
        "preset": ddpm_args.preset,
        "seed": ddpm_args.seed,
    }
    marker = model_dir / DDPM_MARKER
    trained = (model_dir / "unet" / "config.json").is_file()
    if args.skip_train:
        if not trained:
            raise SystemExit(f"--skip-train: no trained model in {model_dir}")
        say(f"DDPM: using {model_dir} as it is")
        return {"reused": True, "skip_train": True}
    if args.reuse and trained and marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("identity") == identity:
            say(f"DDPM: reusing {model_dir} ({done['training']['steps']} steps)")
            return {**done["training"], "reused": True}
    say(
        f"DDPM: training {ddpm_args.preset!r} on {args.dataset} {size}x{size}x{channels} for "
        f"{ddpm_args.minutes:g} CPU min -> {model_dir}"
    )
    if args.model_dir is None and model_dir.exists():
        shutil.rmtree(model_dir)
    training = quality.train_model(
        ddpm_args, model_dir, dataset=args.dataset, size=size, channels=channels
    )
    marker.write_text(json.dumps({"identity": identity, "training": training}, indent=1) + "\n")
    say(f"DDPM: {training['steps']} steps in {training['wall_seconds']:.0f} s wall")
    return {**training, "reused": False}


# ------------------------------------------------------------------ banks


def bank_params(args: argparse.Namespace, spec: BankSpec) -> Any:
    """The authors' generation settings (docs/method.md): DDIM, eta 0, the bank's sampling,
    unless the bank says otherwise."""
    from clsp_positives.proto.params import GenerationParams

    weight = args.interpolation_weight if spec.weight is None else spec.weight
    return GenerationParams(
        interpolation_weight=float(weight),
        steps=args.gen_steps,
        eta=spec.eta,
        method=spec.method,
        sampling=spec.sampling,
        interpolate=spec.interpolate,
        interpolate_until=spec.interpolate_until,
        k=args.k,
    )


def bank_path(out: Path, name: str, key: dict[str, Any]) -> Path:
    return out / "banks" / f"{name}-{short_hash(key)}.npy"


def remove_bank(path: Path) -> None:
    from clsp_positives.trainer.positives.offline import meta_path, progress_path

    for p in (path, progress_path(path), meta_path(path), timing_path(path)):
        p.unlink(missing_ok=True)


def timing_path(path: Path) -> Path:
    """Sidecar with the seconds a generated bank took, so a reused one still reports them."""
    return Path(str(path) + ".seconds.json")


def bank_complete(path: Path) -> bool:
    from clsp_positives.trainer.positives.offline import progress_path

    return path.is_file() and not progress_path(path).exists()


def generate_bank(
    url: str, images: np.ndarray, params: Any, path: Path, meta: dict[str, Any]
) -> float:
    """One bank through the pool client, written like ``clsp generate`` writes one (the same
    resumable writer); returns the seconds it took."""
    from clsp_positives.client import PoolClient
    from clsp_positives.trainer.positives.offline import (
        fill,
        finish,
        open_output,
        progress_path,
    )

    shape = (len(images), int(params.k), *images.shape[1:])
    array, done = open_output(path, shape, meta)
    t0 = time.perf_counter()
    if array is not None:
        with PoolClient(url, timeout_s=600.0) as client:
            fill(
                array,
                done,
                images,
                lambda a: client.submit(a, None, params),
                batch_size=64,
                in_flight=4,
                progress_file=progress_path(path),
            )
        del array
        finish(path)
    return time.perf_counter() - t0


def generated_banks(
    args: argparse.Namespace,
    names: Sequence[str],
    model_dir: Path,
    images: np.ndarray,
    threads: int,
    say: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """The generator's banks: reused when complete (``--reuse``), else made through one
    ``clsp serve`` on ``model_dir`` (started only when something is missing)."""
    from clsp_positives.service.sampling.model import load_model

    fingerprint = load_model(model_dir).fingerprint
    banks: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = GENERATED_BANKS[name]
        params = bank_params(args, spec)
        meta = {
            "dataset": args.dataset,
            "split": "train",
            "shape": [len(images), args.k, *images.shape[1:]],
            "params": json.loads(params.canonical()),
            "model": fingerprint,
        }
        path = bank_path(args.out, name, meta)
        if not args.reuse:
            remove_bank(path)
        banks[name] = {
            "path": path,
            "params": params,
            "meta": meta,
            "seconds": None,
        }
    missing = [n for n, b in banks.items() if not bank_complete(b["path"])]
    for name in set(banks) - set(missing):
        timing = timing_path(banks[name]["path"])
        if timing.is_file():
            banks[name]["seconds"] = json.loads(timing.read_text())["seconds"]
        say(f"bank {name}: reusing {banks[name]['path']}")
    if missing:
        _serve_banks(args, model_dir, banks, missing, images, threads, say)
    return banks


def _serve_banks(
    args: argparse.Namespace,
    model_dir: Path,
    banks: dict[str, dict[str, Any]],
    names: Sequence[str],
    images: np.ndarray,
    threads: int,
    say: Callable[[str], None],
) -> None:
    """Make ``names``' banks through one ``clsp serve`` on ``model_dir``."""
    from clsp_positives.demo import ServiceProcess

    service = ServiceProcess(
        model_dir, log_path=args.out / "service.log", device=args.device, threads=threads
    )
    try:
        service.start()
        say(f"clsp serve on {service.url} ({model_dir})")
        for name in names:
            bank = banks[name]
            seconds = generate_bank(service.url, images, bank["params"], bank["path"], bank["meta"])
            bank["seconds"] = seconds
            timing_path(bank["path"]).write_text(json.dumps({"seconds": seconds}) + "\n")
            per_s = len(images) * args.k / seconds if seconds > 0 else float("nan")
            say(
                f"bank {name}: {len(images)} x {args.k} positives, w = "
                f"{bank['params'].interpolation_weight:g}, {args.gen_steps} DDIM steps, in "
                f"{seconds:.0f} s ({per_s:.1f} positives/s) -> {bank['path']}"
            )
    finally:
        service.stop()


def oracle_bank(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """For each image, k indices of other training images of its class (the image itself
    only when it is alone in its class), drawn with ``seed``: [N, k] int64."""
    rng = np.random.default_rng(seed)
    picks = np.empty((len(labels), k), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        for i in members:
            others = members[members != i] if len(members) > 1 else members
            picks[i] = rng.choice(others, size=k, replace=len(others) < k)
    return picks


def write_oracle_bank(
    args: argparse.Namespace, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    key = {
        "dataset": args.dataset,
        "shape": [len(images), args.k, *images.shape[1:]],
        "seed": args.oracle_seed,
    }
    path = bank_path(args.out, "oracle", key)
    if not (args.reuse and path.is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, images[oracle_bank(labels, args.k, args.oracle_seed)])
    return {"path": path, "meta": key, "seconds": None}


def bank_report(
    bank: np.ndarray, images: np.ndarray, labels: np.ndarray, clfs: dict[str, Any]
) -> dict[str, Any]:
    """Class-kept rate per classifier (trained on the real training images) over every
    candidate, and diversity on [0, 1] (trainer/positive_tools/quality.py, as ``clsp calibrate``
    and the quality benchmark measure them)."""
    from clsp_positives.trainer.positive_tools.quality import (
        Probe,
        between_candidates,
        class_kept,
        to_anchor,
    )

    out: dict[str, Any] = {
        f"class_kept_{name}": class_kept(Probe(clf), bank, labels) for name, clf in clfs.items()
    }
    out["mean_abs_to_anchor"] = to_anchor(bank, images)
    out["mean_abs_between_candidates"] = between_candidates(bank) if bank.shape[1] > 1 else None
    return out


# ------------------------------------------------------------------ training runs


def train_config(args: argparse.Namespace, arm: Arm, seed: int, bank: Path | None) -> Any:
    from clsp_positives.trainer.config import TrainConfig

    extra: dict[str, Any] = {}
    if arm.bank is not None:
        extra.update(clsp_weight=1.0, clsp_mode=arm.clsp_mode, positives_npy=str(bank), k=args.k)
    if arm.joint:
        extra["joint_forward"] = True
    if args.linear_epochs is not None:
        extra["linear_epochs"] = args.linear_epochs
    return TrainConfig(
        dataset=args.dataset,
        image_size=args.image_size,
        subset=args.subset,
        method="simclr",
        backbone="resnet-tiny",
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="adamw",  # as clsp demo trains (clsp_positives/demo.py)
        seed=seed,
        device=args.device,
        progress=False,
        **extra,
    )


def run_key(config: Any, bank_meta: dict[str, Any] | None) -> str:
    """What a run's result depends on: its config (less where its output goes) and what
    its bank was made from (the path alone would not say)."""
    dumped = config.model_dump(mode="json", exclude={"token", "progress", "positives_npy"})
    return short_hash({"config": dumped, "bank": bank_meta})


def train_run(config: Any, log_path: Path) -> dict[str, Any]:
    """One in-process training; its lines go to ``log_path``."""
    from clsp_positives.trainer.train_loop import collapse_warning, train

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        result = train(config, echo=lambda line: print(line, file=log, flush=True))
    seconds = time.perf_counter() - t0
    if result.final is None:
        raise RuntimeError(f"the run ended without an evaluation; see {log_path}")
    history = result.history
    z = [r["z_std"] for r in history if "z_std" in r]
    return {
        # The standard protocol's (None with --linear-epochs 0) and the fast probe's.
        "linear_acc": result.final.linear_acc,
        "probe_acc": float(result.final.probe_acc),
        "knn_acc": float(result.final.knn_acc),
        "z_std": float(z[-1]) if z else None,
        # The check the loop itself warns with (its "collapse" metrics event).
        "collapsed": any(collapse_warning(r, config) for r in history),
        "seconds": round(seconds, 1),
    }


def run_all(
    args: argparse.Namespace,
    arms: Sequence[Arm],
    banks: dict[str, dict[str, Any]],
    previous: dict[str, dict[str, Any]],
    save: Callable[[list[dict[str, Any]]], None],
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Seed by seed, every arm (so an interrupted benchmark still has paired seeds)."""
    plan = [(seed, arm) for seed in range(args.seeds) for arm in arms]
    runs: list[dict[str, Any]] = []
    trained_s: list[float] = []
    for i, (seed, arm) in enumerate(plan, 1):
        bank = banks.get(arm.bank) if arm.bank else None
        config = train_config(args, arm, seed, bank["path"] if bank else None)
        key = run_key(config, bank["meta"] if bank else None)
        if key in previous:
            run = {**previous[key], "reused": True}
        else:
            log = args.out / "logs" / f"{arm.name}-seed{seed}.log"
            run = {"arm": arm.name, "seed": seed, "key": key, **train_run(config, log)}
            trained_s.append(run["seconds"])
        runs.append(run)
        save(runs)
        left = len(plan) - i
        eta = left * (sum(trained_s) / len(trained_s)) if trained_s else 0.0
        took = "reused" if run.get("reused") else f"{run['seconds']:.0f} s"
        collapsed = " COLLAPSED" if run["collapsed"] else ""
        say(
            f"[{i}/{len(plan)}] {arm.name:<24} seed {seed}: linear {_fmt(run['linear_acc'])} "
            f"probe {_fmt(run.get('probe_acc'))} kNN {run['knn_acc']:.3f} "
            f"z_std {_fmt(run['z_std'])}{collapsed} ({took}); "
            f"ETA {eta / 60:.1f} min"
        )
    return runs


# ------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _fmt_interval(iv: stats.Interval | None) -> str:
    if iv is None:
        return "-"
    if iv.low is None or iv.high is None:
        return f"{iv.mean * 100:+.1f}"
    return f"{iv.mean * 100:+.1f} [{iv.low * 100:+.1f}, {iv.high * 100:+.1f}]"


def results_table(summary: Sequence[stats.ArmSummary], confidence: float) -> list[str]:
    """Markdown rows; differences in percentage points."""
    ci = f"{confidence:.0%} CI"
    lines = [
        f"| arm | seeds | linear acc | kNN acc | Δ linear (pp, {ci}) | Δ kNN (pp, {ci}) "
        "| z_std | collapse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        collapse = ", ".join(f"seed {x}" for x in s.collapsed_seeds) or "no"
        lines.append(
            f"| {s.arm} | {len(s.seeds)} "
            f"| {s.mean['linear_acc']:.3f} ± {s.std['linear_acc']:.3f} "
            f"| {s.mean['knn_acc']:.3f} ± {s.std['knn_acc']:.3f} "
            f"| {_fmt_interval(s.diff['linear_acc'])} | {_fmt_interval(s.diff['knn_acc'])} "
            f"| {_fmt(s.z_std, '.2f')} | {collapse} |"
        )
    return lines


def banks_table(reports: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| bank | w | class kept (logreg) | class kept (SVC) | mean abs to anchor "
        "| mean abs between candidates | positives/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        lines.append(
            f"| {name} | {_fmt(r.get('interpolation_weight'), 'g')} "
            f"| {r['class_kept_logreg']:.3f} | {r['class_kept_svc_rbf']:.3f} "
            f"| {r['mean_abs_to_anchor']:.3f} | {_fmt(r['mean_abs_between_candidates'])} "
            f"| {_fmt(r.get('positives_per_s'), '.1f')} |"
        )
    return lines


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high]."""
    span = max(high - low, 1e-9)
    raw = span / max(count - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = np.ceil(low / step) * step
    return [round(float(v), 10) for v in np.arange(first, high + step / 2, step)]


def write_plot(
    summary: Sequence[stats.ArmSummary], path: Path, title: str, metric: str = "knn_acc"
) -> None:
    """Per arm, its per-seed difference to the baseline (grey dots), their mean (black) and
    CI (bar), in percentage points, against a zero line; drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [s for s in summary if s.diff.get(metric) is not None]
    font = ImageFont.load_default()
    width, left, right, top, row_h = 760, 190, 30, 40, 34
    height = top + row_h * max(len(rows), 1) + 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)
    values = [0.0]
    for s in rows:
        iv = s.diff[metric]
        values += [v * 100 for v in s.diffs_by_seed[metric].values()]
        values += [v * 100 for v in (iv.low, iv.high) if v is not None]
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 0.5)
    ticks = nice_ticks(lo - pad, hi + pad)
    lo, hi = min(ticks[0], lo - pad), max(ticks[-1], hi + pad)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - right)

    axis_y = top + row_h * max(len(rows), 1) + 5
    draw.line([(x(0), top - 5), (x(0), axis_y)], fill=(150, 150, 150), width=1)
    draw.line([(left, axis_y), (width - right, axis_y)], fill="black")
    for t in ticks:
        draw.line([(x(t), axis_y), (x(t), axis_y + 5)], fill="black")
        label = f"{t:g}"
        draw.text(
            (x(t) - draw.textlength(label, font=font) / 2, axis_y + 8),
            label,
            fill="black",
            font=font,
        )
    draw.text(
        (left, axis_y + 24),
        "difference to the baseline, percentage points (grey: seeds; black: mean and CI)",
        fill="black",
        font=font,
    )
    for i, s in enumerate(rows):
        y = top + row_h * i + row_h // 2
        iv = s.diff[metric]
        draw.text((10, y - 6), s.arm, fill="black", font=font)
        if iv.low is not None and iv.high is not None:
            draw.line([(x(iv.low * 100), y), (x(iv.high * 100), y)], fill="black", width=2)
            for end in (iv.low, iv.high):
                draw.line([(x(end * 100), y - 5), (x(end * 100), y + 5)], fill="black", width=2)
        for v in s.diffs_by_seed[metric].values():
            cx = x(v * 100)
            draw.ellipse([cx - 3, y - 11, cx + 3, y - 5], fill=(140, 140, 140))
        cx = x(iv.mean * 100)
        draw.ellipse([cx - 5, y - 5, cx + 5, y + 5], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def docs_section(results: dict[str, Any], table: list[str], banks: list[str], png: str) -> str:
    a, m = results["args"], results["machine"]
    lines = [
        f"`{results['command']}` on {m['cpus']} CPUs ({m['threads']} torch "
        f"thread{'' if m['threads'] == 1 else 's'}), torch "
        f"{m['torch']}; {len(results['runs'])} runs, {results['training_seconds'] / 60:.0f} "
        "min of training.",
        "",
        f"Epochs per run: {a['epochs']}; seeds 0..{a['seeds'] - 1}; k = {a['k']} positives per "
        f"image in a bank; {a['gen_steps']} DDIM steps.",
        "",
        *banks,
        "",
        *table,
        "",
        f"![per-seed kNN differences to the baseline]({png})",
    ]
    return "\n".join(lines)


def replace_section(text: str, dataset: str, body: str) -> str:
    """``text`` with the part between this data set's markers replaced (appended if absent)."""
    begin, end = f"<!-- method:{dataset}:begin -->", f"<!-- method:{dataset}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip("\n") + f"\n\n{block}\n"


# ------------------------------------------------------------------ the run


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def load_previous(path: Path, reuse: bool) -> dict[str, Any]:
    """The last results.json of this --out when reusing (its finished runs)."""
    if not (reuse and path.is_file()):
        return {}
    return json.loads(path.read_text())


def build_banks(
    args: argparse.Namespace,
    arms: Sequence[Arm],
    images: np.ndarray,
    labels: np.ndarray,
    threads: int,
    say: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """The banks the arms need, and the DDPM's report when a generated one is among them."""
    needed = sorted({a.bank for a in arms if a.bank})
    banks: dict[str, dict[str, Any]] = {}
    ddpm: dict[str, Any] | None = None
    generated = [n for n in needed if n in GENERATED_BANKS]
    if generated:
        model_dir = Path(args.model_dir) if args.model_dir else args.out / "ddpm"
        size, channels = images.shape[1], images.shape[3]
        ddpm = ensure_ddpm(args, model_dir, size, channels, say)
        banks.update(generated_banks(args, generated, model_dir, images, threads, say))
    if "oracle" in needed:
        banks["oracle"] = write_oracle_bank(args, images, labels)
    return banks, ddpm


def report_banks(
    banks: dict[str, dict[str, Any]],
    images: np.ndarray,
    labels: np.ndarray,
    k: int,
) -> dict[str, dict[str, Any]]:
    """Each bank's class-kept rate and diversity, and how fast it was generated."""
    clfs = quality.classifiers(images.reshape(len(images), -1) / 255.0, labels)
    reports: dict[str, dict[str, Any]] = {}
    for name, bank in banks.items():
        report = bank_report(np.load(bank["path"]), images, labels, clfs)
        report["file"] = str(bank["path"])
        if "params" in bank:
            report["interpolation_weight"] = bank["params"].interpolation_weight
            report["params"] = json.loads(bank["params"].canonical())
        if bank["seconds"]:
            report["seconds"] = round(bank["seconds"], 1)
            report["positives_per_s"] = len(images) * k / bank["seconds"]
        reports[name] = report
    return reports


def write_outputs(
    args: argparse.Namespace, results: dict[str, Any], say: Callable[[str], None]
) -> None:
    """The table, the PNG and (``--write-docs``) the docs page's section."""
    summary = stats.summarise(results["runs"], baseline=BASELINE, confidence=args.confidence)
    results["summary"] = [asdict(s) for s in summary]
    table = results_table(summary, args.confidence)
    say("")
    for line in table:
        say(line)
    png = args.out / f"method-{args.section or args.dataset}.png"
    write_plot(summary, png, f"method benchmark, {args.dataset}: kNN accuracy vs the baseline")
    say(f"wrote {args.out / RESULTS_NAME} and {png}")
    if args.write_docs:
        docs = Path(args.docs)
        (docs.parent / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, docs.parent / "img" / png.name)
        body = docs_section(results, table, banks_table(results["banks"]), f"img/{png.name}")
        section = args.section or args.dataset
        docs.write_text(replace_section(docs.read_text(), section, body))
        say(f"updated {docs} ({section} section) and {docs.parent / 'img' / png.name}")


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from clsp_positives.demo import MAX_THREADS
    from clsp_positives.images import load_images
    from clsp_positives.threads import resolve_threads

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / RESULTS_NAME
    previous = load_previous(results_path, args.reuse)
    threads = resolve_threads(args.threads, at_most=MAX_THREADS)

    def say(line: str) -> None:
        print(line, flush=True)

    arms = [ARMS[n] for n in args.arm_names]
    data = load_images(args.dataset, split="train", size=args.image_size)
    images, labels = data.images[: args.subset], data.labels[: args.subset]
    say(f"{args.dataset}: {len(images)} training images, {data.size}x{data.size}x{data.channels}")
    banks, ddpm = build_banks(args, arms, images, labels, threads, say)
    bank_reports = report_banks(banks, images, labels, args.k)
    for line in banks_table(bank_reports) if bank_reports else []:
        say(line)

    results: dict[str, Any] = {
        "benchmark": "method",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine(), "threads": threads},
        "data": {"dataset": args.dataset, "images": len(images), "shape": list(images.shape[1:])},
        "ddpm": ddpm,
        "banks": bank_reports,
        "runs": [],
    }

    def save(runs: list[dict[str, Any]]) -> None:
        results["runs"] = runs
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["training_seconds"] = round(sum(r["seconds"] for r in runs), 1)
        results_path.write_text(json.dumps(results, indent=1) + "\n")

    # After the DDPM stage, which trains with its own thread count.
    torch.set_num_threads(threads)
    by_key = {r["key"]: r for r in previous.get("runs", []) if "key" in r}
    runs = run_all(args, arms, banks, by_key, save, say)
    write_outputs(args, results, say)
    save(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
