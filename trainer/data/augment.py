"""The SimCLR augmentation, batched on the training device.

A per-image pipeline on CPU workers is the usual bottleneck of contrastive
training on small images (three augmented views per image here: two views and
the synthetic positive). Every transform below draws its random parameters per
sample and applies them to the whole batch tensor at once:

* random resized crop (scale 0.08-1, ratio 3/4-4/3) and horizontal flip are one
  affine sampling grid per sample, applied with a single ``grid_sample``;
* colour jitter (brightness, contrast, saturation 0.4, hue 0.1, p=0.8) with a
  random order of the four operations per sample, as torchvision does;
* random grayscale (p=0.2);
* Gaussian blur (sigma 0.1-2, a kernel a tenth of the side) and solarisation
  (at 0.5), off by default and set per view (``BatchAugment``'s ``views``), as the
  BYOL/solo-learn recipes for STL-10 and ImageNet use them (blur 1.0 / 0.1,
  solarisation 0 / 0.2 for the two views).

One-channel images get brightness and contrast only: saturation, hue and
grayscale are the identity on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's float weights


@dataclass(frozen=True)
class AugmentConfig:
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def to_float_nchw(images: Tensor) -> Tensor:
    """uint8 ``[B, H, W, C]`` -> float32 ``[B, C, H, W]`` in [0, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 [B, H, W, C] images, got {images.dtype} {tuple(images.shape)}"
        )
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def crop_boxes(
    n: int, height: int, width: int, cfg: AugmentConfig, gen: torch.Generator, device
) -> Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` as (top, left, h, w) in pixels.

    Ten tries per sample as in torchvision; samples without a valid try fall
    back to the largest centred crop of an in-range aspect ratio.
    """
    tries = 10
    area = height * width
    target = area * _uniform(n * tries, *cfg.scale, gen, device).view(n, tries)
    log_r = _uniform(n * tries, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), gen, device)
    ratio = torch.exp(log_r).view(n, tries)
    w = torch.sqrt(target * ratio).round()
    h = torch.sqrt(target / ratio).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(
        ok.any(dim=1), ok.int().argmax(dim=1), torch.full_like(ok[:, 0], -1, dtype=torch.long)
    )
    pick = first.clamp(min=0)[:, None]
    w = w.gather(1, pick).squeeze(1)
    h = h.gather(1, pick).squeeze(1)
    # Fallback: whole image clipped to the ratio range.
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        fw, fh = float(width), round(width / cfg.ratio[0])
    elif in_ratio > cfg.ratio[1]:
        fh, fw = float(height), round(height * cfg.ratio[1])
    else:
        fw, fh = float(width), float(height)
    none_ok = first < 0
    w = torch.where(none_ok, torch.full_like(w, fw), w)
    h = torch.where(none_ok, torch.full_like(h, fh), h)
    top = torch.floor(torch.rand(n, generator=gen, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=gen, device=device) * (width - w + 1))
    top = torch.where(none_ok, (height - h) / 2, top)
    left = torch.where(none_ok, (width - w) / 2, left)
    return torch.stack([top, left, h, w], dim=1)


def crop_flip(x: Tensor, boxes: Tensor, flip: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop each sample to its box, flip where asked, resize to ``size``
    (bilinear), all in one ``grid_sample``."""
    b, _, height, width = x.shape
    top, left, h, w = boxes.unbind(dim=1)
    sx = w / width
    sy = h / height
    cx = (2 * left + w) / width - 1
    cy = (2 * top + h) / height - 1
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: Tensor) -> Tensor:
    """Luma ``[B, 1, H, W]`` of RGB images (ITU-R 601, as torchvision)."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    gray = grayscale(x) if x.shape[1] == 3 else x
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(dim=1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    choices_r = torch.stack([v, q, p, p, t, v], dim=1)
    choices_g = torch.stack([t, v, v, q, p, p], dim=1)
    choices_b = torch.stack([p, p, t, v, v, q], dim=1)
    idx = i.unsqueeze(1)
    r = choices_r.gather(1, idx)
    g = choices_g.gather(1, idx)
    b = choices_b.gather(1, idx)
    return torch.cat([r, g, b], dim=1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x
    hsv = rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], dim=1)).clamp(0, 1)


def color_jitter(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    """Per-sample factors and a per-sample random order of the four operations,
    applied to the ``jitter_p`` fraction of the batch."""
    n, dev = x.shape[0], x.device
    apply = torch.rand(n, generator=gen, device=dev) < cfg.jitter_p
    factors = [
        _uniform(n, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, gen, dev),
        _uniform(n, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, gen, dev),
        _uniform(n, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, gen, dev),
        _uniform(n, -cfg.hue, cfg.hue, gen, dev),
    ]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    order = torch.argsort(torch.rand(n, 4, generator=gen, device=dev), dim=1)
    out = x
    # Every op runs on the whole batch and torch.where keeps it where chosen:
    # no data-dependent indexing, so no host-device synchronisation on CUDA.
    for step in range(4):
        for op_id, op in enumerate(ops):
            chosen = (apply & (order[:, step] == op_id)).view(-1, 1, 1, 1)
            out = torch.where(chosen, op(out, factors[op_id]), out)
    return out


def random_grayscale(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    if x.shape[1] != 3:
        return x
    pick = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(pick, grayscale(x).expand_as(x), x)


def blur_kernel_size(side: int) -> int:
    """An odd kernel of about a tenth of the image side, at least 3 (23 at 224 px)."""
    return max(3, 2 * round(side / 20) + 1)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each sample with its own ``sigma`` ``[n]``: one separable grouped convolution
    over the whole batch (reflect padding, as torchvision's GaussianBlur)."""
    n, c, h, w = x.shape
    k = blur_kernel_size(min(h, w))
    offsets = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma.to(x.dtype).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    pad = (k - 1) // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(
        F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, k), groups=n * c
    )
    flat = F.conv2d(
        F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(n * c, 1, k, 1), groups=n * c
    )
    return flat.view(n, c, h, w)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert the pixels at or above ``threshold`` (images in [0, 1])."""
    return torch.where(x >= threshold, 1.0 - x, x)


def random_blur(x: Tensor, cfg: AugmentConfig, gen: torch.Generator) -> Tensor:
    n, dev = x.shape[0], x.device
    pick = (torch.rand(n, generator=gen, device=dev) < cfg.blur_p).view(-1, 1, 1, 1)
    sigma = _uniform(n, *cfg.blur_sigma, gen, dev)
    if cfg.blur_p <= 0:  # nothing to blur; the draws above still advance the stream alike
        return x
    return torch.where(pick, gaussian_blur(x, sigma), x)


def random_solarize(x: Tensor, p: float, gen: torch.Generator) -> Tensor:
    pick = (torch.rand(x.shape[0], generator=gen, device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(pick, solarize(x), x) if p > 0 else x


class BatchAugment:
    """The SimCLR view generator for whole batches on one device.

    ``__call__(images)`` takes uint8 ``[B, H, W, C]`` (as stored and as the
    positives arrive) and returns normalised float32 ``[B, C, size, size]``.
    The generator is owned here and reseeded per epoch by the train loop, so a
    resumed run draws the same views.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: torch.device | str = "cpu",
        config: AugmentConfig | None = None,
        views: Sequence[AugmentConfig] | None = None,
        seed: int = 0,
    ) -> None:
        self.size = (size, size)
        self.config = config or AugmentConfig()
        self.view_configs = tuple(views) if views else (self.config,)
        """The config of view 0, 1, ...: asymmetric recipes blur and solarise the two
        views differently; a view past the last takes the last one's."""
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def views(self, images: Tensor, view: int = 0) -> Tensor:
        """Augmented views in [0, 1], before normalisation, with ``view``'s config."""
        cfg = self.view_configs[min(view, len(self.view_configs) - 1)]
        x = to_float_nchw(images.to(self.device, non_blocking=True))
        n, _, h, w = x.shape
        gen = self.generator
        boxes = crop_boxes(n, h, w, cfg, gen, self.device)
        flip = torch.rand(n, generator=gen, device=self.device) < cfg.flip_p
        x = crop_flip(x, boxes, flip, self.size)
        if cfg.jitter_p > 0:  # off only in crop-and-flip views (the linear protocol's)
            x = color_jitter(x, cfg, gen)
        x = random_grayscale(x, cfg.grayscale_p, gen)
        if cfg.blur_p > 0 or cfg.solarize_p > 0:
            x = random_solarize(random_blur(x, cfg, gen), cfg.solarize_p, gen)
        return x

    def __call__(self, images: Tensor, view: int = 0) -> Tensor:
        return (self.views(images, view) - self.mean) / self.std

    def plain(self, images: Tensor) -> Tensor:
        """No augmentation, only resize and normalisation (evaluation)."""
        x = to_float_nchw(images.to(self.device, non_blocking=True))
        if x.shape[-2:] != torch.Size(self.size):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std
