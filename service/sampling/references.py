"""Torch references of the sampler's fused ops, in the kernels' order of operations.

They are the CPU path of ``ops.py`` and the yardstick of every Triton kernel in
``kernels.py`` (``kernel_check.py``): they draw the same counter-based noise
(``noise.py``), compute in float32 and round once to the input's dtype.
"""

from __future__ import annotations

import torch

from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.schedule import check_prediction_type
from clsp_positives.service.sampling.solvers import StepCoefficients


def noise_anchor_reference(
    anchors: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    sqrt_alpha_bar: float,
    sqrt_one_minus_alpha_bar: float,
) -> torch.Tensor:
    """Torch reference of ``noise_anchor``."""
    z = noise.normal(seeds, stream, tuple(anchors.shape[1:]), device=anchors.device)
    # Python floats multiply float32 tensors as float32 scalars, rounded once
    # like the kernels' float arguments.
    sa = float(sqrt_alpha_bar)
    s1 = float(sqrt_one_minus_alpha_bar)
    out = sa * anchors.float() + s1 * z
    return out.to(anchors.dtype)


def bottleneck_lerp_reference(
    h: torch.Tensor, h_anchor: torch.Tensor, interpolation_weights: torch.Tensor
) -> torch.Tensor:
    """Torch reference of ``bottleneck_lerp``."""
    w = interpolation_weights.to(device=h.device, dtype=torch.float32).reshape(
        -1, *([1] * (h.ndim - 1))
    )
    out = w * h.float() + (1.0 - w) * h_anchor.float()
    return out.to(h.dtype)


def scheduler_update_reference(
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
    """Torch reference of ``scheduler_update``, in the kernel's order of operations:
    x_prev, or with ``return_x0`` ``(x_prev, x0)``, x0 as the step used it (clipped),
    both in ``x``'s dtype. ``x0_prev`` is read only when ``coefs.coef_x0_prev`` is
    not 0, after the x0 term as in the kernel."""
    dev = x.device
    s0 = float(coefs.sqrt_alpha_bar)
    s1 = float(coefs.sqrt_one_minus_alpha_bar)
    xf = x.float()
    out = model_output.float()
    if prediction_type == "epsilon":
        x0 = (xf - s1 * out) * float(1.0 / coefs.sqrt_alpha_bar)
        eps = out
    elif prediction_type == "sample":
        x0 = out
        eps = (xf - s0 * x0) * float(1.0 / coefs.sqrt_one_minus_alpha_bar)
    elif prediction_type == "v_prediction":
        x0 = s0 * xf - s1 * out
        eps = s0 * out + s1 * xf
    else:
        check_prediction_type(prediction_type)
    if clip_range is not None:
        x0 = x0.clamp(-float(clip_range), float(clip_range))
    prev = float(coefs.coef_x0) * x0
    if coefs.coef_x0_prev != 0:
        if x0_prev is None:
            raise ValueError("coef_x0_prev is not 0: the previous step's x0 must be given")
        prev = prev + float(coefs.coef_x0_prev) * x0_prev.float()
    prev = prev + float(coefs.coef_eps) * eps
    prev = prev + float(coefs.coef_x) * xf
    if coefs.sigma != 0:
        z = noise.normal(seeds, stream, tuple(x.shape[1:]), device=dev)
        prev = prev + float(coefs.sigma) * z
    if return_x0:
        return prev.to(x.dtype), x0.to(x.dtype)
    return prev.to(x.dtype)
