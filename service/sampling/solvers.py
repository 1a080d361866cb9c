"""Solvers: the step rules a sampling plan can follow, one registered class each.

A solver (the wire calls it ``method``) reduces the ``step`` function of one of
diffusers' schedulers, built from the sampling mode's config, to one
``StepCoefficients`` per step (docs/design.md §1), so the fused update computes
what diffusers would. It also says what it supports: whether ``eta`` enters its
plan, whether it honours the config's x0 clipping, and whether its steps read the
previous step's x0 (a multistep solver, whose loop keeps each step's x0).

``SOLVERS`` is keyed by the wire names of ``proto.params.Method``; the torch-free
proto package cannot import this registry, so the check at the end of this module
keeps the two (and ``ETA_METHODS``) from drifting apart. Adding a solver is one
class here and its name in ``Method``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from clsp_positives.proto.params import ETA_METHODS, Method


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


class UnsupportedSchedulerError(ValueError):
    """The scheduler config asks for something the CLSP sampler does not implement."""


Steps = tuple[list[int], list[StepCoefficients]]
"""A solver's plan: the timesteps and one ``StepCoefficients`` per timestep."""


class Solver:
    """A step rule: its wire name, what it supports, and its planner (``steps``).

    The subclasses set the class attributes and implement ``steps``; ``SOLVERS``
    holds one instance of each.
    """

    name: ClassVar[str]
    """The wire name (``proto.params.Method``)."""
    scheduler_class: ClassVar[type]
    """The diffusers scheduler whose ``step`` the coefficients reproduce."""
    takes_eta: ClassVar[bool] = False
    """Whether ``eta`` enters the plan: for the others it changes nothing, so it
    enters neither their keys nor their sampler groups (``ETA_METHODS``)."""
    clips_x0: ClassVar[bool] = True
    """Whether the plan honours the config's ``clip_sample``/``clip_sample_range``."""
    reads_previous_x0: ClassVar[bool] = False
    """Whether some steps read the previous step's x0 (``coef_x0_prev``): the loop
    then keeps each step's x0 (``scheduler_update(..., return_x0=True)``)."""
    warmup_steps: ClassVar[int] = 1
    """Fewest steps whose plan launches every update variant this solver adds to the
    single-step ones (a multistep solver's: x0 kept, the previous x0 read); the
    warm-up runs such a solver at least this many (``PositivesGenerator.warmup``)."""

    def steps(self, config: dict[str, Any], steps: int, eta: float) -> Steps:
        """The timesteps and coefficients of ``steps`` steps under ``config``."""
        raise NotImplementedError

    def scheduler(self, config: dict[str, Any], steps: int) -> Any:
        """``scheduler_class`` from ``config`` with ``steps`` timesteps set, or the
        error that says why this solver cannot follow ``config``."""
        try:
            sched = self.scheduler_class.from_config(config)
        except (NotImplementedError, ValueError, ImportError) as exc:
            # e.g. a beta_schedule this scheduler lacks, options it cannot combine
            raise UnsupportedSchedulerError(
                f"{self.name} cannot use this scheduler config: {exc}"
            ) from None
        num_train = int(sched.config.num_train_timesteps)
        if not 1 <= steps <= num_train:
            raise UnsupportedSchedulerError(
                f"steps must be in [1, {num_train}] (the model's num_train_timesteps), got {steps}"
            )
        sched.set_timesteps(steps)
        return sched


class DDIM(Solver):
    """``DDIMScheduler.step`` (formulas (12) and (16) of the DDIM paper): the CLSP
    authors' step rule (docs/design.md §1); ``eta`` scales its noise."""

    name = "ddim"
    scheduler_class = DDIMScheduler
    takes_eta = True

    def steps(self, config: dict[str, Any], steps: int, eta: float) -> Steps:
        sched = self.scheduler(config, steps)
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


class DDPM(Solver):
    """``DDPMScheduler.step`` (formulas (6), (7) of the DDPM paper), ancestral."""

    name = "ddpm"
    scheduler_class = DDPMScheduler

    def steps(self, config: dict[str, Any], steps: int, eta: float) -> Steps:
        sched = self.scheduler(config, steps)
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


class DPMSolverPP2M(Solver):
    """``DPMSolverMultistepScheduler.step``: DPM-Solver++, order 2, midpoint.

    With lambda = log(alpha/sigma_vp) = -log(sigma) and h = lambda_next - lambda,
    a step is ``x' = (sigma_vp'/sigma_vp) x + alpha' (1 - e^-h) D`` where D is x0 on
    the first step and on a lower-order final one, else
    ``(1 + 1/(2r)) x0 - 1/(2r) x0_prev`` with r = h_prev / h. The noise levels are
    the scheduler's own ``sigmas`` (one more than the steps: the last is 0 under
    ``final_sigmas_type="zero"``, which makes the last step return x0, as
    ``set_alpha_to_one`` does for DDIM). Which steps are first order follows
    ``step``: the first, and the last when the final sigma is 0, ``euler_at_final``
    or ``lower_order_final`` with fewer than 15 steps. diffusers' DPM-Solver has no
    ``clip_sample``; the plan clips x0 where the config asks, as for DDIM.
    """

    name = "dpmpp-2m"
    scheduler_class = DPMSolverMultistepScheduler
    reads_previous_x0 = True
    warmup_steps = 3
    """A first-order first step that keeps x0, then a second-order one that also
    reads the previous x0: both variants of the multistep update."""

    def steps(self, config: dict[str, Any], steps: int, eta: float) -> Steps:
        for key in DPMPP_REFUSED_KEYS:
            if config.get(key):
                raise UnsupportedSchedulerError(
                    f"the scheduler config sets {key}=true; {self.name} supports "
                    f"variance-preserving noise levels only: set {key} to false"
                )
        sched = self.scheduler({**config, **DPMPP_2M_OVERRIDES}, steps)
        timesteps = [int(t) for t in sched.timesteps]
        sigmas = [float(s) for s in sched.sigmas]
        n = len(timesteps)
        if any(not b < a for a, b in itertools.pairwise(sigmas)):
            raise UnsupportedSchedulerError(
                f"{self.name} needs a distinct noise level at every step, but timestep_spacing="
                f"{sched.config.timestep_spacing!r} repeats one at this many steps "
                f"(timesteps {timesteps[:3]}...{timesteps[-3:]}); ask for fewer steps"
            )
        cfg = sched.config
        final_first_order = bool(
            cfg.euler_at_final
            or (cfg.lower_order_final and n < 15)
            or cfg.final_sigmas_type == "zero"
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


SOLVERS: dict[str, Solver] = {s.name: s for s in (DDIM(), DDPM(), DPMSolverPP2M())}
"""Every solver by wire name, in ``Method``'s order."""


def get_solver(name: str) -> Solver:
    """The solver called ``name`` on the wire (``GenerationParams.method``)."""
    solver = SOLVERS.get(name)
    if solver is None:
        # "method": the wire field a caller sets
        raise UnsupportedSchedulerError(f"method must be one of {tuple(SOLVERS)}, got {name!r}")
    return solver


def check_registry() -> None:
    """Refuse a registry that has drifted from the torch-free proto package: its names
    must be ``Method``'s, in order, and its eta-taking solvers ``ETA_METHODS``."""
    if tuple(SOLVERS) != get_args(Method):
        raise RuntimeError(
            f"solvers {tuple(SOLVERS)} differ from proto.params.Method {get_args(Method)}"
        )
    takes_eta = tuple(name for name, s in SOLVERS.items() if s.takes_eta)
    if takes_eta != tuple(ETA_METHODS):
        raise RuntimeError(
            f"solvers taking eta {takes_eta} differ from proto.params.ETA_METHODS {ETA_METHODS}"
        )


check_registry()
