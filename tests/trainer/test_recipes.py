"""The recipes in ``recipes/``, ``clsp train --config FILE`` and the run's
``DIR/config.yaml`` (recipes/README.md; docs/training.md, "Recipes"; docs/design.md §8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from clsp_positives import config_file as generic
from clsp_positives.cli import app
from clsp_positives.images import load_images
from clsp_positives.trainer.config import METHOD_DEFAULTS, TrainConfig
from clsp_positives.trainer.config_file import (
    CONFIG_NAME,
    ConfigFileError,
    read_config_file,
    write_run_config,
)
from clsp_positives.trainer.positive_tools.generate_cli import GenerateConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DIGITS = ROOT / "recipes" / "digits-simclr-clsp.yaml"
# The fields a recipe of the authors' runs must pin: those whose default the run
# would otherwise decide (TrainConfig.resolved), and what the runs differ in.
PINNED = (
    "dataset", "method", "backbone", "epochs", "batch_size", "lr", "warmup_epochs",
    "weight_decay", "temperature", "proj_hidden_dim", "proj_dim", "clsp_weight",
    "clsp_mode", "interpolation_weight", "gen_steps", "gen_eta", "gen_method",
    "lr_warmup_start", "lr_step_unit", "proj_bn", "amp",
)  # fmt: skip
# What a baseline of solo-learn's must pin: the same without the CLSP term's options.
BASELINE_PINNED = (
    "dataset", "method", "backbone", "epochs", "batch_size", "optimizer", "lr", "schedule",
    "warmup_epochs", "weight_decay", "temperature", "proj_hidden_dim", "proj_dim",
    "view1_blur", "view2_blur", "clsp_weight",
)  # fmt: skip
# Paths and secrets a recipe never holds: the user adds them for their machine.
NEVER = ("token", "out", "positives", "positives_npy", "data_root", "device")


def recipe_command(path: Path) -> tuple[str, type[BaseModel], dict[str, Any]]:
    """The command a recipe is for (recipes/README.md: by the end of its name), its
    options' model, and the options every run of it adds on the command line."""
    if path.name.endswith("-ddpm.yaml"):
        from clsp_positives.service.ddpm.train import DiffusionTrainConfig

        return "clsp diffusion train", DiffusionTrainConfig, {"out": "models/x"}
    if path.name.endswith("-generate.yaml"):
        return "clsp generate", GenerateConfig, {"out": "x.npy", "positives": "http://h:1"}
    return "clsp train", TrainConfig, {}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``clsp`` command in a child process (stderr kept apart)."""
    return subprocess.run(
        [sys.executable, "-m", "clsp_positives.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_the_recipes_are_there() -> None:
    names = {p.name for p in RECIPES}
    for dataset in ("cifar10", "cifar100"):
        for method in ("simclr", "moco"):
            assert f"{dataset}-{method}-clsp.yaml" in names
    for dataset in ("cifar10", "cifar100", "stl10"):
        for method in ("simclr", "moco", "nnclr"):
            assert f"{dataset}-{method}.yaml" in names
    assert DIGITS.name in names
    for name in ("digits-ddpm", "digits-generate", "digits-demo-simclr-clsp", "cifar10-ddpm"):
        assert f"{name}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_valid_for_its_command(path: Path) -> None:
    """Every file validates against its command's model, through the reader the
    command uses, with only what its opening comment says to add."""
    command, model, added = recipe_command(path)
    options = generic.read_config_file(path, model, command=command)
    config = model.model_validate({**options, **added})
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment saying what run it is"
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"{command} --config recipes/{path.name}" in comments, "it shows its command"
    assert "--out" in comments, "it says what a user must add"
    assert not [name for name in NEVER if name in options], "no paths or secrets"
    if model is TrainConfig:
        assert isinstance(config, TrainConfig)
        if config.clsp_weight > 0:
            assert path.stem.endswith("-clsp") and "--positives" in comments
        else:
            assert not path.stem.endswith("-clsp")


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPES if p.name.startswith("cifar") and p.stem.endswith("-clsp")],
    ids=lambda p: p.stem,
)
def test_the_authors_recipes_pin_what_their_runs_depend_on(path: Path) -> None:
    options = read_config_file(path)
    missing = [name for name in PINNED if name not in options]
    assert not missing, f"{path.name} leaves {missing} to the defaults"
    config = TrainConfig.model_validate(options)
    assert config.resolved() == config  # no default left for the run to decide
    simclr = config.method == "simclr"
    assert (config.batch_size, config.lr) == ((1024, 0.5) if simclr else (512, 0.3))
    assert config.epochs == 1000 and config.warmup_epochs == 10 and config.weight_decay == 1e-4
    assert config.temperature == 0.2 and config.optimizer == "sgd"
    assert (config.proj_hidden_dim, config.proj_dim) == (4096, 256)
    assert (config.interpolation_weight, config.gen_steps, config.gen_eta) == (0.1, 100, 0.1)
    # Their scheduler, projector and precision (docs/method.md, "The authors' recipe").
    assert (config.lr_warmup_start, config.lr_step_unit) == (1e-3, "epoch")
    assert not config.proj_bn and not config.amp
    assert config.joint_forward == simclr  # their SimCLR forwards [v1; v2; p] at once
    if not simclr:
        assert config.queue_size == 32768 and config.moco_momentum == 0.99
        assert config.moco_momentum_end == 0.999
        assert (config.view1_solarize, config.view2_solarize) == (0.2, 0.2)


# solo-learn's pretrain configs (scripts/pretrain/cifar and, for STL-10, which they do
# not run, scripts/pretrain/imagenet-100), as the recipes must hold them:
# lr, weight decay, projector hidden/out, queue, blur per view, solarisation per view.
SOLO_LEARN = {
    ("cifar", "simclr"): (0.4, 1e-4, 2048, 256, None, (0.5, 0.5), (0.0, 0.0)),
    ("cifar", "moco"): (0.3, 1e-4, 2048, 256, 32768, (0.5, 0.5), (0.0, 0.0)),
    ("cifar", "nnclr"): (0.4, 1e-5, 2048, 256, 65536, (0.0, 0.0), (0.0, 0.2)),
    ("stl", "simclr"): (0.3, 1e-4, 4096, 512, None, (0.5, 0.5), (0.0, 0.0)),
    ("stl", "moco"): (0.3, 1e-4, 2048, 256, 65536, (0.5, 0.5), (0.0, 0.0)),
    ("stl", "nnclr"): (0.4, 1e-5, 2048, 256, 65536, (1.0, 0.1), (0.0, 0.2)),
}
BASELINES = [
    ROOT / "recipes" / f"{dataset}-{method}.yaml"
    for dataset in ("cifar10", "cifar100", "stl10")
    for method in ("simclr", "moco", "nnclr")
]


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: p.stem)
def test_the_baselines_hold_solo_learns_values(path: Path) -> None:
    options = read_config_file(path)
    missing = [name for name in BASELINE_PINNED if name not in options]
    assert not missing, f"{path.name} leaves {missing} to the defaults"
    config = TrainConfig.model_validate(options)
    assert config.resolved() == config  # no default left for the run to decide
    assert config.clsp_weight == 0 and "solo-learn's pretrain configs" in path.read_text()
    stl = config.dataset == "stl10"
    lr, wd, hidden, out, queue, blur, solarize = SOLO_LEARN[
        ("stl" if stl else "cifar"), config.method
    ]
    assert (config.lr, config.weight_decay, config.temperature) == (lr, wd, 0.2)
    assert (config.proj_hidden_dim, config.proj_dim, config.queue_size) == (hidden, out, queue)
    assert (config.view1_blur, config.view2_blur) == blur
    assert (config.view1_solarize, config.view2_solarize) == solarize
    assert (config.epochs, config.batch_size, config.warmup_epochs) == (
        400 if stl else 1000,
        256,
        10,
    )
    assert (config.backbone, config.optimizer, config.schedule) == ("resnet18", "sgd", "cosine")
    # STL-10 pre-trains on its unlabeled images too; the evaluation keeps the labels.
    assert config.train_split == ("train+unlabeled" if stl else "train")
    if config.method == "moco":
        assert (config.moco_momentum, config.moco_momentum_end) == (0.99, 0.999)
    if config.method == "nnclr":
        assert config.pred_hidden_dim == 4096
    # LARS is not ours: the recipe says so rather than hiding it.
    assert ("LARS" in path.read_text()) is (config.method != "moco")


def test_the_demo_recipes_are_the_demos_runs(tmp_path: Path) -> None:
    """recipes/digits-{ddpm,generate,demo-simclr-clsp}.yaml are `clsp demo`'s full run;
    the demo builds its configs in code (it runs from an installed wheel, which has no
    recipes/), so this keeps the two from drifting apart."""
    from clsp_positives import demo
    from clsp_positives.service.ddpm.train import DiffusionTrainConfig

    budget = demo.BUDGETS["full"]
    run = {"seed": 0, "device": "cpu", "progress": False}
    arm = demo.arm_config(budget, url="http://h:1", **run)
    recipe = read_config_file(ROOT / "recipes" / "digits-demo-simclr-clsp.yaml")
    mine = TrainConfig.model_validate({**recipe, "positives": "http://h:1", **run})
    # Field by field but the evaluation's epochs, which follow the demo's time budget
    # (--quick shortens them) rather than the run.
    evaluation = {"linear_epochs", "probe_epochs"}
    assert mine.model_dump(exclude=evaluation) == arm.model_dump(exclude=evaluation)

    ddpm = demo.ddpm_config(tmp_path, budget, threads=1, **run)
    recipe = generic.read_config_file(
        ROOT / "recipes" / "digits-ddpm.yaml", DiffusionTrainConfig, command="clsp"
    )
    # The demo's time cap is its own (the recipe says so); everything else is the run.
    mine = DiffusionTrainConfig.model_validate(
        {**recipe, "out": str(tmp_path), "minutes": budget.ddpm_minutes, "threads": 1, **run}
    )
    assert mine == ddpm

    recipe = generic.read_config_file(
        ROOT / "recipes" / "digits-generate.yaml", GenerateConfig, command="clsp"
    )
    bank = GenerateConfig.model_validate({**recipe, "out": "x.npy", "positives": "http://h:1"})
    assert bank.k == budget.k
    assert bank.generation_params() == budget.positives_params(k=budget.k)


def test_the_defaults_are_the_authors() -> None:
    """SimCLR and MoCo as the CLSP authors' CIFAR configs, NNCLR as solo-learn's
    (docs/training.md, "Defaults and the authors' configs"); CLSP off by default."""
    expected = {
        "simclr": (0.2, 4096, 256, None),
        "moco": (0.2, 4096, 256, 32768),
        "nnclr": (0.2, 2048, 256, 65536),
    }
    for method, (tau, hidden, out, queue) in expected.items():
        config = TrainConfig(method=method)
        assert config.resolved_temperature() == tau
        assert config.resolved_proj_hidden_dim() == hidden
        assert config.resolved_proj_dim() == out
        assert config.resolved_queue_size() == queue
        assert tuple(METHOD_DEFAULTS[method]) == (tau, hidden, out, queue)
    assert TrainConfig().moco_momentum == 0.99 and TrainConfig().clsp_weight == 0
    # A value given wins over the method's default.
    assert TrainConfig(method="moco", queue_size=7, temperature=0.5).resolved().queue_size == 7
    assert TrainConfig(method="moco", temperature=0.5).resolved_temperature() == 0.5


def test_the_method_config_takes_the_resolved_values() -> None:
    from clsp_positives.trainer.methods import MethodConfig

    m = MethodConfig.from_train_config(TrainConfig(method="nnclr", proj_dim=32))
    assert (m.tau, m.proj_hidden_dim, m.proj_dim, m.queue_size) == (0.2, 2048, 32, 65536)
    bare = MethodConfig(name="moco", proj_hidden_dim=8)
    assert (bare.proj_hidden_dim, bare.proj_dim, bare.queue_size) == (8, 256, 32768)
    assert MethodConfig(name="simclr").queue_size is None


@pytest.mark.slow
def test_the_digits_recipe_runs_end_to_end_through_clsp_train(tmp_path: Path) -> None:
    """The real command, the recipe, flags over it, offline positives; then the
    run's config.yaml is the resolved configuration and gives the same config back."""
    n = 128
    images = load_images("digits").images[:n]
    npy = tmp_path / "positives.npy"
    np.save(npy, np.ascontiguousarray(np.stack([images, images[:, :, ::-1]], axis=1)))
    out = tmp_path / "run"
    done = _cli(
        "train", "--config", str(DIGITS), "--epochs", "1", "--subset", str(n),
        "--linear-epochs", "2", "--positives-npy", str(npy), "--k", "2",
        "--positives-strict", "--device", "cpu", "--no-progress", "--out", str(out),
        env={"CLSP_API_TOKEN": "recipe-secret"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # The resolved configuration is printed at the start, without the token.
    assert f"clsp train: resolved configuration (written to {out / CONFIG_NAME})" in done.stdout
    assert "recipe-secret" not in done.stdout + done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 1  # --epochs 1 over the recipe's 2
    # Every anchor had its positive (the contrastive form counts it inside the base loss).
    assert epochs[0]["positive_fraction"] == 1.0 and epochs[0]["missing"] == 0

    started = TrainConfig.model_validate(records[0]["config"])
    recipe = read_config_file(DIGITS)
    assert recipe["epochs"] != 1 and started.epochs == 1  # the flag won
    assert started.backbone == recipe["backbone"] == "resnet-tiny"  # the file filled the rest
    assert started.clsp_mode == recipe["clsp_mode"] and started.proj_dim == recipe["proj_dim"]

    saved = out / CONFIG_NAME
    text = saved.read_text()
    assert "recipe-secret" not in text and "token" not in yaml.safe_load(text)
    loaded = TrainConfig.model_validate(read_config_file(saved))
    # Every default decided: the learning rate from the batch, the method's sizes.
    assert loaded.lr == started.resolved_lr() == pytest.approx(0.3 * 64 / 256)
    assert loaded.weight_decay == 1e-4 and loaded.temperature == 0.2
    assert loaded == started.resolved()


def _config_of(args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, TrainConfig]:
    """What ``clsp train ARGS`` would train with: the real command up to the loop."""
    from clsp_positives.trainer import train_loop
    from clsp_positives.trainer.train_loop import TrainResult

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, **_: Any) -> TrainResult:
        seen.append(config)
        return TrainResult(epochs=0, final=None)

    monkeypatch.setattr(train_loop, "train", fake_train)
    result = CliRunner().invoke(app, ["train", *args])
    return result, (seen[0] if seen else None)


def test_loading_a_runs_config_yaml_gives_the_runs_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = TrainConfig(
        method="moco", batch_size=128, clsp_weight=0.5, positives_npy="p.npy", k=3,
        token="s3cret", out=str(tmp_path / "run"), gen_sampling="authors",
    )  # fmt: skip
    path = write_run_config(run, run.out)
    assert path == tmp_path / "run" / CONFIG_NAME
    assert "s3cret" not in path.read_text()
    result, config = _config_of(["--config", str(path)], monkeypatch)
    assert result.exit_code == 0, result.output
    assert config == run.resolved().model_copy(update={"token": None})
    assert config.lr == pytest.approx(0.3 * 128 / 256)
    assert (config.queue_size, config.proj_hidden_dim, config.temperature) == (32768, 4096, 0.2)
    # Writing the loaded config again changes nothing: the file is a fixed point.
    again = write_run_config(config, tmp_path / "again").read_text()
    assert again.split("\n", 3)[3] == path.read_text().split("\n", 3)[3]


def test_a_flag_overrides_the_file_and_the_file_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 96\nepochs: 7\ncandidates: 4\n# a comment\n")
    result, config = _config_of(["--config", str(path), "--epochs", "3"], monkeypatch)
    assert result.exit_code == 0, result.output
    assert (config.epochs, config.batch_size, config.k) == (3, 96, 4)
    assert config.lr is None and config.method == "simclr"  # left to the defaults


def test_a_json_config_file_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"method": "nnclr", "lr": 0.01}))
    result, config = _config_of(["--config", str(path)], monkeypatch)
    assert result.exit_code == 0, result.output
    assert (config.method, config.lr) == ("nnclr", 0.01)


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        ("batch_size: 64\nbatch_sise: 32\n", "c.yaml", "'batch_sise'"),
        ("epochs: [1\n", "c.yaml", "not valid YAML"),
        ("- epochs\n- 3\n", "c.yaml", "must be a mapping"),
        ("{nope", "c.json", "not valid JSON"),
        ("k: 2\ncandidates: 3\n", "c.yaml", "gives 'k' twice"),
        (None, "missing.yaml", "cannot read the config file"),
    ],
    ids=["unknown-key", "bad-yaml", "not-a-mapping", "bad-json", "twice", "missing"],
)
def test_a_bad_config_file_is_a_clean_error(
    tmp_path: Path, content: str | None, name: str, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigFileError) as raised:
        read_config_file(path)
    assert expected in str(raised.value) and str(path) in str(raised.value)
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2 and isinstance(result.exception, (SystemExit, type(None)))
    assert f"error: {raised.value}" in result.output


@pytest.mark.parametrize("content", ["batch_size: 64\nbatch_sise: 32\n", None])
def test_the_real_command_refuses_a_bad_file_with_exit_2_and_no_traceback(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "c.yaml"
    if content is not None:
        path.write_text(content)
    done = _cli("train", "--config", str(path), "--device", "cpu")
    assert done.returncode == 2
    assert str(path) in done.stderr
    assert ("'batch_sise'" if content else "cannot read") in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_bad_value_in_the_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 1\ngen_steps: 100\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert f"batch_size (in {path})" in result.output
    # The same value given as a flag is named as the flag.
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--gen-steps", "0"])
    assert result.exit_code == 2 and "--gen-steps:" in result.output


def test_help_shows_the_per_method_defaults() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())
    assert "--config" in text
    assert "(default: SimCLR/MoCo 4096, NNCLR 2048)" in text
    assert "(default: MoCo 32768, NNCLR 65536)" in text


def test_the_digits_imitation_keeps_what_the_authors_recipe_does_not_scale() -> None:
    """recipes/digits-authors-simclr-clsp.yaml: the long benchmark's recipe
    (docs/method.md, "Scaled to digits") scales the data, batch, epochs and lr only."""
    config = TrainConfig.model_validate(
        read_config_file(ROOT / "recipes" / "digits-authors-simclr-clsp.yaml")
    ).resolved()
    authors = TrainConfig.model_validate(
        read_config_file(ROOT / "recipes" / "cifar10-simclr-clsp.yaml")
    ).resolved()
    kept = (
        "method", "optimizer", "schedule", "warmup_epochs", "lr_warmup_start",
        "lr_step_unit", "weight_decay", "temperature", "proj_hidden_dim", "proj_dim",
        "proj_bn", "joint_forward", "clsp_weight", "clsp_mode", "k",
    )  # fmt: skip
    assert {n: getattr(config, n) for n in kept} == {n: getattr(authors, n) for n in kept}
    assert (config.dataset, config.batch_size, config.epochs) == ("digits", 128, 200)
