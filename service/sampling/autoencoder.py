"""The autoencoder of a latent model: images <-> scaled latents (docs/latent.md).

A latent model samples in the autoencoder's latent space, scaled by the
config's ``scaling_factor`` as diffusers' latent pipelines do (``LDMPipeline``
divides by it before decoding). Encoding is deterministic, so one image always
maps to one latent and its keys and positives stay reproducible
(docs/design.md §2): a KL autoencoder gives its posterior's mean, a VQ model
its quantised code.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, VQModel

from clsp_positives.proto.messages import AutoencoderKind

AUTOENCODER_CLASSES: dict[str, AutoencoderKind] = {"AutoencoderKL": "kl", "VQModel": "vq"}
"""diffusers class name -> kind; the only autoencoders a latent model may carry."""

AUTOENCODER_DIRS: dict[AutoencoderKind, str] = {"vq": "vqvae", "kl": "vae"}
"""The pipeline folder of each kind: ``LDMPipeline`` writes ``vqvae/``, the
Stable Diffusion family ``vae/``."""


class Autoencoder:
    """A diffusers ``AutoencoderKL`` or ``VQModel`` with the scaling of its latents.

    Runs in float32 whatever the UNet's dtype: it is called once per anchor and
    once per positive, not once per step, and rounding the latents it hands the
    sampler would move every positive.
    """

    def __init__(self, model: AutoencoderKL | VQModel) -> None:
        name = type(model).__name__
        if name not in AUTOENCODER_CLASSES:
            raise TypeError(f"a latent model needs an AutoencoderKL or a VQModel, got {name}")
        self.model = model.eval().requires_grad_(False)
        self.kind: AutoencoderKind = AUTOENCODER_CLASSES[name]
        self.scaling_factor = float(model.config.scaling_factor)

    def to(self, device: torch.device) -> Autoencoder:
        self.model = self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[N, c, h, w]`` of images ``[N, C, H, W]`` in [-1, 1]."""
        x = images.to(device=self.device, dtype=torch.float32)
        if self.kind == "kl":
            z = self.model.encode(x).latent_dist.mean
        else:
            z, _, _ = self.model.quantize(self.model.encode(x).latents)
        return z * self.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` (unclamped) of scaled latents ``[N, c, h, w]``."""
        z = latents.to(device=self.device, dtype=torch.float32) / self.scaling_factor
        return self.model.decode(z).sample

    @property
    def downsample(self) -> int:
        """How many image pixels one latent pixel covers along each side: each
        encoder block but the last halves the size, in both diffusers classes."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)


def autoencoder_class(kind: AutoencoderKind) -> type[AutoencoderKL] | type[VQModel]:
    return AutoencoderKL if kind == "kl" else VQModel
