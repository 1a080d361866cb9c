"""Speed and quality in one run: what each sampler setting keeps of the anchor's class,
and how many positives per second `clsp serve` delivers with it over HTTP, against the
plain paper-style loop at the paper's DDIM 100 steps measured in the same run.

    python tests/bench/speed_quality.py [--model runs/ddpm-digits] [--out runs/speed-quality]
        [--anchors 200] [--k 2] [--weight 0.1] [--arms NAME,...]

Every arm is one `clsp calibrate` run against a service this script starts on the
model (the cache bypassed; the same held-out digits as anchors and the same probe, a
classifier fit on real training digits, in every arm), so the quality figures are
the calibration's: class kept, distance between candidates and to the anchor. Each
arm is first run once at 2 steps, unmeasured, so that no timed run pays for a first
call or a compilation. The plain loop is `generation.reference_sample` (eager fp32, two
encoder calls, `torch.randn`) on the same trained UNet, timed before and after the
arms. The HTTP section times one request of 64 anchors against the same call on an
in-process `PositivesGenerator`, interleaved, to show what the service path costs.
Results go to OUT/speed_quality.{json,md,png}; docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import DDIMScheduler

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.support, when run as a script
    sys.path.insert(0, str(REPO))

from clsp_positives.client import PoolClient  # noqa: E402
from clsp_positives.proto.params import GenerationParams  # noqa: E402
from clsp_positives.service.sampling.generator import PositivesGenerator, cpu_has_bf16  # noqa: E402
from clsp_positives.service.sampling.model import load_model  # noqa: E402
from clsp_positives.service.sampling.schedule import sampling_config  # noqa: E402
from clsp_positives.service.sampling.unet_split import UNetSplit  # noqa: E402
from clsp_positives.trainer.positive_tools.calibrate_plot import label_box, ticks  # noqa: E402
from tests.bench.generation import reference_sample  # noqa: E402
from tests.support.servers import ServerProcess, free_port  # noqa: E402

SAMPLING = "authors-clipped"
INTERPOLATE = "bottleneck+low-skips"
PLAIN_STEPS = 100
PLAIN_BATCH = 64


class Arm(NamedTuple):
    name: str
    server: str  # a key of SERVERS
    method: str
    steps: tuple[int, ...]
    share_anchor: bool = False
    anchor_refresh: int = 1


SERVERS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "bf16-compiled": ("--dtype", "bfloat16", "--compile"),
}

ARMS = (
    Arm("ddim", "fp32", "ddim", (10, 20, 50, 100)),
    Arm("dpmpp-2m", "fp32", "dpmpp-2m", (10, 15, 20, 25)),
    Arm("ddim-share", "fp32", "ddim", (50, 100), share_anchor=True),
    Arm("ddim-refresh2", "fp32", "ddim", (50, 100), anchor_refresh=2),
    Arm("ddim-refresh4", "fp32", "ddim", (50,), anchor_refresh=4),
    Arm("bf16-ddim", "bf16-compiled", "ddim", (25, 50, 100)),
    Arm("bf16-ddim-share", "bf16-compiled", "ddim", (30, 40, 50), share_anchor=True),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="runs/ddpm-digits", help="a trained digits DDPM")
    p.add_argument("--out", default="runs/speed-quality", help="folder for the results")
    p.add_argument("--anchors", type=int, default=200)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--weight", type=float, default=0.1, help="interpolation weight")
    p.add_argument("--arms", default=",".join(a.name for a in ARMS), help="arms to run")
    p.add_argument("--http-repeat", type=int, default=5, help="pairs of the HTTP section")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (the median counts)")
    p.add_argument("--render", default=None, help="redraw OUT from this speed_quality.json")
    return p.parse_args(argv)


@contextmanager
def serving(model: Path, server: str, log_dir: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--sampling", SAMPLING]
    cmd += ["--max-batch", "64", *SERVERS[server]]
    with ServerProcess(cmd, port, health_path="/readyz", start_timeout=600) as proc:
        try:
            yield proc.url
        finally:
            (log_dir / f"serve-{server}.log").write_text(proc.log())


def calibrate(url: str, arm: Arm, steps: tuple[int, ...], args, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "clsp_positives.cli", "calibrate", "--dataset", "digits"]
    cmd += ["--positives", url, "--weights", str(args.weight)]
    cmd += ["--steps", ",".join(map(str, steps)), "--anchors", str(args.anchors)]
    cmd += ["--k", str(args.k), "--gen-method", arm.method, "--gen-sampling", SAMPLING]
    cmd += ["--gen-interpolate", INTERPOLATE, "--gen-anchor-refresh", str(arm.anchor_refresh)]
    cmd += ["--gen-share-anchor" if arm.share_anchor else "--no-gen-share-anchor"]
    cmd += ["--out", str(out), "--no-progress", "--timeout-s", "1800"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "calibration.json").read_text())["rows"]


def plain_loop_per_s(model: Path, steps: int = PLAIN_STEPS) -> float:
    """Positives/s of the paper-style loop at DDIM 100 steps, batch 64, on the model."""
    loaded = load_model(model)
    split = UNetSplit(loaded.unet)
    config = sampling_config(loaded.scheduler_config, SAMPLING)
    scheduler = DDIMScheduler.from_config(config)
    rng = np.random.default_rng(0)
    anchors = torch.from_numpy(rng.uniform(-1, 1, (PLAIN_BATCH, 1, 16, 16)).astype(np.float32))
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    reference_sample(split, scheduler, anchors, 0.1, steps, 0.1, g)
    return PLAIN_BATCH / (time.perf_counter() - start)


def http_cost(url: str, model: Path, repeat: int) -> dict[str, Any]:
    """One request of 64 anchors (DDIM 20 steps, cache bypassed) against the same call in
    process, interleaved; the ratio of the medians is what the service path keeps."""
    gen = PositivesGenerator.from_dir(model)
    client = PoolClient(url, timeout_s=600)
    rng = np.random.default_rng(1)
    anchors = rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8)
    params = GenerationParams(
        steps=20, sampling=SAMPLING, interpolate=INTERPOLATE, cache="bypass", k=1
    )
    times: dict[str, list[float]] = {"http": [], "direct": []}
    calls = {
        "http": lambda: client.submit(anchors, None, params).result(),
        "direct": lambda: gen.positives(anchors, None, params),
    }
    for name in calls:  # first calls
        calls[name]()
    for _ in range(repeat):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    client.close()
    http, direct = (64 / statistics.median(times[n]) for n in ("http", "direct"))
    return {"http_per_s": http, "direct_per_s": direct, "ratio": http / direct, "times": times}


TIMING_ANCHORS = 64


def timing_rounds(
    urls: dict[str, str], rows: list[dict[str, Any]], model: Path, args: argparse.Namespace
) -> list[float]:
    """Positives/s, measured in rounds that interleave the plain loop and one request of
    64 anchors x k per setting, so that a slow spell of a shared machine slows every
    setting of its round alike. Each row gets its ``seconds``; returns the plain loop's
    positives/s of every round."""
    clients = {server: PoolClient(url, timeout_s=1800) for server, url in urls.items()}
    rng = np.random.default_rng(2)
    anchors = rng.integers(0, 256, (TIMING_ANCHORS, 16, 16, 1), dtype=np.uint8)
    plain_loop_per_s(model, steps=2)  # first call
    plain = []

    def params(row: dict[str, Any], steps: int) -> GenerationParams:
        return GenerationParams(
            interpolation_weight=args.weight,
            steps=steps,
            method=row["method"],
            sampling=SAMPLING,
            interpolate=INTERPOLATE,
            share_anchor=row["share_anchor"],
            anchor_refresh=row["anchor_refresh"],
            k=args.k,
            cache="bypass",
        )

    for row in rows:  # the request's shapes, at 2 steps: first calls, compilations
        row["k"] = args.k
        row["seconds"] = []
        clients[row["server"]].submit(anchors, None, params(row, 2)).result()
    for r in range(args.rounds):
        plain.append(plain_loop_per_s(model))
        for row in rows:
            start = time.perf_counter()
            clients[row["server"]].submit(anchors, None, params(row, row["steps"])).result()
            row["seconds"].append(time.perf_counter() - start)
        print(f"timing round {r + 1}/{args.rounds}: plain loop {plain[-1]:.2f}/s", flush=True)
    for client in clients.values():
        client.close()
    return plain


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, out = Path(args.model), Path(args.out)
    if not (model / "unet").is_dir():
        raise SystemExit(
            f"no trained model in {model}: train one with `python tests/bench/quality.py "
            f"--model-dir {model} --out runs/quality.json` (about 10 minutes)"
        )
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.arms.split(","))
    arms = [a for a in ARMS if a.name in wanted]
    skipped = []
    if not cpu_has_bf16():
        skipped = [a.name for a in arms if a.server == "bf16-compiled"]
        arms = [a for a in arms if a.server != "bf16-compiled"]
    rows: list[dict[str, Any]] = []
    http: dict[str, Any] | None = None
    with ExitStack() as stack:
        urls = {
            server: stack.enter_context(serving(model, server, out))
            for server in SERVERS
            if any(a.server == server for a in arms)
        }
        for arm in arms:  # quality: one calibration per arm
            url = urls[arm.server]
            with tempfile.TemporaryDirectory() as tmp:
                calibrate(url, arm, (2,), args, Path(tmp))  # first calls, compilations
            for row in calibrate(url, arm, arm.steps, args, out / arm.name):
                rows.append({**arm._asdict(), "steps": row["steps"], **_measures(row)})
                print(_line(rows[-1]), flush=True)
        if "fp32" in urls:
            http = http_cost(urls["fp32"], model, args.http_repeat)
            print(f"HTTP / direct at batch 64: {http['ratio']:.3f}", flush=True)
        plain = timing_rounds(urls, rows, model, args)
    return {
        "command": "python tests/bench/speed_quality.py " + " ".join(sys.argv[1:]),
        "model": str(model),
        "anchors": args.anchors,
        "k": args.k,
        "interpolation_weight": args.weight,
        "sampling": SAMPLING,
        "interpolate": INTERPOLATE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "plain_loop_per_s": plain,
        "rounds": args.rounds,
        "http": http,
        "skipped_arms": skipped,
        "rows": rows,
    }


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """Each row's positives/s (median over the rounds) and its ratio to the plain loop of
    the same round: the median of the per-round ratios, with their range, so a slow
    spell that hit one side of one round shows as spread instead of moving the figure."""
    plain = report["plain_loop_per_s"]
    for row in report["rows"]:
        per_s = [row["k"] * TIMING_ANCHORS / s for s in row["seconds"]]
        ratios = [mine / ref for mine, ref in zip(per_s, plain, strict=True)]
        row["positives_per_s"] = statistics.median(per_s)
        row["vs_plain_ddim100"] = statistics.median(ratios)
        row["vs_plain_range"] = [min(ratios), max(ratios)]
    return report


def _measures(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("class_kept", "between_candidates", "to_anchor")
    return {**{k: row[k] for k in keys}, "calibrate_per_s": row["positives_per_s"]}


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['name']:<26} {row['steps']:>4} steps  class kept {row['class_kept']:.3f}  "
        f"to anchor {row['to_anchor']:.3f}  {row['calibrate_per_s']:6.2f} positives/s"
    )


def table(report: dict[str, Any]) -> str:
    """The markdown table of docs/performance.md."""
    ref = next(
        (r for r in report["rows"] if r["name"] == "ddim" and r["steps"] == PLAIN_STEPS), None
    )
    lines = [
        "| arm | service | method | steps | share | refresh | class kept | vs DDIM-100 "
        "| between candidates | to anchor | positives/s | vs plain loop (range) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        diff = f"{r['class_kept'] - ref['class_kept']:+.3f}" if ref else "n/a"
        lines.append(
            f"| {r['name']} | {r['server']} | {r['method']} | {r['steps']} "
            f"| {'yes' if r['share_anchor'] else 'no'} | {r['anchor_refresh']} "
            f"| {r['class_kept']:.3f} | {diff} | {r['between_candidates']:.3f} "
            f"| {r['to_anchor']:.3f} | {r['positives_per_s']:.1f} "
            f"| {r['vs_plain_ddim100']:.2f}x ({r['vs_plain_range'][0]:.2f}-"
            f"{r['vs_plain_range'][1]:.2f}) |"
        )
    return "\n".join(lines) + "\n"


COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
X_TICKS = (0.25, 0.5, 1, 2, 3, 5, 10, 20)


def plot(report: dict[str, Any], path: Path) -> None:
    """Class kept against the speed ratio (log axis), one line per arm, points labelled
    with their steps; drawn with PIL like ``calibration.png``
    (trainer/positive_tools/calibrate_plot.py)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 860, 560, 70, 200, 50, 60
    rows = report["rows"]
    xs = [r["vs_plain_ddim100"] for r in rows]
    ys = [r["class_kept"] for r in rows]
    x_lo, x_hi = math.log(min(xs) / 1.2), math.log(max(xs) * 1.2)
    y_lo, y_hi = max(min(ys) - 0.03, 0.0), min(max(ys) + 0.03, 1.0)
    y_ticks = ticks(y_lo, y_hi)

    def px(x: float) -> float:
        return left + (math.log(x) - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)

    font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text(
        (10, 10),
        f"Speed and quality: digits DDPM, w = {report['interpolation_weight']}, k = "
        f"{report['k']}, {report['anchors']} held-out anchors (labels: steps)",
        fill="black",
    )
    base_y = height - bottom
    draw.line([(left, top), (left, base_y), (width - right, base_y)], fill="black")
    for t in X_TICKS:
        if x_lo <= math.log(t) <= x_hi:
            draw.line([(px(t), base_y), (px(t), base_y + 5)], fill="black")
            draw.text((px(t) - 6, base_y + 8), f"{t:g}x", fill="black")
    for t in y_ticks:
        draw.line([(left - 5, py(t)), (left, py(t))], fill="black")
        draw.text((left - 40, py(t) - 6), f"{t:.2f}", fill="black")
    draw.text(
        (left, base_y + 28),
        "positives/s over HTTP / the plain loop at DDIM 100 (log scale)",
        fill="black",
    )
    draw.text((10, top - 18), "class kept (probe)", fill="black")
    ref = [r for r in rows if r["name"] == "ddim" and r["steps"] == PLAIN_STEPS]
    if ref:  # the target region: within 0.02 of DDIM-100, at 3x or more
        y = py(ref[0]["class_kept"] - 0.02)
        for x0 in range(left, width - right, 10):
            draw.line([(x0, y), (min(x0 + 5, width - right), y)], fill=(200, 60, 40))
        if x_lo <= math.log(3) <= x_hi:
            for y0 in range(top, base_y, 10):
                draw.line([(px(3), y0), (px(3), min(y0 + 5, base_y))], fill=(200, 60, 40))
    placed: list[tuple[float, float, float, float]] = []
    names = list(dict.fromkeys(r["name"] for r in rows))
    for i, name in enumerate(names):
        colour = COLOURS[i % len(COLOURS)]
        points = [
            (px(r["vs_plain_ddim100"]), py(r["class_kept"]), r) for r in rows if r["name"] == name
        ]
        points.sort(key=lambda p: p[0])
        if len(points) > 1:
            draw.line([(x, y) for x, y, _ in points], fill=colour, width=2)
        for x, y, r in points:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
            label = str(r["steps"])
            box = label_box(x, y, draw.textlength(label, font=font), placed, width - right)
            placed.append(box)
            draw.text(box[:2], label, fill=colour, font=font)
        draw.rectangle(
            [width - right + 15, top + 16 * i + 3, width - right + 25, top + 16 * i + 13],
            fill=colour,
        )
        draw.text((width - right + 30, top + 16 * i), name, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = json.loads(Path(args.render).read_text()) if args.render else run(args)
    paired(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_quality.json").write_text(json.dumps(report, indent=1))
    (out / "speed_quality.md").write_text(table(report))
    plot(report, out / "speed_quality.png")
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
