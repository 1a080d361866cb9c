"""``clsp diffusion train``: a tiny real run through the CLI, resume, and the schedule helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.service.ddpm.train import (
    STATE_FILE,
    BatchOrder,
    DiffusionTrainConfig,
    ema_decay_at,
    image_grid,
    lr_at,
    train,
)

TINY = [
    "--preset",
    "tiny",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--sample-count",
    "4",
    "--sample-steps",
    "2",
    "--lr-warmup",
    "2",
    "--no-calibrate",  # tested on its own below: it serves the model and measures a grid
]


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, ["diffusion", "train", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _state_step(out: Path) -> int:
    return int(torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)["step"])


def test_cli_trains_saves_loads_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "ddpm"
    first = _run("--out", str(out), "--steps", "3", *TINY)
    assert "trained to step 3" in first
    assert (out / "unet" / "config.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    assert _state_step(out) == 3
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * 16, 2 * 16)  # 4 samples of 16x16 in a 2x2 grid
        assert grid.mode == "L"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.0001, 0.02)
    assert scheduler["num_train_timesteps"] == 1000
    assert scheduler["prediction_type"] == "epsilon"

    from clsp_positives.service.sampling.generator import PositivesGenerator
    from clsp_positives.service.sampling.model import load_model

    loaded = load_model(out)
    assert loaded.unet.config.sample_size == 16
    saved_ema = torch.load(out / STATE_FILE, map_location="cpu", weights_only=False)["ema"]
    for name, value in loaded.unet.state_dict().items():
        torch.testing.assert_close(value, saved_ema[name])  # the EMA weights are the model
    generator = PositivesGenerator.from_dir(out)
    assert (generator.sample_size, generator.channels) == (16, 1)

    second = _run("--out", str(out), "--steps", "5", *TINY)
    assert "trained to step 5 (resumed at step 3)" in second
    assert _state_step(out) == 5


def _tiny_config(out: Path, steps: int, **kw: object) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(
        out=str(out),
        preset="tiny",
        steps=steps,
        batch_size=8,
        threads=1,
        progress=False,
        sample_count=0,
        lr_warmup=2,
        **kw,
    )


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    train(_tiny_config(tmp_path / "straight", 4))
    train(_tiny_config(tmp_path / "split", 2))
    result = train(_tiny_config(tmp_path / "split", 4))
    assert (result.start_step, result.step) == (2, 4)
    a = torch.load(tmp_path / "straight" / STATE_FILE, weights_only=False)
    b = torch.load(tmp_path / "split" / STATE_FILE, weights_only=False)
    for part in ("model", "ema"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)  # bit for bit


def test_resume_with_other_data_options_is_refused(tmp_path: Path) -> None:
    train(_tiny_config(tmp_path, 1))
    with pytest.raises(ValueError, match=r"--out.*--image-size"):
        train(_tiny_config(tmp_path, 2, size=8))


def test_cli_errors_name_the_option(tmp_path: Path) -> None:
    runner = CliRunner()
    no_budget = runner.invoke(app, ["diffusion", "train", "--out", str(tmp_path)])
    assert no_budget.exit_code != 0
    assert "--steps or --minutes" in no_budget.output
    bad = runner.invoke(
        app,
        [
            "diffusion",
            "train",
            "--out",
            str(tmp_path),
            "--steps",
            "1",
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path),
        ],
    )
    assert bad.exit_code == 2
    assert "--download" in bad.output
    unknown = runner.invoke(
        app, ["diffusion", "train", "--out", str(tmp_path), "--steps", "1", "--preset", "huge"]
    )
    assert unknown.exit_code == 2
    assert "preset" in unknown.output


def test_lr_warmup_and_cosine() -> None:
    cfg = DiffusionTrainConfig(out="x", steps=10, lr=1e-3, lr_warmup=4, lr_schedule="cosine")
    assert lr_at(cfg, 0, 0.0) == pytest.approx(2.5e-4)
    assert lr_at(cfg, 3, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 50, 0.5) == pytest.approx(1e-3 * 0.55)
    assert lr_at(cfg, 99, 1.0) == pytest.approx(1e-4)
    const = DiffusionTrainConfig(out="x", steps=10, lr=1e-3, lr_warmup=0)
    assert lr_at(const, 0, 0.9) == 1e-3


def test_ema_decay_warms_up_to_its_cap() -> None:
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 90) == pytest.approx(0.91)
    assert ema_decay_at(0.999, 10**6) == 0.999


def test_batch_order_visits_every_item_once_per_epoch() -> None:
    order = BatchOrder(10, 3, seed=0)
    first_epoch = torch.cat([order.global_batch(step) for step in range(3)])
    assert len(set(first_epoch.tolist())) == 9  # the incomplete last batch is dropped
    second_epoch = torch.cat([order.global_batch(step) for step in range(3, 6)])
    assert len(set(second_epoch.tolist())) == 9
    assert not torch.equal(first_epoch, second_epoch)  # a new permutation starts


def test_batch_order_is_a_function_of_the_step_split_disjointly_over_ranks() -> None:
    """What lets a resumed run (a fresh order) and every rank agree on the global batch."""
    order = BatchOrder(100, 12, seed=3, world_size=4)
    again = BatchOrder(100, 12, seed=3, world_size=4)
    for step in (17, 0, 9, 17):  # out of order, across epochs
        shares = [order.rank_batch(step, rank) for rank in range(4)]
        assert all(len(share) == 3 for share in shares)
        assert torch.equal(torch.cat(shares), again.global_batch(step))
        assert len(set(torch.cat(shares).tolist())) == 12
    streamed = list(order.rank_batches(5, 8, rank=2))
    assert streamed == [order.rank_batch(step, 2).tolist() for step in (5, 6, 7)]
    assert not torch.equal(BatchOrder(100, 12, seed=4).global_batch(0), order.global_batch(0))
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        BatchOrder(3, 12, seed=0, world_size=4)
    assert BatchOrder(10, 16, seed=0, world_size=4).batch_size == 8  # a small set: one batch


def test_image_grid_layout() -> None:
    images = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
    grid = image_grid(images)
    assert grid.shape == (2 * 2, 3 * 3, 1)
    np.testing.assert_array_equal(grid[2:4, 3:6], images[4])
    assert grid[2:4, 6:9].max() == 0


@pytest.mark.parametrize("name", ["--image-size", "--size"])
def test_image_size_keeps_its_old_name(tmp_path: Path, name: str) -> None:
    """``--image-size`` as in clsp train and clsp generate; ``--size`` still accepted."""
    result = CliRunner().invoke(
        app, ["diffusion", "train", "--out", str(tmp_path), "--steps", "1", name, "2"]
    )
    assert result.exit_code == 2
    assert "--image-size: Input should be greater than or equal to 4" in result.output


@pytest.mark.parametrize(
    ("dataset", "flip", "expected"),
    [("digits", None, False), ("digits-photos", None, False), ("cifar10", None, True),
     ("digits-photos", True, True)],
)  # fmt: skip
def test_digit_sets_are_not_mirrored_unless_asked(
    dataset: str, flip: bool | None, expected: bool
) -> None:
    """A mirrored digit is not a digit, whatever the background behind it."""
    config = DiffusionTrainConfig(out="unused", steps=1, dataset=dataset, flip=flip)
    assert config.use_flip is expected


def test_trains_on_digits_photos_in_colour(tmp_path: Path) -> None:
    out = tmp_path / "ddpm"
    args = ["--dataset", "digits-photos", "--image-size", "16", "--channels", "3"]
    _run("--out", str(out), "--steps", "1", *args, *TINY)
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["in_channels"] == 3 and config["sample_size"] == 16
    with Image.open(out / "samples.png") as grid:
        assert grid.mode == "RGB" and grid.size == (2 * 16, 2 * 16)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_vae_trains_a_latent_model_that_serves(tmp_path: Path, kind: str) -> None:
    """``--vae``: the UNet trains on the autoencoder's latents (mirrored pictures encoded
    too), and ``--out`` is a latent model that loads and samples pictures."""
    from clsp_positives.proto.params import GenerationParams
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from tests.support.models import tiny_autoencoder

    ae_dir = tmp_path / "ae"
    tiny_autoencoder(kind).save_pretrained(ae_dir)
    out = tmp_path / "latent"
    data = ["--dataset", "digits-photos", "--image-size", "64", "--channels", "3", "--flip"]
    _run("--out", str(out), "--steps", "2", "--vae", str(ae_dir), *data, *TINY)
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert (unet["in_channels"], unet["sample_size"]) == (4, 16)  # the latents' shape
    sub = "vae" if kind == "kl" else "vqvae"
    assert (out / sub / "config.json").is_file()
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * 64, 2 * 64)  # decoded pictures, not latents
    g = PositivesGenerator.from_dir(out)
    assert g.latent_chw == (4, 16, 16) and g.autoencoder.kind == kind
    pictures = np.zeros((2, 64, 64, 3), np.uint8)
    assert g.positives(pictures, None, GenerationParams(steps=2)).shape == (2, 64, 64, 3)
    # resumes on the same latents; another autoencoder's latents are refused
    assert "trained to step 3" in _run(
        "--out", str(out), "--steps", "3", "--vae", str(ae_dir), *data, *TINY
    )
    result = CliRunner().invoke(
        app, ["diffusion", "train", "--out", str(out), "--steps", "4", *data, *TINY]
    )
    assert result.exit_code == 2 and "latent" in result.output


def test_vae_names_what_does_not_fit(tmp_path: Path) -> None:
    from tests.support.models import tiny_autoencoder

    ae_dir = tmp_path / "ae"
    tiny_autoencoder("kl").save_pretrained(ae_dir)

    def train_with(vae: Path):
        args = ["--out", str(tmp_path / "o"), "--steps", "1", "--vae", str(vae), *TINY]
        return CliRunner().invoke(app, ["diffusion", "train", *args])

    grey = train_with(ae_dir)
    assert grey.exit_code == 2 and "--channels 3" in grey.output
    missing = train_with(tmp_path / "none")
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.slow
def test_training_ends_by_storing_calibrated_settings_in_the_model_folder(tmp_path: Path) -> None:
    """The closing calibration: a real clsp serve of the new model, clsp calibrate --write
    against it, and the choice in clsp_generation.json with what it measured."""
    from clsp_positives.closing_calibration import ANCHORS, BASE, CALIBRATION_DIR, WEIGHTS
    from clsp_positives.proto.model_settings import read_generation_defaults

    out = tmp_path / "ddpm"
    args = [a for a in TINY if a != "--no-calibrate"]
    output = _run("--out", str(out), "--steps", "2", *args, "--calibrate-minutes", "0.02")
    assert "calibrating the generation settings for up to 0.02 min" in output
    stored = read_generation_defaults(out)
    assert stored is not None and stored.measured is not None, output
    assert (stored.sampling, stored.interpolate) == (BASE.sampling, BASE.interpolate)
    assert stored.interpolation_weight in WEIGHTS and stored.steps == 50
    assert (stored.measured.dataset, stored.measured.anchors) == ("digits", ANCHORS)
    assert f"wrote {out / 'clsp_generation.json'}" in output
    assert (out / CALIBRATION_DIR / "calibration.json").is_file()


def test_a_set_of_one_class_skips_the_calibration_saying_why(tmp_path: Path) -> None:
    """Training stands when no class probe can be fit; the output says how to calibrate."""
    folder = tmp_path / "faces"
    (folder / "only").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        picture = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        Image.fromarray(picture).save(folder / "only" / f"{i}.png")
    out = tmp_path / "ddpm"
    args = [a for a in TINY if a != "--no-calibrate"]
    output = _run("--out", str(out), "--steps", "1", "--dataset", str(folder), *args)
    assert "calibration skipped:" in output and "fewer than 2 classes" in output
    assert "run it by hand: clsp serve --model" in output
    assert not (out / "clsp_generation.json").exists()
