"""Data-parallel training through torchrun (gloo, CPU): disjoint shards, the
gathered batch and queue, and gradients equal to one process on the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clsp_positives.trainer import checkpoint as ckpt
from clsp_positives.trainer.data.epochs import ShardedBatchSampler, epoch_candidates

REPO = Path(__file__).resolve().parents[2]


def _torchrun(args: list[str], tmp_path: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_rank_shards_are_disjoint_equal_and_seeded() -> None:
    size, batch, world = 103, 8, 3
    samplers = [
        ShardedBatchSampler(size, batch, rank=r, world_size=world, seed=5) for r in range(3)
    ]
    plans = [s.plan(epoch=2) for s in samplers]
    assert {len(p) for p in plans} == {103 // 24}
    seen = np.concatenate([np.concatenate(p.batches) for p in plans])
    assert len(np.unique(seen)) == len(seen) == 4 * 24
    assert all(b.shape == (batch,) for p in plans for b in p.batches)
    again = ShardedBatchSampler(size, batch, rank=1, world_size=world, seed=5).plan(2)
    assert all(np.array_equal(a, b) for a, b in zip(again.batches, plans[1].batches, strict=True))
    other_epoch = samplers[1].plan(3)
    assert not all(
        np.array_equal(a, b) for a, b in zip(other_epoch.batches, plans[1].batches, strict=True)
    )


def test_sampler_errors_and_candidates() -> None:
    with pytest.raises(ValueError, match="--batch-size"):
        ShardedBatchSampler(10, 8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ShardedBatchSampler(10, 2, rank=2, world_size=2)
    c = epoch_candidates(0, 0, 1000, 8)
    assert c.min() == 0 and c.max() == 7 and np.array_equal(c, epoch_candidates(0, 0, 1000, 8))
    assert not np.array_equal(c, epoch_candidates(0, 1, 1000, 8))


@pytest.mark.slow
def test_ddp_gradients_equal_the_single_process_step(tmp_path: Path) -> None:
    out = tmp_path / "grads.json"
    _torchrun([str(REPO / "tests" / "support" / "ddp_gradients.py"), str(out)], tmp_path)
    worst = json.loads(out.read_text())
    assert set(worst) == {"simclr/similarity", "simclr/contrastive", "moco/similarity",
                          "nnclr/contrastive"}  # fmt: skip
    assert max(worst.values()) < 1e-5, worst


@pytest.mark.slow
def test_torchrun_two_ranks_train_an_epoch_on_disjoint_shards(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "-m", "clsp_positives.cli", "train", "--dataset", "digits", "--subset", "150",
        "--backbone", "resnet-tiny", "--proj-hidden-dim", "32", "--method", "moco",
        "--batch-size", "16", "--epochs", "1", "--linear-epochs", "5", "--knn-k", "20",
        "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    proc = _torchrun(args, tmp_path)
    assert "kNN accuracy" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2
    epoch = next(r for r in records if r["event"] == "epoch")
    assert epoch["steps"] == 150 // 32
    assert epoch["images_seen"] == 2 * 4 * 16 and epoch["shard_overlap"] == 0
    state = ckpt.load_checkpoint(out)
    # The queue (capped at the 150 images) holds the keys of both ranks' batches.
    assert state["model"]["queue.items"].shape[0] == 150
    assert int(state["model"]["queue.ptr"]) == 2 * 4 * 16
    assert len(state["rng"]) == 2 and state["world_size"] == 2


@pytest.mark.slow
def test_ddp_ranks_with_different_counts_of_positives_none_forward_a_missing_one(
    tmp_path: Path,
) -> None:
    out = tmp_path / "missing.json"
    _torchrun([str(REPO / "tests" / "support" / "ddp_missing_positives.py"), str(out)], tmp_path)
    result = json.loads(out.read_text())
    cases = {f"{n}/{m}" for n in ("simclr", "moco", "nnclr") for m in ("similarity", "contrastive")}
    assert set(result["grads"]) == cases
    assert max(result["grads"].values()) < 1e-5, result["grads"]
    first, second = result["trained"]  # rank 0 (3 positives), rank 1 (none)
    assert set(first) == {f"{c}/{p}" for c in cases for p in ("per-view", "joint")}
    assert all(r["finite"] for rank in (first, second) for r in rank.values())
    # Rank 1 forwarded no third view; rank 0 did, so its statistics differ, except
    # with MoCo's contrastive mode, whose positives go through the key encoder only.
    assert all(r["anchors_only_stats"] for r in second.values()), second
    unmoved = {case for case, r in first.items() if r["anchors_only_stats"]}
    assert unmoved == {"moco/contrastive/per-view", "moco/contrastive/joint"}, first
