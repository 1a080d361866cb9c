"""``clsp diffusion train --vae``: a data set as an autoencoder's latents (docs/latent.md).

The set is encoded once, before the first step, with the same deterministic
encoding the service uses for picture anchors (``Autoencoder.encode``), so the
UNet learns the very latents it is later asked to start from. A mirrored
latent is not the latent of the mirrored picture, so with flips on, the
mirrored pictures are encoded too and a flip picks that copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clsp_positives.service.sampling.autoencoder import Autoencoder

ENCODE_BATCH = 256
"""Pictures per encoder call: bounds the activations, not the result."""


@dataclass(frozen=True)
class LatentData:
    """Scaled latents ``[N, c, h, w]`` of a set, and of its mirror images with flips."""

    plain: torch.Tensor
    mirrored: torch.Tensor | None

    @property
    def chw(self) -> tuple[int, int, int]:
        c, h, w = self.plain.shape[1:]
        return int(c), int(h), int(w)

    def batch(self, idx: torch.Tensor, flips: torch.Generator | None) -> torch.Tensor:
        """The latents of items ``idx``; with a generator, each mirrored with p = 0.5
        (one draw per item, as the picture path flips)."""
        x = self.plain[idx]
        if flips is None or self.mirrored is None:
            return x
        flip = (torch.rand(len(idx), generator=flips) < 0.5).to(x.device)
        return torch.where(flip.view(-1, 1, 1, 1), self.mirrored[idx], x)


def encode_data_set(
    autoencoder: Autoencoder, images: torch.Tensor, *, flips: bool, progress: bool = True
) -> LatentData:
    """Latents of uint8 pictures ``[N, C, H, W]`` (on the autoencoder's device)."""
    from tqdm.auto import tqdm

    if images.shape[1] != autoencoder.image_channels:
        raise ValueError(
            f"the autoencoder takes {autoencoder.image_channels}-channel pictures but the "
            f"data set has {images.shape[1]} channels: pass --channels "
            f"{autoencoder.image_channels}"
        )
    if images.shape[-1] % autoencoder.downsample or images.shape[-2] % autoencoder.downsample:
        raise ValueError(
            f"the autoencoder halves pictures to 1/{autoencoder.downsample} of their side, so "
            f"the image side must be a multiple of {autoencoder.downsample}, got "
            f"{tuple(images.shape[-2:])}: pass --image-size"
        )
    passes = [False, True] if flips else [False]
    out: dict[bool, list[torch.Tensor]] = {mirror: [] for mirror in passes}
    with tqdm(
        total=len(images) * len(passes), desc="encoding latents", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(images), ENCODE_BATCH):
            x = images[start : start + ENCODE_BATCH].to(torch.float32).div_(127.5).sub_(1.0)
            for mirror in passes:
                out[mirror].append(autoencoder.encode(x.flip(-1) if mirror else x))
                bar.update(len(x))
    plain = torch.cat(out[False]).clone()
    mirrored = torch.cat(out[True]).clone() if flips else None
    return LatentData(plain, mirrored)
