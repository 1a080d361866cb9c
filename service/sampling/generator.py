"""The Python API of the generation core: keys -> seeds -> CLSP sampling -> uint8.

A positive is addressed by its key (``proto.keys``), and its seed is derived
from that key in ``sample_keyed`` alone, so what the service caches under a key
is exactly what this class makes for it (docs/design.md §2). The service's
batcher calls ``sample_keyed`` from one worker thread with items of one
``SamplerGroup`` (``GenerationParams.group()``: the sampler's settings, passed whole;
the interpolation weight may differ per item); ``positives`` does the same for one
request's anchors and candidate indices; ``sample`` is the seed-level core under both.

A latent model (docs/latent.md) samples in its autoencoder's latent space: picture
anchors are encoded first, and positives are decoded unless latents are asked for,
both inside the same call, so the batcher's batches cover them too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsp_positives.proto.keys import (
    anchor_seed,
    canonical_anchors,
    canonical_latents,
    positive_keys,
    seed_from_key,
    unit_to_uint8,
)
from clsp_positives.proto.messages import ModelInfo
from clsp_positives.proto.model_settings import GENERATION_DEFAULTS_FILE
from clsp_positives.proto.params import (
    DEFAULT_SAMPLING,
    ETA_METHODS,
    AnchorSpace,
    GenerationParams,
    SamplerGroup,
    Sampling,
)
from clsp_positives.service.sampling.model import (
    LoadedModel,
    ModelLoadError,
    load_model,
    public_config,
)
from clsp_positives.service.sampling.sampler import CLSPSampler, sampler_path
from clsp_positives.service.sampling.schedule import (
    SamplingPlan,
    UnsupportedSchedulerError,
    sampling_config,
    sampling_plan,
)
from clsp_positives.service.sampling.solvers import SOLVERS
from clsp_positives.service.sampling.unet_split import UNetSplit

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


WARMUP_INTERPOLATION_WEIGHT = 0.5
"""Below 1, so the warm-up takes the anchor path (``sampler.sampler_path``) of CLSP requests."""


class WarmupStopped(Exception):
    """``PositivesGenerator.warmup`` saw its ``stop`` event set and ran no more calls."""


def _bucket(n: int) -> int:
    """The power of two a compiled generator pads a batch of ``n`` to."""
    return 1 << max(n - 1, 0).bit_length()


class GeneratorInputError(ValueError):
    """A sampling input does not fit the model (shape, channels, dtype, range)."""


def _check_interpolation_weights(interpolation_weights: np.ndarray, m: int) -> None:
    w = interpolation_weights
    if w.shape != (m,) or not np.issubdtype(w.dtype, np.floating):
        raise GeneratorInputError(
            f"interpolation weights must be float [{m}], got {w.dtype} {tuple(w.shape)}"
        )
    if not (np.isfinite(w).all() and ((w >= 0) & (w <= 1)).all()):
        raise GeneratorInputError("interpolation weights must be finite and in [0, 1]")


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {resolved}")
    if device.type == "cpu" and resolved == torch.float16:
        raise ValueError("dtype float16 runs on CUDA only; use float32 or bfloat16 on the CPU")
    if device.type == "cpu" and resolved == torch.bfloat16 and not cpu_has_bf16():
        raise ValueError(
            "dtype bfloat16 on this CPU would be emulated (no AVX512-BF16 or AMX), slower "
            "than float32; use float32"
        )
    return resolved


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU: only then is a bfloat16 UNet
    faster than a float32 one here (docs/performance.md)."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class PositivesGenerator:
    """A loaded model ready to sample positives on one device in one dtype.

    ``compile=True`` wraps the encoder and decoder in ``torch.compile`` (slower
    first calls per batch shape, faster afterwards). ``channels_last`` defaults
    to on for CUDA, where cuDNN's NHWC convolutions are faster, and off on the
    CPU where it measured no faster for these UNets.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.fingerprint = model.fingerprint
        self.source = model.source
        self.generation_defaults = model.generation_defaults
        """The model folder's ``clsp_generation.json``, None without one: what a service
        applies to the params requests leave unset (``service/requests.py``)."""
        self.scheduler_config: dict[str, Any] = dict(model.scheduler_config)
        cfg = model.unet.config
        size = cfg.sample_size
        unet_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.autoencoder = model.autoencoder
        self.latent_chw: tuple[int, int, int] | None = None
        """The latents a latent model samples (``[c, h, w]``); None for a pixel model."""
        if self.autoencoder is None:
            self.sample_hw: tuple[int, int] = unet_hw
            self.channels: int = int(cfg.in_channels)
        else:
            self.autoencoder.to(self.device)
            self.latent_chw = (int(cfg.in_channels), *unet_hw)
            f = self.autoencoder.downsample
            self.sample_hw = (unet_hw[0] * f, unet_hw[1] * f)
            self.channels = self.autoencoder.image_channels
        self.sample_size: int = self.sample_hw[0]
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        unet = model.unet.to(device=self.device, dtype=self.dtype)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        self.unet = unet
        split = UNetSplit(unet)
        encode, decode = split.encode, split.decode
        self.compiled = bool(compile)
        if compile:
            # Static shapes are measurably faster than dynamic ones, so compiled
            # generators pad each call to a power-of-two bucket (``_bucket``):
            # one compilation per bucket, at most ~2 x 10 of them up to 512.
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            dynamo_config.accumulated_recompile_limit = max(
                dynamo_config.accumulated_recompile_limit, 512
            )
            encode = torch.compile(encode, dynamic=False)
            decode = torch.compile(decode, dynamic=False)
        self._sampler = CLSPSampler(
            split, channels_last=channels_last, encode=encode, decode=decode
        )
        self._plans: dict[tuple[str, int, float, str], SamplingPlan] = {}
        self._lock = threading.Lock()
        self._check_generation_defaults()
        self.paths_run: set[tuple[str, int | None]] = set()
        """``(sampler path, batch bucket)`` of every call so far (the bucket only when
        compiled, the one thing a batch size changes): a call that adds an entry paid
        for a first call, lazy initialisation or compilation. ``warmup`` leaves none
        for the first request to pay."""

    def _check_generation_defaults(self) -> None:
        """Refuse stored defaults this model cannot sample (a step count whose grid repeats
        a noise level, say) at load, rather than every request that would take them."""
        if self.generation_defaults is None:
            return
        params = self.generation_defaults.applied_to(GenerationParams())
        try:
            self.check_params(params.resolved(DEFAULT_SAMPLING))
        except ValueError as exc:
            raise ModelLoadError(
                f"{self.source}: the params of its {GENERATION_DEFAULTS_FILE} cannot sample "
                f"this model: {exc}"
            ) from None

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        compile: bool = False,
        channels_last: bool | None = None,
    ) -> PositivesGenerator:
        """Load a model directory (see ``model.load_model``) onto ``device``."""
        resolve_dtype(dtype, resolve_device(device))  # refuse before the (slow) load
        return cls(
            load_model(model_dir),
            device=device,
            dtype=dtype,
            compile=compile,
            channels_last=channels_last,
        )

    def model_info(
        self, *, max_k: int, max_anchors: int, sampling: Sampling = DEFAULT_SAMPLING
    ) -> ModelInfo:
        """What ``GET /v1/model`` reports: this model and its stored generation defaults,
        and the request limits (``max_k``, ``max_anchors``) and default ``sampling`` of the
        service that serves it."""
        latent = self.latent_chw
        return ModelInfo(
            fingerprint=self.fingerprint,
            sample_size=self.sample_size,
            channels=self.channels,
            latent_size=None if latent is None else latent[1],
            latent_channels=None if latent is None else latent[0],
            autoencoder=None if self.autoencoder is None else self.autoencoder.kind,
            scheduler=public_config(self.scheduler_config),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            max_k=max_k,
            max_anchors=max_anchors,
            sampling=sampling,
            generation_defaults=None
            if self.generation_defaults is None
            else self.generation_defaults.model_dump(mode="json", exclude_none=True),
        )

    def check_params(self, params: GenerationParams) -> None:
        """Raise ``UnsupportedSchedulerError`` (a ValueError) when this model's scheduler
        config cannot be sampled with ``params`` (a step count whose grid repeats a noise
        level, say): the service refuses such a request before it queues it, rather
        than failing the batch it would join."""
        self.plan(params.group())

    def plan(self, group: SamplerGroup) -> SamplingPlan:
        """The sampling plan of one sampler group (``GenerationParams.group()``), cached:
        its ``solver``, ``sampling_steps`` and ``eta`` under its sampling mode.

        ``sampling="authors"`` plans under ``authors_config`` of the model's scheduler
        config, ``"model"`` under the config as written, ``"authors-clipped"`` under
        the authors' config with x0 clipping (``schedule.SAMPLING_OVERRIDES``;
        docs/design.md §1).
        """
        solver, sampling_steps, sampling = group.solver, group.sampling_steps, group.sampling
        try:
            config = sampling_config(self.scheduler_config, sampling)
        except ValueError as exc:
            raise GeneratorInputError(str(exc)) from None
        # eta changes only DDIM's plan: the others share one plan whatever eta says
        eta = float(group.eta) if solver in ETA_METHODS else 0.0
        key = (solver, int(sampling_steps), eta, sampling)
        plan = self._plans.get(key)
        if plan is None:
            plan = sampling_plan(config, solver=solver, steps=sampling_steps, eta=eta)
            self._plans[key] = plan
        return plan

    def check_anchors(self, anchors: np.ndarray, space: AnchorSpace = "image") -> None:
        """Refuse anchors whose layout does not fit the model: ``[M, C, H, W]`` pictures,
        or a latent model's ``[M, c, h, w]`` latents."""
        if space == "latent":
            if self.latent_chw is None:
                raise GeneratorInputError(
                    "this model samples pixels and has no latent space: send pictures"
                )
            c, h, w = self.latent_chw
            if anchors.ndim != 4 or tuple(anchors.shape[1:]) != self.latent_chw:
                raise GeneratorInputError(
                    f"latent anchors must be float [N, {c}, {h}, {w}] (this model's latents); "
                    f"got shape {tuple(anchors.shape)}"
                )
            return
        want = (self.channels, *self.sample_hw)
        if anchors.ndim != 4 or tuple(anchors.shape[1:]) != want:
            raise GeneratorInputError(
                f"anchors must be [N, {want[0]}, {want[1]}, {want[2]}] (channels, height, "
                f"width of this model) as float, or [N, {want[1]}, {want[2]}, {want[0]}] as "
                f"uint8; got shape {tuple(anchors.shape)}"
            )

    def sample(
        self,
        anchors: np.ndarray,
        seeds: np.ndarray,
        interpolation_weights: np.ndarray,
        group: SamplerGroup,
        *,
        anchor_space: AnchorSpace = "image",
    ) -> np.ndarray:
        """Positives uint8 ``[M, H, W, C]`` for float32 anchors ``[M, C, H, W]`` in [-1, 1],
        int64 seeds ``[M]`` and interpolation weights ``[M]`` in [0, 1], sampled with the
        settings of ``group`` (``GenerationParams.group()``).

        ``group.share_anchor`` noises each anchor by a seed of its own content
        (``anchor_seed``) instead of its candidate's seed, one of the sampler's reuse
        options (``CLSPSampler``). A latent model also takes ``anchor_space="latent"``
        anchors (``[M, c, h, w]`` latents) and, with ``group.output`` latents, returns
        float32 ``[M, c, h, w]`` latents."""
        anchors = np.asarray(anchors)
        if anchors.dtype != np.float32:
            raise GeneratorInputError(f"anchors must be float32, got {anchors.dtype}")
        self.check_anchors(anchors, anchor_space)
        output = group.output
        if output == "latents" and self.latent_chw is None:
            raise GeneratorInputError("output latents needs a latent model; ask for images")
        m = anchors.shape[0]
        seeds = np.asarray(seeds)
        interpolation_weights = np.asarray(interpolation_weights)
        if seeds.dtype != np.int64 or seeds.shape != (m,):
            raise GeneratorInputError(
                f"seeds must be int64 [{m}], got {seeds.dtype} {tuple(seeds.shape)}"
            )
        if seeds.size and seeds.min() < 0:
            raise GeneratorInputError("seeds must be non-negative (63-bit, from seed_from_key)")
        _check_interpolation_weights(interpolation_weights, m)
        if not np.isfinite(anchors).all():
            raise GeneratorInputError("anchors contain NaN or Inf")
        anchor_seeds = (
            np.fromiter((anchor_seed(a) for a in anchors), dtype=np.int64, count=m)
            if group.share_anchor
            else None
        )
        plan = self.plan(group)
        h, w = self.sample_hw
        if m == 0:
            if output == "latents":
                return np.zeros((0, *self.latent_chw), dtype=np.float32)  # type: ignore[misc]
            return np.zeros((0, h, w, self.channels), dtype=np.uint8)
        anchors_t = torch.from_numpy(np.ascontiguousarray(anchors))
        seeds_t = torch.from_numpy(np.ascontiguousarray(seeds))
        weights_t = torch.from_numpy(interpolation_weights.astype(np.float32))
        anchor_seeds_t = None if anchor_seeds is None else torch.from_numpy(anchor_seeds)
        if self.compiled:
            # Pad with copies of the first item: items are independent, so the
            # padding changes no other item's result, only the compiled shape.
            pad = _bucket(m) - m
            if pad:
                anchors_t, seeds_t, weights_t = (
                    torch.cat([v, v[:1].expand(pad, *v.shape[1:])])
                    for v in (anchors_t, seeds_t, weights_t)
                )
                if anchor_seeds_t is not None:
                    anchor_seeds_t = torch.cat([anchor_seeds_t, anchor_seeds_t[:1].expand(pad)])
        path = (sampler_path(weights_t), len(weights_t) if self.compiled else None)
        with self._lock:
            if self.autoencoder is not None and anchor_space == "image":
                anchors_t = self._encode_unique(anchors_t)
            x = self._sampler(
                plan,
                anchors_t,
                seeds_t,
                weights_t,
                group,
                anchor_seeds=anchor_seeds_t,
                clamp=self.autoencoder is None,
            )[:m]
            if output == "latents":
                self.paths_run.add(path)
                return x.cpu().numpy()
            if self.autoencoder is not None:
                x = self.autoencoder.decode(x).clamp(-1.0, 1.0)
            images = x.permute(0, 2, 3, 1).cpu().numpy()
            self.paths_run.add(path)
        return unit_to_uint8(images)

    def _encode_unique(self, anchors: torch.Tensor) -> torch.Tensor:
        """Latents of picture anchors, each distinct picture encoded once: a request
        with k candidates repeats its anchor k times in a batch."""
        flat = anchors.reshape(len(anchors), -1)
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        latents = self.autoencoder.encode(unique.reshape(-1, *anchors.shape[1:]))  # type: ignore[union-attr]
        return latents[inverse].to("cpu")

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """A latent model's latents float32 ``[N, c, h, w]`` of pictures (uint8
        ``[N, H, W, C]`` or float ``[N, C, H, W]`` in [-1, 1]): what the service
        samples from when it gets pictures."""
        if self.autoencoder is None:
            raise GeneratorInputError("this model samples pixels and has no latent space")
        canon = canonical_anchors(np.asarray(images))
        self.check_anchors(canon)
        with self._lock:
            return self.autoencoder.encode(torch.from_numpy(canon.copy())).cpu().numpy()

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, C]`` pictures of a latent model's latents ``[N, c, h, w]``,
        decoded and rounded as the service does for its positives."""
        if self.autoencoder is None:
            raise GeneratorInputError("this model samples pixels and has no latent space")
        canon = canonical_latents(np.asarray(latents))
        self.check_anchors(canon, "latent")
        with self._lock:
            x = self.autoencoder.decode(torch.from_numpy(canon.copy())).clamp(-1.0, 1.0)
            return unit_to_uint8(x.permute(0, 2, 3, 1).cpu().numpy())

    def sample_keyed(
        self,
        anchors: np.ndarray,
        keys: Sequence[bytes],
        interpolation_weights: np.ndarray,
        group: SamplerGroup,
        *,
        anchor_space: AnchorSpace = "image",
    ) -> np.ndarray:
        """``sample`` with each item's seed derived from its key (``seed_from_key``).

        The one place a key becomes a seed: the same key gives the same positive
        whichever request, batch or process carries it (docs/design.md §2).
        """
        seeds = np.fromiter((seed_from_key(k) for k in keys), dtype=np.int64, count=len(keys))
        return self.sample(anchors, seeds, interpolation_weights, group, anchor_space=anchor_space)

    def _canonical(self, anchors: np.ndarray, space: AnchorSpace) -> np.ndarray:
        anchors = np.asarray(anchors)
        canon = canonical_latents(anchors) if space == "latent" else canonical_anchors(anchors)
        self.check_anchors(canon, space)
        return canon

    def keys(
        self,
        anchors: np.ndarray,
        candidates: np.ndarray | None,
        params: GenerationParams,
        *,
        anchor_space: AnchorSpace = "image",
    ) -> list[bytes]:
        """Cache keys of ``(anchor, candidate)`` pairs under this model (``proto.keys``)."""
        canon = self._canonical(anchors, anchor_space)
        cands = self._candidates(candidates, canon)
        return positive_keys(self.fingerprint, params, canon, cands, anchor_space)

    def positives(
        self,
        anchors: np.ndarray,
        candidates: np.ndarray | None,
        params: GenerationParams,
        *,
        anchor_space: AnchorSpace = "image",
    ) -> np.ndarray:
        """One positive per anchor, uint8 ``[N, H, W, C]`` (float32 ``[N, c, h, w]``
        latents with ``params.output`` latents).

        ``anchors``: uint8 ``[N, H, W, C]`` or float ``[N, C, H, W]`` in [-1, 1], or with
        ``anchor_space="latent"`` a latent model's float ``[N, c, h, w]`` latents;
        ``candidates``: int64 ``[N]`` candidate index per anchor, None for all 0.
        ``params.k`` is not expanded here: repeat anchors with candidates 0..k-1.
        ``params.sampling`` None is ``DEFAULT_SAMPLING``, as in a service left at its
        default: keys and images are then exactly those that service caches.
        """
        params = params.resolved(DEFAULT_SAMPLING)
        canon = self._canonical(anchors, anchor_space)
        cands = self._candidates(candidates, canon)
        keys = positive_keys(self.fingerprint, params, canon, cands, anchor_space)
        interpolation_weights = np.full(len(canon), params.interpolation_weight, np.float32)
        return self.sample_keyed(
            canon, keys, interpolation_weights, params.group(), anchor_space=anchor_space
        )

    def warmup(
        self,
        *,
        steps: int = 2,
        batch_sizes: tuple[int, ...] = (1,),
        sampling: Sampling = DEFAULT_SAMPLING,
        stop: threading.Event | None = None,
    ) -> dict[int, float]:
        """Run every sampler path once per batch size, so no request pays a first call;
        return the seconds of one more, warm, anchor-path call of each batch size at
        ``steps`` steps: the batcher's first measures of what a call takes, a call of
        one item and a full one telling its fixed part from its part per item-step.

        ``stop`` is looked at before each call and ends the warm-up with
        ``WarmupStopped`` once set: a service shutting down does not wait for the rest
        of a compile nobody will use (docs/reliability.md, Shutdown).

        A first call pays for lazy initialisation and, on CUDA, for the Triton
        compile of each kernel it launches (and, compiled, for the batch bucket).
        The anchor path (interpolation weight below 1: CLSP's requests) runs the
        encoder on 2N samples and the anchor-noising and interpolation kernels;
        the plain path (weight 1) runs neither. Which solvers run is the registry's
        to say (``solvers.SOLVERS``): the plain call of the solver that takes eta, at
        eta 0, launches the update kernel without noise, its anchor call at eta 0.1
        with noise in every step but perhaps the last, so with ``steps`` >= 2 both
        variants of that kernel are compiled whatever the schedule. A call of each
        solver that reads the previous x0, at ``max(steps, solver.warmup_steps)``
        steps, compiles its variants, which keep x0 and read the previous one (same
        paths, so ``paths_run`` gains nothing), unless the model's config cannot be
        sampled by it. ``sampling`` is the service's default mode: whether x0 is
        clipped selects the kernel variant too. ``paths_run`` records what has run.
        """
        h, w = self.sample_hw
        # the default params' settings but these (steps unvalidated: warmup_steps has no cap)
        base = GenerationParams().group()._replace(sampling_steps=steps, sampling=sampling)
        eta_solver = next(name for name, solver in SOLVERS.items() if solver.takes_eta)
        noisy = base._replace(solver=eta_solver, eta=0.1)
        multistep: list[SamplerGroup] = []
        for name, solver in SOLVERS.items():
            if not solver.reads_previous_x0:
                continue
            group = base._replace(
                solver=name, sampling_steps=max(steps, solver.warmup_steps), eta=0.0
            )
            try:
                self.plan(group)
            except UnsupportedSchedulerError:
                continue  # requests for it will be refused too: nothing to warm
            multistep.append(group)

        def call(b: int, weight: float, group: SamplerGroup) -> None:
            if stop is not None and stop.is_set():
                raise WarmupStopped("the warm-up was stopped before it ended")
            anchors = np.zeros((b, self.channels, h, w), dtype=np.float32)
            seeds = np.arange(b, dtype=np.int64)
            self.sample(anchors, seeds, np.full(b, weight, dtype=np.float32), group)

        for b in batch_sizes:
            for weight, eta in ((WARMUP_INTERPOLATION_WEIGHT, 0.1), (1.0, 0.0)):
                call(b, weight, noisy._replace(eta=eta))
            for group in multistep:
                call(b, WARMUP_INTERPOLATION_WEIGHT, group)
        seconds: dict[int, float] = {}
        for b in sorted(set(batch_sizes)):
            started = time.perf_counter()
            call(b, WARMUP_INTERPOLATION_WEIGHT, noisy)
            seconds[b] = time.perf_counter() - started
        return seconds

    @staticmethod
    def _candidates(candidates: np.ndarray | None, canon: np.ndarray) -> np.ndarray:
        if candidates is None:
            return np.zeros(len(canon), dtype=np.int64)
        cands = np.asarray(candidates)
        if cands.shape != (len(canon),) or not np.issubdtype(cands.dtype, np.integer):
            raise GeneratorInputError(
                f"candidates must be integer [{len(canon)}] (one per anchor), got "
                f"{cands.dtype} {tuple(cands.shape)}"
            )
        if cands.size and cands.min() < 0:
            raise GeneratorInputError("candidate indices must be >= 0")
        return cands.astype(np.int64)
