"""``clsp diffusion train`` at scale on this machine: ranks against threads, bf16 against
fp32 (docs/training.md, "Training the DDPM at scale: measured").

1. For each preset, the same global batch trained as 1 rank x T threads and as T ranks x
   1 thread (torchrun, gloo): the images/s of each (the median of the training log's
   windows after the first, which pays for start-up) and the mean loss over the second
   half of the run, which must agree within the windows' spread.
2. fp32 against ``--precision bf16`` (1 rank x T threads, the tiny preset): images/s, and
   at equal steps the class kept of the positives, measured by the closing calibration
   ``clsp diffusion train`` ends with (its first setting, w = 0.1 at 50 steps).

A timing benchmark: run it on an idle machine (docs/performance.md). Every run is a real
subprocess (``torchrun`` for the ranks), so the figures include what a user's run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRAIN = [sys.executable, "-m", "clsp_positives.cli", "diffusion", "train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="runs/ddpm-scale", help="runs and results.json")
    p.add_argument("--threads", type=int, default=2, help="T: threads of one rank, or ranks")
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--steps", default="tiny=80,small=24", help="steps per preset")
    p.add_argument("--precision-steps", type=int, default=200, help="0: skip the bf16 part")
    p.add_argument("--calibrate-minutes", type=float, default=1.0)
    return p.parse_args(argv)


def windows(model_dir: Path) -> list[dict[str, Any]]:
    lines = (model_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "window"]


def summary(model_dir: Path) -> dict[str, Any]:
    """images/s (median over the windows but the first) and the second half's mean loss."""
    w = windows(model_dir)
    last = w[-1]["step"]
    late = [r["loss"] for r in w if r["step"] > last / 2]
    speeds = [r["images_per_s"] for r in w[1:]] or [w[0]["images_per_s"]]
    return {
        "steps": last,
        "images_per_s": statistics.median(speeds),
        "late_loss": statistics.fmean(late),
        "late_loss_sd": statistics.stdev(late) if len(late) > 1 else 0.0,
        "windows": len(w),
    }


def train(out: Path, args: list[str], *, ranks: int, threads: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={ranks}", *TRAIN[1:]]
    else:
        command = list(TRAIN)
    command += ["--out", str(out), "--threads", str(threads), "--no-progress", *args]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return {"wall_s": round(time.perf_counter() - t0, 1), **summary(out)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = dict(item.split("=") for item in args.steps.split(","))
    common = ["--dataset", "digits", "--batch-size", str(args.batch_size), "--sample-count", "0"]
    common += ["--save-every", "100000", "--lr-warmup-steps", "10"]
    results: dict[str, Any] = {
        "benchmark": "ddpm_scale",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "ranks_vs_threads": {},
        "precision": {},
    }
    t = args.threads
    for preset in args.presets.split(","):
        run = [*common, "--preset", preset, "--steps", steps[preset], "--no-calibrate"]
        one = train(out / f"{preset}-1x{t}", run, ranks=1, threads=t)
        many = train(out / f"{preset}-{t}x1", run, ranks=t, threads=1)
        results["ranks_vs_threads"][preset] = {f"1x{t}": one, f"{t}x1": many}
        print(preset, json.dumps(results["ranks_vs_threads"][preset]), flush=True)
    if args.precision_steps:
        for precision in ("fp32", "bf16"):
            model = out / f"tiny-{precision}"
            run = [*common, "--preset", "tiny", "--steps", str(args.precision_steps)]
            run += ["--precision", precision, "--calibrate-minutes", str(args.calibrate_minutes)]
            measured = train(model, run, ranks=1, threads=t)
            stored = json.loads((model / "clsp_generation.json").read_text())
            measured["class_kept"] = stored["measured"]["class_kept"]
            measured["calibrated"] = {k: v for k, v in stored.items() if k != "measured"}
            results["precision"][precision] = measured
            print(precision, json.dumps(measured), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
