"""``TrainConfig``: every option of ``clsp train``, its default, bounds and help, defined once.

The CLI, the checkpoints and docs/cli.md's table all derive from this model
(docs/design.md §8); the generation params' defaults and bounds are
``GenerationParams``'s own. Importing it does not import torch, so ``clsp --help``
stays instant.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from clsp_positives.options import DEFAULT_TEXT, data_workers_field, mirror_fields
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.method_defaults import (
    METHOD_DEFAULTS,
    METHOD_TITLES,
    MethodDefaults,
    MethodName,
)


def _shown(text: str) -> dict[str, Any]:
    """What ``--help`` and docs/cli.md show as the default of a field whose ``None``
    means "decided later"."""
    return {DEFAULT_TEXT: text}


NOT_GENERATION_OPTIONS = frozenset(
    {"k", "expect_model", "output", "deadline_ms", "priority", "cache"}
)
"""``GenerationParams`` fields that are no ``--gen-*`` option: ``k`` and ``expect_model``
are options of their own (``--k``, ``--expect-model``), ``output`` is ``clsp generate``'s,
``deadline_ms`` and ``priority`` are set per batch (``--pool-deadlines``), and ``cache``
is the client's business. Every other field, a new one too, is an option of ``clsp
train``, ``clsp generate`` and ``clsp calibrate`` with no edit there."""

GENERATION_OPTIONS = mirror_fields(
    GenerationParams,
    set(GenerationParams.model_fields) - NOT_GENERATION_OPTIONS,
    prefix="gen_",
    unprefixed={"interpolation_weight"},  # the CLSP term's knob, named as in the paper
    note="asked of the pool",
)
"""``--interpolation-weight`` and the ``--gen-*`` options: copies of ``GenerationParams``'s
fields (default, bounds, help), so that the trainer asks the pool for the service's
defaults and refuses what it would refuse; ``generation_params()`` maps them back."""


ClspMode = Literal["similarity", "contrastive"]


def _method_names() -> str:
    """The methods ``--method`` accepts, as its help lists them (``simclr, moco or nnclr``)."""
    *others, last = METHOD_DEFAULTS
    return f"{', '.join(others)} or {last}"


def _per_method(field: str) -> dict[str, Any]:
    """The default ``--help`` and docs/cli.md show for a field of ``METHOD_DEFAULTS``
    (trainer/method_defaults.py), read from the table (``SimCLR/MoCo 4096, NNCLR
    2048``), so it cannot drift."""
    groups: dict[Any, list[str]] = {}
    for name, defaults in METHOD_DEFAULTS.items():
        value = getattr(defaults, field)
        if value is not None:
            groups.setdefault(value, []).append(METHOD_TITLES[name])
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(METHOD_DEFAULTS):
        return _shown(f"{next(iter(groups)):g}")
    return _shown(", ".join(f"{'/'.join(names)} {value:g}" for value, names in groups.items()))


class TrainConfig(BaseModel):
    """Every option of ``clsp train``; stored in checkpoints (without the token)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "digits",
        description=(
            "digits, digits-photos, cifar10, cifar100, stl10 or an image folder "
            "(class sub-folders)."
        ),
    )
    data_root: str | None = Field(None, description="Where torchvision-format data sets live.")
    download: bool = Field(False, description="Download the data set into --data-root if missing.")
    image_size: int | None = Field(
        None, ge=4, description="Resize images to this side.", json_schema_extra=_shown("the set's")
    )
    channels: Literal[1, 3] | None = Field(
        None,
        description="Image channels: 1 (luminance) or 3 (RGB; grey repeated); an image "
        "folder reads as RGB.",
        json_schema_extra=_shown("the set's"),
    )
    data_workers: int = data_workers_field()
    subset: int | None = Field(
        None, ge=1, description="Train on the first N images only.", json_schema_extra=_shown("all")
    )
    train_split: Literal["train", "train+unlabeled"] = Field(
        "train",
        description="Images the contrastive loss trains on: train, or for stl10 "
        "train+unlabeled (its 100k unlabeled images too); the evaluation keeps the labelled "
        "train and test splits.",
    )
    method: MethodName = Field("simclr", description=f"Contrastive method: {_method_names()}.")
    backbone: str = Field("resnet18", description="resnet18, resnet50 or resnet-tiny.")
    epochs: int = Field(100, ge=1, description="Training epochs.")
    batch_size: int = Field(256, ge=2, description="Images per step per rank.")
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate.",
        json_schema_extra=_shown("SGD 0.3 x batch/256, AdamW 1e-3"),
    )
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd or adamw.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine",
        # --lr-schedule as in clsp diffusion train; the field keeps its name (checkpoints).
        validation_alias=AliasChoices("lr_schedule", "schedule"),
        description="Learning-rate schedule after the warm-up: cosine or constant.",
    )
    warmup_epochs: float = Field(
        0.0,
        ge=0,
        # --lr-warmup-epochs beside clsp diffusion train's --lr-warmup-steps: the unit named.
        validation_alias=AliasChoices("lr_warmup_epochs", "warmup_epochs"),
        description="Linear learning-rate warm-up, in epochs.",
    )
    lr_warmup_start: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the warm-up's first step (or epoch), rising linearly "
        "to the peak; the CLSP authors start at 1e-3 (none: peak / warm-up steps).",
    )
    lr_step_unit: Literal["step", "epoch"] = Field(
        "step",
        description="How often the learning rate changes: every step, or once per epoch as "
        "the CLSP authors' scheduler does (the warm-up then reaches the peak at its last "
        'epoch; docs/method.md, "The authors\' recipe").',
    )
    weight_decay: float | None = Field(
        None, ge=0, description="Weight decay.", json_schema_extra=_shown("SGD 1e-4, AdamW 1e-2")
    )
    temperature: float | None = Field(
        None, gt=0, description="InfoNCE temperature.", json_schema_extra=_per_method("temperature")
    )
    proj_hidden_dim: int | None = Field(
        None,
        ge=1,
        description="Projection MLP hidden width.",
        json_schema_extra=_per_method("proj_hidden_dim"),
    )
    proj_dim: int | None = Field(
        None, ge=1, description="Projection size.", json_schema_extra=_per_method("proj_dim")
    )
    proj_bn: bool = Field(
        True,
        description="BatchNorm after the projector's hidden layer (solo-learn's); the CLSP "
        "authors' projector has none (--no-proj-bn).",
    )
    pred_hidden_dim: int = Field(4096, ge=1, description="NNCLR predictor hidden width.")
    queue_size: int | None = Field(
        None,
        ge=1,
        description="MoCo queue / NNCLR support set (capped at the data set size).",
        json_schema_extra=_per_method("queue_size"),
    )
    moco_momentum: float = Field(0.99, ge=0, le=1, description="MoCo key encoder momentum.")
    moco_momentum_end: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Raise the MoCo momentum to this by the end of the run on a cosine "
        "(none: constant).",
    )
    view1_blur: float = Field(
        0.0, ge=0, le=1, description="Gaussian blur probability of the first view."
    )
    view2_blur: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Gaussian blur probability of the second view (and the positive's); "
        "BYOL-style recipes: 1.0 and 0.1.",
    )
    view1_solarize: float = Field(
        0.0, ge=0, le=1, description="Solarisation probability of the first view."
    )
    view2_solarize: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Solarisation probability of the second view (and the positive's); "
        "BYOL-style recipes: 0 and 0.2.",
    )
    clsp_weight: float = Field(0.0, ge=0, description="Weight of the CLSP term (0: the baseline).")
    clsp_weight_warmup_epochs: float = Field(
        0.0,
        ge=0,
        description="Raise the CLSP weight linearly from 0 to --clsp-weight over these "
        "epochs, step by step (0: the full weight from the start, as the authors do; "
        'docs/method.md, "Training dynamics").',
    )
    clsp_mode: ClspMode = Field(
        "similarity",
        description="similarity (2 - 2cos to the positive) or contrastive (one more InfoNCE "
        "positive).",
    )
    joint_forward: bool = Field(
        False,
        description="Forward both views and the positives through the backbone in one pass, "
        "BatchNorm over all of them, as the authors' code does (off: one pass per view).",
    )
    positives: str | None = Field(
        None, description="Generation pool: URL[,URL...] or dns+http://HOST:PORT."
    )
    positives_npy: str | None = Field(
        None, description="Offline positives [N, K, H, W, C] uint8 (from clsp generate)."
    )
    token: str | None = Field(
        None,
        description=f"Bearer token of the pool (better set {TOKEN_ENV}); never stored.",
    )
    k: int = Field(
        8,
        ge=1,
        validation_alias=AliasChoices("k", "candidates"),
        description="Candidates per image; one is drawn per epoch.",
    )
    prefetch: int = Field(4, ge=0, description="Batches of positives in flight ahead of training.")
    positives_deadline_ms: float = Field(
        100.0, ge=0, description="Longest wait for a step's positives."
    )
    positives_strict: bool = Field(
        False, description="Wait for every positive instead of the deadline."
    )
    pool_deadlines: bool = Field(
        True,
        description="Tell the pool when each batch's positives are needed (deadline_ms from "
        "the step time, priority 0 for the next step, 1 for look-ahead), so that a pool "
        "slower than training drops what would come too late (off: every request is served "
        "however late; docs/performance.md).",
    )
    allow_model_change: bool = Field(
        False,
        description="Take positives from whichever model the pool serves (by default the "
        "run pins the model of its first positives and skips generators of another).",
    )
    expect_model: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Model fingerprint (GET /v1/model, or a bank's .meta.json) every "
        "positive must come from: generators of another model are skipped, a "
        "--positives-npy bank of another is refused.",
        json_schema_extra=_shown("the first positives'; on --resume the checkpoint's"),
    )
    positives_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for one request to the pool."
    )
    GENERATION_OPTIONS.declare(locals())  # interpolation_weight, gen_steps, gen_eta, ...
    collapse_z_std: float = Field(
        0.2,
        ge=0,
        description="Warn once when an epoch's z_std (spread of the unit projections, ~1 "
        "healthy, 0 collapsed) falls below this (0: never).",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs (0: only at the end).")
    linear_epochs: int = Field(
        100,
        ge=0,
        description="Epochs of the standard linear protocol (solo-learn's: SGD on features "
        "of re-augmented images) at the final evaluation, its linear_acc comparable with "
        "published tables (0: skip).",
    )
    probe_epochs: int = Field(
        100,
        ge=1,
        description="Epochs of the fast linear probe (Adam on features of un-augmented "
        "images) at every evaluation, its probe_acc a cheap proxy.",
    )
    knn_k: int = Field(200, ge=1, description="Neighbours of the weighted kNN evaluation.")
    knn_tau: float = Field(0.1, gt=0, description="Temperature of the weighted kNN evaluation.")
    out: str | None = Field(
        None, description="Directory for checkpoint.pt, metrics.jsonl and curves.png."
    )
    resume: bool = Field(False, description="Continue the run in --out.")
    tensorboard: bool = Field(
        False,
        description="Write TensorBoard event files to --out DIR/tensorboard (needs the "
        "tracking extra).",
    )
    log_every: int = Field(20, ge=1, description="Steps between --tensorboard's step scalars.")
    log_images_every: int = Field(
        1,
        ge=0,
        description="Epochs between --tensorboard's grids of anchors beside their positives "
        "(0: none).",
    )
    seed: int = Field(0, description="Seed of data order, candidates, views and init.")
    device: str | None = Field(
        None, description="cpu, cuda or cuda:N.", json_schema_extra=_shown("auto")
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA.")
    progress: bool | None = Field(
        None, description="Progress bar.", json_schema_extra=_shown("on a terminal")
    )

    @model_validator(mode="after")
    def _one_model_rule(self) -> TrainConfig:
        """One model or any model: the two options contradict each other."""
        if self.expect_model is not None and self.allow_model_change:
            raise ValueError(
                "--expect-model takes positives of one model only, --allow-model-change "
                "of any: give one of them"
            )
        return self

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "adamw":
            return 1e-3
        return 0.06 * self.batch_size / 256 * 5  # SGD: 0.3 per 256 images

    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "sgd" else 1e-2

    def _method_default(self, name: str) -> Any:
        """The option ``name`` as given, else the method's default (trainer/method_defaults.py)."""
        given = {field: getattr(self, field) for field in MethodDefaults._fields}
        return getattr(METHOD_DEFAULTS[self.method].with_given(**given), name)

    def resolved_temperature(self) -> float:
        return float(self._method_default("temperature"))

    def resolved_proj_hidden_dim(self) -> int:
        return int(self._method_default("proj_hidden_dim"))

    def resolved_proj_dim(self) -> int:
        return int(self._method_default("proj_dim"))

    def resolved_queue_size(self) -> int | None:
        """None for a method that keeps no queue (SimCLR)."""
        value = self._method_default("queue_size")
        return None if value is None else int(value)

    def resolved(self) -> TrainConfig:
        """This config with every "decided later" default that the run decides
        from other fields (learning rate, weight decay, temperature, projection
        sizes, queue) set to its value: what ``DIR/config.yaml`` keeps, so loading
        it back gives the same run even after a default changes (docs/design.md §8)."""
        return self.model_copy(
            update={
                "lr": self.resolved_lr(),
                "weight_decay": self.resolved_weight_decay(),
                "temperature": self.resolved_temperature(),
                "proj_hidden_dim": self.resolved_proj_hidden_dim(),
                "proj_dim": self.resolved_proj_dim(),
                "queue_size": self.resolved_queue_size(),
            }
        )

    def generation_params(self, k: int | None = None) -> GenerationParams:
        """The generation params this config asks of the pool: the options given; the
        pool decides the rest from its model's stored settings (docs/api.md)."""
        return GenerationParams(
            **GENERATION_OPTIONS.values(self), k=k, expect_model=self.expect_model
        )

    def stored(self) -> dict[str, Any]:
        """The config as checkpoints and ``DIR/config.yaml`` keep it: resolved, so a
        run rebuilds the same model after a default changes, and never the bearer token.
        The generation options left unset stay out: they are the pool's to decide from
        its model's stored settings (docs/api.md), in the repeated run as in this one."""
        unset = {name for name in GENERATION_OPTIONS.names if name not in self.model_fields_set}
        return self.resolved().model_dump(exclude={"token"} | unset)
