"""The product end to end: a real ``clsp serve`` with the tiny model and a real
Redis, ``clsp generate`` filling the cache through it, then ``clsp train`` on
digits taking its positives from the warm service."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from clsp_positives.cli import app
from tests.support.service import scrape, start_service, total

pytestmark = pytest.mark.slow

GEN = ["--gen-steps", "2", "--gen-eta", "0.1", "--interpolation-weight", "0.1"]


@pytest.fixture(scope="module")
def service(tiny_model_dir, own_redis):
    server = start_service(tiny_model_dir, redis_url=own_redis.url, threads=1)
    yield server
    server.stop()


def _invoke(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"clsp {' '.join(args)} failed:\n{result.output}"
    return result.output


def test_generate_warms_the_pool_then_train_takes_positives_from_it(service, tmp_path: Path):
    npy = tmp_path / "digits-positives.npy"
    _invoke(
        [
            "generate",
            "--dataset",
            "digits",
            "--positives",
            service.url,
            "--k",
            "1",
            "--batch-size",
            "128",
            "--out",
            str(npy),
            "--no-progress",
            *GEN,
        ]
    )
    bank = np.load(npy)
    assert bank.dtype == np.uint8 and bank.shape == (1437, 1, 16, 16, 1)
    generated = total(scrape(service.url), "clsp_positives_generated")
    assert generated >= 1437

    out = tmp_path / "run"
    output = _invoke([
        "train", "--dataset", "digits", "--backbone", "resnet-tiny", "--proj-hidden-dim", "64",
        "--linear-epochs", "10", "--device", "cpu", "--no-progress", "--epochs", "2",
        "--batch-size", "128", "--clsp-weight", "1", "--positives", service.url,
        "--k", "1", "--prefetch", "2", "--positives-deadline-ms", "2000",
        "--out", str(out), *GEN,
    ])  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    summary = next(r for r in records if r["event"] == "summary")
    print(json.dumps(epochs, indent=1), file=sys.stderr)
    assert len(epochs) == 2
    assert all(e["positive_fraction"] > 0.9 for e in epochs), epochs
    assert all(e["cache_hit_rate"] > 0.9 for e in epochs), epochs
    # the run pinned the pool's model and says which it was
    fingerprint = httpx.get(service.url + "/v1/model", timeout=10).json()["fingerprint"]
    assert [e["model"] for e in epochs] == [fingerprint, fingerprint]
    assert all(e["loss_clsp"] > 0 for e in epochs)
    for name in ("linear", "probe", "knn"):
        assert 0.0 <= summary[f"{name}_acc"] <= 1.0, summary
        assert name in output.lower()
    # The warm cache answered the trainer: the service generated nothing new.
    assert total(scrape(service.url), "clsp_positives_generated") == generated
