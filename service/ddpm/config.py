"""``DiffusionTrainConfig``: every option of ``clsp diffusion train``, its default, bounds and
help, defined once.

The command's options are generated from it (``service/ddpm/cli.py``), ``--config FILE``
is validated against it and ``DIR/config.yaml`` keeps it (docs/design.md §8); the
training loop (``service/ddpm/train.py``) takes it whole. Importing it does not import
torch, so ``clsp --help`` stays instant.

A few flags are named as ``clsp train`` names the same thing (``--image-size``,
``--lr-schedule``; ``--lr-warmup-steps`` beside its ``--lr-warmup-epochs``); their older
names stay aliases and the fields keep theirs, so recipes and written configs still load.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from clsp_positives.options import DEFAULT_TEXT, data_workers_field

COMMAND = "clsp diffusion train"


class DiffusionTrainConfig(BaseModel):
    """Options of one ``clsp diffusion train`` run (validated once, at the edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: str = Field(
        description="Model directory: the pipeline, the training state a second run "
        "resumes from, samples.png and the run's log (here or in --config)."
    )
    dataset: str = Field(
        "digits",
        description="digits, digits-photos, cifar10, cifar100, stl10, or an image-folder path.",
    )
    data_root: str | None = Field(
        None, description="Folder with torchvision's cifar10/cifar100/stl10 files."
    )
    download: bool = Field(False, description="Fetch the torchvision set to --data-root.")
    image_size: int | None = Field(
        None,
        ge=4,
        validation_alias=AliasChoices("image_size", "size"),  # its name before clsp train's
        description="Image side.",
        json_schema_extra={DEFAULT_TEXT: "the set's; digits 16, digits-photos 32"},
    )
    channels: Literal[1, 3] | None = Field(
        None, description="1 or 3.", json_schema_extra={DEFAULT_TEXT: "the set's"}
    )
    preset: str = Field(
        "small", description="UNet preset (tiny, small, ddpm-cifar10), or a UNet config .json."
    )
    steps: int | None = Field(
        None,
        ge=1,
        description="Total optimizer steps, across resumes (give --steps, --minutes or both: "
        "whichever comes first stops).",
    )
    minutes: float | None = Field(None, gt=0, description="Wall-clock budget of this run.")
    batch_size: int = Field(
        64,
        ge=1,
        description="Images per optimizer step: the global batch, split evenly over the "
        "ranks of a torchrun (docs/training.md, Training the DDPM at scale).",
    )
    lr: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    lr_warmup: int = Field(
        100,
        ge=0,
        # The unit named, beside clsp train's --lr-warmup-epochs; the field keeps its name.
        validation_alias=AliasChoices("lr_warmup_steps", "lr_warmup"),
        description="Linear learning-rate warm-up, in optimizer steps.",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="Learning-rate schedule after the warm-up: constant or cosine."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max gradient norm.")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay (with warm-up).")
    flip: bool | None = Field(
        None,
        description="Random horizontal flips.",
        # images.DIGIT_SETS, written out: importing images here would slow --help.
        json_schema_extra={DEFAULT_TEXT: "on, but not for digits, digits-photos"},
    )
    seed: int = Field(0, description="Seed of the initialisation, data order and noise.")
    save_every: int = Field(1000, ge=1, description="Checkpoint every N steps.")
    sample_count: int = Field(64, ge=0, description="Images in samples.png (0: none).")
    sample_steps: int = Field(50, ge=1, description="DDIM sampling steps of samples.png.")
    eval_every: int = Field(
        0,
        ge=0,
        description="Every N steps and at the end, FID and KID of --eval-samples EMA samples "
        "against as many training images, into metrics.jsonl, TensorBoard and the run's "
        "result; needs Inception weights (--fid-weights) and images of 32 pixels or more, "
        "else skipped with a line (docs/training.md, Sample quality: FID and KID; 0: off).",
    )
    eval_samples: int = Field(
        1000, ge=2, description="Generated (and real) images of each FID/KID evaluation."
    )
    eval_steps: int = Field(50, ge=1, description="DDIM sampling steps of those samples.")
    fid_weights: str | None = Field(
        None,
        description="Inception weights file of --eval-every (torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth); never downloaded.",
        json_schema_extra={DEFAULT_TEXT: "torch hub's cache, when the file is there"},
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads.", json_schema_extra={DEFAULT_TEXT: "torch's"}
    )
    device: str = Field(
        "cpu",
        description="torch device, e.g. cpu or cuda (under torchrun, cuda is each rank's "
        "LOCAL_RANK GPU).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Arithmetic of the UNet's forward and backward: bf16 autocast (CUDA, or a "
        "CPU with native bf16), fp16 autocast with a gradient scaler (CUDA only), or fp32; "
        "refused where it would be emulated. The weights, the EMA and the optimizer state "
        "stay fp32.",
    )
    data_workers: int = data_workers_field()
    progress: bool = Field(True, description="Progress bar.")
    tensorboard: bool = Field(
        False,
        description="TensorBoard events in --out/tensorboard: the window scalars, and a sample "
        "grid at every checkpoint (needs the tracking extra).",
    )
    calibrate: bool = Field(
        True,
        description="After training, measure which generation settings keep the anchor's "
        "class (clsp calibrate through a clsp serve of the new model, on the set's labelled "
        "held-out images) and store the choice in --out's clsp_generation.json, which every "
        "pool of the model then applies to the params a request leaves unset "
        "(docs/training.md). Skipped, with a line saying so, for a set without labels.",
    )
    calibrate_minutes: float = Field(
        3.0,
        gt=0,
        description="Budget of that calibration; the grid's settings left when it is spent "
        "are skipped.",
    )
    vae: str | None = Field(
        None,
        description="Autoencoder directory (AutoencoderKL or VQModel, or a pipeline with "
        "vae/ or vqvae/): train the UNet on its latents and save a latent model "
        "(docs/latent.md).",
    )

    @model_validator(mode="after")
    def _needs_a_budget(self) -> DiffusionTrainConfig:
        if self.steps is None and self.minutes is None:
            raise ValueError("give --steps or --minutes (or both: whichever comes first stops)")
        return self

    @property
    def use_flip(self) -> bool:
        from clsp_positives.images import DIGIT_SETS  # numpy and PIL: not at --help

        # Mirrored digits are not digits; natural images are symmetric enough.
        return self.flip if self.flip is not None else self.dataset.lower() not in DIGIT_SETS

    def resolved(self, image_size: int, channels: int) -> DiffusionTrainConfig:
        """This config with the defaults the data decides (the image side and channels
        of the loaded set, whether to flip) set to their values: what ``DIR/config.yaml``
        keeps, so ``--config DIR/config.yaml`` repeats the run (docs/design.md §8)."""
        return self.model_copy(
            update={"image_size": image_size, "channels": channels, "flip": self.use_flip}
        )
