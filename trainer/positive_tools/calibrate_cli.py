"""``clsp calibrate``: measure a grid of interpolation weights and step counts against a
running pool on held-out labelled images, and recommend one, before a training run
spends GPU-days on a guess (docs/design.md §1; the logic is trainer/positive_tools/calibrate.py).

It talks to the pool exactly as ``clsp generate`` does (``--positives``, the token from
``CLSP_API_TOKEN``). Its options are generated from ``CalibrateConfig``, whose fields
shared with ``clsp generate`` and ``clsp train`` are copies of theirs, and whose
generation options (``--gen-eta``, ``--gen-method``, ``--gen-sampling``, ...) are the
same copies of ``GenerationParams``'s as theirs, so names, defaults and allowed values
agree (docs/design.md §8). The grid's two axes are named as ``clsp train`` names the one
value it takes (``--interpolation-weight``, ``--gen-steps``), and the recommendation is
printed as those ``clsp train`` flags. ``--write --model-dir DIR`` also stores it, with what
it measured, in the model folder's ``clsp_generation.json``, which ``clsp serve`` then
applies to the params requests leave unset (``proto/model_settings.py``).
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import typer
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from clsp_positives.options import (
    DEFAULT_TEXT,
    all_flags,
    describe_errors,
    flag,
    primary_flag,
    with_model_options,
)
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.messages import ModelInfo
from clsp_positives.proto.model_settings import (
    GENERATION_DEFAULTS_FILE,
    STORED_FIELDS,
    GenerationDefaults,
    GenerationDefaultsError,
    Measured,
    as_pool_applies,
    check_model_dir,
    write_generation_defaults,
)
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.config import GENERATION_OPTIONS, TrainConfig
from clsp_positives.trainer.positive_tools.generate_cli import GenerateConfig

if TYPE_CHECKING:
    from clsp_positives.trainer.positive_tools import calibrate as cal

CALIBRATED = GENERATION_OPTIONS.without("interpolation_weight", "steps")
"""The generation options every setting of the grid shares: all of ``clsp train``'s but
the grid's two axes."""

GRID = ("interpolation_weight", "steps", "sampling")
"""Stored fields that ``--write`` takes from the chosen setting and the pool (the sampling
mode as it resolved it), not from the options every setting shared."""

NOT_ADVISED = ("eta", "method")
"""``GenerationParams`` fields the recommendation leaves out of its ``clsp train`` flags
even when given (as it always has); every other option of ``CALIBRATED`` given a value
other than its default is repeated there."""


def _copied(model: type[BaseModel], name: str) -> Any:
    """A copy of ``model``'s field (default, bounds, help and old names): one definition
    for the commands that share the option (docs/design.md §8)."""
    return FieldInfo.merge_field_infos(model.model_fields[name])


class CalibrateConfig(BaseModel):
    """Every option of ``clsp calibrate``: the command's options are generated from it."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="digits, digits-photos, cifar10, cifar100, stl10 or an image folder (class "
        "sub-folders); its labels are needed."
    )
    positives: str = _copied(GenerateConfig, "positives")
    out: Path = Field(description="Directory for calibration.json and calibration.png.")
    write: bool = Field(
        False,
        description=f"Also write the recommended setting, with what it measured, into "
        f"--model-dir's {GENERATION_DEFAULTS_FILE}: clsp serve of that model then gives it "
        "to every request that leaves those params unset.",
    )
    model_dir: Path | None = Field(
        None,
        description="The folder of the model the pool serves (what clsp serve --model "
        "was given), where --write writes.",
        json_schema_extra={DEFAULT_TEXT: "none"},
    )
    interpolation_weight: str = Field(
        "0,0.1,0.2,0.3,0.5,1.0",
        validation_alias=AliasChoices("interpolation_weight", "weights"),
        description="Interpolation weights to try, comma-separated (the grid's first axis).",
    )
    gen_steps: str = Field(
        "25,50,100",
        validation_alias=AliasChoices("gen_steps", "steps"),
        description="Sampling steps to try, comma-separated (the grid's second axis).",
    )
    anchors: int = Field(
        200, ge=1, description="Held-out labelled images (the test split) to make positives of."
    )
    k: int = Field(
        2,
        ge=2,
        validation_alias=AliasChoices("k", "candidates"),  # as clsp train and clsp generate
        description="Candidates per anchor (2 or more: diversity compares them).",
    )
    min_class_kept: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="The recommendation is the most diverse setting whose positives keep the "
        "anchor's class at least this often.",
    )
    budget: float | None = Field(
        None,
        ge=0.0,
        description="Seconds for the grid; it runs fewest steps first, and the settings left "
        "when the budget is spent are skipped.",
        json_schema_extra={DEFAULT_TEXT: "no limit"},
    )
    features: str | None = Field(
        None,
        description="module:function taking uint8 [N, H, W, C] images and returning [N, D] "
        "float features; the class probe reads those instead of raw pixels.",
        json_schema_extra={DEFAULT_TEXT: "raw pixels"},
    )
    probe_images: int = Field(
        5000,
        ge=2,
        description="The probe is fit on at most this many training images (a fixed random "
        "sample).",
    )
    image_size: int | None = _copied(GenerateConfig, "image_size")
    channels: Literal[1, 3] | None = _copied(GenerateConfig, "channels")
    batch_size: int = Field(64, ge=1, description="Anchors per request.")
    timeout_s: float = _copied(GenerateConfig, "timeout_s")
    progress: bool = _copied(GenerateConfig, "progress")
    data_root: str | None = _copied(TrainConfig, "data_root")
    download: bool = _copied(TrainConfig, "download")
    token: str | None = _copied(TrainConfig, "token")
    CALIBRATED.declare(locals())  # gen_eta, gen_method, gen_sampling, ...


@with_model_options(CalibrateConfig, CalibrateConfig.model_fields, envvars={"token": TOKEN_ENV})
def calibrate(*, given: dict[str, Any]) -> None:
    """Choose the interpolation weight and steps: class kept vs diversity over a grid."""
    from pydantic import ValidationError
    from tqdm import tqdm

    from clsp_positives.client import PoolClient, PoolError
    from clsp_positives.trainer.positive_tools import calibrate as cal
    from clsp_positives.trainer.positive_tools.calibrate_plot import write_plot
    from clsp_positives.trainer.positive_tools.quality import class_kept, fit_probe, load_features

    try:
        config = CalibrateConfig.model_validate(given)
    except ValidationError as exc:
        named = partial(primary_flag, CalibrateConfig)
        raise typer.BadParameter(describe_errors(exc, named)) from None
    # The grid is checked here, its messages naming each option by all its names: the
    # user may have typed the old one (--weights, --steps).
    names = partial(all_flags, CalibrateConfig)
    try:
        weights = cal.parse_weights(config.interpolation_weight, names("interpolation_weight"))
        settings = cal.grid(weights, cal.parse_steps(config.gen_steps, names("gen_steps")))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None  # the message names the option
    model_dir = _model_dir(config)
    dataset, positives, k, features = config.dataset, config.positives, config.k, config.features
    try:
        extractor = load_features(features) if features else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--features") from None

    try:
        client = PoolClient(positives, token=config.token, timeout_s=config.timeout_s)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positives") from None
    try:
        info = _pool_model(client, positives, config.image_size, config.channels)
        model_shape = f"{info.sample_size}x{info.sample_size}x{info.channels}"
        # What the pool gives the options left unset (its model's stored settings, its
        # sampling mode) is asked explicitly and recorded (docs/design.md §6).
        base = as_pool_applies(_base_params(config, info.max_k), info.model_dump(mode="json"))
        data = _held_out(config, info.sample_size, info.channels)
        anchor_images, labels = data["anchors"], data["labels"]
        try:
            probe = fit_probe(data["probe_images"], data["probe_labels"], features=extractor)
            probe_accuracy = class_kept(probe, anchor_images, labels)
        except ValueError as exc:  # a feature extractor returning the wrong shape
            raise typer.BadParameter(str(exc), param_hint="--features") from None
        sampling = base.sampling
        run = {
            "dataset": dataset,
            "anchors": len(anchor_images),
            "anchor_source": data["source"],
            "anchor_indices": data["indices"].tolist(),
            "probe_images": len(data["probe_images"]),
            "probe": "features " + features if features else "raw pixels, logistic regression",
            "k": k,
            # What every setting shared (eta, method, interpolate, ...); the sampling
            # mode is the results' own entry, as the pool resolved it.
            **{n: getattr(base, n) for n in CALIBRATED.names.values() if n != "sampling"},
            "weights": sorted({s.interpolation_weight for s in settings}),
            "steps": sorted({s.steps for s in settings}),
            "budget_s": config.budget,
            "min_class_kept": config.min_class_kept,
            "pool": positives,
        }
        typer.echo(
            f"{dataset}: {len(anchor_images)} held-out anchors ({data['source']}), a probe fit "
            f"on {len(data['probe_images'])} training images; model {info.fingerprint} "
            f"({model_shape}), sampling {sampling}, interpolate {base.interpolate}, k = {k}, "
            f"eta {base.eta:g}, {base.method}"
        )
        # The options given that every setting shared, for the advice (a default left out).
        shared_flags = " ".join(
            flag(option) if value is True else f"{flag(option)} {value}"
            for option, name in CALIBRATED.names.items()
            if name not in NOT_ADVISED
            and (value := getattr(base, name)) != GenerationParams.model_fields[name].default
        )

        def save(rows: list[cal.Row], complete: bool) -> None:
            chosen = cal.recommend(rows, config.min_class_kept, probe_accuracy, shared_flags)
            payload = cal.results(
                rows=rows,
                recommendation=chosen,
                probe_accuracy=probe_accuracy,
                model=info.model_dump(mode="json"),
                sampling=str(sampling),
                run=run,
                complete=complete,
            )
            cal.write_results(config.out, payload)

        fetch = cal.pool_fetch(client, anchor_images, base, config.batch_size)
        done: list[cal.Row] = []
        with tqdm(
            total=len(settings), unit="setting", disable=not config.progress, desc="calibrate"
        ) as bar:

            def measure_one(setting: cal.Setting) -> cal.Row:
                bar.set_postfix_str(f"w={setting.interpolation_weight:g} steps={setting.steps}")
                return cal.measure(setting, fetch, probe, anchor_images, labels)

            def on_row(row: cal.Row) -> None:
                done.append(row)
                save(done, complete=False)
                bar.update(1)

            try:
                rows = cal.run_grid(
                    settings,
                    measure_one,
                    budget_s=config.budget,
                    clock=time.monotonic,
                    on_row=on_row,
                )
            except PoolError as exc:
                hint = " (lower --batch-size)" if "cost_too_high" in str(exc) else ""
                kept = (
                    f"; the {len(done)} setting(s) done so far are in "
                    f"{config.out / cal.RESULTS_NAME}"
                    if done
                    else ""
                )
                typer.echo(f"clsp calibrate: {exc}{hint}{kept}", err=True)
                raise typer.Exit(1) from None
        chosen = cal.recommend(rows, config.min_class_kept, probe_accuracy, shared_flags)
        pick = None if chosen is None else chosen.setting
        save(rows, complete=True)
        png = write_plot(
            rows,
            config.out / cal.PLOT_NAME,
            min_class_kept=config.min_class_kept,
            probe_accuracy=probe_accuracy,
            recommended=pick,
            title=f"clsp calibrate: {dataset}, model {info.fingerprint}, k = {k}, {sampling}",
        )
        typer.echo(cal.format_table(rows, pick))
        typer.echo(
            f"the probe on the real anchors themselves: {probe_accuracy:.3f} (what copies of "
            "the anchors would score as class kept)"
        )
        typer.echo(chosen.text if chosen else "no setting was measured")
        typer.echo(f"wrote {config.out / cal.RESULTS_NAME} and {png}")
        if config.write and model_dir is not None:
            if chosen is None:
                typer.echo(f"clsp calibrate: nothing measured; {model_dir} unchanged", err=True)
                raise typer.Exit(1)
            measured = _measured(chosen, rows, run, probe_accuracy, info)
            _write_defaults(model_dir, chosen, base, str(sampling), measured)
    finally:
        client.close()


def _model_dir(config: CalibrateConfig) -> Path | None:
    """``--model-dir``, checked to be a model folder before the grid spends any time;
    ``--write`` needs it."""
    if config.model_dir is None:
        if config.write:
            raise typer.BadParameter(
                "--write needs the folder of the model the pool serves: give --model-dir DIR "
                "(what clsp serve --model was given)",
                param_hint="--model-dir",
            )
        return None
    try:
        return check_model_dir(config.model_dir)
    except GenerationDefaultsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--model-dir") from None


def _measured(
    chosen: cal.Recommendation,
    rows: list[cal.Row],
    run: dict[str, Any],
    probe_accuracy: float,
    info: ModelInfo,
) -> Measured:
    """What the model folder keeps of the recommended setting's measurement."""
    row = next(r for r in rows if r.setting == chosen.setting)
    return Measured(
        class_kept=chosen.class_kept,
        between_candidates=chosen.between_candidates,
        to_anchor=row.to_anchor,
        positives_per_s=row.positives_per_s,
        probe=run["probe"],
        probe_accuracy=probe_accuracy,
        dataset=run["dataset"],
        anchors=run["anchors"],
        k=run["k"],
        min_class_kept=chosen.min_class_kept,
        reached_target=chosen.reached_target,
        model=info.fingerprint,
        at=datetime.now(timezone.utc),
        command=_command_line(),
    )


def _write_defaults(
    model_dir: Path,
    chosen: cal.Recommendation,
    base: GenerationParams,
    sampling: str,
    measured: Measured,
) -> None:
    """``--write``: the recommended setting into the model folder, as ``clsp serve``
    reads it: the params every setting shared (the sampling mode as the pool resolved
    it), the chosen weight and steps, and what they measured."""
    stored = GenerationDefaults.model_validate(
        {
            **{name: getattr(base, name) for name in STORED_FIELDS if name not in GRID},
            "interpolation_weight": chosen.interpolation_weight,
            "steps": chosen.steps,
            "sampling": sampling,
            "measured": measured,
        }
    )
    path = write_generation_defaults(model_dir, stored)
    given = ", ".join(f"{name} {value}" for name, value in stored.stored().items())
    typer.echo(
        f"wrote {path}: clsp serve --model {model_dir} gives {given} to the requests that "
        "leave them unset"
    )


def _command_line() -> str:
    """This command as typed from ``calibrate`` on, a ``--token`` value hidden."""
    argv = sys.argv[sys.argv.index("calibrate") + 1 :] if "calibrate" in sys.argv else []
    shown = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "--token":
            arg = "***"
        elif arg.startswith("--token="):
            arg = "--token=***"
        shown.append(arg)
    return shlex.join(["clsp", "calibrate", *shown])


def _pool_model(
    client: Any, positives: str, image_size: int | None, channels: int | None
) -> ModelInfo:
    """The pool's ``GET /v1/model``, checked against the image options given."""
    from pydantic import ValidationError

    from clsp_positives.client import PoolError

    try:
        info = ModelInfo.model_validate(client.model_info())
    except (PoolError, ValidationError) as exc:
        raise typer.BadParameter(
            f"no generator of {positives} answered GET /v1/model ({exc})",
            param_hint="--positives",
        ) from None
    shape = f"{info.sample_size}x{info.sample_size}x{info.channels}"
    if image_size is not None and image_size != info.sample_size:
        raise typer.BadParameter(
            f"{image_size} differs from the pool's model ({shape}); leave it out or give "
            f"{info.sample_size}",
            param_hint="--image-size",
        )
    if channels is not None and channels != info.channels:
        raise typer.BadParameter(
            f"{channels} differs from the pool's model ({shape})", param_hint="--channels"
        )
    return info


def _base_params(config: CalibrateConfig, max_k: int) -> GenerationParams:
    """The generation params every setting shares: the options' eta, method, sampling and
    the rest, ``k`` candidates, and the cache bypassed, so that positives per second is
    what the pool generates, and held-out images never fill a cache meant for training.
    The weight and steps are the params' defaults until each setting sets its own."""
    from pydantic import ValidationError

    try:
        return GenerationParams.model_validate(
            {**CALIBRATED.values(config), "k": config.k, "cache": "bypass"},
            context={"max_k": max_k},
        )
    except ValidationError:  # the copies passed CalibrateConfig: only k is left
        raise typer.BadParameter(
            f"{config.k} is above the pool's limit of {max_k} candidates per anchor",
            param_hint="--k",
        ) from None


def _held_out(config: CalibrateConfig, size: int, channels: int) -> dict[str, Any]:
    """The probe's training images and the held-out anchors, as the model sees them.

    The anchors come from the test split and the probe learns from the train split, so
    the probe's accuracy on the anchors is an honest ceiling. A folder without ``train``
    and ``test`` sub-folders has one split only: the anchors are then held out of it.
    Raises typer.BadParameter naming the option to change.
    """
    from clsp_positives.images import load_images
    from clsp_positives.trainer.positive_tools.calibrate import held_out_indices

    dataset, anchors, probe_images = config.dataset, config.anchors, config.probe_images

    def load(split: str) -> Any:
        return load_images(
            dataset,
            split=split,
            size=size,
            channels=channels,
            root=config.data_root,
            download=config.download,
        )

    try:
        train, test = load("train"), load("test")
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    if (train.labels < 0).any() or (test.labels < 0).any():
        raise typer.BadParameter(
            f"{dataset} has unlabelled images; calibration needs a labelled set",
            param_hint="--dataset",
        )
    if len(np.unique(train.labels)) < 2:
        raise typer.BadParameter(
            f"{dataset} has fewer than 2 classes: a class probe needs labelled images of "
            "several classes (one sub-folder per class)",
            param_hint="--dataset",
        )
    # A folder without train/ and test/ loads the same images for both splits: half of
    # them at most are held out, the rest teach the probe.
    same = train.images.shape == test.images.shape and np.array_equal(train.images, test.images)
    pool_images, pool_labels = test.images, test.labels
    most = len(pool_images) // 2 if same else len(pool_images)
    if anchors > most:
        raise typer.BadParameter(
            f"{dataset} can hold out {most} labelled images; ask for at most {most}",
            param_hint="--anchors",
        )
    chosen = held_out_indices(len(pool_images), anchors)
    if same:
        rest = np.setdiff1d(np.arange(len(train)), chosen)
        probe_x, probe_y = train.images[rest], train.labels[rest]
        source = "held out of the only split"
    else:
        probe_x, probe_y = train.images, train.labels
        source = "test split"
    if len(probe_x) > probe_images:
        keep = held_out_indices(len(probe_x), probe_images)
        probe_x, probe_y = probe_x[keep], probe_y[keep]
    if len(np.unique(probe_y)) < 2:
        raise typer.BadParameter(
            f"the probe's {len(probe_x)} training images hold one class only; raise --probe-images",
            param_hint="--probe-images",
        )
    return {
        "anchors": pool_images[chosen],
        "labels": pool_labels[chosen],
        "probe_images": probe_x,
        "probe_labels": probe_y,
        "source": source,
        "indices": chosen,
    }


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
