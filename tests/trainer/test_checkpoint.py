"""Checkpoints load without unpickling (docs/reliability.md §4): a shared file
whose pickle would run code is refused by ``clsp eval``, ``--resume`` and
``clsp checkpoint convert`` without running it; a checkpoint of the first format
is refused with the command that converts it, and the converted file resumes
exactly; RNG states round-trip as plain data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.train_loop import train

BASE = dict(
    dataset="digits", backbone="resnet-tiny", proj_hidden_dim=32, linear_epochs=2,
    device="cpu", progress=False, subset=64, batch_size=32, method="moco", knn_k=20,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _RunsCode:
    """Unpickling this calls ``exec``: what a hostile shared checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _plant_hostile(run_dir: Path, marker: Path) -> Path:
    """A well-formed checkpoint of the current format, but with a code-running object."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ckpt.CHECKPOINT_NAME
    torch.save(
        {
            "format": ckpt.FORMAT_VERSION,
            "model": {"w": torch.zeros(2), "payload": _RunsCode(marker)},
            "epoch": 0,
            "config": "{}",
        },
        path,
    )
    return path


def test_a_checkpoint_whose_pickle_runs_code_is_refused_unread(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "shared-run"
    path = _plant_hostile(run_dir, marker)

    evaluated = CliRunner().invoke(app, ["eval", str(run_dir), "--device", "cpu"])
    assert evaluated.exit_code == 2, evaluated.output
    assert "refused unread" in evaluated.output and "builtins.exec" in evaluated.output

    cfg = TrainConfig(**BASE, epochs=1, out=str(run_dir), resume=True)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="refused unread"):
        train(cfg, echo=lambda _: None)
    resumed = CliRunner().invoke(
        app, ["train", "--dataset", "digits", "--out", str(run_dir), "--resume", "--no-progress"]
    )
    assert resumed.exit_code == 2 and "refused unread" in resumed.output, resumed.output

    converted = CliRunner().invoke(app, ["checkpoint", "convert", str(path)])
    assert converted.exit_code == 2 and "refused unread" in converted.output, converted.output
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert path.is_file() and not (run_dir / "checkpoint.pt.format1").exists()

    # The planted file is live: a full unpickler does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_save_refuses_what_could_not_be_loaded_back(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="numpy"):
        ckpt.save_checkpoint(tmp_path / "c.pt", {"rng": [np.zeros(3, np.uint32)]})
    assert not list(tmp_path.iterdir())  # neither the file nor its temp file


def test_rng_states_are_plain_and_restore_every_generator(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in the legacy state
    state = ckpt.rng_state()
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    ckpt.save_checkpoint(tmp_path / "c.pt", {"rng": [state], "config": {"seed": 1}})
    loaded = ckpt.load_checkpoint(tmp_path / "c.pt")
    assert loaded["config"] == {"seed": 1}
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(loaded["rng"][0])
    assert random.random() == expected[0]
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert torch.equal(torch.rand(3), expected[2])


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint the way the first format stored it: RNG states as
    ``random.getstate()`` and ``np.random.get_state()`` return them, config a dict."""
    state = ckpt.load_checkpoint(path)
    old_rng = []
    for r in state["rng"]:
        n = r["numpy"]
        old_rng.append(
            {
                "python": (r["python"][0], tuple(r["python"][1]), r["python"][2]),
                "numpy": (
                    n["bit_generator"],
                    np.asarray(n["key"], np.uint32),
                    n["pos"],
                    n["has_gauss"],
                    n["cached_gaussian"],
                ),
                "torch": r["torch"],
            }
        )
    torch.save({**state, "format": 1, "rng": old_rng}, path)


class _Preempted(Exception):
    pass


def _stop_after_first_epoch(line: str) -> None:
    if line.startswith("epoch 1 "):
        raise _Preempted


def test_a_format_1_checkpoint_is_refused_with_how_to_convert_and_then_resumes_exactly(
    tmp_path: Path,
) -> None:
    straight = train(TrainConfig(**BASE, epochs=2, out=str(tmp_path / "a")), echo=lambda _: None)
    cfg = TrainConfig(**BASE, epochs=2, out=str(tmp_path / "b"))
    with pytest.raises(_Preempted):
        train(cfg, echo=_stop_after_first_epoch)
    path = tmp_path / "b" / ckpt.CHECKPOINT_NAME
    _as_format_1(path)

    again = cfg.model_copy(update={"resume": True})
    with pytest.raises(ValueError, match=f"clsp checkpoint convert {path}"):
        train(again, echo=lambda _: None)
    evaluated = CliRunner().invoke(app, ["eval", str(path), "--device", "cpu"])
    assert evaluated.exit_code == 2 and "clsp checkpoint convert" in evaluated.output

    converted = CliRunner().invoke(app, ["checkpoint", "convert", str(tmp_path / "b")])
    assert converted.exit_code == 0, converted.output
    assert (tmp_path / "b" / "checkpoint.pt.format1").is_file()
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    resumed = train(again, echo=lambda _: None)

    a = ckpt.load_checkpoint(tmp_path / "a")
    b = ckpt.load_checkpoint(tmp_path / "b")
    assert b["epoch"] == 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert straight.final is not None and resumed.final is not None
    assert straight.final.knn_acc == resumed.final.knn_acc
    twice = CliRunner().invoke(app, ["checkpoint", "convert", str(path)])
    assert twice.exit_code == 2 and "already of format 2" in twice.output
