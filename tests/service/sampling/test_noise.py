"""Counter-based noise and the torch reference ops: exactness, batch independence, sanity."""

from __future__ import annotations

import pytest
import torch

from clsp_positives.service.sampling import noise, ops
from clsp_positives.service.sampling.solvers import StepCoefficients

SHAPE = (3, 17, 19)  # odd sizes: SIMD chunks and scalar tails fall at different elements


def _seeds(n: int, base: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234 + base)
    return torch.randint(0, 2**62, (n,), generator=gen, dtype=torch.int64) * 2 + base % 2


def _word(v: int) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int64)


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected) -> None:
    """Random123's Philox4x32-10 known-answer vectors (what Triton implements)."""
    words = noise.philox_rounds(*map(_word, counter), *map(_word, key))
    assert tuple(int(w) for w in words) == expected


def test_seed_and_offset_layout() -> None:
    """Key = (seed_lo, seed_hi), counter = (element, stream, 0, 0), as tl.randint4x."""
    seed = 0x0123456789ABCDEF
    words = noise.randint4x(torch.tensor([seed]), 5, 10)
    direct = noise.philox_rounds(
        torch.arange(10), _word(5), _word(0), _word(0), _word(seed & 0xFFFFFFFF), _word(seed >> 32)
    )
    for a, b in zip(words, direct, strict=True):
        assert torch.equal(a[0], b)
        assert int(a.min()) >= 0 and int(a.max()) < 2**32


def test_streams() -> None:
    assert noise.STREAM_INITIAL == 0
    assert [noise.anchor_stream(i) for i in range(3)] == [1, 3, 5]
    assert [noise.step_stream(i) for i in range(3)] == [2, 4, 6]


def test_normal_is_batch_independent() -> None:
    seeds = _seeds(64)
    full = noise.normal(seeds, 3, SHAPE)
    assert full.shape == (64, *SHAPE) and full.dtype == torch.float32
    for i in (0, 5, 63):
        alone = noise.normal(seeds[i : i + 1], 3, SHAPE)
        assert torch.equal(alone[0], full[i])
    seven = noise.normal(seeds[10:17], 3, SHAPE)
    assert torch.equal(seven, full[10:17])
    other = torch.cat([_seeds(3, base=7), seeds[20:21], _seeds(2, base=9)])
    assert torch.equal(noise.normal(other, 3, SHAPE)[3], full[20])
    # A flat view of the same sample draws the same numbers (element = C-order index).
    assert torch.equal(noise.normal(seeds[20:21], 3, (3 * 17 * 19,)).view(SHAPE), full[20])


def test_normal_dtypes_share_the_float32_noise() -> None:
    seeds = _seeds(4)
    z32 = noise.normal(seeds, 0, SHAPE)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(noise.normal(seeds, 0, SHAPE, dtype=dtype), z32.to(dtype))


def test_normal_statistics() -> None:
    seeds = _seeds(64, base=3)
    z = noise.normal(seeds, 0, (4096,)).double()
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1.0) < 0.01
    within_one = float((z.abs() < 1).double().mean())
    assert abs(within_one - 0.682689) < 0.005
    kurtosis = float((z**4).mean() / (z**2).mean() ** 2)
    assert abs(kurtosis - 3.0) < 0.1
    # Neighbouring seeds, streams and elements are uncorrelated.
    other_stream = noise.normal(seeds, 1, (4096,)).double()

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    assert abs(corr(z, other_stream)) < 0.01
    assert abs(corr(z[:-1], z[1:])) < 0.01
    assert abs(corr(z[:, :-1], z[:, 1:])) < 0.01
    consecutive = noise.normal(torch.arange(64), 0, (4096,)).double()
    assert abs(corr(consecutive[:-1], consecutive[1:])) < 0.01
    # Different seeds and streams give different numbers, the same ones the same numbers.
    assert not torch.equal(z, other_stream)
    assert torch.equal(z, noise.normal(seeds, 0, (4096,)).double())


def test_bad_inputs_name_the_fix() -> None:
    with pytest.raises(ValueError, match="int64"):
        noise.normal(torch.zeros(2, dtype=torch.int32), 0, (3,))
    with pytest.raises(ValueError, match="1-D"):
        noise.normal(torch.zeros(2, 2, dtype=torch.int64), 0, (3,))
    with pytest.raises(ValueError, match="stream"):
        noise.normal(_seeds(2), -1, (3,))
    with pytest.raises(ValueError, match="stream"):
        noise.normal(_seeds(2), 2**31, (3,))
    with pytest.raises(ValueError, match="seeds must be"):
        ops.noise_anchor(torch.zeros(3, 1, 2, 2), _seeds(2), 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="weights"):
        ops.bottleneck_lerp(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(2))
    coefs = StepCoefficients(1.0, 0.5, 1.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        ops.scheduler_update(torch.zeros(2, 3), torch.zeros(2, 3), _seeds(2), 0, coefs, "x", None)


def test_kernels_env_switch(monkeypatch) -> None:
    x = torch.zeros(2, 3)
    monkeypatch.setenv("CLSP_KERNELS", "torch")
    assert not ops.use_kernels(x)
    monkeypatch.setenv("CLSP_KERNELS", "auto")
    assert not ops.use_kernels(x)  # CPU tensors take the torch path
    monkeypatch.setenv("CLSP_KERNELS", "cuda")
    with pytest.raises(ValueError, match="CLSP_KERNELS"):
        ops.use_kernels(x)
    monkeypatch.setenv("CLSP_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.use_kernels(x)


def test_noise_anchor_reference() -> None:
    seeds = _seeds(5)
    anchors = torch.rand(5, *SHAPE) * 2 - 1
    out = ops.noise_anchor(anchors, seeds, 7, 0.8, 0.6)
    z = noise.normal(seeds, 7, SHAPE)
    assert torch.allclose(out, 0.8 * anchors + 0.6 * z, atol=1e-6)
    alone = ops.noise_anchor(anchors[2:3], seeds[2:3], 7, 0.8, 0.6)
    assert torch.equal(alone[0], out[2])
    half = ops.noise_anchor(anchors.bfloat16(), seeds, 7, 0.8, 0.6)
    assert half.dtype == torch.bfloat16


def test_bottleneck_lerp_reference() -> None:
    h, ha = torch.randn(3, 8, 2, 2), torch.randn(3, 8, 2, 2)
    out = ops.bottleneck_lerp(h, ha, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(out[0], h[0]) and torch.equal(out[1], ha[1])
    assert torch.allclose(out[2], 0.25 * h[2] + 0.75 * ha[2], atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddim_update_matches_diffusers(prediction_type: str, clip: float | None) -> None:
    """eta = 0 DDIM step against diffusers' DDIMScheduler.step (the coefficients' meaning)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=clip is not None,
        clip_sample_range=clip or 1.0,
        set_alpha_to_one=True,
    )
    sched.set_timesteps(20)
    t = int(sched.timesteps[3])
    t_prev = t - 1000 // 20
    ab_t = float(sched.alphas_cumprod[t])
    ab_prev = float(sched.alphas_cumprod[t_prev])
    coefs = StepCoefficients(
        sqrt_alpha_bar=ab_t**0.5,
        sqrt_one_minus_alpha_bar=(1 - ab_t) ** 0.5,
        coef_x0=ab_prev**0.5,
        coef_eps=(1 - ab_prev) ** 0.5,
        coef_x=0.0,
        sigma=0.0,
    )
    x = torch.randn(4, *SHAPE) * 1.5
    out = torch.randn(4, *SHAPE)
    ours = ops.scheduler_update(x, out, _seeds(4), 2, coefs, prediction_type, clip)
    theirs = sched.step(out, t, x, eta=0.0).prev_sample
    assert torch.allclose(ours, theirs, atol=2e-5)


def test_update_noise_term_is_the_step_stream() -> None:
    seeds = _seeds(6)
    x, out = torch.randn(6, *SHAPE), torch.randn(6, *SHAPE)
    quiet = StepCoefficients(0.9, 0.43588989, 0.95, 0.2, 0.1, 0.0)
    noisy = StepCoefficients(0.9, 0.43588989, 0.95, 0.2, 0.1, 0.3)
    a = ops.scheduler_update(x, out, seeds, 4, quiet, "epsilon", None)
    b = ops.scheduler_update(x, out, seeds, 4, noisy, "epsilon", None)
    assert torch.allclose(b - a, 0.3 * noise.normal(seeds, 4, SHAPE), atol=1e-5)
    alone = ops.scheduler_update(x[4:5], out[4:5], seeds[4:5], 4, noisy, "epsilon", None)
    assert torch.equal(alone[0], b[4])
