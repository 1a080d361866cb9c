"""Sampling plans: timesteps and per-step coefficients from a scheduler config.

The model's scheduler config decides the schedule (betas, timestep spacing,
``steps_offset``, ``set_alpha_to_one``, x0 clipping, prediction and variance
type). Rather than re-deriving those rules, the timesteps and ``alphas_cumprod``
(or noise levels) come from diffusers' own ``DDIMScheduler``/``DDPMScheduler``/
``DPMSolverMultistepScheduler`` built from that config, and each step is reduced
to the ``StepCoefficients`` of its ``step`` function, so the fused update
computes what diffusers would. Options the
fused update cannot express (dynamic thresholding, learned variance) are
refused with an error that says which key to change.

By default the service does not sample under the model's config as written
but under ``authors_config`` of it, the CLSP authors' DDIM interpolation loop
(docs/design.md §1); ``sampling="model"`` keeps the config as it is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, get_args

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from clsp_positives.proto.params import Method

METHODS: tuple[str, ...] = get_args(Method)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@dataclass(frozen=True)
class StepCoefficients:
    """One sampling step:
    ``x_prev = coef_x0*x0 + coef_x0_prev*x0_prev + coef_eps*eps + coef_x*x + sigma*z``.

    ``sqrt_alpha_bar``/``sqrt_one_minus_alpha_bar`` are those of the current
    timestep and turn the model output into ``(x0, eps)``. ``x0_prev`` is the
    previous step's x0 prediction (clipped like ``x0``): only DPM-Solver++'s
    second-order steps use it, every other step has ``coef_x0_prev`` 0.
    """

    sqrt_alpha_bar: float
    sqrt_one_minus_alpha_bar: float
    coef_x0: float
    coef_eps: float
    coef_x: float
    sigma: float
    coef_x0_prev: float = 0.0


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )


class UnsupportedSchedulerError(ValueError):
    """The scheduler config asks for something the CLSP sampler does not implement."""


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the sampler loop needs besides the UNet: one entry per step index."""

    method: str
    timesteps: tuple[int, ...]
    coefficients: tuple[StepCoefficients, ...]
    prediction_type: str
    clip_range: float | None
    init_noise_sigma: float

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def uses_previous_x0(self) -> bool:
        """Whether a step reads the previous step's x0 (``coef_x0_prev``), so the
        loop must keep each step's x0 for the next."""
        return any(c.coef_x0_prev != 0 for c in self.coefficients)


AUTHORS_OVERRIDES: dict[str, Any] = {
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "variance_type": "fixed_large",
}
"""The scheduler keys on which the authors' loop differs from diffusers' defaults:
a trailing timestep grid (999, 989, ..., 9 for 100 of 1000 steps), alpha_bar 1
after the last step (it returns x0), no x0 clipping inside the loop, and beta_t
as the DDPM step's variance."""


SAMPLING_OVERRIDES: dict[str, dict[str, Any]] = {
    "authors": AUTHORS_OVERRIDES,
    # The authors' loop with x0 clipped inside it: small, briefly trained models
    # (ours on a CPU) predict x0 far outside [-1, 1] at the first, noisiest steps
    # and a share of their samples then diverge to noise (docs/performance.md).
    "authors-clipped": {**AUTHORS_OVERRIDES, "clip_sample": True},
    "model": {},
}
"""What each sampling mode (``GenerationParams.sampling``) changes in the model's config."""


def authors_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``AUTHORS_OVERRIDES``: the plan of the authors' loop (docs/design.md §1).

    Betas, ``num_train_timesteps`` and the prediction type stay the model's: they
    describe how it was trained; the overridden keys only say how to sample it.
    """
    return sampling_config(config, "authors")


def sampling_config(config: dict[str, Any], sampling: str) -> dict[str, Any]:
    """``config`` as the sampling mode ``sampling`` plans it (docs/design.md §1)."""
    if sampling not in SAMPLING_OVERRIDES:
        raise ValueError(
            f"sampling must be one of {', '.join(SAMPLING_OVERRIDES)}, got {sampling!r}"
        )
    return {**config, **SAMPLING_OVERRIDES[sampling]}


def check_scheduler_config(config: dict[str, Any]) -> None:
    """Refuse configs the sampler cannot follow faithfully (independent of the method)."""
    if config.get("thresholding"):
        raise UnsupportedSchedulerError(
            "the scheduler config sets thresholding=true (dynamic thresholding); the CLSP "
            "sampler supports plain x0 clipping only: set thresholding to false "
            "(clip_sample/clip_sample_range still apply)"
        )
    variance_type = config.get("variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise UnsupportedSchedulerError(
            f"the scheduler config sets variance_type={variance_type!r}; supported: "
            f"{', '.join(VARIANCE_TYPES)} (a model with learned variance outputs twice the "
            "channels and cannot be sampled here)"
        )
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UnsupportedSchedulerError(
            f"the scheduler config sets prediction_type={prediction_type!r}; supported: "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise UnsupportedSchedulerError(
            f"the scheduler config sets timestep_spacing={spacing!r}; supported: "
            f"{', '.join(SPACINGS)}"
        )
    if config.get("clip_sample", True) and not float(config.get("clip_sample_range", 1.0)) > 0:
        raise UnsupportedSchedulerError("clip_sample_range must be positive when clip_sample")


def _scheduler(cls: type, config: dict[str, Any], method: str, steps: int) -> Any:
    try:
        sched = cls.from_config(config)
    except (NotImplementedError, ValueError, ImportError) as exc:
        # e.g. a beta_schedule this scheduler lacks, options it cannot combine
        raise UnsupportedSchedulerError(
            f"{method} cannot use this scheduler config: {exc}"
        ) from None
    num_train = int(sched.config.num_train_timesteps)
    if not 1 <= steps <= num_train:
        raise UnsupportedSchedulerError(
            f"steps must be in [1, {num_train}] (the model's num_train_timesteps), got {steps}"
        )
    sched.set_timesteps(steps)
    return sched


def _ddim(config: dict[str, Any], steps: int, eta: float) -> tuple[list[int], list]:
    """Coefficients of ``DDIMScheduler.step`` (formulas (12) and (16) of the DDIM paper)."""
    sched = _scheduler(DDIMScheduler, config, "ddim", steps)
    abar = [float(a) for a in sched.alphas_cumprod]
    final = float(sched.final_alpha_cumprod)
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    timesteps = [int(t) for t in sched.timesteps]
    coefs = []
    for t in timesteps:
        prev = t - stride  # diffusers' rule, whatever the spacing
        ab_t = abar[t]
        ab_prev = abar[prev] if prev >= 0 else final
        variance = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
        sigma = eta * math.sqrt(max(variance, 0.0))
        coefs.append(
            StepCoefficients(
                sqrt_alpha_bar=math.sqrt(ab_t),
                sqrt_one_minus_alpha_bar=math.sqrt(1.0 - ab_t),
                coef_x0=math.sqrt(ab_prev),
                coef_eps=math.sqrt(max(1.0 - ab_prev - sigma * sigma, 0.0)),
                coef_x=0.0,
                sigma=sigma,
            )
        )
    return timesteps, coefs


def _ddpm(config: dict[str, Any], steps: int) -> tuple[list[int], list]:
    """Coefficients of ``DDPMScheduler.step`` (formulas (6), (7) of the DDPM paper)."""
    sched = _scheduler(DDPMScheduler, config, "ddpm", steps)
    abar = [float(a) for a in sched.alphas_cumprod]
    variance_type = sched.config.variance_type
    timesteps = [int(t) for t in sched.timesteps]
    coefs = []
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab_t = abar[t]
        ab_prev = abar[prev] if prev >= 0 else 1.0
        alpha_t = ab_t / ab_prev
        beta_t = 1.0 - alpha_t
        sigma = 0.0
        if t > 0:  # diffusers adds noise at every step whose timestep is not 0
            if variance_type == "fixed_large":
                sigma = math.sqrt(beta_t)
            else:  # fixed_small and fixed_small_log: the posterior variance, clamped
                sigma = math.sqrt(max((1.0 - ab_prev) / (1.0 - ab_t) * beta_t, 1e-20))
        coefs.append(
            StepCoefficients(
                sqrt_alpha_bar=math.sqrt(ab_t),
                sqrt_one_minus_alpha_bar=math.sqrt(1.0 - ab_t),
                coef_x0=math.sqrt(ab_prev) * beta_t / (1.0 - ab_t),
                coef_eps=0.0,
                coef_x=math.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab_t),
                sigma=sigma,
            )
        )
    return timesteps, coefs


DPMPP_2M_OVERRIDES: dict[str, Any] = {
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "variance_type": None,  # DDPM's key; DPM-Solver reads it only as "learned"
}
"""What ``dpmpp-2m`` fixes in the config it builds ``DPMSolverMultistepScheduler`` from;
everything else (betas, spacing, ``final_sigmas_type``, ``lower_order_final``, ...)
is the sampling mode's config or diffusers' default."""

DPMPP_REFUSED_KEYS = ("use_flow_sigmas",)
"""DPM-Solver options the update cannot express: flow-matching noise levels are not
variance-preserving (alpha = 1 - sigma). Reshaped VP levels (``use_karras_sigmas``
and the like) are followed: the coefficients come from the scheduler's sigmas."""


def _vp(sigma: float) -> tuple[float, float]:
    """``(alpha, sigma_vp)`` of a noise level ``sigma = sqrt((1-abar)/abar)``, as
    ``DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t``: sqrt(abar), sqrt(1-abar)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _dpmpp_2m(config: dict[str, Any], steps: int) -> tuple[list[int], list]:
    """Coefficients of ``DPMSolverMultistepScheduler.step`` (DPM-Solver++, order 2, midpoint).

    With lambda = log(alpha/sigma_vp) = -log(sigma) and h = lambda_next - lambda,
    a step is ``x' = (sigma_vp'/sigma_vp) x + alpha' (1 - e^-h) D`` where D is x0 on
    the first step and on a lower-order final one, else
    ``(1 + 1/(2r)) x0 - 1/(2r) x0_prev`` with r = h_prev / h. The noise levels are
    the scheduler's own ``sigmas`` (one more than the steps: the last is 0 under
    ``final_sigmas_type="zero"``, which makes the last step return x0, as
    ``set_alpha_to_one`` does for DDIM). Which steps are first order follows
    ``step``: the first, and the last when the final sigma is 0, ``euler_at_final``
    or ``lower_order_final`` with fewer than 15 steps.
    """
    for key in DPMPP_REFUSED_KEYS:
        if config.get(key):
            raise UnsupportedSchedulerError(
                f"the scheduler config sets {key}=true; dpmpp-2m supports variance-preserving "
                f"noise levels only: set {key} to false"
            )
    sched = _scheduler(
        DPMSolverMultistepScheduler, {**config, **DPMPP_2M_OVERRIDES}, "dpmpp-2m", steps
    )
    timesteps = [int(t) for t in sched.timesteps]
    sigmas = [float(s) for s in sched.sigmas]
    n = len(timesteps)
    if any(not b < a for a, b in itertools.pairwise(sigmas)):
        raise UnsupportedSchedulerError(
            f"dpmpp-2m needs a distinct noise level at every step, but timestep_spacing="
            f"{sched.config.timestep_spacing!r} repeats one at this many steps "
            f"(timesteps {timesteps[:3]}...{timesteps[-3:]}); ask for fewer steps"
        )
    cfg = sched.config
    final_first_order = bool(
        cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
    )
    coefs = []
    for i in range(n):
        alpha, sigma_vp = _vp(sigmas[i])
        alpha_next, sigma_vp_next = _vp(sigmas[i + 1])
        # 1 - e^-h = 1 - sigma'/sigma: 1 when the next noise level is 0 (h infinite)
        one_minus_exp = 1.0 - sigmas[i + 1] / sigmas[i]
        c0 = alpha_next * one_minus_exp
        c_prev = 0.0
        if not (i == 0 or (i == n - 1 and final_first_order)):
            h = math.log(sigmas[i] / sigmas[i + 1])
            r = math.log(sigmas[i - 1] / sigmas[i]) / h
            c_prev = -c0 / (2.0 * r)
            c0 = c0 - c_prev
        coefs.append(
            StepCoefficients(
                sqrt_alpha_bar=alpha,
                sqrt_one_minus_alpha_bar=sigma_vp,
                coef_x0=c0,
                coef_eps=0.0,
                coef_x=sigma_vp_next / sigma_vp,
                sigma=0.0,
                coef_x0_prev=c_prev,
            )
        )
    return timesteps, coefs


def sampling_plan(
    config: dict[str, Any], *, method: str, steps: int, eta: float = 0.0
) -> SamplingPlan:
    """The plan of ``steps`` DDIM (with ``eta``), DDPM ancestral or DPM-Solver++ (2M)
    steps under ``config`` (eta enters DDIM's alone)."""
    check_scheduler_config(config)
    if method not in METHODS:
        raise UnsupportedSchedulerError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UnsupportedSchedulerError(f"steps must be an int, got {steps!r}")
    if method == "ddim":
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise UnsupportedSchedulerError(f"eta must be in [0, 1], got {eta!r}")
        timesteps, coefs = _ddim(config, steps, float(eta))
    elif method == "ddpm":
        timesteps, coefs = _ddpm(config, steps)
    else:
        timesteps, coefs = _dpmpp_2m(config, steps)
    prediction_type = config.get("prediction_type", "epsilon")
    for t, c in zip(timesteps, coefs, strict=True):
        zero = (prediction_type == "epsilon" and c.sqrt_alpha_bar == 0) or (
            prediction_type == "sample" and c.sqrt_one_minus_alpha_bar == 0
        )
        if zero:
            raise UnsupportedSchedulerError(
                f"timestep {t} has alpha_bar={c.sqrt_alpha_bar**2}: {prediction_type} "
                "prediction cannot recover x0 there (zero-SNR schedules need v_prediction)"
            )
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
    return SamplingPlan(
        method=method,
        timesteps=tuple(timesteps),
        coefficients=tuple(coefs),
        prediction_type=prediction_type,
        clip_range=clip,
        init_noise_sigma=1.0,
    )
