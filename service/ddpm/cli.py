"""``clsp diffusion ...``: train the diffusion models the service samples from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clsp_positives.config_file import CONFIG_HELP

diffusion_app = typer.Typer(
    help="Train and inspect the diffusion models the service samples from.", no_args_is_help=True
)


@diffusion_app.command("train")
def train(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(
        None, "--config", help=CONFIG_HELP, show_default=False
    ),
    out: Optional[str] = typer.Option(
        None,
        "--out",
        help="Model directory; resumes when it holds a state (required, here or in --config).",
        show_default=False,
    ),
    dataset: str = typer.Option(
        "digits",
        "--dataset",
        help="digits, digits-photos, cifar10, cifar100, stl10, or an image-folder path.",
    ),
    data_root: Optional[str] = typer.Option(
        None, "--data-root", help="Folder with torchvision's cifar10/cifar100/stl10 files."
    ),
    download: bool = typer.Option(False, "--download", help="Fetch the torchvision set to root."),
    image_size: Optional[int] = typer.Option(
        None,
        "--image-size",
        "--size",
        help="Image side (default: the set's; digits 16, digits-photos 32).",
    ),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 or 3."),
    preset: str = typer.Option("small", "--preset", help="UNet preset, or a UNet config .json."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimizer steps."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Time budget of this run."),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(2e-4, "--lr", help="Peak AdamW learning rate."),
    lr_warmup: int = typer.Option(100, "--lr-warmup", help="Linear warm-up steps."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant or cosine."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm."),
    ema_decay: float = typer.Option(0.999, "--ema-decay", help="EMA decay (with warm-up)."),
    flip: Optional[bool] = typer.Option(
        None,
        "--flip/--no-flip",
        help="Random horizontal flips (default: not for digits, digits-photos).",
    ),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(1000, "--save-every", help="Checkpoint every N steps."),
    sample_count: int = typer.Option(64, "--sample-count", help="Images in samples.png (0: none)."),
    sample_steps: int = typer.Option(50, "--sample-steps", help="DDIM steps for samples.png."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    tensorboard: bool = typer.Option(
        False,
        "--tensorboard",
        help="TensorBoard events in --out/tensorboard: loss, learning rate, images/s and "
        "sample grids (needs the tracking extra).",
    ),
    vae: Optional[str] = typer.Option(
        None,
        "--vae",
        help="Autoencoder directory (AutoencoderKL or VQModel, or a pipeline with vae/ or "
        "vqvae/): train the UNet on its latents and save a latent model (docs/latent.md).",
        show_default=False,
    ),
) -> None:
    """Train an unconditional DDPM (EMA weights saved in the diffusers pipeline layout)."""
    from clsp_positives.config_file import (
        OptionsError,
        announcement,
        given_on_command_line,
        resolve_options,
    )
    from clsp_positives.service.ddpm.train import COMMAND, DiffusionTrainConfig
    from clsp_positives.service.ddpm.train import train as run_training

    # Every option but --config is a DiffusionTrainConfig field of the same name.
    given = given_on_command_line(ctx, [n for n in ctx.params if n != "config_file"])
    try:
        config = resolve_options(DiffusionTrainConfig, config_file, given, command=COMMAND)
    except OptionsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    def show(resolved: DiffusionTrainConfig, path: Path) -> None:
        typer.echo(announcement(resolved.model_dump(mode="json"), command=COMMAND, path=path))

    try:
        result = run_training(config, on_start=show)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    resumed = f" (resumed at step {result.start_step})" if result.start_step else ""
    typer.echo(
        f"trained to step {result.step}{resumed} in {result.seconds:.0f}s, "
        f"{result.images_per_s:.0f} images/s, loss {result.loss:.4f}, "
        f"{result.parameters / 1e6:.2f}M parameters -> {result.out}"
    )
