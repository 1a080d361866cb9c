"""The service's default sampling against the CLSP authors' DDIM interpolation loop.

The loop below is written from the authors' equations (docs/design.md §1) in
plain torch, independently of ``sampler.py`` and ``schedule.py``: its own
trailing timestep grid, its own alpha_bar, its own update. It draws the same
counter-based noise streams as the sampler (stream 0: initial noise; 1 + 2i:
the anchor's noise at step i; 2 + 2i: the update's noise at step i). The model
config says leading / clip_sample / fixed_small, so only the authors' override
of that config makes the two agree.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clsp_positives.proto.keys import positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.ddpm import presets
from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.generator import PositivesGenerator
from clsp_positives.service.sampling.sampler import CLSPSampler
from clsp_positives.service.sampling.schedule import authors_config, sampling_config, sampling_plan
from clsp_positives.service.sampling.unet_split import Encoded, UNetSplit
from tests.support.models import scheduler_config, tiny_unet

SHAPE = (1, 16, 16)
STEPS = 20
MODEL_CONFIG = scheduler_config()  # leading, clip_sample true, fixed_small


@pytest.fixture(scope="module")
def split() -> UNetSplit:
    return UNetSplit(tiny_unet(0, output_scale=0.2))


def _alpha_bar(config: dict) -> list[float]:
    betas = np.linspace(config["beta_start"], config["beta_end"], config["num_train_timesteps"])
    return np.cumprod(1.0 - betas).tolist()


def authors_loop(
    split: UNetSplit,
    anchors: torch.Tensor,
    seeds: torch.Tensor,
    w: float,
    *,
    steps: int,
    solver: str,
    eta: float = 0.0,
    clip: bool = False,
) -> torch.Tensor:
    """The authors' loop: trailing grid, no x0 clipping, alpha_bar 1 after the last step.

    ``clip``: x0 clamped to [-1, 1] before the update, eps kept as predicted (the
    ``authors-clipped`` mode)."""
    num_train = MODEL_CONFIG["num_train_timesteps"]
    abar = _alpha_bar(MODEL_CONFIG)
    stride = num_train // steps
    grid = list(range(num_train - 1, -1, -stride))[:steps]  # 999, 949, ..., 49 for 20
    n = anchors.shape[0]
    x = noise.normal(seeds, 0, SHAPE)
    with torch.inference_mode():
        for i, t in enumerate(grid):
            a = abar[t]
            a_next = abar[grid[i + 1]] if i + 1 < len(grid) else 1.0
            tt = split.timesteps(t, n)
            emb = split.embed(tt)
            noised = math.sqrt(a) * anchors + math.sqrt(1 - a) * noise.normal(
                seeds, 1 + 2 * i, SHAPE
            )
            own, anchor = split.encode(x, emb), split.encode(noised, emb)
            h = w * own.h + (1 - w) * anchor.h
            eps = split.decode(Encoded(h, own.skips), emb, tt)
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            if clip:
                x0 = x0.clamp(-1, 1)
            z = noise.normal(seeds, 2 + 2 * i, SHAPE)
            if solver == "ddim":
                sigma = eta * math.sqrt((1 - a / a_next) * (1 - a_next) / (1 - a))
                x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - sigma**2) * eps + sigma * z
            else:  # DDPM, fixed_large: the posterior mean plus sqrt(beta_t) z
                alpha = a / a_next
                beta = 1 - alpha
                mean = (
                    math.sqrt(a_next) * beta / (1 - a) * x0
                    + math.sqrt(alpha) * (1 - a_next) / (1 - a) * x
                )
                x = mean + math.sqrt(beta) * z if t > 0 else mean
    return x.clamp(-1, 1)


@pytest.mark.parametrize("w", [0.1, 1.0])
@pytest.mark.parametrize(("solver", "eta"), [("ddim", 0.0), ("ddim", 0.1), ("ddpm", 0.0)])
def test_authors_sampling_equals_the_authors_loop(
    split: UNetSplit, solver: str, eta: float, w: float
) -> None:
    g = torch.Generator().manual_seed(7)
    anchors = torch.rand((3, *SHAPE), generator=g) * 2 - 1
    seeds = torch.randint(0, 2**62, (3,), generator=g, dtype=torch.int64)
    want = authors_loop(split, anchors, seeds, w, steps=STEPS, solver=solver, eta=eta)
    sampler = CLSPSampler(split)
    plan = sampling_plan(authors_config(MODEL_CONFIG), solver=solver, steps=STEPS, eta=eta)
    got = sampler(plan, anchors, seeds, torch.full((3,), w))
    assert (got - want).abs().max().item() <= 1e-4
    # The model's own config samples something else: the override is what matters.
    as_model = sampler(
        sampling_plan(MODEL_CONFIG, solver=solver, steps=STEPS, eta=eta),
        anchors,
        seeds,
        torch.full((3,), w),
    )
    assert (as_model - want).abs().max().item() > 1e-2


@pytest.mark.parametrize(("solver", "eta"), [("ddim", 0.1), ("ddpm", 0.0)])
def test_authors_clipped_sampling_equals_the_loop_with_clipping(
    split: UNetSplit, solver: str, eta: float
) -> None:
    g = torch.Generator().manual_seed(11)
    # Anchors beyond [-1, 1] push x0 out of range, so the clipping is exercised.
    anchors = (torch.rand((3, *SHAPE), generator=g) * 2 - 1) * 3
    seeds = torch.randint(0, 2**62, (3,), generator=g, dtype=torch.int64)
    want = authors_loop(split, anchors, seeds, 0.1, steps=STEPS, solver=solver, eta=eta, clip=True)
    unclipped = authors_loop(split, anchors, seeds, 0.1, steps=STEPS, solver=solver, eta=eta)
    plan = sampling_plan(
        sampling_config(MODEL_CONFIG, "authors-clipped"), solver=solver, steps=STEPS, eta=eta
    )
    got = CLSPSampler(split)(plan, anchors, seeds, torch.full((3,), 0.1))
    assert (got - want).abs().max().item() <= 1e-4
    assert (unclipped - want).abs().max().item() > 1e-3


def test_authors_plan_is_the_trailing_grid_ending_in_x0() -> None:
    plan = sampling_plan(authors_config(MODEL_CONFIG), solver="ddim", steps=100, eta=0.1)
    assert plan.timesteps == tuple(range(999, 0, -10))
    assert plan.clip_range is None
    last = plan.coefficients[-1]
    assert (last.coef_x0, last.coef_eps, last.sigma) == (1.0, 0.0, 0.0)
    ddpm = sampling_plan(authors_config(MODEL_CONFIG), solver="ddpm", steps=100)
    abar = _alpha_bar(MODEL_CONFIG)
    assert ddpm.coefficients[0].sigma == pytest.approx(math.sqrt(1 - abar[999] / abar[989]))


@pytest.fixture(scope="module")
def model_gen(tmp_path_factory: pytest.TempPathFactory) -> PositivesGenerator:
    out = tmp_path_factory.mktemp("leading-model")
    presets.save_model(tiny_unet(0, output_scale=0.2), MODEL_CONFIG, out)
    return PositivesGenerator.from_dir(Path(out))


def test_generator_plans_the_override_by_default(model_gen: PositivesGenerator) -> None:
    cfg = model_gen.scheduler_config
    assert cfg["timestep_spacing"] == "leading" and cfg["clip_sample"]
    assert model_gen.plan(GenerationParams(steps=STEPS, eta=0.1).group()) == sampling_plan(
        authors_config(cfg), solver="ddim", steps=STEPS, eta=0.1
    )
    assert model_gen.plan(GenerationParams(steps=STEPS, eta=0.1, sampling="model").group()) == (
        sampling_plan(cfg, solver="ddim", steps=STEPS, eta=0.1)
    )


def test_sampling_mode_changes_the_key_and_the_positives(model_gen: PositivesGenerator) -> None:
    anchors = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    authors = GenerationParams(steps=5, sampling="authors")
    model = GenerationParams(steps=5, sampling="model")
    assert model_gen.keys(anchors, None, authors) != model_gen.keys(anchors, None, model)
    # None is the default mode, key and image alike.
    default = GenerationParams(steps=5)
    assert model_gen.keys(anchors, None, default) == model_gen.keys(anchors, None, authors)
    out = model_gen.positives(anchors, None, default)
    assert np.array_equal(out, model_gen.positives(anchors, None, authors))
    assert not np.array_equal(out, model_gen.positives(anchors, None, model))
    canon = np.zeros((1, 16, 16), np.float32)
    assert positive_key("fp", authors, canon, 0) != positive_key("fp", model, canon, 0)
