"""Options generated from the models (clsp_positives/options.py): one flag per concept in
every command, each old name an alias that parses to the same configuration, and the
generation options copied from ``GenerationParams`` with no list to keep in step
(docs/design.md §8)."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field

from clsp_positives.cli import app
from clsp_positives.config_file import OptionsError, read_config_file, resolve_options
from clsp_positives.options import field_names, flags, is_bool, mirror_fields, primary_flag
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.ddpm.config import DiffusionTrainConfig
from clsp_positives.service.settings import ServiceSettings
from clsp_positives.trainer.config import (
    GENERATION_OPTIONS,
    NOT_GENERATION_OPTIONS,
    TrainConfig,
)
from clsp_positives.trainer.positive_tools.calibrate_cli import CALIBRATED, CalibrateConfig
from clsp_positives.trainer.positive_tools.generate_cli import GenerateConfig

COMMANDS: dict[tuple[str, ...], tuple[type[BaseModel], list[str]]] = {
    ("serve",): (ServiceSettings, ["--model", "m"]),
    ("train",): (TrainConfig, []),
    ("generate",): (GenerateConfig, ["--dataset", "digits", "--out", "o", "--positives", "p"]),
    ("calibrate",): (CalibrateConfig, ["--dataset", "digits", "--out", "o", "--positives", "p"]),
    ("diffusion", "train"): (DiffusionTrainConfig, ["--out", "o", "--minutes", "1"]),
}
"""Every command whose options are generated: its model, and the options it requires."""

SAMPLES = {
    "k": "3",
    "image_size": "8",
    "schedule": "constant",
    "warmup_epochs": "2",
    "timeout_s": "5",
    "lr_warmup": "7",
    "interpolation_weight": "0,0.5",  # clsp calibrate's grid
    "gen_steps": "3,4",
}
"""A value, not the default, for each field that has an alias."""

SAME_CONCEPT = {
    "--interpolation-weight": [
        ("train", "interpolation_weight"),
        ("generate", "interpolation_weight"),
        ("calibrate", "interpolation_weight"),
    ],
    "--gen-steps": [("train", "gen_steps"), ("generate", "gen_steps"), ("calibrate", "gen_steps")],
    "--lr-schedule": [("train", "schedule"), ("diffusion train", "lr_schedule")],
    "--positives-timeout-s": [
        ("train", "positives_timeout_s"),
        ("generate", "timeout_s"),
        ("calibrate", "timeout_s"),
    ],
    "--image-size": [
        ("train", "image_size"),
        ("generate", "image_size"),
        ("calibrate", "image_size"),
        ("diffusion train", "image_size"),
    ],
    "--k": [("train", "k"), ("generate", "k"), ("calibrate", "k")],
}
"""One concept, one flag, in every command that takes it (old names stay aliases)."""


def _command(path: tuple[str, ...]) -> Any:
    """The click command (typer may carry its own copy of click: not typed here)."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _parsed(path: tuple[str, ...], args: list[str]) -> tuple[dict[str, Any], BaseModel]:
    """What the command line parses to: click's values, and the model they validate into."""
    model, required = COMMANDS[path]
    ctx = _command(path).make_context(" ".join(path), [*required, *args])
    given = {n: v for n, v in ctx.params.items() if v is not None and n in model.model_fields}
    return ctx.params, model.model_validate(given)


ALIASED = [
    (path, name)
    for path, (model, _) in COMMANDS.items()
    for name, field in model.model_fields.items()
    if len(field_names(field, name)) > 1
]
"""Every field, of every command, that has an alias."""


@pytest.mark.parametrize(("path", "name"), ALIASED, ids=[f"{' '.join(p)}:{n}" for p, n in ALIASED])
def test_every_alias_parses_to_the_same_config_as_the_flag(
    path: tuple[str, ...], name: str
) -> None:
    model = COMMANDS[path][0]
    first, *aliases = flags(model, name)
    if is_bool(model.model_fields[name]):
        forms = [[[f], [f"--no-{f[2:]}"]] for f in (first, *aliases)]
    else:
        assert name in SAMPLES, f"give SAMPLES a value of {name}, which has an alias"
        forms = [[[f, SAMPLES[name]]] for f in (first, *aliases)]
    for cases in zip(*forms, strict=True):
        (params, config), *others = (_parsed(path, args) for args in cases)
        assert params[name] is not None
        for other_params, other_config in others:
            assert other_params == params and other_config == config


@pytest.mark.parametrize("wanted", list(SAME_CONCEPT))
def test_one_concept_has_one_flag_in_every_command(wanted: str) -> None:
    models = {" ".join(path): model for path, (model, _) in COMMANDS.items()}
    for command, name in SAME_CONCEPT[wanted]:
        assert flags(models[command], name)[0] == wanted, (command, name)


def test_sampling_and_optimizer_steps_are_told_apart() -> None:
    """``--steps`` is optimizer steps (clsp diffusion train); sampling steps are
    ``--gen-steps``, wherever they are a flag's own name."""
    for path, (model, _) in COMMANDS.items():
        for name in model.model_fields:
            if flags(model, name)[0] == "--steps":
                assert path == ("diffusion", "train") and "optimizer" in (
                    model.model_fields[name].description or ""
                )


def test_a_message_names_the_flag_not_the_alias_given(tmp_path: Any) -> None:
    with pytest.raises(OptionsError, match=r"^--lr-schedule: Input should be"):
        resolve_options(TrainConfig, None, {"schedule": "linear"}, command="clsp train")
    assert primary_flag(TrainConfig, "warmup_epochs") == "--lr-warmup-epochs"
    assert primary_flag(GenerateConfig, "positives_timeout_s") == "--positives-timeout-s"
    # A config file may use the flag's name or the field's; both reach the field.
    path = tmp_path / "c.yaml"
    path.write_text("lr_schedule: constant\nwarmup_epochs: 2\n")
    options = read_config_file(path, TrainConfig, command="clsp train")
    assert options == {"schedule": "constant", "warmup_epochs": 2}


def test_the_generation_options_are_generation_params_own() -> None:
    """Same types, defaults, bounds and help as ``GenerationParams`` (help with the note),
    in ``clsp train``, ``clsp generate`` and ``clsp calibrate`` alike (calibrate's grid
    axes apart), and mapped back."""
    assert CALIBRATED.names == GENERATION_OPTIONS.without("interpolation_weight", "steps").names
    assert set(GENERATION_OPTIONS.names.values()) == set(GenerationParams.model_fields) - set(
        NOT_GENERATION_OPTIONS
    )
    for model, mirror in (
        (TrainConfig, GENERATION_OPTIONS),
        (GenerateConfig, GENERATION_OPTIONS),
        (CalibrateConfig, CALIBRATED),
    ):
        for option, source in mirror.names.items():
            mine, theirs = model.model_fields[option], GenerationParams.model_fields[source]
            assert (mine.annotation, mine.default, mine.metadata) == (
                theirs.annotation,
                theirs.default,
                theirs.metadata,
            )
            assert mine.description == f"{theirs.description.rstrip('.')}; asked of the pool."
    config = TrainConfig(gen_steps=7, gen_method="dpmpp-2m", interpolation_weight=0.4)
    params = config.generation_params(k=2)
    assert (params.steps, params.method, params.interpolation_weight, params.k) == (
        7,
        "dpmpp-2m",
        0.4,
        2,
    )


def test_a_new_generation_param_becomes_an_option_with_no_edit() -> None:
    """What ``GENERATION_OPTIONS`` does for a param added to ``GenerationParams``: a field
    of the options model where the mirror is declared, and a value in the way back."""

    class Params(BaseModel):
        steps: int = Field(100, ge=1, description="Sampling steps.")
        guidance: float = Field(1.0, ge=0, description="A new param.")
        k: int | None = None

    mirror = mirror_fields(Params, {"steps", "guidance"}, prefix="gen_", note="asked of the pool")

    class Options(BaseModel):
        before: int = 0
        mirror.declare(locals())
        after: int = 0

    assert list(Options.model_fields) == ["before", "gen_steps", "gen_guidance", "after"]
    guidance = Options.model_fields["gen_guidance"]
    assert guidance.default == 1.0 and guidance.description == "A new param; asked of the pool."
    with pytest.raises(ValueError):
        Options(gen_guidance=-1)
    # only what was given goes back: the rest stays the source's to resolve
    assert mirror.values(Options(gen_guidance=2.5)) == {"guidance": 2.5}
    assert mirror.values(Options(gen_steps=100, gen_guidance=1.0)) == {
        "steps": 100,
        "guidance": 1.0,
    }
    assert mirror.values(Options()) == {}
    assert list(mirror.without("steps").names) == ["gen_guidance"]
    with pytest.raises(ValueError, match="no field nope"):
        mirror_fields(Params, {"nope"})
