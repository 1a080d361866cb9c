"""The CLSP sampler: DDIM/DDPM/DPM-Solver++ with bottleneck interpolation (docs/design.md §1).

One call runs a batch of candidates, each with its own anchor, seed and
interpolation weight, through a ``SamplingPlan`` (the step math of the request's
solver, steps and eta), with the rest of the request's ``SamplerGroup`` choosing what
the loop does with the anchors. Every random number is drawn
from the per-sample counter-based noise (``noise``/``ops``) by seed, stream and
element, never from a batch-level generator, so a candidate's noise is the
same whatever else is in the batch (docs/design.md §2).

The trajectory ``x`` and the anchors stay in float32; only the UNet runs in
the model dtype (bf16/fp16 on CUDA), so low precision costs accuracy in the
network alone and not by rounding the state at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from clsp_positives.proto.params import GenerationParams, Interpolate, SamplerGroup
from clsp_positives.service.sampling import ops
from clsp_positives.service.sampling.noise import STREAM_INITIAL, anchor_stream, step_stream
from clsp_positives.service.sampling.schedule import SamplingPlan
from clsp_positives.service.sampling.unet_split import Encoded, UNetSplit

EncodeFn = Callable[[torch.Tensor, torch.Tensor], Encoded]
DecodeFn = Callable[[Encoded, torch.Tensor, torch.Tensor], torch.Tensor]

ANCHOR_PATH = "anchor"
PLAIN_PATH = "plain"

DEFAULT_GROUP: SamplerGroup = GenerationParams().group()
"""The default params' sampler group: the paper's loop (the bottleneck alone
interpolated, the anchors encoded at every step, each noised by its candidate's seed),
for a caller that brings only a plan."""


def sampler_path(interpolation_weights: torch.Tensor) -> str:
    """The path a call takes: ``PLAIN_PATH`` when every interpolation weight is exactly 1.

    Weight 1 gives the anchor's bottleneck weight 0, so such a call skips the
    anchor's encoder pass, its noising and the interpolation; any weight below 1
    takes ``ANCHOR_PATH``, the encoder on ``[candidates; anchors]``. The two
    paths run different shapes and kernels, so each pays its own first call.
    """
    return PLAIN_PATH if bool((interpolation_weights == 1).all()) else ANCHOR_PATH


def anchor_steps(steps: int, interpolate_until: float) -> int:
    """How many of a loop's ``steps``, from the noisiest on, mix in the anchor's encoding
    (``GenerationParams.interpolate_until``): at least one, so that a positive always
    starts from its anchor's coarse shape. The later steps are plain sampling, which
    decides the candidate's fine detail on its own (docs/method.md)."""
    return min(steps, max(1, math.ceil(interpolate_until * steps - 1e-9)))


def mix_encodings(
    candidates: Encoded,
    anchors: Encoded,
    interpolation_weights: torch.Tensor,
    interpolate: Interpolate,
) -> Encoded:
    """The candidates' encoding with their anchors' (row for row) mixed in:
    ``w*candidate + (1-w)*anchor`` per sample.

    ``bottleneck`` mixes the bottleneck alone, as the paper does: the decoder then
    works from the candidate's skips, which with a small UNet carry enough of
    the candidate's own shape to change the class. ``bottleneck+low-skips`` also
    mixes the skip tensors at the bottleneck's resolution (docs/design.md §1,
    measured in docs/method.md); the finer skips stay the candidate's.
    """
    h = ops.bottleneck_lerp(candidates.h, anchors.h, interpolation_weights)
    low = candidates.h.shape[-2:]
    skips = tuple(
        ops.bottleneck_lerp(c, a, interpolation_weights)
        if interpolate == "bottleneck+low-skips" and c.shape[-2:] == low
        else c
        for c, a in zip(candidates.skips, anchors.skips, strict=True)
    )
    return Encoded(h, skips)


def rows(enc: Encoded, index: slice | torch.Tensor) -> Encoded:
    """The rows ``index`` of every tensor of an encoding."""
    return Encoded(enc.h[index], tuple(s[index] for s in enc.skips))


def anchor_groups(anchor_seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, group)`` of candidates grouped by anchor seed: ``first[j]`` is the
    first candidate of group ``j``, ``group[i]`` the group of candidate ``i``.

    Each row of the encoder is computed on its own, so neither the order of the
    groups nor what else is in the batch changes an anchor's encoding.
    """
    _, group = torch.unique(anchor_seeds, return_inverse=True)
    n = len(anchor_seeds)
    arange = torch.arange(n, device=anchor_seeds.device)
    first = torch.full((int(group.max()) + 1,), n, dtype=torch.int64, device=anchor_seeds.device)
    return first.scatter_reduce(0, group, arange, "amin"), group


class CLSPSampler:
    """The sampling loop over a ``UNetSplit``.

    ``encode``/``decode`` default to the split's own methods; a caller may pass
    compiled versions of them (``torch.compile``) without changing the loop.
    """

    def __init__(
        self,
        split: UNetSplit,
        *,
        channels_last: bool = False,
        encode: EncodeFn | None = None,
        decode: DecodeFn | None = None,
    ) -> None:
        self.split = split
        self.channels_last = channels_last
        self.encode = encode if encode is not None else split.encode
        self.decode = decode if decode is not None else split.decode

    @property
    def model_dtype(self) -> torch.dtype:
        return self.split.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.split.unet.device

    def _embedding(self, timestep: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[batch]`` and their embedding, computed as ``forward`` does."""
        t = self.split.timesteps(timestep, batch)
        return t, self.split.embed(t)

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.model_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(
        self,
        plan: SamplingPlan,
        anchors: torch.Tensor,
        seeds: torch.Tensor,
        interpolation_weights: torch.Tensor,
        group: SamplerGroup = DEFAULT_GROUP,
        *,
        anchor_seeds: torch.Tensor | None = None,
        clamp: bool = True,
    ) -> torch.Tensor:
        """Positives ``[N, C, H, W]`` float32, clamped to [-1, 1] unless ``clamp`` is
        False (a latent model's latents, which are not bounded; docs/latent.md).

        ``anchors`` float32 ``[N, C, H, W]`` in [-1, 1]; ``seeds`` int64 ``[N]``;
        ``interpolation_weights`` float ``[N]`` (1 = plain sampling, 0 = only the
        anchor's bottleneck). ``plan`` is made from ``group`` (``PositivesGenerator.plan``:
        its solver, sampling steps, eta and sampling mode); the loop reads the rest of
        it: ``group.interpolate``, what of the anchor's encoding is mixed in
        (``mix_encodings``), ``group.interpolate_until``, the share of steps that mix
        it (``anchor_steps``), and ``group.anchor_refresh``.

        The anchor path's two reuse options (docs/design.md §1, both off by
        default): ``anchor_seeds`` int64 ``[N]`` (``group.share_anchor``, seeded by the
        caller) noises each anchor by its own seed instead of its candidate's, so
        candidates with the same anchor seed (and so the same anchor) share one anchor
        encoding per step; ``group.anchor_refresh`` n > 1 encodes the anchors at every
        n-th step only and reuses that encoding in between, as DeepCache reuses features
        across adjacent steps.
        """
        interpolate, anchor_refresh = group.interpolate, group.anchor_refresh
        if anchor_refresh < 1:
            raise ValueError(f"anchor_refresh must be >= 1, got {anchor_refresh}")
        mixed_steps = anchor_steps(len(plan.timesteps), group.interpolate_until)
        n = anchors.shape[0]
        device = self.device
        use_anchor = sampler_path(interpolation_weights) == ANCHOR_PATH
        anchors = anchors.to(device=device, dtype=torch.float32)
        seeds = seeds.to(device=device, dtype=torch.int64)
        interpolation_weights = interpolation_weights.to(device=device, dtype=torch.float32)
        group: torch.Tensor | None = None
        if use_anchor and anchor_seeds is not None:
            anchor_seeds = anchor_seeds.to(device=device, dtype=torch.int64)
            first, group = anchor_groups(anchor_seeds)
            anchors, anchor_seeds = anchors[first], anchor_seeds[first]
        else:
            anchor_seeds = seeds
        with torch.inference_mode():
            x = ops.normal(seeds, STREAM_INITIAL, tuple(anchors.shape[1:]), device=device)
            if plan.init_noise_sigma != 1.0:
                x = x * plan.init_noise_sigma
            # A multistep plan (DPM-Solver++) reads the previous step's x0: the update
            # writes it in the same pass, one more store per element, not a recomputation.
            keep_x0 = plan.uses_previous_x0
            x0: torch.Tensor | None = None
            anchor_enc: Encoded | None = None
            for i, (timestep, coefs) in enumerate(
                zip(plan.timesteps, plan.coefficients, strict=True)
            ):
                mixing = use_anchor and i < mixed_steps
                refresh = mixing and i % anchor_refresh == 0
                t, emb = self._embedding(timestep, n + len(anchors) if refresh else n)
                if refresh:
                    a_t = ops.noise_anchor(
                        anchors,
                        anchor_seeds,
                        anchor_stream(i),
                        coefs.sqrt_alpha_bar,
                        coefs.sqrt_one_minus_alpha_bar,
                    )
                    # Both paths in one encoder call: [candidates; anchors].
                    enc = self.encode(self._to_model(torch.cat([x, a_t])), emb)
                    anchor_enc = rows(enc, slice(n, None))
                    if group is not None:
                        anchor_enc = rows(anchor_enc, group)
                    enc = rows(enc, slice(None, n))
                else:
                    enc = self.encode(self._to_model(x), emb)
                if mixing and anchor_enc is not None:
                    enc = mix_encodings(enc, anchor_enc, interpolation_weights, interpolate)
                out = self.decode(enc, emb[:n], t[:n])
                args = (
                    x,
                    out.contiguous(),
                    seeds,
                    step_stream(i),
                    coefs,
                    plan.prediction_type,
                    plan.clip_range,
                )
                if keep_x0:
                    x, x0 = ops.scheduler_update(*args, x0_prev=x0, return_x0=True)
                else:
                    x = ops.scheduler_update(*args)
            x = x.float()
            return x.clamp_(-1.0, 1.0) if clamp else x
