"""Every Triton kernel against its torch reference on one device: the check that
``make gpu-check`` runs on a GPU and the tests run on the CPU under
``TRITON_INTERPRET=1``. Kept apart from ``kernels.py`` so the kernels module holds
only what the sampler launches.
"""

from __future__ import annotations

import os

import torch

from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.kernels import (
    PREDICTION_CODES,
    bottleneck_lerp,
    noise_anchor,
    normal,
    randint4x,
    scheduler_update,
)
from clsp_positives.service.sampling.references import (
    bottleneck_lerp_reference,
    noise_anchor_reference,
    scheduler_update_reference,
)
from clsp_positives.service.sampling.solvers import StepCoefficients


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.cpu().float() - b.cpu().float()).abs().max()) if a.numel() else 0.0


def _dtype_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _update_cases(full: bool) -> list[tuple[str, float | None, float]]:
    """All prediction types x clip x sigma, or two covering cases (fewer compilations)."""
    if full:
        return [(p, c, s) for p in PREDICTION_CODES for c in (None, 1.0) for s in (0.0, 0.3)]
    return [("epsilon", 1.0, 0.3), ("v_prediction", None, 0.0)]


def _multistep_cases(full: bool) -> list[tuple[str, float | None, float]]:
    """DPM-Solver++ steps (x0 kept, the previous x0 read when its coefficient is not 0):
    every prediction type x clip x coefficient, or two covering cases."""
    if full:
        return [(p, c, k) for p in PREDICTION_CODES for c in (None, 1.0) for k in (0.0, -0.4)]
    return [("epsilon", 1.0, -0.4), ("v_prediction", None, 0.0)]


def self_check(device: str | torch.device, *, atol: float | None = None) -> dict:
    """Compare every kernel with its torch reference on ``device``.

    Returns a flat dict: ``ints_equal`` (all Philox words bitwise equal, against
    the reference on ``device`` and on CPU), ``<case>`` -> max abs error for each
    float case (the error of half-precision outputs is divided by
    ``max(1, |ref|) * eps(dtype)``, i.e. counted in output ulps, under
    ``<case>@ulp``), ``failures`` (case names over tolerance) and ``ok``.
    Default float32 tolerance: 1e-6 (interpreter and CUDA alike: the kernels do
    not contract into FMAs); half outputs may differ by 1 ulp of their dtype.
    On CPU this needs ``TRITON_INTERPRET=1`` set before triton was imported.
    Seen on an H100 (triton 3.6): every case 0.0, integers and normals equal to
    the CPU reference bit for bit; about 20 s, mostly compilation.
    """
    device = torch.device(device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("self_check on CPU needs TRITON_INTERPRET=1 set before importing triton")
    atol = 1e-6 if atol is None else atol
    gen = torch.Generator().manual_seed(0)
    report: dict = {"device": str(device)}
    failures: list[str] = []

    def record(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
        if got.dtype == torch.float32:
            err = _err(got, ref)
            report[name] = err
            if not err <= atol:
                failures.append(name)
        else:
            scale = ref.float().abs().clamp_min(1.0) * _dtype_eps(got.dtype)
            ulps = float(((got.cpu().float() - ref.cpu().float()).abs() / scale.cpu()).max())
            report[name + "@ulp"] = ulps
            if not ulps <= 1.0:
                failures.append(name)
        if got.shape != ref.shape or got.dtype != ref.dtype:
            failures.append(name + ":shape/dtype")

    def seeds_for(n: int) -> torch.Tensor:
        s = torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64) * 2
        s[0] = 0  # the all-zero key
        return s.to(device)

    ints_equal = True
    for n, numel, stream in (
        (3, 2001, 0),
        (2, 1024, noise.step_stream(99)),
        (1, 7, noise.MAX_STREAM),
    ):
        seeds = seeds_for(n)
        got = randint4x(seeds, stream, numel)
        for ref in (
            noise.randint4x(seeds, stream, numel),
            noise.randint4x(seeds.cpu(), stream, numel),
        ):
            ints_equal &= all(torch.equal(g.cpu(), r.cpu()) for g, r in zip(got, ref, strict=True))
    report["ints_equal"] = bool(ints_equal)
    if not ints_equal:
        failures.append("ints_equal")

    shape = (3, 23, 29)  # 2001 elements: not a multiple of BLOCK
    seeds = seeds_for(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).removeprefix("torch.")
        for stream in (0, 7):
            record(f"normal.{tag}.s{stream}", normal(seeds, stream, shape, dtype=dtype),
                   noise.normal(seeds, stream, shape, device=device, dtype=dtype))  # fmt: skip
        record(f"normal.{tag}.vs_cpu", normal(seeds, 3, shape, dtype=dtype),
               noise.normal(seeds.cpu(), 3, shape, dtype=dtype))  # fmt: skip

        x = (torch.randn(5, *shape, generator=gen) * 1.5).to(device=device, dtype=dtype)
        mo = torch.randn(5, *shape, generator=gen).to(device=device, dtype=dtype)
        for layout in ("nchw", "channels_last"):
            xl = x.contiguous(memory_format=torch.channels_last) if layout != "nchw" else x
            mol = mo.contiguous(memory_format=torch.channels_last) if layout != "nchw" else mo
            got = noise_anchor(xl, seeds, 5, 0.8, 0.6)
            record(f"noise_anchor.{tag}.{layout}", got,
                   noise_anchor_reference(x, seeds, 5, 0.8, 0.6))  # fmt: skip
            full = dtype == torch.float32 and layout == "nchw"
            for prediction_type, clip, sigma in _update_cases(full):
                coefs = StepCoefficients(0.6, 0.8, 0.7, 0.5, 0.2, sigma)
                got = scheduler_update(xl, mol, seeds, 8, coefs, prediction_type, clip)
                ref = scheduler_update_reference(x, mo, seeds, 8, coefs, prediction_type, clip)
                record(f"update.{tag}.{layout}.{prediction_type}.clip{clip}.sigma{sigma}", got, ref)
            x0p = (torch.randn(5, *shape, generator=gen) * 1.2).to(device=device, dtype=dtype)
            x0pl = x0p.contiguous(memory_format=torch.channels_last) if layout != "nchw" else x0p
            for prediction_type, clip, coef_prev in _multistep_cases(full):
                coefs = StepCoefficients(0.6, 0.8, 1.3, 0.0, 0.5, 0.0, coef_prev)
                args = (seeds, 8, coefs, prediction_type, clip)
                got, got_x0 = scheduler_update(xl, mol, *args, x0_prev=x0pl, return_x0=True)
                ref, ref_x0 = scheduler_update_reference(x, mo, *args, x0_prev=x0p, return_x0=True)
                name = f"update_x0.{tag}.{layout}.{prediction_type}.clip{clip}.prev{coef_prev}"
                record(name, got, ref)
                record(name + ".x0", got_x0, ref_x0)
                # the variant that reads the previous x0 without keeping its own
                record(name + ".no_keep", scheduler_update(xl, mol, *args, x0_prev=x0pl), ref)
        h = torch.randn(5, 37, 3, 3, generator=gen).to(device=device, dtype=dtype)
        ha = torch.randn(5, 37, 3, 3, generator=gen).to(device=device, dtype=dtype)
        w = torch.tensor([0.1, 1.0, 0.0, 0.5, 0.37], device=device)
        record(f"lerp.{tag}", bottleneck_lerp(h, ha, w), bottleneck_lerp_reference(h, ha, w))
        record(f"lerp.{tag}.channels_last",
               bottleneck_lerp(h.contiguous(memory_format=torch.channels_last), ha, w),
               bottleneck_lerp_reference(h, ha, w))  # fmt: skip
    report["failures"] = failures
    report["ok"] = not failures
    return report
