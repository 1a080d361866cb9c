"""``TrainConfig``: every option of ``clsp train``, its default, bounds and help, defined once.

The CLI, the checkpoints and the README's table all derive from this model
(docs/design.md, "Configuration").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clsp_positives.trainer.methods import MethodConfig


class TrainConfig(BaseModel):
    """Every option of ``clsp train``; stored in checkpoints (without the token)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = Field(None, ge=4)
    subset: int | None = Field(None, ge=1, description="Train on the first N images only.")
    method: Literal["simclr", "moco", "nnclr"] = "simclr"
    backbone: str = "resnet18"
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float | None = Field(None, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    weight_decay: float | None = Field(None, ge=0)
    temperature: float | None = Field(None, gt=0)
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int | None = Field(None, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    queue_size: int = Field(65536, ge=1)
    moco_momentum: float = Field(0.99, ge=0, le=1)
    clsp_weight: float = Field(0.0, ge=0)
    clsp_mode: Literal["similarity", "contrastive"] = "similarity"
    positives: str | None = None
    positives_npy: str | None = None
    token: str | None = None
    candidates: int = Field(8, ge=1)
    prefetch: int = Field(4, ge=0)
    positives_deadline_ms: float = Field(100.0, ge=0)
    positives_strict: bool = False
    positives_timeout_s: float = Field(30.0, gt=0)
    interpolation_weight: float = Field(0.1, ge=0, le=1)
    gen_steps: int = Field(100, ge=1, le=1000)
    gen_eta: float = Field(0.1, ge=0, le=1)
    gen_method: Literal["ddim", "ddpm"] = "ddim"
    eval_every: int = Field(0, ge=0)
    linear_epochs: int = Field(100, ge=1)
    knn_k: int = Field(200, ge=1)
    knn_tau: float = Field(0.1, gt=0)
    out: str | None = None
    resume: bool = False
    seed: int = 0
    device: str | None = None
    amp: bool = True
    progress: bool | None = None

    def method_config(self) -> MethodConfig:
        return MethodConfig(
            name=self.method,
            temperature=self.temperature,
            proj_hidden_dim=self.proj_hidden_dim,
            proj_dim=self.proj_dim or (256 if self.method == "nnclr" else 128),
            pred_hidden_dim=self.pred_hidden_dim,
            clsp_weight=self.clsp_weight,
            clsp_mode=self.clsp_mode,
            queue_size=self.queue_size,
            momentum=self.moco_momentum,
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

    def stored(self) -> dict[str, Any]:
        """The config as checkpoints keep it: never the bearer token."""
        return self.model_dump(exclude={"token"})
