"""Elementwise hot path of the CLSP sampler: torch references and dispatch to Triton.

Each op computes in float32 and returns the dtype of its main input. On CUDA
tensors (when triton imports) the fused Triton kernel of ``kernels.py`` runs;
elsewhere the torch reference below, which draws the same counter-based noise
(``noise.py``). ``CLSP_KERNELS=torch`` forces the references,
``CLSP_KERNELS=triton`` forces the kernels (on CPU only together with
``TRITON_INTERPRET=1``, for tests). The environment is read at every call so
tests and benchmarks can switch paths without re-importing.

Step coefficients are plain Python floats, so no op ever syncs with the device.
Divisions by ``s0``/``s1`` are multiplications by reciprocals computed in float64
on the host, identically in the reference and the kernel.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Literal, overload

import torch

from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.references import (
    bottleneck_lerp_reference,
    noise_anchor_reference,
    scheduler_update_reference,
)
from clsp_positives.service.sampling.schedule import check_prediction_type
from clsp_positives.service.sampling.solvers import StepCoefficients

KERNELS_ENV = "CLSP_KERNELS"


# ----------------------------------------------------------------------------- dispatch


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels_module() -> ModuleType | None:
    """``kernels`` if triton imports, else None; imported lazily so that the
    interpreter switch (``TRITON_INTERPRET``) can be set before the first use.
    Only a missing triton means "no kernels": an error inside ``kernels`` raises."""
    if not _triton_available():
        return None
    from clsp_positives.service.sampling import kernels

    return kernels


def use_kernels(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs the Triton kernel (see module docstring)."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode == "torch":
        return False
    if mode == "triton":
        if _kernels_module() is None:
            raise RuntimeError(f"{KERNELS_ENV}=triton but triton cannot be imported")
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{KERNELS_ENV}=triton on {tensor.device.type} tensors needs TRITON_INTERPRET=1"
            )
        return True
    if mode != "auto":
        raise ValueError(f"{KERNELS_ENV} must be 'torch', 'triton' or 'auto', got {mode!r}")
    return tensor.device.type == "cuda" and _kernels_module() is not None


def _check_batch(name: str, tensor: torch.Tensor, n: int, what: str) -> None:
    if tensor.ndim != 1 or tensor.shape[0] != n:
        raise ValueError(f"{name} must be [N] = [{n}] ({what}), got {tuple(tensor.shape)}")


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


# ----------------------------------------------------------------------------- ops


def normal(
    seeds: torch.Tensor,
    stream: int,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``noise.normal`` through the kernel on CUDA (one launch instead of ~150 torch ops)."""
    device = seeds.device if device is None else torch.device(device)
    probe = torch.empty(0, device=device)
    if use_kernels(probe):
        return _kernels_module().normal(seeds.to(device), stream, tuple(shape), dtype=dtype)
    return noise.normal(seeds, stream, tuple(shape), device=device, dtype=dtype)


def noise_anchor(
    anchors: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    sqrt_alpha_bar: float,
    sqrt_one_minus_alpha_bar: float,
) -> torch.Tensor:
    """Forward-diffuse the anchors to step t: ``sa*a + s1*n``, n the per-sample noise."""
    _check_float("anchors", anchors)
    noise.check_seeds(seeds)
    noise.check_stream(stream)
    if anchors.ndim < 2:
        raise ValueError(f"anchors must be [N, C, H, W], got {tuple(anchors.shape)}")
    _check_batch("seeds", seeds, anchors.shape[0], "one seed per anchor")
    if use_kernels(anchors):
        return _kernels_module().noise_anchor(
            anchors, seeds, stream, float(sqrt_alpha_bar), float(sqrt_one_minus_alpha_bar)
        )
    return noise_anchor_reference(anchors, seeds, stream, sqrt_alpha_bar, sqrt_one_minus_alpha_bar)


def bottleneck_lerp(
    h: torch.Tensor, h_anchor: torch.Tensor, interpolation_weights: torch.Tensor
) -> torch.Tensor:
    """Per-sample interpolation of the bottleneck: ``w*h + (1-w)*h_anchor``."""
    _check_float("h", h)
    if h_anchor.shape != h.shape:
        raise ValueError(
            f"h_anchor must have the shape of h {tuple(h.shape)}, got {tuple(h_anchor.shape)}"
        )
    if h.ndim < 1:
        raise ValueError("h must have a leading batch dimension")
    _check_batch(
        "interpolation_weights",
        interpolation_weights,
        h.shape[0],
        "one interpolation weight per sample",
    )
    if use_kernels(h):
        return _kernels_module().bottleneck_lerp(h, h_anchor, interpolation_weights)
    return bottleneck_lerp_reference(h, h_anchor, interpolation_weights)


@overload
def scheduler_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    coefs: StepCoefficients,
    prediction_type: str,
    clip_range: float | None,
    *,
    x0_prev: torch.Tensor | None = None,
    return_x0: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def scheduler_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    coefs: StepCoefficients,
    prediction_type: str,
    clip_range: float | None,
    *,
    x0_prev: torch.Tensor | None = None,
    return_x0: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def scheduler_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    coefs: StepCoefficients,
    prediction_type: str,
    clip_range: float | None,
    *,
    x0_prev: torch.Tensor | None = None,
    return_x0: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One step from the model output (see ``StepCoefficients``); ``x0_prev``: the
    previous step's x0, needed when ``coefs.coef_x0_prev`` is not 0.

    ``return_x0`` also returns this step's x0 (clipped as the step used it),
    ``(x_prev, x0)``: the ``x0_prev`` of a multistep solver's next step, written by
    the same pass rather than recomputed from ``x`` and the model output. Off, the
    kernel stores x_prev alone (one write per element fewer for DDIM and DDPM).
    """
    args = (x, model_output, seeds, stream, coefs, prediction_type, clip_range)
    x0_prev = _check_update(*args, x0_prev)
    if use_kernels(x):
        return _kernels_module().scheduler_update(*args, x0_prev=x0_prev, return_x0=return_x0)
    return scheduler_update_reference(*args, x0_prev=x0_prev, return_x0=return_x0)


def _check_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    coefs: StepCoefficients,
    prediction_type: str,
    clip_range: float | None,
    x0_prev: torch.Tensor | None,
) -> torch.Tensor | None:
    """Refuse bad update inputs; ``x0_prev`` if the step reads it, else None."""
    _check_float("x", x)
    if model_output.shape != x.shape:
        raise ValueError(
            f"model_output must have the shape of x {tuple(x.shape)}, "
            f"got {tuple(model_output.shape)}"
        )
    noise.check_seeds(seeds)
    noise.check_stream(stream)
    _check_batch("seeds", seeds, x.shape[0], "one seed per sample")
    check_prediction_type(prediction_type)
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be positive or None, got {clip_range}")
    if coefs.coef_x0_prev == 0:
        return None  # not read: the kernel takes no pointer for it
    if x0_prev is None:
        raise ValueError("coef_x0_prev is not 0: the previous step's x0 must be given")
    if x0_prev.shape != x.shape:
        raise ValueError(
            f"x0_prev must have the shape of x {tuple(x.shape)}, got {tuple(x0_prev.shape)}"
        )
    return x0_prev
