"""``clsp generate``: K candidates for every image of a data set, through the pool,
into the paper's offline layout ``[N, K, H, W, C]`` uint8 (docs/design.md §5), or with
``--output latents`` a latent model's ``[N, K, c, h, w]`` float16 latents (docs/latent.md).

The file format, its sidecars and the resumable writing are in
``trainer/positives/offline.py``, beside the reader; this module is the command.
The options it shares with ``clsp train`` (``--k``, the token, the data set's folder)
are copies of ``TrainConfig``'s fields, and its generation options are the same copies
of ``GenerationParams``'s (``GENERATION_OPTIONS``), so both commands name them alike
and take one set of defaults (docs/design.md §8).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

from clsp_positives.config_file import CONFIG_HELP
from clsp_positives.options import (
    DEFAULT_TEXT,
    describe_errors,
    primary_flag,
    with_model_options,
)
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.model_settings import as_pool_applies
from clsp_positives.proto.params import GenerationParams, Output
from clsp_positives.trainer.config import GENERATION_OPTIONS, TrainConfig
from clsp_positives.trainer.positives.offline import (
    OfflineNpySource,
    config_path,
    fill,
    finish,
    open_output,
    progress_path,
    rows_done,
)

COMMAND = "clsp generate"

SHARED = ("data_root", "download", "token", "k", *GENERATION_OPTIONS.names)
"""``TrainConfig`` fields that are ``clsp generate`` options too (``GenerateConfig`` copies
the first four and declares the same generation options, so the two commands take one
definition)."""


def _shared(name: str) -> Any:
    """A copy of ``TrainConfig``'s field (default, bounds, help and old names), so both
    commands name the option alike and take one default (docs/design.md §8)."""
    return FieldInfo.merge_field_infos(TrainConfig.model_fields[name])


class GenerateConfig(BaseModel):
    """Every option of ``clsp generate``: the command's options are generated from it,
    ``--config FILE`` is validated against it, and ``<bank>.config.yaml`` keeps it."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="digits, digits-photos, cifar10, cifar100, stl10 or an image folder."
    )
    out: Path = Field(description="Output .npy ([N, K, H, W, C] uint8).")
    positives: str = Field(description="Generation pool: URL[,URL...] or dns+http://HOST:PORT.")
    split: str = Field(
        "train",
        description="train or test; for stl10 also unlabeled, or train+unlabeled (the images "
        "clsp train --train-split train+unlabeled trains on).",
    )
    image_size: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("image_size", "size"),
        description="Image side.",
        json_schema_extra={DEFAULT_TEXT: "the model's sample size"},
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 or 3.", json_schema_extra={DEFAULT_TEXT: "the model's"}
    )
    batch_size: int = Field(64, ge=1, description="Images per request.")
    in_flight: int = Field(4, ge=1, description="Requests in flight.")
    timeout_s: float = Field(
        600.0,
        gt=0,
        # Named as clsp train's --positives-timeout-s; the field keeps its name (bank configs).
        validation_alias=AliasChoices("positives_timeout_s", "timeout_s"),
        description="Longest wait for one request to the pool.",
    )
    progress: bool = Field(True, description="Progress bar.")
    grid: Path | None = Field(
        None,
        description="Also write a PNG of anchors beside their k candidates (one anchor per class).",
    )
    grid_rows: int = Field(10, ge=1, description="Anchors in the --grid PNG.")
    output: Output = Field(
        "images",
        description="images: uint8 pictures; latents: a latent model's float16 [N, K, c, h, w] "
        "latents, a quarter of the pictures' bytes for 4x16x16 against 64x64x3 (for "
        "trainers that decode themselves; docs/latent.md).",
    )
    data_root: str | None = _shared("data_root")
    download: bool = _shared("download")
    token: str | None = _shared("token")
    k: int = _shared("k")
    GENERATION_OPTIONS.declare(locals())  # interpolation_weight, gen_steps, gen_eta, ...

    @model_validator(mode="after")
    def _grid_draws_pictures(self) -> GenerateConfig:
        if self.grid is not None and self.output != "images":
            raise ValueError("--grid draws pictures: drop it, or generate --output images")
        return self

    def generation_params(self) -> GenerationParams:
        """The generation params asked of the pool: the mirror's way back, as ``clsp
        train`` builds them, with this command's ``k`` and ``output``."""
        return GenerationParams(**GENERATION_OPTIONS.values(self), k=self.k, output=self.output)

    def stored(self) -> dict[str, Any]:
        """What ``<bank>.config.yaml`` keeps: every option, never the bearer token."""
        return self.model_dump(mode="json", exclude={"token"})


@with_model_options(GenerateConfig, GenerateConfig.model_fields, envvars={"token": TOKEN_ENV})
def generate(
    config_file: Optional[Path] = typer.Option(
        None, "--config", help=CONFIG_HELP, show_default=False
    ),
    *,
    given: dict[str, Any],
) -> None:
    """Generate k synthetic positives per image into a resumable .npy (the paper's layout)."""
    from tqdm import tqdm

    from clsp_positives.client import PoolClient, PoolError
    from clsp_positives.config_file import (
        OptionsError,
        announcement,
        resolve_options,
        write_config_file,
    )
    from clsp_positives.images import load_images

    try:
        config = resolve_options(GenerateConfig, config_file, given, command=COMMAND)
        params = config.generation_params()
    except (OptionsError, ValidationError) as exc:
        named = partial(primary_flag, GenerateConfig)
        message = describe_errors(exc, named) if isinstance(exc, ValidationError) else str(exc)
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None
    out, k = config.out, config.k
    try:
        client = PoolClient(config.positives, token=config.token, timeout_s=config.timeout_s)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positives") from None
    try:
        info = client.model_info()
        data = load_images(
            config.dataset,
            split=config.split,
            size=config.image_size or int(info["sample_size"]),
            channels=config.channels or int(info["channels"]),
            root=config.data_root,
            download=config.download,
        )
        images = data.images
        # What the pool gives the params left unset (the model's stored settings, its
        # sampling mode) is asked explicitly, so the file says how its positives were
        # made (docs/design.md §1, §6).
        params = as_pool_applies(params, info)
        # Every row from the model the file names: generators of another model in the
        # pool refuse these requests and the client sends them elsewhere.
        params = params.model_copy(update={"expect_model": info.get("fingerprint")})
        item_shape, dtype = _bank_item(config.output, images.shape[1:], info)
        meta = {
            "dataset": config.dataset,
            "split": config.split,
            "shape": [len(images), k, *item_shape],
            "params": json.loads(params.canonical()),
            "model": info.get("fingerprint"),
        }
        if config.output != "images":  # banks of pictures keep the sidecar they always had
            meta["output"] = config.output
        array, done = open_output(out, (len(images), k, *item_shape), meta, dtype)
        # Only once the bank accepted these options: a refused rerun keeps the file's.
        resolved = config.model_copy(
            update={
                "image_size": data.size,
                "channels": data.channels,
                **{opt: getattr(params, name) for opt, name in GENERATION_OPTIONS.names.items()},
            }
        )
        path = write_config_file(config_path(out), resolved.stored(), command=COMMAND)
        typer.echo(announcement(resolved.stored(), command=COMMAND, path=path))
        if array is None:
            typer.echo(f"{out} is already complete ({len(images)} x {k})")
            _write_grid(config.grid, out, data, config.grid_rows)
            return
        with tqdm(
            total=len(done),
            initial=int(done.sum()),
            unit="img",
            disable=not config.progress,
            desc="generate",
        ) as bar:
            totals = fill(
                array,
                done,
                images,
                lambda a: client.submit(a, None, params),
                batch_size=config.batch_size,
                in_flight=config.in_flight,
                progress_file=progress_path(out),
                advance=lambda rows, hits: bar.update(rows),
            )
        del array
        finish(out)
        stats = client.stats()
        typer.echo(
            f"wrote {out}: {len(images)} x {k} positives "
            f"({totals['rows']} rows this run, {totals['cache_hits']} cache hits, "
            f"{stats.failovers} failovers, {stats.errors} errors)"
        )
        _write_grid(config.grid, out, data, config.grid_rows)
    except (PoolError, ValueError, FileNotFoundError) as exc:
        progress = rows_done(out)
        done_note = (
            ""
            if progress is None
            else f" ({progress[0]} of {progress[1]} rows done; rerun to continue)"
        )
        typer.echo(f"clsp generate: {exc}{done_note}", err=True)
        raise typer.Exit(1) from None
    finally:
        client.close()


def _bank_item(
    output: str, image_shape: tuple[int, ...], info: dict[str, Any]
) -> tuple[tuple[int, ...], Any]:
    """One positive's shape and dtype in the bank: the picture's, or a latent model's
    ``[c, h, w]`` latents in float16 (``GET /v1/model``'s latent fields)."""
    import numpy as np

    if output == "images":
        return tuple(image_shape), np.uint8
    if info.get("latent_channels") is None:
        raise ValueError(
            f"--output latents needs a latent model, but the pool serves "
            f"{info.get('fingerprint')}, a pixel model: drop --output latents"
        )
    size = int(info["latent_size"])
    return (int(info["latent_channels"]), size, size), np.float16


def _write_grid(grid: Path | None, out: Path, data: Any, rows: int) -> None:
    """The finished bank's first image of each class (the first images when a set has no
    labels) beside its candidates, as ``clsp demo`` draws them."""
    if grid is None:
        return
    import numpy as np

    from clsp_positives.grid import grid_anchors, write_grid

    source = OfflineNpySource(out)  # the one reader of banks (no pickles, shape checked)
    bank = source.array
    labelled = data.labels >= 0
    picks = (
        grid_anchors(data.labels, rows)
        if labelled.all()
        else np.arange(min(rows, len(data.images)), dtype=np.int64)
    )
    width, height = write_grid(data.images[picks], np.asarray(bank[picks]), grid)
    source.close()
    typer.echo(f"wrote {grid} ({width}x{height}: {len(picks)} anchors x {bank.shape[1]})")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
