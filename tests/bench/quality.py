"""Quality benchmark: do CLSP positives keep their anchor's class? (not a test; prints a table)

Trains a DDPM on digits at 16x16 for a fixed CPU budget with ``clsp diffusion train``'s code
(default: 10 minutes of process CPU time on one thread, capped at 20 wall minutes: on a
shared 2-core machine two OpenMP threads spent most of their CPU time waiting for each other,
and CPU time keeps the budget independent of what else runs),
generates positives for test anchors with the service's ``PositivesGenerator`` at w = 0.1 (CLSP) and
w = 1.0 (plain unconditional sampling: the anchor is ignored) with the same anchors and seeds,
and asks classifiers trained on the real digits training images which class each positive is.

Targets: rate >= 0.45 at w = 0.1 and >= 3x the rate at w = 1.0; positives are not
copies (mean |positive - anchor| >= 0.05 on [0, 1]) and two candidates of one anchor differ.

The UNet: two levels (32, 64 channels; 16x16 -> 8x8) with self-attention at the 8x8
bottleneck. With a bottleneck at 8x8 the interpolated features still hold the anchor's
layout, which is what carries its class; deeper UNets (4x4 or 2x2 bottlenecks) decode mostly
from the candidate's skips and kept the class far less often in exploratory runs at the same
budget (see docs/performance.md). Plain DDPM recipe otherwise: lr 2e-4 with cosine decay over the
budget, batch 64, EMA 0.999 with warm-up.

    .venv/bin/python tests/bench/quality.py --out quality.json            # 10 CPU minutes
    .venv/bin/python tests/bench/quality.py --minutes 1 --anchors 50      # quick look
    .venv/bin/python tests/bench/quality.py --model-dir runs/ddpm-digits \
        --skip-train --sampling authors-clipped                           # same model, clipped
    .venv/bin/python tests/bench/quality.py --model-dir runs/ddpm-digits \
        --skip-train --sampling authors-clipped --interpolate bottleneck+low-skips
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np

from clsp_positives.proto.params import Interpolate, Sampling
from clsp_positives.trainer.positive_tools.quality import (
    Probe,
    between_candidates,
    class_kept,
    default_classifier,
    fraction_all_differ,
    min_to_anchor,
    pixels,
    to_anchor,
)

WEIGHTS = (0.1, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="quality.json", help="JSON file for the results")
    p.add_argument("--model-dir", default=None, help="where to train (default: a temp dir)")
    p.add_argument("--skip-train", action="store_true", help="evaluate --model-dir as it is")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the budget is process CPU time / threads (the same work whatever else runs "
        "on a shared machine); wall: elapsed time",
    )
    p.add_argument(
        "--max-wall-minutes",
        type=float,
        default=20.0,
        help="with --clock cpu: stop by this much elapsed time too (a heavily shared machine)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lr-schedule", default="cosine")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument(
        "--preset",
        default="tiny",
        help="UNet preset or JSON; tiny (two levels, attention at the 8x8 "
        "bottleneck) kept the anchor's class best in the config search",
    )
    p.add_argument("--anchors", type=int, default=200)
    p.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    p.add_argument("--eta", type=float, default=0.1)
    p.add_argument(
        "--sampling",
        default="authors",
        choices=typing.get_args(Sampling),
        help="sampling mode (docs/design.md §1); the seeds are the same in every mode",
    )
    p.add_argument(
        "--interpolate",
        default="bottleneck",
        choices=typing.get_args(Interpolate),
        help="what of the anchor's encoding is mixed in (docs/design.md §1)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_model(
    args: argparse.Namespace,
    model_dir: Path,
    *,
    dataset: str = "digits",
    size: int = 16,
    channels: int = 1,
) -> dict[str, Any]:
    """The DDPM on a CPU budget (``args``: this script's options); the method benchmark
    (tests/bench/method.py) trains its model with it too, on other data sets."""
    from clsp_positives.service.ddpm.train import DiffusionTrainConfig, train

    preset = args.preset
    config = DiffusionTrainConfig(
        out=str(model_dir),
        dataset=dataset,
        size=size,
        channels=channels,
        preset=preset,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay,
        seed=args.seed,
        threads=args.threads,
        save_every=200,
        sample_count=64,
        sample_steps=50,
        progress=sys.stderr.isatty(),
    )
    threads = args.threads
    wall0, load0 = time.perf_counter(), os.getloadavg()
    wall_scale = args.minutes / args.max_wall_minutes

    def cpu_clock() -> float:
        # CPU time of this process per thread, unless the wall-time cap comes first.
        return max(time.process_time() / threads, (time.perf_counter() - wall0) * wall_scale)

    clock = cpu_clock if args.clock == "cpu" else time.perf_counter
    result = train(config, clock=clock)
    return {
        "steps": result.step,
        "budget_minutes": args.minutes,
        "clock": args.clock,
        "max_wall_minutes": args.max_wall_minutes if args.clock == "cpu" else None,
        "cpu_seconds": round(time.process_time(), 1),
        "budget_seconds_used": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
        "images_per_s": round(result.images_per_s, 1),
        "final_loss": round(result.loss, 4),
        "parameters": result.parameters,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "ema_decay": args.ema_decay,
        "threads": threads,
        "unet": json.loads(Path(preset).read_text()) if preset.endswith(".json") else preset,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def classifiers(train_x: np.ndarray, train_y: np.ndarray) -> dict[str, Any]:
    """Two classifiers on real digits; a positive 'keeps its class' per each of them.
    The logistic regression is ``clsp calibrate``'s probe (trainer/positive_tools/quality.py)."""
    from sklearn.svm import SVC

    return {
        "logreg": default_classifier().fit(train_x, train_y),
        "svc_rbf": SVC().fit(train_x, train_y),
    }


def evaluate(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    import torch

    from clsp_positives.images import load_images
    from clsp_positives.proto.keys import canonical_anchors, positive_keys, seed_from_key
    from clsp_positives.proto.params import GenerationParams
    from clsp_positives.service.sampling.generator import PositivesGenerator

    torch.set_num_threads(args.threads)
    train_set = load_images("digits", split="train", size=16, channels=1)
    test_set = load_images("digits", split="test", size=16, channels=1)
    fitted = classifiers(pixels(train_set.images), train_set.labels)
    probes = {name: Probe(c) for name, c in fitted.items()}
    real_acc = {k: class_kept(p, test_set.images, test_set.labels) for k, p in probes.items()}

    # Anchors: the first N test images (a fixed, stratified-by-construction sample).
    n = min(args.anchors, len(test_set))
    anchors_u8, labels = test_set.images[:n], test_set.labels[:n]
    canon = canonical_anchors(anchors_u8)
    generator = PositivesGenerator.from_dir(model_dir, device="cpu", dtype="float32")
    # The seeds of candidates 0 and 1 at w = 0.1; reused at w = 1.0 so both arms share noise.
    params = GenerationParams(interpolation_weight=0.1, steps=args.steps, eta=args.eta)
    seeds = [
        np.array(
            [
                seed_from_key(k)
                for k in positive_keys(
                    generator.fingerprint, params, canon, np.full(n, cand, dtype=np.int64)
                )
            ],
            dtype=np.int64,
        )
        for cand in (0, 1)
    ]
    anchors01 = anchors_u8.astype(np.float32) / 255.0
    group = params.model_copy(
        update={"sampling": args.sampling, "interpolate": args.interpolate}
    ).group()
    rows: dict[str, Any] = {}
    for w in WEIGHTS:
        t0 = time.perf_counter()
        cands = [
            generator.sample(
                canon,
                s,
                np.full(n, w, dtype=np.float32),
                group,
            ).astype(np.float32)
            / 255.0
            for s in seeds
        ]
        seconds = time.perf_counter() - t0
        p0, both = cands[0], np.stack(cands, axis=1)  # [N, H, W, C], [N, 2, H, W, C]
        row: dict[str, Any] = {f"rate_{k}": class_kept(p, p0, labels) for k, p in probes.items()}
        # Candidate 1 as a second draw: the rate over both candidates is less noisy.
        for k, p in probes.items():
            row[f"rate_{k}_2cand"] = class_kept(p, both, labels)
        # Distances to the anchor are candidate 0's, as they always were.
        row["mean_abs_to_anchor"] = to_anchor(p0[:, None], anchors01)
        row["min_abs_to_anchor"] = min_to_anchor(p0[:, None], anchors01)
        row["mean_abs_between_candidates"] = between_candidates(both)
        row["fraction_candidates_differ"] = fraction_all_differ(both)
        row["sampling_seconds"] = round(seconds, 1)
        rows[f"w={w}"] = row
    lo, hi = rows["w=0.1"], rows["w=1.0"]
    targets = {
        "rate_w0.1>=0.45": lo["rate_logreg"] >= 0.45,
        "ratio>=3": lo["rate_logreg"] >= 3 * hi["rate_logreg"],
        "not_copies(mean_abs>=0.05)": lo["mean_abs_to_anchor"] >= 0.05,
        "candidates_differ": lo["fraction_candidates_differ"] == 1.0,
    }
    return {
        "anchors": n,
        "sampler": {
            "method": "ddim",
            "steps": args.steps,
            "eta": args.eta,
            "sampling": args.sampling,
            "interpolate": args.interpolate,
        },
        "classifier_accuracy_on_real_test": real_acc,
        "results": rows,
        "ratio_logreg": lo["rate_logreg"] / max(hi["rate_logreg"], 1e-9),
        "ratio_svc_rbf": lo["rate_svc_rbf"] / max(hi["rate_svc_rbf"], 1e-9),
        "targets": targets,
        "fingerprint": generator.fingerprint,
    }


def print_table(report: dict[str, Any]) -> None:
    tr = report.get("training")
    if tr:
        print(
            f"training: {tr['steps']} steps in {tr['budget_seconds_used']}s ({tr['clock']} "
            f"clock; {tr['wall_seconds']}s wall), {tr['images_per_s']} img/s, "
            f"{tr['parameters'] / 1e6:.2f}M params, loss {tr['final_loss']}, "
            f"load avg {tr['loadavg_before'][0]} -> {tr['loadavg_after'][0]}"
        )
    ev = report["evaluation"]
    print(f"classifiers on real test digits: {ev['classifier_accuracy_on_real_test']}")
    print(f"sampler: {ev['sampler']}, {ev['anchors']} anchors")
    cols = (
        "rate_logreg",
        "rate_svc_rbf",
        "rate_logreg_2cand",
        "mean_abs_to_anchor",
        "mean_abs_between_candidates",
        "fraction_candidates_differ",
    )
    print(f"{'w':>5} " + " ".join(f"{c:>28}" for c in cols))
    for name, row in ev["results"].items():
        print(f"{name[2:]:>5} " + " ".join(f"{row[c]:>28.3f}" for c in cols))
    print(f"ratio (logreg) {ev['ratio_logreg']:.2f}x, (svc) {ev['ratio_svc_rbf']:.2f}x")
    for name, ok in ev["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'} {name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "digits16"
        report: dict[str, Any] = {
            "benchmark": "quality",
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
        if not args.skip_train:
            report["training"] = train_model(args, model_dir)
        report["evaluation"] = evaluate(args, model_dir)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report)
    return 0 if all(report["evaluation"]["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
