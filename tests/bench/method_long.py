"""Long-schedule method benchmark: the CLSP authors' recipe scaled to digits, run long
enough to see their dynamics (not a test; writes results.json, a table and a PNG).

The authors' SimCLR-CLSP ResNet-50 runs collapse for the first ~5 % of training and
recover to end above the baseline (tests/data/authors_runs, docs/method.md "Training
dynamics"); our 15-20-epoch method benchmark (tests/bench/method.py) stops inside that
window. This one trains every arm for ``--epochs`` (200 by default) with the authors'
optimiser and schedule, evaluates every ``--eval-every`` epochs, and reports per arm:

- the paired kNN and probe difference to the baseline with its t interval at 10, 25, 50
  and 100 % of training, and the standard linear protocol's at the end;
- the collapse episodes of every run (trainer/collapse_monitor.py);
- one PNG of base loss (over its collapsed value), CLSP term and kNN over the fraction of
  training, ours (mean over seeds, with the seeds' range) beside the authors' curves,
  and the same over optimizer steps.

Arms: baseline; the paper's similarity form; the contrastive form; the similarity form
with the CLSP weight warmed up over ``--clsp-warmup-epochs``. Every run's result is a
file of its own under ``--out``/runs, keyed by its config: an interrupted benchmark
resumes where it stopped, and a partial one still reports the seeds it has.

    .venv/bin/python tests/bench/method_long.py                          # 5 seeds, hours
    .venv/bin/python tests/bench/method_long.py --seeds 2 --report-only  # table so far
    .venv/bin/python tests/bench/method_long.py --seeds 1 --epochs 4 --eval-every 1 \\
        --ddpm-minutes 0.5 --gen-steps 5 --linear-epochs 2 --out runs/long-smoke   # smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clsp_positives.trainer.collapse_monitor import (
    Observation,
    find_episodes,
    is_collapsed,
    nt_xent_collapsed,
)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.bench.*, when run as a script
    sys.path.insert(0, str(REPO))

from tests.bench import method  # noqa: E402
from tests.bench import method_stats as stats  # noqa: E402

AUTHORS = REPO / "tests" / "data" / "authors_runs"
AUTHORS_CURVES = {
    "R50 (theirs)": ("simclr_clsp_cifar10_resnet50", 48, 1000),
    "R18 (theirs)": ("simclr_clsp_cifar10_resnet18", 48, 1000),
}
"""Their SimCLR-CLSP CIFAR-10 runs: file, steps per epoch (50000 / 1024), epochs."""
AUTHORS_BATCH = 1024
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
BASELINE = "baseline"
BANK = "lowskip"
"""The recommended generation setting (docs/method.md, "Positive quality"): the authors'
loop with x0 clipped, the anchor's bottleneck and low-resolution skips."""


@dataclass(frozen=True)
class LongArm:
    name: str
    clsp_mode: str | None  # None: no CLSP term
    warmup: bool = False


ARMS = {
    a.name: a
    for a in (
        LongArm(BASELINE, None),
        LongArm("similarity", "similarity"),
        LongArm("contrastive", "contrastive"),
        LongArm("similarity-warmup", "similarity", warmup=True),
    )
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/method-long")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, the same for every arm")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--warmup-epochs", type=float, default=10.0)
    p.add_argument("--clsp-warmup-epochs", type=float, default=20.0)
    p.add_argument("--k", type=int, default=8, help="candidates per image (the paper's 8)")
    p.add_argument("--gen-steps", type=int, default=50)
    p.add_argument("--ddpm-minutes", type=float, default=10.0)
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="fixed, so the cores may be shared")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the runs")
    p.add_argument(
        "--shard",
        default="0/1",
        help="I/N: train only every N-th (seed, arm) from the I-th, so N processes share "
        "the plan (each reports what all have finished)",
    )
    p.add_argument("--confidence", type=float, default=0.95)
    args = p.parse_args(argv)
    args.out = Path(args.out)
    args.arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.trained = set(args.arm_names)  # the baseline added below is reported, not trained
    unknown = sorted(set(args.arm_names) - set(ARMS))
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if BASELINE not in args.arm_names:
        args.arm_names.insert(0, BASELINE)
    return args


def bank_args(args: argparse.Namespace) -> argparse.Namespace:
    """What method.py's DDPM and bank stages read, for this benchmark's one bank."""
    return argparse.Namespace(
        dataset="digits",
        image_size=None,
        subset=None,
        out=args.out,
        k=args.k,
        gen_steps=args.gen_steps,
        interpolation_weight=0.1,
        model_dir=None,
        skip_train=False,
        ddpm_minutes=args.ddpm_minutes,
        ddpm_threads=args.threads,
        reuse=True,
        device="cpu",
    )


RECIPE = REPO / "recipes" / "digits-authors-simclr-clsp.yaml"


def train_config(args: argparse.Namespace, arm: LongArm, seed: int, bank: Path | None) -> Any:
    """The recipe (the authors' scaled to digits: its comments and docs/method.md, "Scaled
    to digits") with this benchmark's epochs, batch, rates and evaluation, and the arm's
    CLSP term: none for the baseline, whose forward stays one pass of [view1; view2]."""
    from clsp_positives.trainer.config import TrainConfig
    from clsp_positives.trainer.config_file import read_config_file

    options = read_config_file(RECIPE)
    options.update(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        eval_every=args.eval_every,
        linear_epochs=args.linear_epochs,
        seed=seed,
        device="cpu",
        progress=False,
    )
    if arm.clsp_mode is None:
        for name in ("clsp_weight", "clsp_mode", "k"):
            options.pop(name)
    else:
        options.update(clsp_mode=arm.clsp_mode, positives_npy=str(bank), k=args.k)
    if arm.warmup:
        options["clsp_weight_warmup_epochs"] = args.clsp_warmup_epochs
    return TrainConfig.model_validate(options)


def collapsed_value(config: Any) -> float:
    """The base loss with every embedding equal: NT-Xent over 2B rows, or 3B rows when the
    positives are inside it (the contrastive form, a full bank)."""
    rows = 3 if config.clsp_weight > 0 and config.clsp_mode == "contrastive" else 2
    return nt_xent_collapsed(rows * config.batch_size)


def run_one(config: Any, path: Path, log_path: Path) -> dict[str, Any]:
    """One in-process training; its per-epoch records and final figures go to ``path``."""
    from clsp_positives.trainer.train_loop import train

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        result = train(config, echo=lambda line: print(line, file=log, flush=True))
    if result.final is None:
        raise RuntimeError(f"the run ended without an evaluation; see {log_path}")
    keep = ("epoch", "steps", "loss_base", "loss_clsp", "z_std", "knn_acc", "probe_acc", "lr")
    run = {
        "records": [{k: r[k] for k in keep if k in r} for r in result.history],
        "linear_acc": result.final.linear_acc,
        "knn_acc": float(result.final.knn_acc),
        "probe_acc": float(result.final.probe_acc),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run) + "\n")
    tmp.replace(path)  # a run is there whole or not at all
    return run


def episodes_of(run: dict[str, Any], config: Any) -> list[Any]:
    value = collapsed_value(config)
    return find_episodes(
        Observation(
            r["epoch"] + 1,
            is_collapsed(
                r["loss_base"],
                value,
                z_std=r.get("z_std"),
                z_std_threshold=config.collapse_z_std,
            ),
        )
        for r in run["records"]
        if "loss_base" in r
    )


def at_fraction(run: dict[str, Any], epochs: int, fraction: float, key: str) -> float | None:
    """``key`` at the evaluation that ends ``fraction`` of training (the last one at or
    before it); the final evaluation's value at 1.0."""
    target = fraction * epochs
    points = [(r["epoch"] + 1, r[key]) for r in run["records"] if key in r]
    before = [v for e, v in points if e <= target + 1e-9]
    return float(before[-1]) if before else None


def paired(
    runs: dict[tuple[str, int], dict[str, Any]], arm: str, value: Callable[[dict], float | None]
) -> stats.Interval | None:
    diffs = []
    for (name, seed), run in runs.items():
        base = runs.get((BASELINE, seed))
        if name != arm or base is None:
            continue
        a, b = value(run), value(base)
        if a is not None and b is not None:
            diffs.append(100.0 * (a - b))
    return stats.t_interval(diffs, 0.95) if diffs else None


def _mean(
    runs: dict[tuple[str, int], dict[str, Any]], arm: str, value: Callable[[dict], float | None]
) -> str:
    values = [v for (a, _), r in runs.items() if a == arm and (v := value(r)) is not None]
    return f"{100 * float(np.mean(values)):.1f}" if values else "-"


def _iv(iv: stats.Interval | None) -> str:
    if iv is None:
        return "-"
    if iv.low is None or iv.high is None:
        return f"{iv.mean:+.1f} (n={iv.n})"
    return f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}] (n={iv.n})"


def report(
    args: argparse.Namespace,
    runs: dict[tuple[str, int], dict[str, Any]],
    configs: dict[tuple[str, int], Any],
) -> tuple[list[str], dict[str, Any]]:
    """The markdown table (paired differences to the baseline, percentage points) and the
    same as JSON."""
    lines = [
        "Paired differences to the baseline in percentage points, mean [95% CI] (n seeds); "
        "the baseline's row: its means.",
        "",
        "| arm | seeds | kNN @10% | kNN @25% | kNN @50% | kNN @100% | probe @10% | "
        "probe @50% | probe @100% | linear (end) | collapse episodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table: dict[str, Any] = {}
    for name in args.arm_names:
        seeds = sorted(s for (a, s) in runs if a == name)
        if not seeds:
            continue
        row: dict[str, Any] = {"seeds": seeds}
        for metric in ("knn_acc", "probe_acc"):
            for f in FRACTIONS:
                row[f"{metric}@{f:g}"] = paired(
                    runs, name, lambda r, m=metric, f=f: at_fraction(r, args.epochs, f, m)
                )
        row["linear_acc"] = paired(runs, name, lambda r: r.get("linear_acc"))
        row["mean_knn_end"] = float(np.mean([runs[(name, s)]["knn_acc"] for s in seeds]))
        row["episodes"] = {
            s: [e.describe() for e in episodes_of(runs[(name, s)], configs[(name, s)])]
            for s in seeds
        }
        table[name] = row
        eps = "; ".join(f"s{s}: " + (", ".join(row["episodes"][s]) or "none") for s in seeds)
        if name == BASELINE:  # absolute means, the others' differences are to these
            cells = [
                _mean(runs, name, lambda r, f=f: at_fraction(r, args.epochs, f, "knn_acc"))
                for f in FRACTIONS
            ] + [
                _mean(runs, name, lambda r, f=f: at_fraction(r, args.epochs, f, "probe_acc"))
                for f in (0.1, 0.5, 1.0)
            ]
            cells.append(_mean(runs, name, lambda r: r.get("linear_acc")))
        else:
            cells = [_iv(row[f"knn_acc@{f:g}"]) for f in FRACTIONS]
            cells += [_iv(row[f"probe_acc@{f:g}"]) for f in (0.1, 0.5, 1.0)]
            cells.append(_iv(row["linear_acc"]))
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + f" | {eps} |")
    json_table = {
        n: {k: (v.__dict__ if isinstance(v, stats.Interval) else v) for k, v in row.items()}
        for n, row in table.items()
    }
    return lines, json_table


def authors_curves() -> dict[str, list[dict[str, float]]]:
    """Their logged base loss (over its collapsed value) and CLSP term per step."""
    collapsed = nt_xent_collapsed(2 * AUTHORS_BATCH)
    out = {}
    for label, (name, per_epoch, epochs) in AUTHORS_CURVES.items():
        with (AUTHORS / f"{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        out[label] = [
            {
                "step": float(r["step"]),
                "fraction": int(r["step"]) / (per_epoch * epochs),
                "base": float(r["loss_simclr"]) / collapsed,
                "clsp": float(r["loss_clsp"]),
            }
            for r in rows
        ]
    return out


def write_png(
    args: argparse.Namespace,
    runs: dict[tuple[str, int], dict[str, Any]],
    configs: dict[tuple[str, int], Any],
    path: Path,
) -> None:
    """Two PNGs (over the fraction of training, and over optimizer steps): base loss over
    its collapsed value, CLSP term and kNN; ours as the mean over seeds with the seeds'
    lowest and highest value, theirs from their logs."""
    from clsp_positives.curves import Panel, Series, write_curves

    theirs = authors_curves()
    for x_key, suffix, x_label in (
        ("fraction", "", "fraction of training"),
        ("step", "-steps", "optimizer steps"),
    ):
        base_s, clsp_s, knn_s = [], [], []
        for label, points in theirs.items():
            if x_key == "step":  # their collapse spans their first ~2400 steps
                points = [p for p in points if p["step"] <= max(3000.0, 18.0 * args.epochs)]
            base_s.append(Series(label, tuple((p[x_key], p["base"]) for p in points)))
            clsp_s.append(Series(label, tuple((p[x_key], p["clsp"]) for p in points)))
            knn_s.append(Series(label, ()))  # their kNN is not logged: a place, not a line
        for name in args.arm_names:
            seeds = sorted(s for (a, s) in runs if a == name)
            if not seeds:
                continue
            steps = runs[(name, seeds[0])]["records"][0].get("steps", 11)

            def x(epoch: int, steps: int = steps, x_key: str = x_key) -> float:
                done = epoch + 1
                return done / args.epochs if x_key == "fraction" else float(done * steps)

            for key, collection, scale in (
                ("loss_base", base_s, "collapsed"),
                ("loss_clsp", clsp_s, None),
                ("knn_acc", knn_s, None),
            ):
                if key == "loss_clsp" and ARMS[name].clsp_mode != "similarity":
                    collection.append(Series(name, ()))  # no similarity term: its place
                    continue
                by_epoch: dict[int, list[float]] = {}
                for s in seeds:
                    div = collapsed_value(configs[(name, s)]) if scale else 1.0
                    for r in runs[(name, s)]["records"]:
                        if key in r and r[key] is not None and math.isfinite(r[key]):
                            by_epoch.setdefault(r["epoch"], []).append(r[key] / div)
                epochs = sorted(by_epoch)
                mean = tuple((x(e), float(np.mean(by_epoch[e]))) for e in epochs)
                band = (
                    tuple((x(e), min(by_epoch[e]), max(by_epoch[e])) for e in epochs)
                    if len(seeds) > 1
                    else ()
                )
                collection.append(Series(f"{name} (n={len(seeds)})", mean, band))
        panels = [
            Panel("base loss / its collapsed value (1 = collapsed)", tuple(base_s)),
            Panel("CLSP term 2 - 2cos (similarity form)", tuple(clsp_s)),
            Panel("kNN accuracy (ours; band: the seeds' lowest and highest)", tuple(knn_s)),
        ]
        write_curves(
            panels,
            path.with_name(path.stem + suffix + path.suffix),
            title=f"digits, {args.epochs} epochs, vs the authors' SimCLR-CLSP CIFAR-10 logs",
            x_label=x_label,
        )


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from clsp_positives.images import load_images

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    def say(line: str) -> None:
        print(line, flush=True)

    arms = [ARMS[n] for n in args.arm_names]
    bank_path: Path | None = None
    bank_meta: dict[str, Any] | None = None
    if any(a.clsp_mode for a in arms):
        bargs = bank_args(args)
        data = load_images("digits", split="train")
        bank_arm = [method.ARMS[f"{BANK}-similarity"]]
        banks, _ = method.build_banks(bargs, bank_arm, data.images, data.labels, args.threads, say)
        if BANK in banks:
            bank_path, bank_meta = banks[BANK]["path"], banks[BANK]["meta"]
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    configs: dict[tuple[str, int], Any] = {}
    started = time.perf_counter()
    shard, shards = (int(x) for x in args.shard.split("/"))
    plan = [(seed, arm) for seed in range(args.seeds) for arm in arms]
    mine = {
        item
        for i, item in enumerate(p for p in plan if p[1].name in args.trained)
        if i % shards == shard
    }
    for seed, arm in plan:
        config = train_config(args, arm, seed, bank_path)
        key = method.run_key(config, bank_meta if arm.clsp_mode else None)
        path = args.out / "runs" / f"{arm.name}-seed{seed}-{key}.json"
        configs[(arm.name, seed)] = config
        if path.is_file():
            runs[(arm.name, seed)] = json.loads(path.read_text())
            continue
        skip = args.report_only or (seed, arm) not in mine
        if skip or (arm.clsp_mode and bank_path is None):
            continue
        say(f"training {arm.name} seed {seed} ({args.epochs} epochs)")
        log = args.out / "logs" / f"{arm.name}-seed{seed}.log"
        run = run_one(config, path, log)
        runs[(arm.name, seed)] = run
        eps = [e.describe() for e in episodes_of(run, config)] or ["no collapse"]
        say(
            f"  {arm.name} seed {seed}: kNN {run['knn_acc']:.3f} linear "
            f"{run['linear_acc']} in {run['seconds']:.0f} s; {'; '.join(eps)}"
        )
    lines, table = report(args, runs, configs)
    for line in lines:
        say(line)
    png = args.out / "method-long.png"
    write_png(args, runs, configs, png)
    results = {
        "benchmark": "method-long",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**method.machine(), "threads": args.threads},
        "bank": bank_meta,
        "runs_done": sorted(f"{a}-seed{s}" for a, s in runs),
        "table": table,
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "training_seconds": round(sum(r["seconds"] for r in runs.values()), 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    say(f"wrote {args.out / 'results.json'}, table.md and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
