"""The options that reproduce the CLSP authors' recipe and the CLSP weight's warm-up, in
real runs on digits (docs/method.md, "The authors' recipe"): the warm-up's weight is in
every epoch's record and a run preempted in the middle of it resumes exactly; the
authors' projector has no BatchNorm; their learning rate moves once per epoch from 1e-3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clsp_positives.images import load_images
from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.train_loop import train

N, BATCH = 96, 32  # three steps per epoch
BASE = dict(
    dataset="digits", backbone="resnet-tiny", proj_hidden_dim=32, linear_epochs=0,
    probe_epochs=2, knn_k=20, device="cpu", progress=False, subset=N, batch_size=BATCH,
    epochs=2, optimizer="sgd", lr=0.1,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bank(tmp_path: Path) -> str:
    """Each image and its mirror as its two candidates."""
    images = load_images("digits").images[:N]
    npy = tmp_path / "positives.npy"
    np.save(npy, np.ascontiguousarray(np.stack([images, images[:, :, ::-1]], axis=1)))
    return str(npy)


def _epochs(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


def test_the_clsp_weight_warms_up_step_by_step_and_resumes_exactly(tmp_path: Path) -> None:
    config = TrainConfig(
        **BASE, clsp_weight=0.8, positives_npy=_bank(tmp_path), k=2, positives_strict=True,
        clsp_weight_warmup_epochs=2, out=str(tmp_path / "a"),
    )  # fmt: skip
    straight = train(config, echo=lambda _: None)
    # The weight each epoch's last step had: steps 2 and 5 of a 6-step warm-up.
    weights = [r["clsp_weight"] for r in _epochs(tmp_path / "a")]
    assert weights == pytest.approx([0.8 * 2 / 6, 0.8 * 5 / 6])

    class Preempted(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1 "):
            raise Preempted

    resumable = config.model_copy(update={"out": str(tmp_path / "b")})
    with pytest.raises(Preempted):
        train(resumable, echo=stop_after_first_epoch)
    resumed = train(resumable.model_copy(update={"resume": True}), echo=lambda _: None)
    a, b = ckpt.load_checkpoint(tmp_path / "a"), ckpt.load_checkpoint(tmp_path / "b")
    assert b["config"]["clsp_weight_warmup_epochs"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["clsp_weight"] for r in _epochs(tmp_path / "b")] == pytest.approx(weights)
    assert straight.final is not None and resumed.final is not None
    assert straight.final.knn_acc == resumed.final.knn_acc


def test_without_a_warmup_the_weight_is_whole_from_the_first_step(tmp_path: Path) -> None:
    config = TrainConfig(
        **BASE, clsp_weight=0.8, positives_npy=_bank(tmp_path), k=2, positives_strict=True,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, echo=lambda _: None)
    assert all("clsp_weight" not in r for r in _epochs(tmp_path / "run"))


def test_the_authors_projector_and_per_epoch_learning_rate(tmp_path: Path) -> None:
    config = TrainConfig(
        **{**BASE, "epochs": 3}, proj_bn=False, lr_step_unit="epoch", warmup_epochs=2,
        lr_warmup_start=1e-3, out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, echo=lambda _: None)
    state = ckpt.load_checkpoint(tmp_path / "run")
    assert not [k for k in state["model"] if k.startswith("projector.") and "running_mean" in k]
    # An epoch's record has the rate after its last step, the next epoch's: the peak for
    # the warm-up's last epoch and the cosine's first, then the cosine's end (the first
    # epoch's 1e-3: tests/trainer/test_schedules.py).
    lrs = [r["lr"] for r in _epochs(tmp_path / "run")]
    assert lrs == pytest.approx([0.1, 0.1, 0.0], abs=1e-12)
    default = TrainConfig(**BASE)
    assert default.proj_bn and default.lr_step_unit == "step" and default.lr_warmup_start is None
