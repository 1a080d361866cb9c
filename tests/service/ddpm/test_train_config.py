"""``clsp diffusion train --config FILE``: a recipe runs, a flag wins over the file and
the file over the default, a bad file stops with exit 2 naming the key, and the
run's ``DIR/config.yaml`` is its resolved configuration, which repeats the run
(docs/design.md §8; recipes/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from clsp_positives import config_file
from clsp_positives.cli import app
from clsp_positives.service.ddpm import train as ddpm_train
from clsp_positives.service.ddpm.train import DiffusionTrainConfig

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "digits-ddpm.yaml"
# A few steps of the recipe's model, cheap enough for a test.
QUICK = ["--steps", "2", "--threads", "1", "--sample-count", "4", "--sample-steps", "2"]
QUICK += ["--lr-warmup", "2", "--no-progress", "--no-calibrate"]


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["diffusion", "train", *args])


def _captured(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Any, DiffusionTrainConfig]:
    """What ``clsp diffusion train ARGS`` would train with: the real command up to the
    training function."""
    seen: list[DiffusionTrainConfig] = []

    def fake_train(config: DiffusionTrainConfig, **_: Any) -> Any:
        seen.append(config)
        raise ValueError("stopped before training")

    monkeypatch.setattr(ddpm_train, "train", fake_train)
    result = _invoke(*args)
    assert seen, result.output
    return result, seen[0]


def test_the_digits_recipe_trains_and_its_config_yaml_repeats_the_run(tmp_path: Path) -> None:
    out = tmp_path / "ddpm"
    first = _invoke("--config", str(RECIPE), "--out", str(out), *QUICK)
    assert first.exit_code == 0, first.output
    assert "trained to step 2" in first.output  # --steps 2 over the recipe's 2000
    saved = out / config_file.RUN_CONFIG_NAME
    assert f"clsp diffusion train: resolved configuration (written to {saved})" in first.output
    text = saved.read_text()
    assert text.startswith("# The resolved configuration of this clsp diffusion train run")
    data = yaml.safe_load(text)
    recipe = yaml.safe_load(RECIPE.read_text())
    assert data["steps"] == 2 and data["preset"] == recipe["preset"] == "tiny"
    assert data["batch_size"] == recipe["batch_size"] and data["save_every"] == 500
    # Resolved: the data's side and channels, and the flip the digits get (none).
    assert (data["image_size"], data["channels"], data["flip"]) == (16, 1, False)
    assert data["ema_decay"] == DiffusionTrainConfig.model_fields["ema_decay"].default
    # The file alone repeats the run: here it continues it, to a later step.
    again = _invoke("--config", str(saved), "--steps", "3")
    assert again.exit_code == 0, again.output
    assert "trained to step 3 (resumed at step 2)" in again.output
    assert yaml.safe_load(saved.read_text()) == {**data, "steps": 3}


def test_a_flag_overrides_the_file_and_the_file_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"out: {tmp_path / 'm'}\nbatch_size: 8\nlr_warmup: 3\nsize: 8\nsteps: 5\n")
    result, config = _captured(monkeypatch, "--config", str(path), "--batch-size", "4")
    assert result.exit_code == 2 and "stopped before training" in result.output
    assert (config.batch_size, config.lr_warmup, config.image_size) == (4, 3, 8)
    assert config.out == str(tmp_path / "m") and config.steps == 5  # --out from the file
    assert config.ema_decay == 0.999 and config.preset == "small"  # the defaults
    # A flag given its default value still wins over the file.
    _, config = _captured(monkeypatch, "--config", str(path), "--batch-size", "64")
    assert config.batch_size == 64


def test_out_is_required_here_or_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("steps: 1\n")
    result = _invoke("--config", str(path))
    assert result.exit_code == 2 and "--out: Field required" in result.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("steps: 1\nbatch_sise: 8\n", "unknown key 'batch_sise'"),
        ("steps: 1\nlr: -1\n", "lr (in {path}): Input should be greater than 0"),
        ("- steps\n", "must be a mapping of clsp diffusion train options"),
    ],
    ids=["unknown-key", "bad-value", "not-a-mapping"],
)
def test_a_bad_file_is_a_clean_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    result = _invoke("--config", str(path), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2
    assert expected.format(path=path) in result.output and str(path) in result.output
    assert not (tmp_path / "m").exists()  # nothing started


def test_an_unknown_key_names_the_nearest_and_every_allowed_key(tmp_path: Path) -> None:
    """Through the real command in a child process: exit 2, no traceback, and the
    message says what the key may have been (a clsp train option is not one here)."""
    path = tmp_path / "c.yaml"
    path.write_text("steps: 1\nbatch_sise: 8\n")
    done = subprocess.run(
        [sys.executable, "-m", "clsp_positives.cli", "diffusion", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    assert "did you mean 'batch_size'?" in done.stderr
    assert "not a clsp diffusion train option" in done.stderr
    for key in DiffusionTrainConfig.model_fields:
        assert key in done.stderr
    path.write_text("steps: 1\nclsp_weight: 1\n")  # a clsp train option
    result = _invoke("--config", str(path), "--out", str(tmp_path / "m"))
    assert result.exit_code == 2 and "unknown key 'clsp_weight'" in result.output


def test_help_shows_every_options_help_and_default() -> None:
    """The options are generated from DiffusionTrainConfig: each field's flag, help and
    default, and the default the --flip help spells out is images.DIGIT_SETS."""
    from clsp_positives.images import DIGIT_SETS
    from clsp_positives.options import flags, shown_default

    result = CliRunner().invoke(app, ["diffusion", "train", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())  # the help, unwrapped
    for name, field in DiffusionTrainConfig.model_fields.items():
        assert all(f in text for f in flags(DiffusionTrainConfig, name)), name
        default = "required" if field.is_required() else f"default: {shown_default(field)}"
        assert f"{field.description} ({default}" in text, name
    flip = shown_default(DiffusionTrainConfig.model_fields["flip"])
    assert all(name in flip for name in DIGIT_SETS)
