"""``clsp diffusion ...``: train the diffusion models the service samples from.

``clsp diffusion train``'s options are generated from ``DiffusionTrainConfig``
(``service/ddpm/config.py``; one per field, its default and help included), so the
model is the only place they are defined (docs/design.md §8). ``--config FILE`` is the
command's own option, not a field: it fills what the flags leave out
(``clsp_positives/config_file.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from clsp_positives.config_file import CONFIG_HELP
from clsp_positives.options import with_model_options
from clsp_positives.service.ddpm.config import COMMAND, DiffusionTrainConfig

diffusion_app = typer.Typer(
    help="Train and inspect the diffusion models the service samples from.", no_args_is_help=True
)


@diffusion_app.command("train")
@with_model_options(DiffusionTrainConfig, DiffusionTrainConfig.model_fields)
def train(
    config_file: Optional[Path] = typer.Option(
        None, "--config", help=CONFIG_HELP, show_default=False
    ),
    *,
    given: dict[str, Any],
) -> None:
    """Train an unconditional DDPM (EMA weights saved in the diffusers pipeline layout)."""
    from clsp_positives.config_file import OptionsError, announcement, resolve_options
    from clsp_positives.service.ddpm import train as training  # torch: not at --help

    try:
        config = resolve_options(DiffusionTrainConfig, config_file, given, command=COMMAND)
    except OptionsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    def show(resolved: DiffusionTrainConfig, path: Path) -> None:
        typer.echo(announcement(resolved.model_dump(mode="json"), command=COMMAND, path=path))

    try:
        result = training.train(config, on_start=show)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not result.is_main:
        # Under torchrun rank 0 reports and calibrates, after every rank has passed the
        # closing barrier (docs/training.md, "Training the DDPM at scale").
        return
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    typer.echo(
        f"trained to step {result.step}{resumed} in {result.seconds:.0f}s, "
        f"{result.images_per_s:.0f} images/s, loss {result.loss:.4f}, "
        f"{result.parameters / 1e6:.2f}M parameters -> {result.out}"
    )
    if result.quality is not None:
        q = result.quality
        typer.echo(
            f"sample quality at step {result.step}: FID {q.fid:.2f}, "
            f"KID {q.kid:.4f} ± {q.kid_std:.4f} ({q.samples} EMA samples)"
        )
    if config.calibrate:
        from clsp_positives.closing_calibration import calibrate_trained

        typer.echo(
            f"calibrating the generation settings for up to {config.calibrate_minutes:g} min "
            "(--no-calibrate skips it)"
        )
        calibrate_trained(config, Path(result.out), say=typer.echo)
