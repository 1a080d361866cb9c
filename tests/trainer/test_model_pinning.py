"""A run's positives come from one model (docs/reliability.md, "Model pinning"): the
fingerprint pinned at the first positives (or named by ``--expect-model``) is kept in
the checkpoint and pinned again on ``--resume``, so a pool that now serves another
model is unavailable to the resumed run, and an offline bank made by another model is
refused at start. Real ``train()`` runs on a digits subset against stub generators
(real uvicorn, real HTTP) that report a fingerprint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.images import load_images
from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.positives.offline import meta_path
from clsp_positives.trainer.train_loop import train
from tests.support.servers import ServerProcess
from tests.support.stub_pool import counters, stub_server

N = 64
BASE = dict(
    dataset="digits", backbone="resnet-tiny", proj_hidden_dim=32, linear_epochs=0,
    probe_epochs=5, device="cpu", progress=False, subset=N, batch_size=32, knn_k=20,
    clsp_weight=1.0, k=1, prefetch=1, positives_deadline_ms=2000,
)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Preempted(Exception):
    pass


def _stop_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1 "):
        raise _Preempted


def _epochs(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


def _resume(out: Path, **changes: Any) -> list[str]:
    """Resume the run in ``out`` to its end; the lines it echoed."""
    said: list[str] = []
    train(TrainConfig(**{**BASE, "epochs": 2, "out": str(out), "resume": True, **changes}),
          echo=said.append)  # fmt: skip
    return said


@pytest.fixture(scope="module")
def stubs() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    with (
        stub_server(STUB_FINGERPRINT="model-a") as a,
        stub_server(STUB_FINGERPRINT="model-b") as b,
    ):
        yield a, b


@pytest.fixture(scope="module")
def first_epoch(stubs, tmp_path_factory) -> Path:
    """A run preempted after its first epoch, its positives from model-a's generator."""
    out = tmp_path_factory.mktemp("pinned") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(**BASE, epochs=2, positives=stubs[0].url, out=str(out))
        with pytest.raises(_Preempted):
            train(cfg, echo=_stop_after_first_epoch)
    finally:
        torch.set_num_threads(before)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_the_checkpoint_keeps_the_pinned_model(first_epoch: Path) -> None:
    assert ckpt.load_checkpoint(first_epoch)[ckpt.PINNED_MODEL] == "model-a"
    [epoch] = _epochs(first_epoch)
    assert epoch["model"] == "model-a" and epoch["positive_fraction"] > 0


def test_a_resumed_run_skips_a_pool_now_serving_another_model(
    first_epoch: Path, stubs, tmp_path: Path
) -> None:
    """The pool was updated to model-b while the run was down: the resumed run takes
    none of its positives (trains as the baseline) and says why at start."""
    a, b = stubs
    out = _copy(first_epoch, tmp_path)
    served_before = counters(b)["items"]
    said = _resume(out, positives=b.url)
    assert any("positives pinned to model model-a" in line for line in said), said
    last = _epochs(out)[-1]
    assert last["epoch"] == 1 and last["model"] == "model-a"
    assert last["positive_fraction"] == 0.0 and last["missing"] == N
    assert counters(b)["items"] == served_before  # every request refused (409), none used
    assert ckpt.load_checkpoint(out)[ckpt.PINNED_MODEL] == "model-a"

    # With model-a back beside it, the pinned model's generator serves every positive.
    again = _copy(first_epoch, tmp_path / "again")
    _resume(again, positives=f"{b.url},{a.url}")
    last = _epochs(again)[-1]
    assert last["model"] == "model-a" and last["positive_fraction"] == 1.0
    assert counters(b)["items"] == served_before


def test_allow_model_change_takes_the_new_model(first_epoch: Path, stubs, tmp_path: Path) -> None:
    _, b = stubs
    out = _copy(first_epoch, tmp_path)
    served_before = counters(b)["items"]
    _resume(out, positives=b.url, allow_model_change=True)
    last = _epochs(out)[-1]
    assert last["positive_fraction"] == 1.0 and "model" not in last
    assert counters(b)["items"] == served_before + N
    assert ckpt.load_checkpoint(out)[ckpt.PINNED_MODEL] is None


def test_a_checkpoint_from_before_the_pin_pins_its_first_positives_again(
    first_epoch: Path, stubs, tmp_path: Path
) -> None:
    _, b = stubs
    out = _copy(first_epoch, tmp_path)
    state = ckpt.load_checkpoint(out)
    del state[ckpt.PINNED_MODEL], state["format"]
    ckpt.save_checkpoint(out / ckpt.CHECKPOINT_NAME, state)
    said = _resume(out, positives=b.url)
    assert not any("pinned" in line for line in said), said
    last = _epochs(out)[-1]
    assert last["model"] == "model-b" and last["positive_fraction"] == 1.0
    assert ckpt.load_checkpoint(out)[ckpt.PINNED_MODEL] == "model-b"


# ----------------------------------------------------------------- offline banks


def _bank(path: Path, model: str | None) -> Path:
    """One 'positive' per image (the image itself) for the first N digits, with the
    ``.meta.json`` that ``clsp generate`` writes naming ``model``."""
    images = load_images("digits").images[:N]
    np.save(path, np.ascontiguousarray(images[:, None]))
    if model is not None:
        meta_path(path).write_text(json.dumps({"dataset": "digits", "model": model}))
    return path


def test_a_bank_of_another_model_is_refused_at_start(tmp_path: Path) -> None:
    bank = _bank(tmp_path / "bank.npy", "model-a")
    out = tmp_path / "run"
    args = [
        "train", "--dataset", "digits", "--backbone", "resnet-tiny", "--subset", str(N),
        "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--no-progress",
        "--clsp-weight", "1", "--k", "1", "--positives-npy", str(bank),
        "--expect-model", "model-b", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # the terminal wraps the line
    assert "made by model model-a" in message and "expects model model-b" in message
    assert "--allow-model-change" in message and "--expect-model" in message
    assert not (out / "metrics.jsonl").exists()  # refused before anything trained


def test_a_resumed_run_refuses_a_bank_of_another_model(tmp_path: Path) -> None:
    """The run's first bank came from model-a; the bank under the same name now holds
    model-b's positives: the resume refuses it, naming both, unless told otherwise."""
    bank = _bank(tmp_path / "bank.npy", "model-a")
    out = tmp_path / "run"
    cfg = TrainConfig(**BASE, epochs=2, positives_npy=str(bank), out=str(out))
    with pytest.raises(_Preempted):
        train(cfg, echo=_stop_after_first_epoch)
    assert _epochs(out)[0]["model"] == "model-a"
    assert ckpt.load_checkpoint(out)[ckpt.PINNED_MODEL] == "model-a"

    _bank(bank, "model-b")
    with pytest.raises(ValueError, match=r"made by model model-b.*expects model model-a"):
        _resume(out, positives_npy=str(bank))
    _resume(out, positives_npy=str(bank), allow_model_change=True)
    assert _epochs(out)[-1]["model"] == "model-b"


def test_expect_model_and_allow_model_change_contradict() -> None:
    with pytest.raises(ValidationError, match="give one of them"):
        TrainConfig(expect_model="model-a", allow_model_change=True)
    assert TrainConfig(expect_model="model-a").generation_params().expect_model == "model-a"
