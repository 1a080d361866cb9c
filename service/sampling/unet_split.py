"""The encoder/decoder split of a diffusers ``UNet2DModel`` (docs/design.md §1).

CLSP interpolates the UNet's bottleneck: the candidate's and the anchor's
paths are encoded (time embedding, ``conv_in``, down blocks, mid block), their
bottlenecks mixed, and the candidate's skips decoded (up blocks, output head).
The split mirrors ``UNet2DModel.forward`` of the installed diffusers step by
step, so ``decode(encode(x))`` is the UNet's own output for every config it
supports (attention or not, any depth, skip blocks, fourier time embedding,
no mid block); a test checks that for several configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from torch import nn


class UnsupportedUNetError(ValueError):
    """The UNet cannot be split for unconditional sampling."""


@dataclass
class Encoded:
    """What the encoder hands the decoder: the bottleneck and the skip tensors."""

    h: torch.Tensor
    skips: tuple[torch.Tensor, ...]


def check_unconditional(unet: nn.Module) -> None:
    """Refuse UNets this split (and the CLSP sampler) cannot run."""
    if not isinstance(unet, UNet2DModel):
        raise UnsupportedUNetError(
            f"the model is a {type(unet).__name__}; CLSP sampling needs an unconditional "
            "diffusers UNet2DModel"
        )
    cfg = unet.config
    if unet.class_embedding is not None or cfg.class_embed_type or cfg.num_class_embeds:
        raise UnsupportedUNetError(
            "the UNet2DModel is class-conditional (class_embed_type="
            f"{cfg.class_embed_type!r}, num_class_embeds={cfg.num_class_embeds!r}); "
            "CLSP needs an unconditional model: train one without class embeddings"
        )


class UNetSplit:
    """Encoder and decoder halves over one ``UNet2DModel`` (shares its weights).

    The time embedding is computed separately (``embed``) because every sample
    of a sampler call is at the same timestep: it is computed once for one
    sample and broadcast, which also keeps it independent of the batch size.
    """

    def __init__(self, unet: UNet2DModel) -> None:
        check_unconditional(unet)
        self.unet = unet
        self._fourier = unet.config.time_embedding_type == "fourier"

    def timesteps(self, timestep: int | torch.Tensor, batch: int) -> torch.Tensor:
        """``timestep`` as the ``[batch]`` tensor ``forward`` builds from it."""
        device = self.unet.conv_in.weight.device
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(device)
        return timestep * torch.ones(batch, dtype=timestep.dtype, device=timestep.device)

    def embed(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Time embedding ``emb`` for ``[B]`` timesteps (as ``forward`` step 1)."""
        unet = self.unet
        t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
        return unet.time_embedding(t_emb)

    def encode(self, sample: torch.Tensor, emb: torch.Tensor) -> Encoded:
        """``conv_in``, the down blocks and the mid block (``forward`` steps 0, 2-4)."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        skip_sample = sample
        sample = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(
                    hidden_states=sample, temb=emb, skip_sample=skip_sample
                )
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
        return Encoded(sample, skips)

    def decode(self, encoded: Encoded, emb: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The up blocks and the output head (``forward`` steps 5-6)."""
        unet = self.unet
        sample = encoded.h
        skips = encoded.skips
        skip_sample = None
        for block in unet.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res, emb, skip_sample)
            else:
                sample = block(sample, res, emb)
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
        sample = unet.conv_out(sample)
        if skip_sample is not None:
            sample = sample + skip_sample
        if self._fourier:
            sample = sample / timesteps.reshape((sample.shape[0],) + (1,) * (sample.ndim - 1))
        return sample

    def __call__(self, sample: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """The whole UNet through the split: equals ``unet(sample, timestep).sample``."""
        t = self.timesteps(timestep, sample.shape[0])
        emb = self.embed(t)
        return self.decode(self.encode(sample, emb), emb, t)
