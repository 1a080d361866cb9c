"""One-shot CUDA check (``make gpu-check``): kernels, sampler and throughput.

The GPU is lent for minutes, so everything a CUDA machine must confirm runs
in one call: the Triton kernels compiled for the GPU against their torch
references, the sampler against diffusers' own DDIM loop, CPU-vs-GPU closeness
of one set of positives, the card's measured bf16 matmul peak, and the
throughput table of ``tests/bench/generation.py`` on a UNet with the config of
``google/ddpm-cifar10-32`` (random weights) in fp32 and bf16. Everything is
printed and written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests.support, when run as a script
    sys.path.insert(0, str(REPO))


def _section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["gpu"] = torch.cuda.get_device_name(0)
    return info


def kernels_vs_reference() -> dict[str, Any]:
    from clsp_positives.service.sampling.kernel_check import self_check

    return self_check("cuda")


def sampler_vs_diffusers(model_dir: Path, steps: int = 20) -> dict[str, Any]:
    """w = 1, eta = 0: our sampler on CUDA against a plain DDIMScheduler loop."""
    import torch
    from diffusers import DDIMScheduler

    from clsp_positives.proto.keys import unit_to_uint8
    from clsp_positives.proto.params import GenerationParams
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from clsp_positives.service.sampling.noise import STREAM_INITIAL, normal

    gen = PositivesGenerator.from_dir(model_dir, device="cuda", dtype="float32")
    n, c, s = 16, gen.channels, gen.sample_size
    seeds = np.arange(1000, 1000 + n, dtype=np.int64)
    anchors = np.zeros((n, c, s, s), np.float32)
    group = GenerationParams(steps=steps, eta=0.0).group()
    ours = gen.sample(anchors, seeds, np.ones(n, np.float32), group)

    from clsp_positives.service.sampling.model import load_model

    unet = load_model(model_dir).unet.to("cuda").eval()
    sched = DDIMScheduler.from_config(gen.scheduler_config)
    sched.set_timesteps(steps)
    x = normal(torch.from_numpy(seeds).cuda(), STREAM_INITIAL, (c, s, s), device="cuda")
    with torch.inference_mode():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    ref = unit_to_uint8(x.clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy())
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return {
        "steps": steps,
        "max_level_diff": int(diff.max()),
        "mean_level_diff": float(diff.mean()),
        "ok": int(diff.max()) <= 1,
    }


def cpu_vs_gpu(model_dir: Path, steps: int = 20) -> dict[str, Any]:
    """Same keys on CPU and CUDA (fp32): close, not identical (docs/design.md §2)."""
    from clsp_positives.proto.params import GenerationParams
    from clsp_positives.service.sampling.generator import PositivesGenerator

    rng = np.random.default_rng(0)
    out = {}
    gens = {
        d: PositivesGenerator.from_dir(model_dir, device=d, dtype="float32")
        for d in ("cpu", "cuda")
    }
    c, s = gens["cpu"].channels, gens["cpu"].sample_size
    anchors = rng.uniform(-1, 1, (8, c, s, s)).astype(np.float32)
    seeds = np.arange(8, dtype=np.int64) * 7919
    weights = np.full(8, 0.1, np.float32)
    group = GenerationParams(steps=steps, eta=0.1).group()
    for d, g in gens.items():
        out[d] = g.sample(anchors, seeds, weights, group)
    diff = np.abs(out["cpu"].astype(np.int16) - out["cuda"].astype(np.int16))
    return {
        "steps": steps,
        "max_level_diff": int(diff.max()),
        "mean_level_diff": float(diff.mean()),
        "fraction_within_1_level": float((diff <= 1).mean()),
    }


def bf16_matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s: the ceiling the sampler is compared with."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def throughput(dtype: str, out_dir: Path, peak: float, args: argparse.Namespace) -> dict:
    out = out_dir / f"generation_{dtype}.json"
    cmd = [
        sys.executable,
        str(REPO / "tests/bench/generation.py"),
        "--device",
        "cuda",
        "--dtype",
        dtype,
        "--preset",
        "ddpm-cifar10",
        "--batches",
        args.batches,
        "--steps",
        str(args.steps),
        "--out",
        str(out),
        "--peak-tflops",
        f"{peak:.1f}",
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, timeout=args.bench_timeout)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bench-timeout", type=int, default=150)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    failed = False

    from tests.support.models import random_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="clsp-gpu-check-"))
    cifar = random_model_dir(tmp / "cifar", preset="ddpm-cifar10", sample_size=32, channels=3)
    steps = [
        ("environment", environment),
        ("kernels vs torch reference (CUDA)", kernels_vs_reference),
        ("sampler vs diffusers DDIM (w=1, eta=0, fp32)", lambda: sampler_vs_diffusers(cifar)),
        ("CPU vs CUDA positives (fp32, w=0.1)", lambda: cpu_vs_gpu(cifar)),
        ("bf16 matmul peak (TFLOP/s)", bf16_matmul_peak),
    ]
    for title, fn in steps:
        _section(title)
        t0 = time.perf_counter()
        try:
            report[title] = fn()
        except Exception:  # a check that breaks must not hide the others
            failed = True
            report[title] = {"error": traceback.format_exc()}
        print(json.dumps(report[title], indent=1, default=str)[:4000])
        print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
    peak = report.get("bf16 matmul peak (TFLOP/s)")
    for dtype in ("bfloat16", "float32"):
        title = f"throughput {dtype}"
        _section(title)
        try:
            report[title] = throughput(
                dtype, out_dir, peak if isinstance(peak, float) else 0.0, args
            )
        except Exception:
            failed = True
            report[title] = {"error": traceback.format_exc()}
            print(report[title]["error"])
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    kernels = report.get("kernels vs torch reference (CUDA)", {})
    sampler = report.get("sampler vs diffusers DDIM (w=1, eta=0, fp32)", {})
    ok = not failed and kernels.get("ok") and sampler.get("ok")
    print(f"\ngpu-check: {'OK' if ok else 'FAILED'}; details in {out_dir}/gpu_check.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
