"""``clsp_generation.json``: reading, writing, refusing, and applying it to request params."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from clsp_positives.proto.model_settings import (
    GENERATION_DEFAULTS_FILE,
    STORED_FIELDS,
    GenerationDefaults,
    GenerationDefaultsError,
    Measured,
    check_model_dir,
    read_generation_defaults,
    write_generation_defaults,
)
from clsp_positives.proto.params import GenerationParams, parse_params

SMALL_MODEL = {"sampling": "authors-clipped", "interpolate": "bottleneck+low-skips"}
MEASURED = Measured(
    class_kept=0.89,
    between_candidates=0.065,
    to_anchor=0.15,
    positives_per_s=13.3,
    probe="raw pixels, logistic regression",
    probe_accuracy=0.965,
    dataset="digits",
    anchors=200,
    k=2,
    min_class_kept=0.85,
    reached_target=True,
    model="16eaea433a7819d2",
    at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    command="clsp calibrate --dataset digits",
)


def _file(folder: Path, content: object) -> Path:
    path = folder / GENERATION_DEFAULTS_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_folder_without_the_file_has_no_defaults(tmp_path: Path) -> None:
    assert read_generation_defaults(tmp_path) is None


def test_written_and_read_back_with_only_the_stored_fields(tmp_path: Path) -> None:
    defaults = GenerationDefaults(
        **SMALL_MODEL, interpolation_weight=0.3, steps=50, measured=MEASURED
    )
    path = write_generation_defaults(tmp_path, defaults)
    assert path == tmp_path / GENERATION_DEFAULTS_FILE
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {"sampling", "interpolate", "interpolation_weight", "steps", "measured"}
    assert on_disk["measured"]["at"] == "2025-01-02T03:04:05Z"
    assert read_generation_defaults(tmp_path) == defaults
    assert defaults.stored() == {**SMALL_MODEL, "interpolation_weight": 0.3, "steps": 50}


def test_unset_params_take_the_stored_values_and_set_ones_win() -> None:
    defaults = GenerationDefaults(**SMALL_MODEL, steps=50)
    applied = defaults.applied_to(parse_params({"eta": 0.2}))
    assert (applied.sampling, applied.interpolate, applied.steps) == (
        "authors-clipped",
        "bottleneck+low-skips",
        50,
    )
    assert applied.eta == 0.2 and applied.interpolation_weight == 0.1  # not stored: the default
    mine = defaults.applied_to(parse_params({"sampling": "authors", "steps": 3}))
    assert (mine.sampling, mine.steps, mine.interpolate) == ("authors", 3, "bottleneck+low-skips")
    # null sampling means "the service's default", which the file is part of
    assert defaults.applied_to(parse_params({"sampling": None})).sampling == "authors-clipped"
    # a request set even to the params' own defaults keeps them
    assert defaults.applied_to(parse_params({"interpolate": "bottleneck"})).interpolate == (
        "bottleneck"
    )


def test_a_request_setting_every_stored_field_keeps_its_params_and_key() -> None:
    explicit = {
        "interpolation_weight": 0.1,
        "steps": 100,
        "eta": 0.1,
        "method": "ddim",
        "sampling": "authors",
        "interpolate": "bottleneck",
        "interpolate_until": 1.0,
    }
    assert set(explicit) == set(STORED_FIELDS)
    params = parse_params(explicit)
    defaults = GenerationDefaults(
        **SMALL_MODEL,
        interpolation_weight=0.3,
        steps=50,
        eta=0.0,
        method="ddpm",
        interpolate_until=0.5,
    )
    assert defaults.applied_to(params) is params
    assert GenerationDefaults().applied_to(GenerationParams()) == GenerationParams()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"sampling": "clipped"}, "sampling: Input should be 'authors', 'authors-clipped'"),
        ({"steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"interpolation_weight": "0.1"}, "interpolation_weight: Input should be a valid number"),
        ({"guidance": 2}, "guidance: unknown field"),
        ({"measured": {"class_kept": 0.9}}, "measured.between_candidates: Field required"),
        ("{not json", "cannot read"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_file_and_field(
    tmp_path: Path, content: object, named: str
) -> None:
    path = _file(tmp_path, content)
    with pytest.raises(GenerationDefaultsError) as err:
        read_generation_defaults(tmp_path)
    assert str(path) in str(err.value) and named in str(err.value)


def test_only_a_model_folder_takes_the_file(tmp_path: Path) -> None:
    with pytest.raises(GenerationDefaultsError, match="holds no model"):
        check_model_dir(tmp_path)
    with pytest.raises(GenerationDefaultsError, match="not a directory"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert check_model_dir(tmp_path) == tmp_path
