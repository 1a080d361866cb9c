"""Sample quality during DDPM training: FID and KID of the EMA model's samples against
the training set (docs/training.md, "Sample quality: FID and KID").

The formulas are torchmetrics' (``FrechetInceptionDistance``, ``KernelInceptionDistance``),
fed with features this module extracts once per image: a ``feature_extractor`` is any
module mapping uint8 ``[N, C, H, W]`` images to ``[N, D]`` features. The default is the
Inception network FID is defined with (torch-fidelity's port of the 2015-12-05 TensorFlow
weights, through torchmetrics), built only from a local file: ``--fid-weights FILE`` or
the file torch-fidelity's own download left in torch hub's cache. Nothing here downloads;
without the file the metrics are skipped, with a line that says how to get it.

The features of the real images are computed once per run, those of the samples at every
evaluation; the metric arithmetic (``feature_scores``) is a pure function of the two
feature sets.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
"""The file torch-fidelity (and through it torchmetrics) downloads its Inception from."""
INCEPTION_FEATURES = 2048
"""The pool features FID and KID are reported on (the standard layer)."""
MIN_INCEPTION_SIDE = 32
"""Below this side (16x16 digits) ImageNet features of an image upscaled to 299 pixels
say little about it: no FID is reported there (docs/training.md)."""
KID_SUBSET_SIZE = 1000
KID_SUBSETS = 100
"""KID's subsets (torchmetrics' defaults), the subset cut to the samples there are."""
SKIPPED = "sample quality (FID/KID) skipped:"
INSTALL = "pip install 'clsp-positives[quality]'"


@dataclass(frozen=True)
class QualityScores:
    """FID, KID (the mean over subsets, and its standard deviation) of ``samples``
    generated images against as many real ones; lower is closer."""

    fid: float
    kid: float
    kid_std: float
    samples: int

    def record(self) -> dict[str, float]:
        return asdict(self)


class GivenFeatures(torch.nn.Module):
    """The identity, as torchmetrics' ``feature`` module: the metrics receive features
    already extracted, so one extraction serves both FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def feature_scores(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    kid_subset_size: int = KID_SUBSET_SIZE,
    kid_subsets: int = KID_SUBSETS,
    seed: int = 0,
) -> QualityScores:
    """FID and KID between two feature sets ``[N, D]`` (at least 2 rows each), computed
    in float64 on the CPU by torchmetrics. KID's random subsets are drawn from ``seed``
    in a forked RNG, so the result is a function of its inputs and the caller's global
    RNG is left as it was."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    given = GivenFeatures(real.shape[1])
    # Rank 0 evaluates alone under torchrun: no metric may wait for the other ranks.
    fid = FrechetInceptionDistance(feature=given, sync_on_compute=False)
    subset = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        # Its note that it keeps every feature: these are the few thousand of one evaluation.
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(
            feature=given, subsets=kid_subsets, subset_size=subset, sync_on_compute=False
        )
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return QualityScores(float(fid.compute()), float(kid_mean), float(kid_std), len(fake))


@torch.inference_mode()
def extract_features(
    extractor: torch.nn.Module, images: np.ndarray, *, device: torch.device, batch: int
) -> torch.Tensor:
    """``extractor``'s features of uint8 NHWC ``images``, ``batch`` at a time: float64
    ``[N, D]`` on the CPU."""
    out = []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch]))
        chunk = chunk.to(device).permute(0, 3, 1, 2).contiguous()
        features = extractor(chunk)
        out.append(features.reshape(len(chunk), -1).double().cpu())
    return torch.cat(out)


class SampleQuality:
    """FID/KID of generated images against a fixed sample of the real ones, whose
    features are extracted once, here."""

    def __init__(
        self,
        extractor: torch.nn.Module,
        real: np.ndarray,
        *,
        device: torch.device,
        batch: int,
        seed: int = 0,
    ) -> None:
        self.extractor = extractor.to(device).eval()
        self.device, self.batch, self.seed = device, batch, seed
        self.real = extract_features(self.extractor, real, device=device, batch=batch)

    def measure(self, images: np.ndarray) -> QualityScores:
        """The scores of uint8 NHWC ``images`` (the samples of one evaluation)."""
        fake = extract_features(self.extractor, images, device=self.device, batch=self.batch)
        return feature_scores(self.real, fake, seed=self.seed)


# ---------------------------------------------------------------- Inception, from a file


def cached_inception_weights() -> Path:
    """Where torch-fidelity's own download keeps the weights (torch hub's checkpoints,
    under ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def inception_weights(given: str | None) -> Path | None:
    """The weights file to use: ``--fid-weights`` when given (it must exist), else the
    library's cache file when it is there, else None (skip: never download)."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"--fid-weights {given!r} is not a file: give the Inception weights "
                f"({INCEPTION_WEIGHTS_NAME}, docs/training.md) or leave the option out"
            )
        return path
    cached = cached_inception_weights()
    return cached if cached.is_file() else None


def check_quality(eval_every: int, fid_weights: str | None) -> None:
    """Before the data and the model, on every rank: a ``--fid-weights`` that names no
    file stops the run at once, not at the first evaluation."""
    if eval_every:
        inception_weights(fid_weights)


def inception_skip_reason(fid_weights: str | None, image_side: int) -> str | None:
    """Why the Inception FID/KID cannot run on this set (None: it can)."""
    if image_side < MIN_INCEPTION_SIDE:
        return (
            f"{image_side}x{image_side} images are too small for Inception features "
            f"(from {MIN_INCEPTION_SIDE} pixels on; docs/training.md)"
        )
    if inception_weights(fid_weights) is None:
        return (
            f"no Inception weights (give --fid-weights FILE, the {INCEPTION_WEIGHTS_NAME} "
            f"torch-fidelity uses, or place it at {cached_inception_weights()}); "
            "nothing is downloaded"
        )
    missing = [m for m in ("torchmetrics", "torch_fidelity") if not _importable(m)]
    if missing:
        return f"{' and '.join(missing)} not installed ({INSTALL})"
    return None


class InceptionFeatures(torch.nn.Module):
    """FID's Inception pool features (2048) of uint8 images; grey images are repeated
    to RGB, and the network resizes to 299 pixels itself."""

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # torch-fidelity unpickles the file in full; a plain state dict (tensors only) is
        # checked first, so a file holding code is refused before it runs.
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"--fid-weights {str(weights)!r} is not a plain state dict of Inception "
                f"weights ({INCEPTION_WEIGHTS_NAME}): {exc}"
            ) from None
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(INCEPTION_FEATURES)],
            feature_extractor_weights_path=str(weights),
        )
        self.num_features = INCEPTION_FEATURES

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net(images)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
