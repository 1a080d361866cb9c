"""``clsp train`` / ``clsp eval`` on digits with the tiny backbone, on the CPU:
the baseline, offline positives, exact resume and option errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.images import load_images
from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.train_loop import train

FAST = [
    "--dataset", "digits", "--backbone", "resnet-tiny", "--proj-hidden-dim", "64",
    "--probe-epochs", "10", "--linear-epochs", "5", "--device", "cpu", "--no-progress",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_baseline_on_digits_reports_linear_and_knn_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *FAST, "--epochs", "2", "--batch-size", "64", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"CLSP_API_TOKEN": "secret-token"})
    assert result.exit_code == 0, result.output
    assert "linear accuracy" in result.output and "probe accuracy" in result.output
    assert "kNN accuracy" in result.output
    records = _records(out)
    events = [r["event"] for r in records]
    assert events == ["start", "epoch", "eval", "epoch", "summary"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[0]["steps"] == 1437 // 64
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in epochs)
    summary = records[-1]
    # Ten classes: chance is 10%; even two epochs of a tiny net do far better.
    assert summary["probe_acc"] > 0.5 and summary["knn_acc"] > 0.3
    assert summary["linear_acc"] > 0.2  # five epochs of the standard protocol
    state = ckpt.load_checkpoint(out)
    assert state["epoch"] == 1 and "token" not in state["config"]
    assert "secret-token" not in (out / "metrics.jsonl").read_text()

    evaluated = CliRunner().invoke(app, ["eval", str(out), "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads(evaluated.output.strip().splitlines()[-1])
    assert again["knn_acc"] == pytest.approx(summary["knn_acc"])
    assert again["probe_acc"] == pytest.approx(summary["probe_acc"], abs=0.02)
    assert again["linear_acc"] == pytest.approx(summary["linear_acc"], abs=0.02)


def test_offline_positives_feed_the_clsp_term(tmp_path: Path) -> None:
    train_set = load_images("digits")
    n = 128
    # K = 2 "synthetic" positives per image: the image itself and its mirror.
    pos = np.stack([train_set.images[:n], train_set.images[:n, :, ::-1]], axis=1)
    npy = tmp_path / "positives.npy"
    np.save(npy, np.ascontiguousarray(pos))
    out = tmp_path / "run"
    args = [
        "train", *FAST, "--subset", str(n), "--epochs", "1", "--batch-size", "32",
        "--method", "moco", "--clsp-weight", "0.5", "--positives-npy", str(npy),
        "--k", "2", "--prefetch", "2", "--positives-strict", "--out", str(out),
        "--view1-blur", "1", "--view2-blur", "0.1", "--view2-solarize", "0.2",
        "--moco-momentum-end", "0.999",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    epoch = next(r for r in _records(out) if r["event"] == "epoch")
    assert epoch["positive_fraction"] == 1.0 and epoch["missing"] == 0
    assert epoch["loss_clsp"] > 0
    assert epoch["loss"] == pytest.approx(epoch["loss_base"] + 0.5 * epoch["loss_clsp"], rel=1e-4)


def test_digits_photos_train_in_colour_with_colour_positives(tmp_path: Path) -> None:
    """The embedded set whose nuisance is the background goes through the same path: RGB
    anchors, RGB offline positives, a 3-channel backbone."""
    n = 64
    train_set = load_images("digits-photos", size=16)
    assert train_set.images.shape[1:] == (16, 16, 3)
    pos = np.stack([train_set.images[:n], train_set.images[:n]], axis=1)
    npy = tmp_path / "positives.npy"
    np.save(npy, np.ascontiguousarray(pos))
    out = tmp_path / "run"
    fast = [arg if arg != "digits" else "digits-photos" for arg in FAST]
    args = [
        "train", *fast, "--image-size", "16", "--subset", str(n), "--epochs", "1",
        "--batch-size", "32", "--clsp-weight", "0.5", "--positives-npy", str(npy), "--k", "2",
        "--positives-strict", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert records[0]["config"]["dataset"] == "digits-photos"
    epoch = next(r for r in records if r["event"] == "epoch")
    assert epoch["positive_fraction"] == 1.0 and np.isfinite(epoch["loss"])
    state = ckpt.load_checkpoint(out)
    first_conv = next(v for v in state["model"].values() if getattr(v, "ndim", 0) == 4)
    assert first_conv.shape[1] == 3


def test_resume_continues_exactly(tmp_path: Path) -> None:
    base = dict(
        dataset="digits", backbone="resnet-tiny", proj_hidden_dim=32, linear_epochs=2,
        device="cpu", progress=False, subset=96, batch_size=32, epochs=2, method="moco",
        knn_k=20,
    )  # fmt: skip
    straight = train(TrainConfig(**base, out=str(tmp_path / "a")), echo=lambda _: None)

    class Preempted(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1 "):
            raise Preempted

    cfg = TrainConfig(**base, out=str(tmp_path / "b"))
    with pytest.raises(Preempted):
        train(cfg, echo=stop_after_first_epoch)
    assert ckpt.load_checkpoint(tmp_path / "b")["epoch"] == 0
    resumed = train(cfg.model_copy(update={"resume": True}), echo=lambda _: None)

    a = ckpt.load_checkpoint(tmp_path / "a")
    b = ckpt.load_checkpoint(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    assert "queue.items" in a["model"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["schedule"]["last_epoch"] == b["schedule"]["last_epoch"]
    assert straight.final is not None and resumed.final is not None
    assert straight.final.knn_acc == resumed.final.knn_acc
    assert [r["epoch"] for r in _records(tmp_path / "b") if r["event"] == "epoch"] == [0, 1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--clsp-weight", "1"], "--positives"),
        (["--method", "byol"], "--method"),
        (["--resume"], "--out"),
        (["--backbone", "vgg"], "resnet-tiny"),
        (["--batch-size", "5000"], "--batch-size"),
    ],
)
def test_option_errors_name_what_to_fix(extra: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["train", *FAST, "--epochs", "1", *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_candidates_is_still_accepted_as_k(tmp_path: Path) -> None:
    """The old flag reaches TrainConfig.k: asking 3 of a file holding 2 is refused."""
    npy = tmp_path / "positives.npy"
    n = len(load_images("digits").images)
    np.save(npy, np.zeros((n, 2, 16, 16, 1), np.uint8))
    args = ["train", *FAST, "--clsp-weight", "1", "--positives-npy", str(npy), "--candidates", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "candidate 2 asked" in result.output and "pass --k 2" in result.output


def test_a_checkpoint_that_says_candidates_still_loads() -> None:
    stored = TrainConfig(k=5).stored()
    assert "k" in stored and "candidates" not in stored
    old = {**{n: v for n, v in stored.items() if n != "k"}, "candidates": 3}
    assert TrainConfig(**old).k == 3


def test_a_checkpoint_keeps_the_values_its_defaults_resolved_to() -> None:
    """A default that changes later must not rebuild a stored run differently."""
    stored = TrainConfig(method="moco").stored()
    assert stored["proj_dim"] == TrainConfig(method="moco").resolved_proj_dim()
    assert stored["temperature"] is not None and stored["lr"] is not None
    assert TrainConfig(**stored).resolved() == TrainConfig(**stored)


def test_generation_defaults_and_bounds_are_the_wire_contracts() -> None:
    from pydantic import ValidationError

    from clsp_positives.proto.params import GenerationParams

    pairs = {"interpolation_weight": "interpolation_weight", "gen_steps": "steps"}
    pairs |= {"gen_eta": "eta", "gen_method": "method"}
    params = TrainConfig().generation_params()
    for ours, theirs in pairs.items():
        assert getattr(TrainConfig(), ours) == GenerationParams.model_fields[theirs].default
        assert getattr(params, theirs) == GenerationParams.model_fields[theirs].default
    for bad in ({"gen_steps": 1001}, {"gen_eta": 1.5}, {"interpolation_weight": -0.1}):
        with pytest.raises(ValidationError):
            TrainConfig(**bad)


def test_help_shows_every_options_help_and_default() -> None:
    from clsp_positives.options import shown_default

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())  # the help, unwrapped
    for name, field in TrainConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        assert f"{field.description} (default: {shown_default(field)}" in text, name
    assert "--candidates" in text and "(default: 8)" in text


def test_an_out_of_bounds_option_is_named() -> None:
    result = CliRunner().invoke(app, ["train", *FAST, "--gen-steps", "0"])
    assert result.exit_code == 2
    assert "--gen-steps" in result.output and "greater than or equal to 1" in result.output


@pytest.mark.slow
def test_positives_from_a_pool_over_http(tmp_path: Path) -> None:
    """The loop with the real pool client against a stand-in generator on
    loopback: every anchor gets its positive, the token comes from the
    environment, and epoch 2 (same candidate) is all cache hits."""
    from tests.support.stub_pool import counters, stub_server

    out = tmp_path / "run"
    with stub_server(STUB_TOKEN="pool-token") as server:
        args = [
            "train", *FAST, "--subset", "96", "--epochs", "2", "--batch-size", "32",
            "--clsp-weight", "1", "--positives", server.url, "--candidates", "1",
            "--prefetch", "2", "--positives-strict", "--out", str(out),
        ]  # fmt: skip
        result = CliRunner().invoke(app, args, env={"CLSP_API_TOKEN": "pool-token"})
        assert result.exit_code == 0, result.output
        served = counters(server)
    epochs = [r for r in _records(out) if r["event"] == "epoch"]
    assert [e["positive_fraction"] for e in epochs] == [1.0, 1.0]
    assert epochs[0]["cache_hit_rate"] < 0.1 and epochs[1]["cache_hit_rate"] == 1.0
    assert all(e["loss_clsp"] > 0 and e["errors"] == 0 for e in epochs)
    assert served["items"] == 2 * 3 * 32  # each planned batch asked once, none after the end
    assert "pool-token" not in (out / "metrics.jsonl").read_text()
