"""The batched SimCLR augmentation: geometry, colour operations against
torchvision's, per-sample randomness and reproducibility."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from clsp_positives.trainer.data import augment as A


def _images(n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), generator=g, dtype=torch.uint8)


def test_full_box_without_flip_is_the_identity_and_flip_mirrors() -> None:
    x = A.to_float_nchw(_images(3, 8, 3))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 3)
    same = A.crop_flip(x, boxes, torch.zeros(3, dtype=torch.bool), (8, 8))
    assert torch.allclose(same, x, atol=1e-5)
    flipped = A.crop_flip(x, boxes, torch.ones(3, dtype=torch.bool), (8, 8))
    assert torch.allclose(flipped, torch.flip(x, dims=[3]), atol=1e-5)


def test_crop_takes_the_box_region() -> None:
    x = A.to_float_nchw(_images(1, 8, 1))
    box = torch.tensor([[2.0, 4.0, 4.0, 4.0]])  # top 2, left 4, 4x4: a crop at native scale
    out = A.crop_flip(x, box, torch.zeros(1, dtype=torch.bool), (4, 4))
    assert torch.allclose(out, x[:, :, 2:6, 4:8], atol=1e-5)


def test_crop_boxes_respect_bounds_scale_and_ratio() -> None:
    cfg = A.AugmentConfig()
    g = torch.Generator().manual_seed(0)
    boxes = A.crop_boxes(4000, 32, 32, cfg, g, "cpu")
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= 32).all() and (left + w <= 32).all())
    area = h * w / (32 * 32)
    assert area.min().item() >= 0.05 and area.max().item() <= 1.0
    ratio = w / h
    # Rounding to whole pixels widens the ratio range slightly on small crops.
    assert ratio.min().item() > 0.5 and ratio.max().item() < 2.0
    assert area.std().item() > 0.1  # the scale really varies per sample


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_torchvision(factor: float) -> None:
    x = A.to_float_nchw(_images(4, 8, 3, seed=2))
    f = torch.full((4,), factor)
    for ours, theirs in [
        (A.adjust_brightness, TF.adjust_brightness),
        (A.adjust_contrast, TF.adjust_contrast),
        (A.adjust_saturation, TF.adjust_saturation),
    ]:
        expected = torch.stack([theirs(img, factor) for img in x])
        assert torch.allclose(ours(x, f), expected, atol=1e-5), ours.__name__


@pytest.mark.parametrize("shift", [-0.1, 0.03, 0.1])
def test_hue_matches_torchvision(shift: float) -> None:
    x = A.to_float_nchw(_images(4, 8, 3, seed=3))
    expected = torch.stack([TF.adjust_hue(img, shift) for img in x])
    assert torch.allclose(A.adjust_hue(x, torch.full((4,), shift)), expected, atol=1e-4)


def test_hsv_round_trip() -> None:
    x = A.to_float_nchw(_images(2, 8, 3, seed=4))
    assert torch.allclose(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5)


def test_one_channel_images_get_brightness_and_contrast_only() -> None:
    x = A.to_float_nchw(_images(2, 8, 1))
    f = torch.tensor([0.7, 1.3])
    assert torch.equal(A.adjust_saturation(x, f), x)
    assert torch.equal(A.adjust_hue(x, torch.tensor([0.1, -0.1])), x)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(A.random_grayscale(x, 1.0, g), x)
    assert not torch.allclose(A.adjust_contrast(x, f), x)


def test_grayscale_with_p_one_makes_channels_equal() -> None:
    x = A.to_float_nchw(_images(3, 8, 3))
    out = A.random_grayscale(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_views_shape_range_per_sample_randomness_and_seeding() -> None:
    images = _images(1, 16, 3).expand(16, -1, -1, -1).contiguous()  # one image, 16 times
    aug = A.BatchAugment(12, [0.5] * 3, [0.25] * 3, seed=7)
    views = aug.views(images)
    assert views.shape == (16, 3, 12, 12) and views.dtype == torch.float32
    assert views.min().item() >= 0.0 and views.max().item() <= 1.0
    # Every copy of the same image got its own crop / colours.
    flat = views.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(math.inf).min().item() > 1e-3
    again = A.BatchAugment(12, [0.5] * 3, [0.25] * 3, seed=7).views(images)
    assert torch.equal(views, again)
    aug.reseed(7)
    assert torch.equal(aug.views(images), views)
    normalised = A.BatchAugment(12, [0.5] * 3, [0.25] * 3, seed=7)(images)
    assert torch.allclose(normalised, (views - 0.5) / 0.25, atol=1e-5)


def test_plain_resizes_and_normalises_without_randomness() -> None:
    images = _images(2, 8, 1)
    aug = A.BatchAugment(8, [0.5], [0.5])
    out = aug.plain(images)
    assert torch.allclose(out, (A.to_float_nchw(images) - 0.5) / 0.5)
    assert A.BatchAugment(16, [0.5], [0.5]).plain(images).shape == (2, 1, 16, 16)


def test_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        A.BatchAugment(8, [0.5], [0.5])(torch.rand(2, 8, 8, 1))


def test_colour_jitter_follows_its_probability() -> None:
    x = A.to_float_nchw(_images(64, 8, 3, seed=5))
    never = A.AugmentConfig(jitter_p=0.0)
    assert torch.equal(A.color_jitter(x, never, torch.Generator().manual_seed(0)), x)
    changed = A.color_jitter(x, A.AugmentConfig(jitter_p=1.0), torch.Generator().manual_seed(0))
    differs = (changed - x).abs().flatten(1).amax(1) > 1e-4
    assert differs.float().mean().item() > 0.9


def test_gaussian_blur_matches_torchvision_per_sample() -> None:
    x = _images(3, 20, 3, seed=4).permute(0, 3, 1, 2).float() / 255
    sigma = torch.tensor([0.3, 1.0, 2.0])
    got = A.gaussian_blur(x, sigma)
    k = A.blur_kernel_size(20)
    assert k % 2 == 1 and k >= 3 and A.blur_kernel_size(224) == 23
    for i in range(3):
        want = TF.gaussian_blur(x[i], kernel_size=[k, k], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_solarize_matches_torchvision() -> None:
    x = _images(2, 8, 3, seed=5).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(A.solarize(x), TF.solarize(x, threshold=0.5))


def test_views_blur_and_solarize_by_their_own_config() -> None:
    """Per-view configs: the second view alone blurs and solarises here; with both off
    a view is exactly the plain SimCLR view (same random stream)."""
    images = _images(64, 16, 3, seed=6)
    plain = A.BatchAugment(16, [0.5] * 3, [0.25] * 3, seed=1)
    asym = A.BatchAugment(
        16,
        [0.5] * 3,
        [0.25] * 3,
        seed=1,
        views=[A.AugmentConfig(), A.AugmentConfig(blur_p=1.0, solarize_p=1.0)],
    )
    assert torch.equal(asym.views(images, view=0), plain.views(images))
    second = asym.views(images, view=1)
    reference = plain.views(images)  # the same crops and colours, not blurred or solarised
    assert not torch.allclose(second, reference)
    # solarised: nothing above 0.5 is left
    assert float(second.max()) <= 0.5 + 1e-6
