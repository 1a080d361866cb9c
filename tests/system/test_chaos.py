"""A chaos check of the real stack: ``clsp train`` keeps training while its pool
breaks under it (docs/reliability.md §3).

One Redis, two ``clsp serve`` generators of the tiny model sharing it, and one
``clsp train`` process on digits pointed at both. Once the first epoch is logged,
Redis is restarted (stopped, then started empty on the same port, as after a crash)
and one generator is SIGKILLed while it is sampling. The run must finish as if
nothing happened: exit 0, every planned step taken, and its metrics.jsonl shows the
dip (failovers or errors counted, or fewer positives) and the recovery (a later
epoch with positives again).

tests/system/test_faults_stack.py kills a generator under the trainer's pool client
and prefetcher in-process; this file runs the whole ``clsp train`` command across
both faults at once and reads only what a user sees: the exit code and the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.service import clsp_serve, running, scrape

pytestmark = pytest.mark.slow

EPOCHS = 6
SUBSET, BATCH = 128, 32  # 4 steps an epoch
SECRET = "chaos-pool-secret"  # one cache secret: the generators share entries
TRAIN = [
    "--dataset", "digits", "--subset", str(SUBSET), "--batch-size", str(BATCH),
    "--epochs", str(EPOCHS), "--backbone", "resnet-tiny", "--proj-hidden-dim", "32",
    "--linear-epochs", "0", "--probe-epochs", "5", "--device", "cpu", "--no-progress",
    "--clsp-weight", "1", "--k", "1", "--prefetch", "2", "--positives-deadline-ms", "5000",
    "--gen-steps", "2", "--gen-eta", "0.1", "--interpolation-weight", "0.1",
]  # fmt: skip


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl that may be mid-write."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _wait_for(check, trainer: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert trainer.poll() is None, f"clsp train ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.02)


def test_training_survives_a_killed_generator_and_a_restarted_redis(
    tiny_model_dir, own_redis, tmp_path: Path
) -> None:
    servers = [
        clsp_serve(tiny_model_dir, own_redis.url, env={"CLSP_CACHE_SECRET": SECRET})
        for _ in range(2)
    ]
    out, log = tmp_path / "run", tmp_path / "train.log"
    metrics = out / "metrics.jsonl"
    with running(servers) as (doomed, survivor), log.open("wb") as sink:
        pool = f"{doomed.url},{survivor.url}"
        cmd = [sys.executable, "-m", "clsp_positives.cli", "train", *TRAIN]
        cmd += ["--positives", pool, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        trainer = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for(
                lambda: any(r["event"] == "epoch" for r in _records(metrics)),
                trainer,
                "first epoch",
                timeout=120,
            )
            fault_after = max(r["epoch"] for r in _records(metrics) if r["event"] == "epoch")
            own_redis.stop()  # the cache goes away with every entry in it...
            time.sleep(0.5)
            own_redis.start()  # ...and comes back empty on the same port
            # Misses now: kill the generator while its sampler holds a batch.
            _wait_for(
                lambda: scrape(doomed.url)["clsp_items_in_flight"] > 0,
                trainer,
                "batch on the doomed generator",
            )
            doomed.kill()
            code = trainer.wait(120)
            generated = scrape(survivor.url)["clsp_positives_generated_total"]
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait(10)
    output = log.read_text(errors="replace")
    epochs = [r for r in _records(metrics) if r["event"] == "epoch"]
    print("\n" + "\n".join(json.dumps(e, sort_keys=True) for e in epochs), file=sys.stderr)
    assert code == 0, output[-5000:]
    assert "Traceback" not in output, output[-5000:]
    assert doomed.proc is not None and doomed.proc.poll() is not None
    # No step failed: every epoch ran its plan, with a finite loss.
    assert [e["epoch"] for e in epochs] == list(range(EPOCHS))
    assert all(e["steps"] == SUBSET // BATCH and e["loss"] == e["loss"] for e in epochs)
    before = [e for e in epochs if e["epoch"] <= fault_after]
    after = [e for e in epochs if e["epoch"] > fault_after]
    # The dip: the pool's failures were counted, or positives went missing.
    best = max(e["positive_fraction"] for e in before)
    dips = [
        e["epoch"]
        for e in after
        if e["failovers"] + e["errors"] > 0 or e["positive_fraction"] < best
    ]
    assert dips, f"no epoch after the faults shows them: {epochs}"
    # The recovery: a later epoch took positives again, from the survivor.
    assert any(e["positive_fraction"] > 0 for e in after if e["epoch"] > dips[0]), epochs
    assert epochs[-1]["positive_fraction"] > 0.5, epochs
    # ...and from the cache again: the restarted Redis serves the refilled entries.
    assert any(e["cache_hit_rate"] > 0.5 for e in after if e["epoch"] > dips[0]), epochs
    assert generated > 0
