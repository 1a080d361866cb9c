"""``clsp generate`` against ``clsp serve`` of a tiny latent model: pictures in, and the
bank either pictures (as from a pixel model) or compact float16 latents (docs/latent.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.images import load_images
from clsp_positives.trainer.positives.offline import OfflineNpySource, meta_path
from tests.support.models import latent_model_dir
from tests.support.servers import ServerProcess
from tests.support.service import clsp_serve

pytestmark = pytest.mark.slow


N_DIGITS = len(load_images("digits-photos", split="train", size=8, channels=3).images)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    model = latent_model_dir(tmp_path_factory.mktemp("latent-gen") / "model", "vq")
    with clsp_serve(model, args=("--max-batch", "64", "--max-wait-ms", "5")) as server:
        yield server


def generate(url: str, out: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "generate",
            "--dataset",
            "digits-photos",
            "--positives",
            url,
            "--k",
            "1",
            "--gen-steps",
            "1",
            "--batch-size",
            "256",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
    )


def test_generate_writes_pictures_from_a_latent_model(service, tmp_path: Path) -> None:
    """The image size and channels come from /v1/model (the pictures', not the latents')."""
    out = tmp_path / "pictures.npy"
    result = generate(service.url, out)
    assert result.exit_code == 0, result.output
    source = OfflineNpySource(out)
    assert source.array.shape == (N_DIGITS, 1, 64, 64, 3) and source.array.dtype == np.uint8
    source.close()


def test_generate_output_latents_writes_the_compact_form(service, tmp_path: Path) -> None:
    out = tmp_path / "latents.npy"
    result = generate(service.url, out, "--output", "latents")
    assert result.exit_code == 0, result.output
    bank = np.load(out, mmap_mode="r")
    assert bank.shape == (N_DIGITS, 1, 4, 16, 16) and bank.dtype == np.float16
    assert np.isfinite(bank[:64]).all() and np.abs(bank[:64]).max() > 0
    meta = json.loads(meta_path(out).read_text())
    assert meta["output"] == "latents" and meta["shape"] == [N_DIGITS, 1, 4, 16, 16]
    # the trainer's reader refuses it, naming what it is
    with pytest.raises(ValueError, match="latents bank"):
        OfflineNpySource(out)
    refused = generate(service.url, tmp_path / "x.npy", "--output", "latents", "--grid", "g.png")
    assert refused.exit_code == 2 and "--grid draws pictures" in refused.output


def test_clsp_train_takes_positives_from_a_latent_pool(service, tmp_path: Path) -> None:
    """The trainer sends pictures and gets pictures, as from a pixel model (of the
    pictures' size, which GET /v1/model's sample_size reports)."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train", "--dataset", "digits-photos", "--image-size", "64", "--channels", "3",
            "--subset", "64",
            "--backbone", "resnet-tiny", "--proj-hidden-dim", "32", "--epochs", "1",
            "--batch-size", "32", "--clsp-weight", "1", "--positives", service.url, "--k", "1",
            "--gen-steps", "1", "--positives-strict", "--linear-epochs", "0",
            "--probe-epochs", "1", "--device", "cpu", "--no-progress", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert epochs and epochs[-1].get("positive_fraction") == 1.0, epochs
