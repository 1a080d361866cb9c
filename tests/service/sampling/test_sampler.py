"""The CLSP sampler against diffusers' schedulers, and its determinism contract.

These plans come from the scheduler config as written: the ``sampling="model"``
mode (docs/design.md §1). The default ``authors`` mode, which overrides that
config, is checked against the authors' loop in ``test_authors_loop.py``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from clsp_positives.service.sampling import noise, ops
from clsp_positives.service.sampling.sampler import (
    DEFAULT_GROUP,
    CLSPSampler,
    anchor_groups,
    anchor_steps,
    mix_encodings,
    rows,
)
from clsp_positives.service.sampling.schedule import (
    UnsupportedSchedulerError,
    sampling_plan,
)
from clsp_positives.service.sampling.unet_split import Encoded, UNetSplit
from tests.support.models import scheduler_config, tiny_unet

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def sampler() -> CLSPSampler:
    return CLSPSampler(UNetSplit(tiny_unet(0, output_scale=0.2)))


@pytest.fixture(scope="module")
def raw_sampler() -> CLSPSampler:
    """The unscaled random tiny UNet (see ``tiny_unet``: chaotic over many steps)."""
    return CLSPSampler(UNetSplit(tiny_unet(0)))


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand((n, *SHAPE), generator=g) * 2 - 1
    seeds = torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)
    return anchors, seeds


def _diffusers_loop(unet, sched, seeds, steps, step_kwargs) -> torch.Tensor:
    """diffusers-style sampling from our x_T; ``step_kwargs(i, shape)`` adds step arguments."""
    sched.set_timesteps(steps)
    x = noise.normal(seeds, noise.STREAM_INITIAL, SHAPE) * sched.init_noise_sigma
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps):
            out = unet(x, t).sample
            x = sched.step(out, t, x, **step_kwargs(i, x.shape)).prev_sample
    return x.clamp(-1, 1)


DDIM_CONFIGS = {
    "default": {},
    "v-trailing-noclip": dict(
        prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    ),
    "offset-alpha-range": dict(steps_offset=1, set_alpha_to_one=False, clip_sample_range=0.5),
    "sample-linspace": dict(prediction_type="sample", timestep_spacing="linspace"),
}


@pytest.mark.parametrize("name", sorted(DDIM_CONFIGS))
def test_ddim_w1_eta0_matches_diffusers(sampler: CLSPSampler, name: str) -> None:
    cfg = scheduler_config(**DDIM_CONFIGS[name])
    anchors, seeds = _inputs(4)
    plan = sampling_plan(cfg, solver="ddim", steps=20, eta=0.0)
    got = sampler(plan, anchors, seeds, torch.ones(4))
    want = _diffusers_loop(
        sampler.split.unet, DDIMScheduler.from_config(cfg), seeds, 20, lambda i, s: {"eta": 0.0}
    )
    assert (got - want).abs().max().item() <= 1e-4


def test_ddim_unscaled_random_unet_matches_over_10_steps(raw_sampler: CLSPSampler) -> None:
    cfg = scheduler_config()
    anchors, seeds = _inputs(4)
    plan = sampling_plan(cfg, solver="ddim", steps=10, eta=0.0)
    got = raw_sampler(plan, anchors, seeds, torch.ones(4))
    want = _diffusers_loop(
        raw_sampler.split.unet,
        DDIMScheduler.from_config(cfg),
        seeds,
        10,
        lambda i, s: {"eta": 0.0},
    )
    assert (got - want).abs().max().item() <= 1e-4


def test_ddim_eta_matches_diffusers_given_variance_noise(sampler: CLSPSampler) -> None:
    cfg = scheduler_config()
    anchors, seeds = _inputs(3, seed=1)
    plan = sampling_plan(cfg, solver="ddim", steps=10, eta=0.7)
    got = sampler(plan, anchors, seeds, torch.ones(3))

    def kwargs(i: int, shape: torch.Size) -> dict:
        z = noise.normal(seeds, noise.step_stream(i), tuple(shape[1:]))
        return {"eta": 0.7, "variance_noise": z}

    want = _diffusers_loop(sampler.split.unet, DDIMScheduler.from_config(cfg), seeds, 10, kwargs)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers_given_noises(
    sampler: CLSPSampler, monkeypatch: pytest.MonkeyPatch, variance_type: str
) -> None:
    cfg = scheduler_config(variance_type=variance_type, steps_offset=1)
    anchors, seeds = _inputs(3, seed=2)
    plan = sampling_plan(cfg, solver="ddpm", steps=10)
    got = sampler(plan, anchors, seeds, torch.ones(3))

    step = {"i": 0}

    def our_noise(shape, generator=None, device=None, dtype=None, **_):
        # DDPMScheduler.step draws its noise here: hand it the sampler's stream.
        return noise.normal(seeds, noise.step_stream(step["i"]), tuple(shape[1:]))

    def kwargs(i: int, shape: torch.Size) -> dict:
        step["i"] = i
        return {}

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", our_noise)
    want = _diffusers_loop(sampler.split.unet, DDPMScheduler.from_config(cfg), seeds, 10, kwargs)
    assert plan.coefficients[-1].sigma > 0  # steps_offset=1: diffusers noises the last step too
    assert (got - want).abs().max().item() <= 1e-4


def test_batch_independence(sampler: CLSPSampler) -> None:
    """(anchor, seed, w) alone equals the same item inside a mixed batch of 64."""
    n = 64
    anchors, seeds = _inputs(n, seed=3)
    anchors[10:20] = anchors[0]  # several candidates of one anchor
    weights = torch.tensor([0.1, 0.5, 1.0, 0.0] * 16)
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=6, eta=0.1)
    batch = sampler(plan, anchors, seeds, weights)
    for j in (0, 13, 42):  # w = 0.1, 0.5, 1.0 (alone: the anchor pass is skipped)
        alone = sampler(plan, anchors[j : j + 1], seeds[j : j + 1], weights[j : j + 1])
        assert (alone[0] - batch[j]).abs().max().item() <= 2 / 255  # 1/255 on the [0,1] scale
        for stream in (noise.STREAM_INITIAL, noise.anchor_stream(3), noise.step_stream(5)):
            one = noise.normal(seeds[j : j + 1], stream, SHAPE)
            many = noise.normal(seeds, stream, SHAPE)
            assert torch.equal(one[0], many[j])


def test_interpolation_uses_the_anchor(sampler: CLSPSampler) -> None:
    anchors, seeds = _inputs(2, seed=4)
    seeds[1] = seeds[0]  # same candidate noise, different anchors
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=6, eta=0.1)
    w0 = sampler(plan, anchors, seeds, torch.zeros(2))
    w1 = sampler(plan, anchors, seeds, torch.ones(2))
    w01 = sampler(plan, anchors, seeds, torch.full((2,), 0.1))
    assert torch.equal(w1[0], w1[1])  # w = 1 ignores the anchor
    assert (w0[0] - w1[0]).abs().max().item() > 0.05
    assert (w01[0] - w01[1]).abs().max().item() > 0.05  # different anchors -> different positives


def test_low_skips_mix_only_the_skips_at_the_bottleneck_resolution() -> None:
    n, w = 3, torch.tensor([0.0, 0.25, 1.0])
    h = torch.randn(2 * n, 8, 4, 4)
    skips = (
        torch.randn(2 * n, 4, 16, 16),
        torch.randn(2 * n, 8, 8, 8),
        torch.randn(2 * n, 8, 4, 4),
    )
    enc = Encoded(h, skips)
    lerp = lambda t: w.view(-1, 1, 1, 1) * t[:n] + (1 - w.view(-1, 1, 1, 1)) * t[n:]  # noqa: E731
    cand, anchor = rows(enc, slice(n)), rows(enc, slice(n, None))
    plain = mix_encodings(cand, anchor, w, "bottleneck")
    low = mix_encodings(cand, anchor, w, "bottleneck+low-skips")
    for mixed in (plain, low):
        torch.testing.assert_close(mixed.h, lerp(h))
        assert [torch.equal(a, b[:n]) for a, b in zip(mixed.skips[:2], skips[:2], strict=True)] == [
            True,
            True,
        ]  # the finer skips stay the candidate's
    assert torch.equal(plain.skips[2], skips[2][:n])
    torch.testing.assert_close(low.skips[2], lerp(skips[2]))
    assert torch.equal(low.skips[2][2], skips[2][2])  # w = 1: the candidate's own


def test_low_skips_change_positives_below_w1_only(sampler: CLSPSampler) -> None:
    anchors, seeds = _inputs(4, seed=6)
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=6, eta=0.1)
    weights = torch.tensor([0.0, 0.1, 0.5, 1.0])
    plain = sampler(plan, anchors, seeds, weights)
    low = sampler(
        plan, anchors, seeds, weights, DEFAULT_GROUP._replace(interpolate="bottleneck+low-skips")
    )
    assert torch.equal(plain[3], low[3])  # w = 1 mixes nothing in either mode
    for j in range(3):
        assert (plain[j] - low[j]).abs().max().item() > 1e-3
    # the anchor's low skips pull the positive towards the anchor at w = 0
    assert (low[0] - anchors[0]).abs().mean() < (plain[0] - anchors[0]).abs().mean()


def test_candidates_of_one_anchor_differ(sampler: CLSPSampler) -> None:
    anchors, seeds = _inputs(3, seed=5)
    anchors[:] = anchors[0]
    plan = sampling_plan(scheduler_config(), solver="ddpm", steps=6)
    out = sampler(plan, anchors, seeds, torch.full((3,), 0.1))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (out[a] - out[b]).abs().mean().item() > 0.02


def test_anchor_groups_follow_the_anchor_seeds() -> None:
    first, group = anchor_groups(torch.tensor([7, 3, 7, 9, 3, 7]))
    # every candidate maps to a group whose first candidate has its seed
    assert torch.equal(
        torch.tensor([7, 3, 7, 9, 3, 7])[first][group], torch.tensor([7, 3, 7, 9, 3, 7])
    )
    assert sorted(first.tolist()) == [0, 1, 3]


def _reuse_loop(sampler: CLSPSampler, plan, anchors, seeds, w, anchor_seeds, refresh, mixed=None):
    """The anchor path written out plainly: each candidate's own anchor noised by
    ``anchor_seeds`` and encoded at every ``refresh``-th step, reused in between; from step
    ``mixed`` on (when given) the candidate runs alone."""
    split, n = sampler.split, anchors.shape[0]
    x = noise.normal(seeds, noise.STREAM_INITIAL, SHAPE)
    anchor_enc = None
    with torch.inference_mode():
        for i, (timestep, c) in enumerate(zip(plan.timesteps, plan.coefficients, strict=True)):
            t = split.timesteps(timestep, n)
            emb = split.embed(t)
            if i % refresh == 0:
                eps = noise.normal(anchor_seeds, noise.anchor_stream(i), SHAPE)
                a_t = c.sqrt_alpha_bar * anchors + c.sqrt_one_minus_alpha_bar * eps
                anchor_enc = split.encode(a_t, emb)
            enc = split.encode(x, emb)
            if mixed is None or i < mixed:
                enc = mix_encodings(enc, anchor_enc, w, "bottleneck")
            out = split.decode(enc, emb, t)
            x = ops.scheduler_update(
                x, out, seeds, noise.step_stream(i), c, plan.prediction_type, plan.clip_range
            )
    return x.clamp(-1, 1)


@pytest.mark.parametrize("refresh", [1, 3, 100])
def test_anchor_reuse_matches_the_plain_loop(sampler: CLSPSampler, refresh: int) -> None:
    """Shared anchors and a refresh every n steps equal the loop written out per candidate."""
    anchors, seeds = _inputs(6, seed=8)
    anchors[3:] = anchors[0]  # candidates 0, 3, 4, 5 share one anchor
    anchor_seeds = torch.tensor([11, 12, 13, 11, 11, 11])
    w = torch.tensor([0.1, 0.3, 0.0, 0.5, 0.1, 0.9])
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=7, eta=0.1)
    refreshed = DEFAULT_GROUP._replace(anchor_refresh=refresh)
    got = sampler(plan, anchors, seeds, w, refreshed, anchor_seeds=anchor_seeds)
    want = _reuse_loop(sampler, plan, anchors, seeds, w, anchor_seeds, refresh)
    assert (got - want).abs().max().item() <= 1e-4
    if refresh == 1:  # without sharing each candidate noises its anchor by its own seed
        own = sampler(plan, anchors, seeds, w)
        assert (own - _reuse_loop(sampler, plan, anchors, seeds, w, seeds, 1)).abs().max() <= 1e-4
    else:  # a stale anchor encoding changes the positives
        assert (
            got - sampler(plan, anchors, seeds, w, anchor_seeds=anchor_seeds)
        ).abs().max() > 1e-3


@pytest.mark.parametrize(("until", "mixed"), [(0.3, 3), (0.5, 4), (0.05, 1)])
def test_interpolate_until_mixes_the_first_steps_only(
    sampler: CLSPSampler, until: float, mixed: int
) -> None:
    """``interpolate_until`` u mixes the anchor into the first ceil(u * steps) steps (at
    least one) and runs the rest plainly, as the loop written out does."""
    assert anchor_steps(7, until) == mixed
    anchors, seeds = _inputs(4, seed=10)
    w = torch.tensor([0.0, 0.1, 0.3, 0.9])
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=7, eta=0.1)
    group = DEFAULT_GROUP._replace(interpolate_until=until)
    got = sampler(plan, anchors, seeds, w, group)
    want = _reuse_loop(sampler, plan, anchors, seeds, w, seeds, 1, mixed=mixed)
    assert (got - want).abs().max().item() <= 1e-4
    every_step = sampler(plan, anchors, seeds, w)
    assert (got - every_step).abs().max().item() > 1e-3  # the later steps changed


def test_interpolate_until_one_is_every_step() -> None:
    assert [anchor_steps(n, 1.0) for n in (1, 7, 100)] == [1, 7, 100]
    assert anchor_steps(100, 0.999) == 100 and anchor_steps(3, 1e-6) == 1


def test_shared_anchor_positives_are_batch_independent(sampler: CLSPSampler) -> None:
    """With a shared anchor, a candidate alone equals the same candidate beside its siblings."""
    anchors, seeds = _inputs(8, seed=9)
    anchors[1:4] = anchors[0]
    anchor_seeds = torch.tensor([5, 5, 5, 5, 6, 7, 8, 9])
    w = torch.full((8,), 0.1)
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=6, eta=0.1)
    every_2 = DEFAULT_GROUP._replace(anchor_refresh=2)
    batch = sampler(plan, anchors, seeds, w, every_2, anchor_seeds=anchor_seeds)
    for j in (0, 2, 6):
        one = slice(j, j + 1)
        alone = sampler(
            plan, anchors[one], seeds[one], w[one], every_2, anchor_seeds=anchor_seeds[one]
        )
        assert (alone[0] - batch[j]).abs().max().item() <= 2 / 255


def test_refresh_below_one_is_refused(sampler: CLSPSampler) -> None:
    anchors, seeds = _inputs(1)
    plan = sampling_plan(scheduler_config(), solver="ddim", steps=2, eta=0.1)
    with pytest.raises(ValueError, match="anchor_refresh"):
        sampler(
            plan, anchors, seeds, torch.full((1,), 0.1), DEFAULT_GROUP._replace(anchor_refresh=0)
        )


def test_plan_follows_config() -> None:
    plan = sampling_plan(scheduler_config(steps_offset=1), solver="ddim", steps=10, eta=0.0)
    assert plan.timesteps == tuple(range(901, 0, -100))
    assert plan.clip_range == 1.0
    assert all(c.sigma == 0.0 for c in plan.coefficients)
    last = plan.coefficients[-1]
    assert last.coef_x0 == 1.0 and last.coef_eps == 0.0  # set_alpha_to_one
    ddpm = sampling_plan(scheduler_config(), solver="ddpm", steps=10)
    assert ddpm.coefficients[-1].sigma == 0.0 and ddpm.coefficients[0].sigma > 0


@pytest.mark.parametrize(
    ("overrides", "solver", "steps", "match"),
    [
        (dict(thresholding=True), "ddim", 10, "thresholding"),
        (dict(variance_type="learned_range"), "ddpm", 10, "variance_type"),
        (dict(variance_type="fixed_large_log"), "ddpm", 10, "variance_type"),
        (dict(prediction_type="flow"), "ddim", 10, "prediction_type"),
        (dict(beta_schedule="sigmoid"), "ddim", 10, "ddim cannot use"),
        ({}, "ddim", 1001, "steps must be in"),
        ({}, "euler", 10, "method"),
    ],
)
def test_unsupported_configs_are_refused(overrides, solver, steps, match) -> None:
    with pytest.raises(UnsupportedSchedulerError, match=match):
        sampling_plan(scheduler_config(**overrides), solver=solver, steps=steps, eta=0.1)
