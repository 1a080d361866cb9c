"""``CLSPPipeline``: the service's positives in a notebook, diffusers-style
(docs/library.md, "In a notebook: CLSPPipeline").

A pipeline only wires pieces together (docs/design.md §1): the model is loaded by the
service's loader (a folder or a hub id, ``service/sampling/model.py``), the arguments
become one ``GenerationParams`` completed as a service completes a request's
(``RequestDefaults``: the model folder's ``clsp_generation.json``, then the default
sampling mode), and the positives come from ``PositivesGenerator``, the sampler
``clsp serve`` runs. With ``seed=None`` each positive is seeded by its cache key
(docs/design.md §2), so candidate j of an anchor is the positive ``POST /v1/positives``
returns for candidate index j with the same params; an integer seed draws other
candidates, reproducibly (``candidate_seed``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError

from clsp_positives.images import as_pil
from clsp_positives.proto.codec import check_anchors
from clsp_positives.proto.keys import canonical_anchors, seed_from_key, uint8_to_unit
from clsp_positives.proto.params import (
    GenerationParams,
    Interpolate,
    Method,
    Sampling,
    describe_validation_error,
)
from clsp_positives.service.requests import RequestDefaults
from clsp_positives.service.sampling.generator import PositivesGenerator
from clsp_positives.service.sampling.model import LoadedModel, load_model
from clsp_positives.service.settings import ServiceSettings

OutputType = Literal["np", "pt", "pil"]
PIPELINE_SEED_DOMAIN = b"clsp-positives/pipeline-seed/v1"
ARGUMENT_NAMES = {"steps": "num_inference_steps"}
"""``GenerationParams`` fields the pipeline's arguments name as diffusers does."""
BATCH_SIZE: int = ServiceSettings.model_fields["max_batch"].default
"""Items per sampler call unless told otherwise: a service's default ``max_batch``."""


def candidate_seed(seed: int, anchor: int, candidate: int) -> int:
    """The noise seed of candidate ``candidate`` of the ``anchor``-th anchor of a call with
    integer ``seed``: the first 63 bits of sha256 over a domain of its own and the three
    numbers, as ``proto.keys.seed_from_key`` reads a key. Pure: the same three numbers
    give the same positive in any process, and no such seed is a cache key's."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    if not -(1 << 63) <= int(seed) < 1 << 63:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    parts = (int(seed).to_bytes(8, "little", signed=True), anchor.to_bytes(8, "little"))
    digest = hashlib.sha256(
        PIPELINE_SEED_DOMAIN + b"|" + b"|".join((*parts, candidate.to_bytes(8, "little")))
    )
    return seed_from_key(digest.digest())


class CLSPPipeline:
    """Synthetic positives of anchors from one diffusion model, in this process.

    ``CLSPPipeline.from_pretrained(model_dir_or_hub_id)`` loads as ``clsp serve --model``
    does; ``.to("cuda")`` moves it; calling it on anchors returns ``k`` positives of
    each. The model runs in ``torch_dtype`` (float32 unless told) on the CPU until moved.
    """

    def __init__(self, model: LoadedModel, torch_dtype: torch.dtype | str | None = None) -> None:
        self.model = model
        self.dtype: torch.dtype | str = torch.float32 if torch_dtype is None else torch_dtype
        self._generator: PositivesGenerator | None = None
        self._device: torch.device | str = "cpu"

    @classmethod
    def from_pretrained(
        cls, model: str | Path, torch_dtype: torch.dtype | str | None = None
    ) -> CLSPPipeline:
        """A model folder (``clsp diffusion train``'s, a diffusers DDPM or LDM pipeline's)
        or a Hugging Face hub id ``ORG/NAME`` read from the hub cache; refused with a
        ``ModelLoadError`` (a ValueError) naming what to fix (docs/library.md, Hub models).
        """
        return cls(load_model(model), torch_dtype)

    def to(self, device: str | torch.device) -> CLSPPipeline:
        """This pipeline on ``device`` (cpu, cuda, cuda:N); returns itself."""
        self._device = device
        self._generator = None
        self._generator = self.generator
        return self

    @property
    def generator(self) -> PositivesGenerator:
        """The service's generator of this model on this pipeline's device, made at first
        use (a float16 pipeline is moved to CUDA before it runs)."""
        if self._generator is None:
            self._generator = PositivesGenerator(self.model, device=self._device, dtype=self.dtype)
        return self._generator

    @property
    def device(self) -> torch.device:
        return self.generator.device

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint, as ``GET /v1/model`` reports it."""
        return self.model.fingerprint

    def generation_params(self, **given: Any) -> GenerationParams:
        """The params positives are made and keyed with: ``given`` (``GenerationParams``
        fields, None left out) completed as a service left at its defaults completes a
        request's (``RequestDefaults``): the model's ``clsp_generation.json`` for each field
        not given, then the default sampling mode."""
        try:
            params = GenerationParams.model_validate(
                {name: value for name, value in given.items() if value is not None}
            )
        except ValidationError as exc:
            message = describe_validation_error(exc, allowed=sorted(GenerationParams.model_fields))
            for field, argument in ARGUMENT_NAMES.items():
                message = re.sub(rf"\b{field}:", f"{argument}:", message)
            raise ValueError(message) from None
        defaults = RequestDefaults.of(ServiceSettings(model=self.model.source), self.generator)
        params = defaults.apply(params)
        self.generator.check_params(params)
        return params

    @torch.inference_mode()
    def __call__(
        self,
        anchors: Any,
        *,
        interpolation_weight: float | None = None,
        num_inference_steps: int | None = None,
        k: int = 1,
        seed: int | None = None,
        output_type: OutputType = "np",
        sampling: Sampling | None = None,
        interpolate: Interpolate | None = None,
        interpolate_until: float | None = None,
        share_anchor: bool | None = None,
        eta: float | None = None,
        method: Method | None = None,
        anchor_refresh: int | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> Any:
        """``k`` positives of each of N anchors.

        ``anchors``: a list of PIL images (or one), uint8 numpy ``[N, H, W, C]``, float
        numpy ``[N, C, H, W]`` in [-1, 1], or a torch tensor ``[N, C, H, W]`` in [-1, 1];
        the model's size and channels. A generation param left None takes the model's
        stored setting, else ``GenerationParams``' default (``interpolation_weight`` 0.1,
        ``num_inference_steps`` 100: docs/api.md). ``seed`` None: the service's positives
        (candidate j is the pool's candidate index j); an integer: other candidates,
        the same for the same seed (``candidate_seed``).

        Returns by ``output_type``: "np" uint8 ``[N, k, H, W, C]``; "pt" float
        ``[N, k, C, H, W]`` in [-1, 1] on the pipeline's device (the uint8 positives
        mapped as ``uint8_to_unit``); "pil" a list of N lists of k PIL images.
        """
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil', got {output_type!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1 (positives per anchor), got {k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        params = self.generation_params(
            interpolation_weight=interpolation_weight,
            steps=num_inference_steps,
            sampling=sampling,
            interpolate=interpolate,
            interpolate_until=interpolate_until,
            share_anchor=share_anchor,
            eta=eta,
            method=method,
            anchor_refresh=anchor_refresh,
        )
        canon = self._canonical(anchors)
        n, k = len(canon), int(k)
        items = np.repeat(canon, k, axis=0)  # anchor a's candidate j is item a * k + j
        candidates = np.tile(np.arange(k, dtype=np.int64), n)
        if seed is not None:
            seeds = np.array(
                [candidate_seed(seed, a, j) for a in range(n) for j in range(k)], dtype=np.int64
            )
        out = []
        for start in range(0, len(items), batch_size):
            part = slice(start, start + batch_size)
            if seed is None:
                out.append(self.generator.positives(items[part], candidates[part], params))
            else:
                weights = np.full(len(items[part]), params.interpolation_weight, np.float32)
                out.append(self.generator.sample(items[part], seeds[part], weights, params.group()))
        positives = np.concatenate(out).reshape(n, k, *out[0].shape[1:])
        return self._output(positives, output_type)

    def _canonical(self, anchors: Any) -> np.ndarray:
        """Anchors as the service's canonical float32 ``[N, C, H, W]``, checked as the
        service checks a request's (``proto.codec.check_anchors``)."""
        if isinstance(anchors, torch.Tensor):
            if anchors.dtype == torch.uint8:
                raise ValueError(
                    "a uint8 tensor is ambiguous: pass float [N, C, H, W] in [-1, 1] "
                    "(x / 127.5 - 1) or a uint8 numpy array [N, H, W, C]"
                )
            array = anchors.detach().to("cpu", torch.float32).numpy()
        elif _is_pil(anchors) or (
            isinstance(anchors, Sequence) and anchors and all(_is_pil(a) for a in anchors)
        ):
            array = self._pil_pixels([anchors] if _is_pil(anchors) else list(anchors))
        elif isinstance(anchors, np.ndarray):
            array = anchors
        else:
            raise ValueError(
                "anchors must be a list of PIL images, a numpy array (uint8 [N, H, W, C] or "
                f"float [N, C, H, W] in [-1, 1]) or a torch tensor, got {type(anchors).__name__}"
            )
        g = self.generator
        check_anchors(array, expected_chw=(g.channels, *g.sample_hw))
        return canonical_anchors(array)

    def _pil_pixels(self, images: list[Any]) -> np.ndarray:
        """PIL images as uint8 ``[N, H, W, C]``, each in the model's mode."""
        mode = "L" if self.generator.channels == 1 else "RGB"
        for i, image in enumerate(images):
            if image.mode != mode:
                raise ValueError(
                    f"anchor {i} is a PIL image of mode {image.mode}; this model takes mode "
                    f'{mode} pictures: pass image.convert("{mode}")'
                )
        sizes = {image.size for image in images}
        if len(sizes) > 1:
            raise ValueError(f"the PIL anchors differ in size ({sorted(sizes)}): resize them")
        pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
        return pixels[..., None] if pixels.ndim == 3 else pixels

    def _output(self, positives: np.ndarray, output_type: OutputType) -> Any:
        if output_type == "np":
            return positives
        if output_type == "pil":
            return [[as_pil(p) for p in row] for row in positives]
        unit = uint8_to_unit(positives).transpose(0, 1, 4, 2, 3)
        return torch.from_numpy(np.ascontiguousarray(unit)).to(self.device)


def _is_pil(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)
