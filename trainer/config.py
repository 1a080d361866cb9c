"""``TrainConfig``: every option of ``clsp train``, its default, bounds and help, defined once.

The CLI, the checkpoints and the README's table all derive from this model
(docs/design.md §8); the generation params' defaults and bounds are
``GenerationParams``'s own. Importing it does not import torch, so ``clsp --help``
stays instant.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

from clsp_positives.options import DEFAULT_TEXT
from clsp_positives.proto.auth import TOKEN_ENV
from clsp_positives.proto.params import GenerationParams, Method, Sampling


def _shown(text: str) -> dict[str, Any]:
    """What ``--help`` and the README show as the default of a field whose ``None``
    means "decided later"."""
    return {DEFAULT_TEXT: text}


def _generation(name: str) -> Any:
    """A copy of ``GenerationParams``'s field: its default and bounds, so that the
    trainer asks the pool for the service's defaults and refuses what it would refuse."""
    source = GenerationParams.model_fields[name]
    return FieldInfo.merge_field_infos(
        source, description=f"{(source.description or '').rstrip('.')}; asked of the pool."
    )


MethodName = Literal["simclr", "moco", "nnclr"]
ClspMode = Literal["similarity", "contrastive"]


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
    subset: int | None = Field(
        None, ge=1, description="Train on the first N images only.", json_schema_extra=_shown("all")
    )
    method: MethodName = Field("simclr", description="Contrastive method: simclr, moco or nnclr.")
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
        "cosine", description="Learning-rate schedule after the warm-up: cosine or constant."
    )
    warmup_epochs: float = Field(0.0, ge=0, description="Linear learning-rate warm-up, in epochs.")
    weight_decay: float | None = Field(
        None, ge=0, description="Weight decay.", json_schema_extra=_shown("SGD 1e-4, AdamW 1e-2")
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="InfoNCE temperature.",
        json_schema_extra=_shown("SimCLR 0.5, MoCo/NNCLR 0.2"),
    )
    proj_hidden_dim: int = Field(2048, ge=1, description="Projection MLP hidden width.")
    proj_dim: int | None = Field(
        None, ge=1, description="Projection size.", json_schema_extra=_shown("128, NNCLR 256")
    )
    pred_hidden_dim: int = Field(4096, ge=1, description="NNCLR predictor hidden width.")
    queue_size: int = Field(
        65536, ge=1, description="MoCo queue / NNCLR support set (capped at the data set size)."
    )
    moco_momentum: float = Field(0.99, ge=0, le=1, description="MoCo key encoder momentum.")
    clsp_weight: float = Field(0.0, ge=0, description="Weight of the CLSP term (0: the baseline).")
    clsp_mode: ClspMode = Field(
        "similarity",
        description="similarity (2 - 2cos to the positive) or contrastive (one more InfoNCE "
        "positive).",
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
    positives_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for one request to the pool."
    )
    interpolation_weight: float = _generation("interpolation_weight")
    gen_steps: int = _generation("steps")
    gen_eta: float = _generation("eta")
    gen_method: Method = _generation("method")
    gen_sampling: Sampling | None = _generation("sampling")
    collapse_z_std: float = Field(
        0.2,
        ge=0,
        description="Warn once when an epoch's z_std (spread of the unit projections, ~1 "
        "healthy, 0 collapsed) falls below this (0: never).",
    )
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs (0: only at the end).")
    linear_epochs: int = Field(100, ge=1, description="Linear probe epochs.")
    knn_k: int = Field(200, ge=1, description="Neighbours of the weighted kNN evaluation.")
    knn_tau: float = Field(0.1, gt=0, description="Temperature of the weighted kNN evaluation.")
    out: str | None = Field(None, description="Directory for checkpoint.pt and metrics.jsonl.")
    resume: bool = Field(False, description="Continue the run in --out.")
    seed: int = Field(0, description="Seed of data order, candidates, views and init.")
    device: str | None = Field(
        None, description="cpu, cuda or cuda:N.", json_schema_extra=_shown("auto")
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA.")
    progress: bool | None = Field(
        None, description="Progress bar.", json_schema_extra=_shown("on a terminal")
    )

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

    def generation_params(self, k: int | None = None) -> GenerationParams:
        """The generation params this config asks of the pool."""
        return GenerationParams(
            interpolation_weight=self.interpolation_weight,
            steps=self.gen_steps,
            eta=self.gen_eta,
            method=self.gen_method,
            sampling=self.gen_sampling,
            k=k,
        )

    def stored(self) -> dict[str, Any]:
        """The config as checkpoints keep it: never the bearer token."""
        return self.model_dump(exclude={"token"})
