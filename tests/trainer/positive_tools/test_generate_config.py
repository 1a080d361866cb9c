"""``clsp generate --config FILE`` against a real stub pool: the digits recipe makes a
bank, a flag wins over the file and the file over the default, a bad file stops with
exit 2 naming the key, and ``<bank>.config.yaml`` is the resolved configuration, which
repeats the run (docs/design.md §8; recipes/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.images import load_images
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.positive_tools.generate_cli import SHARED, GenerateConfig
from clsp_positives.trainer.positives.offline import OfflineNpySource, config_path, meta_path
from tests.support.servers import free_port
from tests.support.stub_pool import counters, stub_positive, stub_server

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "digits-generate.yaml"


def test_the_digits_recipe_makes_a_bank_and_its_config_yaml_repeats_the_run(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bank.npy"
    runner = CliRunner()
    with stub_server(STUB_SAMPLING="authors") as server:
        args = ["generate", "--config", str(RECIPE), "--positives", server.url]
        result = runner.invoke(app, [*args, "--out", str(out), "--k", "1", "--no-progress"])
        assert result.exit_code == 0, result.output
        saved = config_path(out)
        assert f"clsp generate: resolved configuration (written to {saved})" in result.output
        data = yaml.safe_load(saved.read_text())
        recipe = yaml.safe_load(RECIPE.read_text())
        assert data["k"] == 1 != recipe["k"]  # the flag won
        assert data["batch_size"] == recipe["batch_size"]  # the file filled the rest
        # The recipe leaves the generation params to the pool's model; this pool has no
        # stored settings, so the file records the params' defaults and the pool's mode.
        assert not any(name.startswith("gen_") for name in recipe)
        assert data["gen_steps"] == GenerationParams.model_fields["steps"].default
        assert data["gen_sampling"] == "authors" and data["interpolation_weight"] == 0.1
        # Resolved from the pool's model: the bank's image size and channels.
        assert (data["image_size"], data["channels"]) == (16, 1)
        assert data["out"] == str(out) and data["positives"] == server.url
        assert "token" not in data
        meta = json.loads(meta_path(out).read_text())
        assert meta["params"]["steps"] == data["gen_steps"] and meta["shape"][1] == 1

        images = load_images("digits").images
        bank = OfflineNpySource(out)
        assert bank.array.shape == (len(images), 1, 16, 16, 1)
        np.testing.assert_array_equal(bank.array[7, 0], stub_positive(images[7], 0))
        bank.close()

        # The file alone repeats the run: the same options, so the bank is complete.
        before = counters(server)["items"]
        again = runner.invoke(app, ["generate", "--config", str(saved)])
        assert again.exit_code == 0, again.output
        assert "already complete" in again.output and counters(server)["items"] == before


def test_the_pools_sampling_mode_is_what_the_file_keeps(tmp_path: Path) -> None:
    """Without --gen-sampling the pool decides; the saved file pins what it decided."""
    out = tmp_path / "bank.npy"
    args = ["--dataset", "digits", "--out", str(out), "--k", "1", "--gen-steps", "2"]
    with stub_server(STUB_SAMPLING="model") as server:
        result = CliRunner().invoke(
            app, ["generate", *args, "--positives", server.url, "--no-progress"]
        )
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(config_path(out).read_text())["gen_sampling"] == "model"


def test_a_flag_overrides_the_file_and_the_file_the_default(tmp_path: Path) -> None:
    """Checked before the pool is asked: nothing listens at the URL."""
    path = tmp_path / "c.yaml"
    url = f"http://127.0.0.1:{free_port()}"
    path.write_text(f"dataset: digits\nout: {tmp_path / 'b.npy'}\npositives: {url}\ngen_eta: 2\n")
    result = CliRunner().invoke(app, ["generate", "--config", str(path)])
    assert result.exit_code == 2
    assert f"gen_eta (in {path}): Input should be less than or equal to 1" in result.output
    # The flag wins over the file's bad value; the file's URL is then asked (and is down).
    result = CliRunner().invoke(
        app, ["generate", "--config", str(path), "--gen-eta", "0.5", "--timeout-s", "2"]
    )
    assert result.exit_code == 1 and "clsp generate:" in result.output


def test_an_unknown_key_is_a_clean_error_naming_the_allowed_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\nepochs: 3\n")  # a clsp train option, not generate's
    result = CliRunner().invoke(app, ["generate", "--config", str(path)])
    assert result.exit_code == 2
    assert f"unknown key 'epochs' in the config file {path}" in result.output
    assert "not a clsp generate option" in result.output
    assert "in_flight" in result.output and "gen_steps" in result.output


def test_the_shared_options_are_train_configs() -> None:
    """The options both commands take have one definition: TrainConfig's."""
    for name in SHARED:
        mine, theirs = GenerateConfig.model_fields[name], TrainConfig.model_fields[name]
        assert mine.default == theirs.default and mine.description == theirs.description
        assert mine.metadata == theirs.metadata and mine.validation_alias == theirs.validation_alias
    assert set(GenerateConfig.model_fields) & set(TrainConfig.model_fields) >= set(SHARED)
