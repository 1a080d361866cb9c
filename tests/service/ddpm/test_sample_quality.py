"""FID and KID during ``clsp diffusion train`` (docs/training.md, "Sample quality: FID and
KID"): the metric arithmetic on known feature sets, a tiny real run scored through the
``feature_extractor`` seam, the Inception path from a local weights file, and the skip
(with its line, and no download) where no weights are there."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.service.ddpm.sample_quality import (
    INCEPTION_FEATURES,
    INCEPTION_WEIGHTS_NAME,
    SKIPPED,
    InceptionFeatures,
    extract_features,
    feature_scores,
)
from clsp_positives.service.ddpm.train import DiffusionTrainConfig, train


def _config(out: Path, **kw: object) -> DiffusionTrainConfig:
    base: dict[str, object] = dict(
        out=str(out),
        preset="tiny",
        steps=3,
        batch_size=8,
        threads=1,
        progress=False,
        sample_count=0,
        lr_warmup=2,
        calibrate=False,
        eval_every=2,
        eval_samples=32,
        eval_steps=2,
    )
    return DiffusionTrainConfig(**{**base, **kw})


def _records(out: Path, event: str) -> list[dict[str, float]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


class TinyFeatures(torch.nn.Module):
    """A random conv net: uint8 [N, 1, H, W] -> [N, 6], as Inception maps images to 2048."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 6, 3, stride=2)
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 1
        self.calls += 1
        x = images.float() / 127.5 - 1.0
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def test_fid_is_zero_against_itself_and_grows_with_a_shift() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g, dtype=torch.float64)
    same = feature_scores(real, real)
    assert same.fid == pytest.approx(0.0, abs=1e-9)
    # A mean shift by s in every one of D dimensions, covariance unchanged: FID = D s².
    for shift in (0.5, 2.0):
        moved = feature_scores(real, real + shift)
        assert moved.fid == pytest.approx(6 * shift**2, rel=1e-6)
        assert moved.kid > same.kid + 0.1
    other = feature_scores(real, torch.randn(400, 6, generator=g, dtype=torch.float64))
    assert 0 < other.fid < 0.5  # another draw of the same distribution: close, not equal
    assert abs(other.kid) < 0.05
    assert feature_scores(real, real + 1.0) == feature_scores(real, real + 1.0)  # seeded KID


def test_a_tiny_run_logs_finite_fid_and_kid_of_its_samples(tmp_path: Path) -> None:
    features = TinyFeatures()
    out = tmp_path / "ddpm"
    said: list[str] = []
    result = train(_config(out, tensorboard=True), feature_extractor=features, say=said.append)
    assert said == []
    records = _records(out, "quality")
    # At the --eval-every step and at the end (step 3).
    assert [r["step"] for r in records] == [2, 3]
    for r in records:
        assert r["samples"] == 32
        for key in ("fid", "kid"):
            assert math.isfinite(r[key]) and r[key] >= 0, r
        assert r["fid"] > 0.001  # 3 steps of training: noise, far from the digits
    assert result.quality is not None
    assert result.quality.fid == pytest.approx(records[-1]["fid"])
    # 32 real images once, then 32 samples per evaluation, each in batches of 8.
    assert features.calls == 4 + 2 * 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("fid", "kid", "kid_std"):
        logged = events.Scalars(f"quality/{key}")
        assert [(e.step, e.value) for e in logged] == [
            (r["step"], pytest.approx(r[key], rel=1e-6)) for r in records
        ]


def test_extract_features_batches_and_keeps_the_order() -> None:
    features = TinyFeatures()
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    cpu = torch.device("cpu")
    whole = extract_features(features, images, device=cpu, batch=10)
    parts = extract_features(features, images, device=cpu, batch=3)
    assert whole.shape == (10, 6) and whole.dtype == torch.float64
    torch.testing.assert_close(whole, parts)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache, the hubs offline, and any connection an error."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return home


def test_without_weights_the_metrics_are_skipped_saying_so(offline: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddpm"
    result = CliRunner().invoke(
        app,
        [
            "diffusion", "train", "--out", str(out), "--image-size", "32", "--preset", "tiny",
            "--steps", "2", "--batch-size", "8", "--threads", "1", "--no-progress",
            "--sample-count", "0", "--no-calibrate", "--eval-every", "2", "--eval-samples", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith(SKIPPED)]
    assert len(skipped) == 1
    assert "--fid-weights" in skipped[0] and "nothing is downloaded" in skipped[0]
    assert "sample quality at step" not in result.output
    assert _records(out, "quality") == []
    assert list(offline.rglob("*")) == []  # nothing fetched into the cache


def test_digits_skip_inception_for_their_size(offline: Path, tmp_path: Path) -> None:
    said: list[str] = []
    result = train(_config(tmp_path / "ddpm", steps=2), say=said.append)
    assert result.quality is None
    assert len(said) == 1 and said[0].startswith(SKIPPED) and "16x16" in said[0]


def test_a_missing_weights_file_stops_the_run_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--fid-weights"):
        train(_config(tmp_path / "ddpm", image_size=32, fid_weights=str(tmp_path / "none.pth")))
    assert not (tmp_path / "ddpm").exists()


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file in the layout of the real one, with random values: the real file
    cannot be downloaded here. Only its making bypasses the loader; the run loads it
    through the code path the real file takes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("weights")
    torch.save({}, folder / "empty.pth")
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"):
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], folder / "empty.pth")
    path = folder / INCEPTION_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_from_a_weights_file_scores_a_run(
    random_inception_weights: Path, offline: Path, tmp_path: Path
) -> None:
    extractor = InceptionFeatures(random_inception_weights)
    grey = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
    features = extract_features(extractor, grey, device=torch.device("cpu"), batch=2)
    assert features.shape == (2, INCEPTION_FEATURES)  # grey repeated to RGB

    out = tmp_path / "ddpm"
    config = _config(
        out, steps=2, image_size=32, eval_samples=4, fid_weights=str(random_inception_weights)
    )
    result = train(config, say=pytest.fail)
    [record] = _records(out, "quality")
    assert record["step"] == 2 and math.isfinite(record["fid"]) and record["fid"] >= 0
    assert result.quality is not None and result.quality.samples == 4


def test_a_weights_file_holding_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"what": DiffusionTrainConfig}, path)  # a pickled class, not tensors
    with pytest.raises(ValueError, match="plain state dict"):
        InceptionFeatures(path)


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_scores_and_no_rank_waits_for_it(
    random_inception_weights: Path, tmp_path: Path
) -> None:
    """The metrics must not all-gather (rank 0 evaluates alone): a deadlock would time out."""
    out = tmp_path / "ddpm"
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "clsp_positives.cli", "diffusion", "train", "--out", str(out),
            "--image-size", "32", "--preset", "tiny", "--steps", "3", "--batch-size", "8",
            "--threads", "1", "--no-progress", "--sample-count", "0", "--no-calibrate",
            "--eval-every", "2", "--eval-samples", "4", "--eval-steps", "2",
            "--fid-weights", str(random_inception_weights),
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("sample quality at step 3: FID") == 1, done.stdout
    assert [r["step"] for r in _records(out, "quality")] == [2, 3]
