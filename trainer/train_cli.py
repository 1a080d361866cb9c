"""``clsp train`` and ``clsp eval``: thin wrappers that validate options into a
``TrainConfig`` and call the training loop or the evaluation."""

from __future__ import annotations

import json
from typing import Optional

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def train_command(
    dataset: str = typer.Option(
        "digits", help="digits, cifar10, cifar100, stl10 or an image folder."
    ),
    data_root: Optional[str] = typer.Option(None, help="Where torchvision-format data sets live."),
    download: bool = typer.Option(False, help="Download the data set into --data-root if missing."),
    image_size: Optional[int] = typer.Option(None, help="Resize images (default: the set's own)."),
    subset: Optional[int] = typer.Option(None, help="Train on the first N images only."),
    method: str = typer.Option("simclr", help="simclr, moco or nnclr."),
    backbone: str = typer.Option("resnet18", help="resnet18, resnet50 or resnet-tiny."),
    epochs: int = typer.Option(100, help="Training epochs."),
    batch_size: int = typer.Option(256, help="Images per step per rank."),
    lr: Optional[float] = typer.Option(
        None, help="Peak LR (default: SGD 0.3 x batch/256, AdamW 1e-3)."
    ),
    optimizer: str = typer.Option("sgd", help="sgd or adamw."),
    schedule: str = typer.Option("cosine", help="cosine or constant (after warm-up)."),
    warmup_epochs: float = typer.Option(0.0, help="Linear LR warm-up, in epochs."),
    weight_decay: Optional[float] = typer.Option(None, help="Default: SGD 1e-4, AdamW 1e-2."),
    temperature: Optional[float] = typer.Option(None, help="Default: SimCLR 0.5, MoCo/NNCLR 0.2."),
    proj_hidden_dim: int = typer.Option(2048, help="Projection MLP hidden width."),
    proj_dim: Optional[int] = typer.Option(None, help="Projection size (default 128; NNCLR 256)."),
    pred_hidden_dim: int = typer.Option(4096, help="NNCLR predictor hidden width."),
    queue_size: int = typer.Option(65536, help="MoCo queue / NNCLR support set (capped at N)."),
    moco_momentum: float = typer.Option(0.99, help="MoCo key encoder momentum."),
    clsp_weight: float = typer.Option(0.0, help="Weight of the CLSP term (0 = the baseline)."),
    clsp_mode: str = typer.Option("similarity", help="similarity or contrastive."),
    positives: Optional[str] = typer.Option(None, help="Generation pool URL[,URL...]."),
    positives_npy: Optional[str] = typer.Option(None, help="Offline positives [N,K,H,W,C] uint8."),
    token: Optional[str] = typer.Option(None, envvar="CLSP_API_TOKEN", help="Bearer token."),
    candidates: int = typer.Option(8, help="Candidates per image (K); one is drawn per epoch."),
    prefetch: int = typer.Option(4, help="Batches of positives in flight ahead of training."),
    positives_deadline_ms: float = typer.Option(100.0, help="Longest wait for a step's positives."),
    positives_strict: bool = typer.Option(False, help="Wait for every positive instead."),
    interpolation_weight: float = typer.Option(0.1, help="Generation: interpolation weight."),
    gen_steps: int = typer.Option(100, help="Generation: sampling steps."),
    gen_eta: float = typer.Option(0.1, help="Generation: DDIM eta."),
    gen_method: str = typer.Option("ddim", help="Generation: ddim or ddpm."),
    eval_every: int = typer.Option(0, help="Evaluate every N epochs (0: only at the end)."),
    linear_epochs: int = typer.Option(100, help="Linear probe epochs."),
    knn_k: int = typer.Option(200, help="kNN neighbours."),
    knn_tau: float = typer.Option(0.1, help="kNN temperature."),
    out: Optional[str] = typer.Option(None, help="Directory for checkpoint.pt and metrics.jsonl."),
    resume: bool = typer.Option(False, help="Continue the run in --out."),
    seed: int = typer.Option(0, help="Seed of data order, candidates, views and init."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: auto)."),
    amp: bool = typer.Option(True, help="bf16 autocast on CUDA."),
    progress: Optional[bool] = typer.Option(None, help="Progress bar (default: on a terminal)."),
) -> None:
    """Train a contrastive model, optionally with synthetic positives from a pool."""
    from pydantic import ValidationError

    from clsp_positives.trainer.config import TrainConfig
    from clsp_positives.trainer.train_loop import train

    options = dict(locals())
    options.pop("ValidationError", None)
    options.pop("TrainConfig", None)
    options.pop("train", None)
    try:
        config = TrainConfig(**options)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "--" + str(first["loc"][0]).replace("_", "-")
        _fail(f"{name}: {first['msg']}")
    try:
        result = train(config, echo=typer.echo)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if result.final is not None:
        f = result.final
        typer.echo(
            f"final: linear accuracy {f.linear_acc:.2%}, kNN accuracy {f.knn_acc:.2%} "
            f"({f.train_size} train / {f.test_size} test images)"
        )


def eval_command(
    checkpoint: str = typer.Argument(..., help="checkpoint.pt or the run's --out directory."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: auto)."),
    data_root: Optional[str] = typer.Option(None, help="Override the run's --data-root."),
    linear_epochs: Optional[int] = typer.Option(None, help="Linear probe epochs."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Linear probe and weighted kNN accuracy of a checkpoint's frozen backbone."""
    from clsp_positives.trainer.train_loop import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(
            checkpoint, device=device, data_root=data_root, linear_epochs=linear_epochs
        )
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        typer.echo(f"linear accuracy {result.linear_acc:.2%}, kNN accuracy {result.knn_acc:.2%}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
