"""DPM-Solver++ (2M), ``method="dpmpp-2m"``, against diffusers' ``DPMSolverMultistepScheduler``.

At w = 1 the sampler must be diffusers' own loop from our x_T (stream 0); below 1
it must be that loop driven by the CLSP model output: the bottleneck mixed with
the anchor's, the anchor noised to each evaluation's timestep with its own noise
stream (docs/design.md §1). diffusers' DPM-Solver has no ``clip_sample``; the
plan applies the config's x0 clipping as for DDIM, so the reference clips the
x0 prediction where the config asks for it.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from clsp_positives.service.ddpm import presets
from clsp_positives.service.sampling import noise, ops
from clsp_positives.service.sampling.sampler import DEFAULT_GROUP, CLSPSampler, mix_encodings, rows
from clsp_positives.service.sampling.schedule import (
    UnsupportedSchedulerError,
    sampling_config,
    sampling_plan,
)
from clsp_positives.service.sampling.solvers import StepCoefficients
from clsp_positives.service.sampling.unet_split import UNetSplit
from tests.support.models import scheduler_config, tiny_unet

SHAPE = (1, 16, 16)
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}


class ClippedDPMSolver(DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ with the x0 prediction clamped to ``clip`` (None: as is)."""

    clip: float | None = None

    def convert_model_output(self, model_output, *args, sample=None, **kwargs):
        x0 = super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)


def _reference(config: dict, steps: int) -> ClippedDPMSolver:
    sched = ClippedDPMSolver.from_config({**config, **DPMPP_2M})
    if config.get("clip_sample", True):
        sched.clip = float(config.get("clip_sample_range", 1.0))
    sched.set_timesteps(steps)
    return sched


@pytest.fixture(scope="module")
def split() -> UNetSplit:
    return UNetSplit(tiny_unet(0, output_scale=0.2))


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)
    return anchors, seeds


def _diffusers_loop(
    split: UNetSplit,
    sched: DPMSolverMultistepScheduler,
    anchors: torch.Tensor,
    seeds: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """diffusers' DPM-Solver++ loop from our x_T; below w = 1 its model output is the
    CLSP one: ``[x; a_t]`` through the encoder, bottlenecks mixed, the candidate decoded."""
    n = anchors.shape[0]
    x = noise.normal(seeds, noise.STREAM_INITIAL, SHAPE) * sched.init_noise_sigma
    abar = sched.alphas_cumprod.double()
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps):
            if bool((w == 1).all()):
                out = split.unet(x, t).sample
            else:
                a = float(abar[int(t)])
                a_t = math.sqrt(a) * anchors + math.sqrt(1 - a) * noise.normal(
                    seeds, noise.anchor_stream(i), SHAPE
                )
                tt = split.timesteps(int(t), 2 * n)
                emb = split.embed(tt)
                enc = split.encode(torch.cat([x, a_t]), emb)
                enc = mix_encodings(rows(enc, slice(n)), rows(enc, slice(n, None)), w, "bottleneck")
                out = split.decode(enc, emb[:n], tt[:n])
            x = sched.step(out, t, x).prev_sample
    return x.clamp(-1, 1)


MODEL_CONFIGS = {
    # what `clsp diffusion train` writes: trailing, no clipping, alpha_bar 1 at the end
    "trained": presets.default_scheduler_config(),
    # diffusers' usual DDPM config: leading timesteps, x0 clipped
    "leading-clipped": scheduler_config(),
    "v-linspace": scheduler_config(prediction_type="v_prediction", timestep_spacing="linspace"),
    # a final noise level above 0: the last step is second order at 20 steps
    "sigma-min": scheduler_config(final_sigmas_type="sigma_min", clip_sample=False),
    "karras": scheduler_config(use_karras_sigmas=True, clip_sample=False),
}


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_w1_equals_diffusers_dpm_solver_in_model_mode(
    split: UNetSplit, name: str, steps: int
) -> None:
    cfg = sampling_config(MODEL_CONFIGS[name], "model")
    anchors, seeds = _inputs(3)
    plan = sampling_plan(cfg, solver="dpmpp-2m", steps=steps)
    ref = _reference(cfg, steps)
    assert plan.timesteps == tuple(int(t) for t in ref.timesteps)
    got = CLSPSampler(split)(plan, anchors, seeds, torch.ones(3))
    want = _diffusers_loop(split, ref, anchors, seeds, torch.ones(3))
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["authors", "authors-clipped"])
def test_w1_equals_diffusers_dpm_solver_in_the_authors_modes(split: UNetSplit, mode: str) -> None:
    cfg = sampling_config(scheduler_config(), mode)  # the model says leading / clip_sample
    anchors, seeds = _inputs(3, seed=1)
    plan = sampling_plan(cfg, solver="dpmpp-2m", steps=20)
    assert plan.timesteps == tuple(range(999, 0, -50))  # the authors' trailing grid
    assert plan.clip_range == (1.0 if mode == "authors-clipped" else None)
    got = CLSPSampler(split)(plan, anchors, seeds, torch.ones(3))
    want = _diffusers_loop(split, _reference(cfg, 20), anchors, seeds, torch.ones(3))
    assert (got - want).abs().max().item() <= 1e-4
    if mode == "authors-clipped":  # the clipping is exercised, not a no-op
        unclipped = sampling_plan(sampling_config(cfg, "authors"), solver="dpmpp-2m", steps=20)
        free = CLSPSampler(split)(unclipped, anchors, seeds, torch.ones(3))
        assert (free - got).abs().max().item() > 1e-3


@pytest.mark.parametrize("interpolate", ["bottleneck", "bottleneck+low-skips"])
def test_interpolation_at_every_evaluation(split: UNetSplit, interpolate: str) -> None:
    cfg = sampling_config(scheduler_config(), "authors")
    anchors, seeds = _inputs(4, seed=2)
    w = torch.tensor([0.0, 0.1, 0.5, 1.0])
    plan = sampling_plan(cfg, solver="dpmpp-2m", steps=12)
    got = CLSPSampler(split)(
        plan, anchors, seeds, w, DEFAULT_GROUP._replace(interpolate=interpolate)
    )
    if interpolate == "bottleneck":
        want = _diffusers_loop(split, _reference(cfg, 12), anchors, seeds, w)
        assert (got - want).abs().max().item() <= 1e-4
    else:  # the low skips enter too: w = 1 alone is unchanged
        plain = CLSPSampler(split)(plan, anchors, seeds, w)
        assert torch.equal(got[3], plain[3])
        assert (got[:3] - plain[:3]).abs().max().item() > 1e-3


def test_batch_independence(split: UNetSplit) -> None:
    """(anchor, seed, w) alone equals the same item inside a mixed batch of 32."""
    sampler = CLSPSampler(split)
    n = 32
    anchors, seeds = _inputs(n, seed=3)
    anchors[10:20] = anchors[0]  # several candidates of one anchor
    weights = torch.tensor([0.1, 0.5, 1.0, 0.0] * 8)
    plan = sampling_plan(scheduler_config(), solver="dpmpp-2m", steps=6)
    assert plan.uses_previous_x0
    batch = sampler(plan, anchors, seeds, weights)
    for j in (0, 13, 26):  # w = 0.1, 0.5, 1.0 (alone: the anchor pass is skipped)
        alone = sampler(plan, anchors[j : j + 1], seeds[j : j + 1], weights[j : j + 1])
        assert (alone[0] - batch[j]).abs().max().item() <= 2 / 255  # 1/255 on the [0,1] scale


def test_plan_coefficients() -> None:
    cfg = sampling_config(scheduler_config(), "authors")
    plan = sampling_plan(cfg, solver="dpmpp-2m", steps=20)
    first, middle, last = plan.coefficients[0], plan.coefficients[1:-1], plan.coefficients[-1]
    assert all(c.sigma == 0 and c.coef_eps == 0 for c in plan.coefficients)  # deterministic
    assert first.coef_x0_prev == 0  # no previous x0 yet: first order
    assert all(c.coef_x0_prev < 0 for c in middle)  # second order
    # final noise level 0: the last step returns x0, as DDIM's set_alpha_to_one
    assert (last.coef_x0, last.coef_x0_prev, last.coef_x) == (1.0, 0.0, 0.0)
    # the multistep D = (1 + 1/2r) x0 - 1/2r x0_prev has weights summing to 1: the
    # x0 terms together weigh what a first-order step gives x0, alpha' (1 - sigma'/sigma)
    for i, c in enumerate(plan.coefficients[:-1]):
        nxt = plan.coefficients[i + 1]
        s, s_next = (
            c.sqrt_one_minus_alpha_bar / c.sqrt_alpha_bar,
            nxt.sqrt_one_minus_alpha_bar / nxt.sqrt_alpha_bar,
        )
        assert c.coef_x0 + c.coef_x0_prev == pytest.approx(nxt.sqrt_alpha_bar * (1 - s_next / s))
        assert c.coef_x == pytest.approx(nxt.sqrt_one_minus_alpha_bar / c.sqrt_one_minus_alpha_bar)
    # eta has no part in it; two steps (first order, then the final one) keep no x0
    assert sampling_plan(cfg, solver="dpmpp-2m", steps=20, eta=0.9) == plan
    assert not sampling_plan(cfg, solver="dpmpp-2m", steps=2).uses_previous_x0
    assert sampling_plan(cfg, solver="dpmpp-2m", steps=3).uses_previous_x0
    assert not sampling_plan(cfg, solver="ddim", steps=20, eta=0.1).uses_previous_x0


@pytest.mark.parametrize(
    ("overrides", "steps", "match"),
    [
        (dict(use_flow_sigmas=True), 10, "use_flow_sigmas"),
        (dict(thresholding=True), 10, "thresholding"),
        (dict(prediction_type="flow_prediction"), 10, "prediction_type"),
        (dict(beta_schedule="sigmoid"), 10, "dpmpp-2m cannot use"),
        (dict(use_karras_sigmas=True, use_exponential_sigmas=True), 10, "dpmpp-2m cannot use"),
        (dict(timestep_spacing="linspace"), 1000, "distinct noise level"),
        (dict(timestep_spacing="leading"), 1000, "distinct noise level"),
        ({}, 1001, "steps must be in"),
    ],
)
def test_configs_the_update_cannot_express_are_refused(overrides, steps, match) -> None:
    with pytest.raises(UnsupportedSchedulerError, match=match):
        sampling_plan(scheduler_config(**overrides), solver="dpmpp-2m", steps=steps)


def test_the_update_needs_the_previous_x0_when_it_reads_it() -> None:
    x, seeds = torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    coefs = StepCoefficients(0.6, 0.8, 1.3, 0.0, 0.5, 0.0, -0.4)
    with pytest.raises(ValueError, match="previous step's x0"):
        ops.scheduler_update(x, x, seeds, 2, coefs, "epsilon", None)
    with pytest.raises(ValueError, match="x0_prev must have the shape"):
        ops.scheduler_update(x, x, seeds, 2, coefs, "epsilon", None, x0_prev=x[:1])
    x0_prev = torch.randn_like(x)
    got, x0 = ops.scheduler_update(
        x, x, seeds, 2, coefs, "epsilon", None, x0_prev=x0_prev, return_x0=True
    )
    torch.testing.assert_close(x0, (x - 0.8 * x) / 0.6)
    torch.testing.assert_close(got, 1.3 * x0 - 0.4 * x0_prev + 0.5 * x)
    assert torch.equal(
        got, ops.scheduler_update(x, x, seeds, 2, coefs, "epsilon", None, x0_prev=x0_prev)
    )
