"""Positives/s of the CLSP sampler against a plain reference sampler, in one process.

The reference is written the way the paper's public code does it: eager
float32, ``torch.no_grad``, the candidate's and the anchor's encoder passes as
two separate calls, unfused elementwise ops (``scheduler.add_noise``,
``scheduler.step``) and ``torch.randn`` noise from one batch generator. Both
samplers run the same UNet weights, steps and batch sizes; the ratio is what
counts (the absolute numbers depend on the machine and its load).

    python tests/bench/generation.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
        [--preset tiny|small|ddpm-cifar10] [--batches 1,8,64,256] [--steps N]
        [--compile/--no-compile] [--threads N] [--out FILE.json] [--peak-tflops X]

On CUDA the table also gives the achieved FLOP/s of our sampler (UNet FLOPs
counted once with ``torch.utils.flop_counter``) as a fraction of the measured
bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.support, when run as a script
    sys.path.insert(0, str(REPO))

from clsp_positives.proto.params import GenerationParams  # noqa: E402
from clsp_positives.service.sampling.generator import PositivesGenerator  # noqa: E402
from clsp_positives.service.sampling.model import load_model  # noqa: E402
from clsp_positives.service.sampling.unet_split import Encoded, UNetSplit  # noqa: E402
from tests.support.models import random_model_dir  # noqa: E402

WEIGHT = 0.1
ETA = 0.1


def reference_sample(
    split: UNetSplit,
    scheduler: DDIMScheduler,
    anchors: torch.Tensor,
    weight: float,
    steps: int,
    eta: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The paper-style CLSP loop: two encoder calls, unfused ops, torch.randn."""
    scheduler.set_timesteps(steps)
    device = anchors.device
    x = torch.randn(anchors.shape, generator=generator, device=device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            n = torch.randn(anchors.shape, generator=generator, device=device)
            a_t = scheduler.add_noise(anchors, n, t.reshape(1))
            tt = split.timesteps(t, anchors.shape[0])
            emb = split.embed(tt)
            enc = split.encode(x, emb)
            enc_a = split.encode(a_t, emb)
            h = weight * enc.h + (1 - weight) * enc_a.h
            eps = split.decode(Encoded(h, enc.skips), emb, tt)
            x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return x.clamp(-1, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` (the least disturbed run)."""
    return _interleaved([fn], device, repeat)[0]


def _interleaved(fns, device: torch.device, repeat: int) -> list[float]:
    """Best-of-``repeat`` wall times of several functions run in turn (ABAB...), so a
    change in the machine's load during the benchmark hits all of them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _head(encoded: Encoded, n: int) -> Encoded:
    """The first ``n`` samples of an encoder output: the candidates' half of a batched call."""
    return Encoded(encoded.h[:n], tuple(s[:n] for s in encoded.skips))


def step_flops(split: UNetSplit, batch: int, shape: tuple[int, ...], device, dtype) -> int:
    """FLOPs of one CLSP step: the encoder on 2B samples and the decoder on B."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((2 * batch, *shape), device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        t = split.timesteps(500, 2 * batch)
        emb = split.embed(t)
        enc = _head(split.encode(x, emb), batch)
        split.decode(enc, emb[:batch], t[:batch])
    return int(counter.get_total_flops())


def bf16_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    secs = _timed(lambda: [a @ b for _ in range(reps)], device, 3)
    return 2 * n**3 * reps / secs / 1e12


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size, channels = (32, 3) if args.preset == "ddpm-cifar10" else (16, 1)
    tmp = Path(tempfile.mkdtemp(prefix="clsp-bench-"))
    model_dir = random_model_dir(
        tmp / "model", preset=args.preset, sample_size=size, channels=channels
    )
    compile_ = args.compile if args.compile is not None else device.type == "cuda"
    gen = PositivesGenerator.from_dir(model_dir, device=device, dtype=args.dtype, compile=compile_)
    ref_unet = load_model(model_dir).unet.to(device)
    ref_split = UNetSplit(ref_unet)
    scheduler = DDIMScheduler.from_config(gen.scheduler_config)
    shape = (channels, size, size)

    peak = args.peak_tflops
    if device.type == "cuda" and not peak:
        peak = bf16_peak_tflops(device)
    flop_split = UNetSplit(load_model(model_dir).unet.to(device=device, dtype=gen.dtype))

    rows = []
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        anchors = rng.uniform(-1, 1, (batch, *shape)).astype(np.float32)
        seeds = rng.integers(0, 2**62, batch, dtype=np.int64)
        weights = np.full(batch, WEIGHT, np.float32)
        anchors_t = torch.from_numpy(anchors).to(device)
        g = torch.Generator(device=device).manual_seed(0)

        def ours(a=anchors, s=seeds, w=weights) -> None:
            gen.sample(a, s, w, GenerationParams(steps=args.steps, eta=ETA).group())

        def ref(a=anchors_t, g=g, b=batch) -> None:
            reference_sample(ref_split, scheduler, a, WEIGHT, args.steps, ETA, g).cpu()

        ours()  # warm-up (and compilation for this batch shape)
        ref()
        t_ours, t_ref = _interleaved([ours, ref], device, args.repeat)
        row = {
            "batch": batch,
            "ours_per_s": batch / t_ours,
            "reference_per_s": batch / t_ref,
            "ratio": t_ref / t_ours,
        }
        if device.type == "cuda":
            flops = step_flops(flop_split, batch, shape, device, gen.dtype) * args.steps
            row["ours_tflops"] = flops / t_ours / 1e12
            row["fraction_of_bf16_peak"] = row["ours_tflops"] / peak if peak else None
        rows.append(row)
        print(_format_row(row), flush=True)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "dtype": args.dtype,
        "preset": args.preset,
        "steps": args.steps,
        "compile": compile_,
        "interpolation_weight": WEIGHT,
        "eta": ETA,
        "bf16_peak_tflops": peak,
        "torch": torch.__version__,
        "rows": rows,
    }


def _format_row(row: dict[str, Any]) -> str:
    text = (
        f"{row['batch']:>6} {row['ours_per_s']:>12.1f} {row['reference_per_s']:>12.1f} "
        f"{row['ratio']:>7.2f}x"
    )
    if "ours_tflops" in row:
        frac = row["fraction_of_bf16_peak"]
        text += f" {row['ours_tflops']:>9.2f}" + (f" {frac:>8.1%}" if frac is not None else "")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small", "ddpm-cifar10"])
    ap.add_argument(
        "--batches", default="1,8,64,256", type=lambda s: [int(b) for b in s.split(",") if b]
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: 4 on CPU, 20 on CUDA)"
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the encoder/decoder (default: on for CUDA, off on CPU)",
    )
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per batch (best counts)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bf16 matmul peak to compare with (measured when omitted, CUDA)",
    )
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 4 if args.device == "cpu" else 20
    print(
        f"{'batch':>6} {'ours/s':>12} {'reference/s':>12} {'ratio':>8}"
        + (f" {'TFLOP/s':>9} {'of peak':>8}" if args.device.startswith("cuda") else "")
    )
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
