"""Sampling plans: timesteps and per-step coefficients from a scheduler config.

The model's scheduler config decides the schedule (betas, timestep spacing,
``steps_offset``, ``set_alpha_to_one``, x0 clipping, prediction and variance
type). Rather than re-deriving those rules, the timesteps and ``alphas_cumprod``
(or noise levels) come from diffusers' own scheduler of the chosen solver
(``solvers.SOLVERS``: ``DDIMScheduler``/``DDPMScheduler``/
``DPMSolverMultistepScheduler``) built from that config, and the solver reduces
each step to the ``StepCoefficients`` of its ``step`` function, so the fused
update computes what diffusers would. Options the fused update cannot express
(dynamic thresholding, learned variance) are refused with an error that says
which key to change.

By default the service does not sample under the model's config as written
but under ``authors_config`` of it, the CLSP authors' DDIM interpolation loop
(docs/design.md §1); ``sampling="model"`` keeps the config as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clsp_positives.service.sampling.solvers import (
    StepCoefficients,
    UnsupportedSchedulerError,
    get_solver,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the sampler loop needs besides the UNet: one entry per step index."""

    solver: str
    """The solver's name (``solvers.SOLVERS``; the wire's ``method``)."""
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
    """Refuse configs the sampler cannot follow faithfully (whatever the solver)."""
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


def sampling_plan(
    config: dict[str, Any], *, solver: str, steps: int, eta: float = 0.0
) -> SamplingPlan:
    """The plan of ``steps`` steps of the solver named ``solver`` (``solvers.SOLVERS``:
    DDIM, DDPM ancestral or DPM-Solver++ 2M) under ``config``; ``eta`` enters only
    the plan of a solver that takes it (DDIM's)."""
    check_scheduler_config(config)
    rule = get_solver(solver)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise UnsupportedSchedulerError(f"steps must be an int, got {steps!r}")
    if rule.takes_eta and not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise UnsupportedSchedulerError(f"eta must be in [0, 1], got {eta!r}")
    timesteps, coefs = rule.steps(config, steps, float(eta) if rule.takes_eta else 0.0)
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
    clips = rule.clips_x0 and config.get("clip_sample", True)
    clip = float(config.get("clip_sample_range", 1.0)) if clips else None
    return SamplingPlan(
        solver=solver,
        timesteps=tuple(timesteps),
        coefficients=tuple(coefs),
        prediction_type=prediction_type,
        clip_range=clip,
        init_noise_sigma=1.0,
    )
