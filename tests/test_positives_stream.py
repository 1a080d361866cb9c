"""PositivesStream against a real ``clsp serve`` (docs/library.md, "A pool in your own loop:
PositivesStream"): a loader's batches come with the positives ``clsp train``'s feed takes
for the same indices, epoch and params, byte for byte the pool's answer for those keys; a
rank streams its own shard, float images come back as floats; a dead or silent pool costs
at most the deadline and masks everything; a pinned model is kept as the trainer keeps it
(docs/reliability.md, "Model pinning")."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from clsp_positives.client import PoolClient
from clsp_positives.proto.params import GenerationParams
from clsp_positives.torch import Indexed, PositivesStream
from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.data.epochs import ShardedBatchSampler, epoch_candidates
from clsp_positives.trainer.train_loop import _open_positives
from tests.support.servers import ServerProcess, free_port
from tests.support.service import anchors_u8, clsp_serve, scrape

pytestmark = pytest.mark.slow

N, B, K, SEED = 24, 8, 3, 7
PARAMS = GenerationParams(steps=2)
IMAGES = anchors_u8(N, seed=11)  # uint8 [24, 16, 16, 1]


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path) -> Iterator[ServerProcess]:
    server = clsp_serve(tiny_model_dir).start(180)
    try:
        yield server
    finally:
        server.stop()


def pool_answer(url: str, indices: np.ndarray, epoch: int) -> np.ndarray:
    """What the pool answers for these images and the epoch's candidates of them."""
    candidates = epoch_candidates(SEED, epoch, N, K)[indices]
    with PoolClient(url) as client:
        return client.positives(IMAGES[indices], candidates, PARAMS).positives


def fingerprint(url: str) -> str:
    return str(httpx.get(url + "/v1/model", timeout=10).json()["fingerprint"])


def test_the_stream_yields_what_the_trainers_feed_takes_for_the_same_keys(
    pool: ServerProcess,
) -> None:
    epoch = 1
    assert (epoch_candidates(SEED, 0, N, K) != epoch_candidates(SEED, 1, N, K)).any()
    sampler = ShardedBatchSampler(N, B, seed=SEED)
    plan = [b.tolist() for b in sampler.plan(epoch).batches]
    loader = DataLoader(Indexed(IMAGES), batch_sampler=plan)
    config = TrainConfig(
        clsp_weight=1.0, positives=pool.url, k=K, seed=SEED, gen_steps=2, epochs=2,
        batch_size=B, positives_strict=True,
    )  # fmt: skip
    assert config.generation_params() == PARAMS  # both ask the pool the same
    trainer = _open_positives(config, IMAGES, sampler)
    assert trainer is not None
    stream = PositivesStream(loader, pool.url, params=PARAMS, k=K, seed=SEED, strict=True)
    try:
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == len(plan)
        for step, ((images, indices), positives, mask) in enumerate(batches):
            assert indices.tolist() == plan[step]
            np.testing.assert_array_equal(images.numpy(), IMAGES[plan[step]])
            assert positives.dtype == torch.uint8 and mask.dtype == torch.bool
            assert mask.all()
            taken = trainer.take(epoch, step)
            np.testing.assert_array_equal(positives.numpy(), taken.images)
            np.testing.assert_array_equal(taken.images, pool_answer(pool.url, indices.numpy(), 1))
        assert stream.model == trainer.model == fingerprint(pool.url)
        assert stream.epoch_stats()["positive_fraction"] == 1.0
    finally:
        stream.close()
        trainer.close()


def test_each_rank_streams_its_own_shard_and_float_images_get_float_positives(
    pool: ServerProcess,
) -> None:
    """DDP's layout without a process group (the stream has no collective): each rank's
    loader has its DistributedSampler shard, loaded by two workers."""
    floats = torch.from_numpy(IMAGES).permute(0, 3, 1, 2).float() / 255  # ToTensor's
    labelled = [(image, 100 + i) for i, image in enumerate(floats)]  # (image, label) items
    seen: list[int] = []
    for rank in range(2):
        sampler = DistributedSampler(range(N), num_replicas=2, rank=rank, seed=SEED)
        loader = DataLoader(Indexed(labelled), batch_size=B // 2, sampler=sampler, num_workers=2)
        with PositivesStream(loader, pool.url, params=PARAMS, k=K, seed=SEED, strict=True) as s:
            s.set_epoch(1)  # the sampler's epoch too: its shuffle of epoch 1
            order = list(sampler)
            assert order != list(DistributedSampler(range(N), 2, rank, seed=SEED))  # epoch 0's
            got = []
            for (images, indices, labels), positives, mask in s:
                assert torch.equal(images, floats[indices]) and torch.equal(labels, indices + 100)
                got.append((indices, positives, mask))
        assert torch.cat([idx for idx, _, _ in got]).tolist() == order
        for indices, positives, mask in got:
            assert mask.all() and positives.dtype == torch.float32
            assert positives.shape == (len(indices), 1, 16, 16)
            as_bytes = (positives * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(as_bytes, pool_answer(pool.url, indices.numpy(), 1))
        seen += order
    assert sorted(seen) == list(range(N))


def silent_listener() -> socket.socket:
    """A port that accepts connections and never answers: a hung generator."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@pytest.mark.parametrize("down", ["refused", "silent"])
def test_a_dead_pool_masks_every_positive_after_at_most_the_deadline(down: str) -> None:
    listener = silent_listener() if down == "silent" else None
    port = listener.getsockname()[1] if listener else free_port()
    loader = DataLoader(Indexed(IMAGES), batch_size=B)
    deadline_s = 0.3
    stream = PositivesStream(
        loader, f"http://127.0.0.1:{port}", params=PARAMS, deadline_ms=deadline_s * 1000
    )
    try:
        waits, started = [], time.monotonic()
        for (images, _), positives, mask in stream:
            waits.append(time.monotonic() - started)
            assert not mask.any() and not positives.any()
            assert positives.shape == images.shape
            started = time.monotonic()
        assert len(waits) == N // B
        assert max(waits) < deadline_s + 1.0, waits
        assert stream.epoch_stats()["missing"] == N
    finally:
        stream.close()
        if listener:
            listener.close()


def test_a_pinned_stream_refuses_a_generator_of_another_model_as_the_trainer_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Pinned at its first positives (from a), the stream is refused by b, which serves
    another model, and takes nothing from it once a is gone; unpinned, b serves it."""
    from tests.support.models import random_model_dir

    other = random_model_dir(tmp_path / "other", preset="tiny", sample_size=16, seed=1)
    a, b = clsp_serve(tiny_model_dir), clsp_serve(other)
    loader = DataLoader(Indexed(IMAGES), batch_size=B)
    options: dict[str, Any] = {"params": PARAMS, "deadline_ms": 5000, "lookahead": 1}
    a.start(180)
    stream = PositivesStream(loader, f"{a.url},{b.url}", **options)
    try:
        assert all(mask.all() for _, _, mask in stream)  # b is not up yet
        pinned = fingerprint(a.url)
        assert stream.model == pinned
        b.start(180)
        a.stop()
        stream.set_epoch(1)
        assert not any(mask.any() for _, _, mask in stream)
        assert stream.model == pinned != fingerprint(b.url)
        refused = sum(
            v for name, v in scrape(b.url).items() if name.startswith("clsp_requests_total")
            and "status=409" in name
        )  # fmt: skip
        assert refused > 0, "b was never asked: the test shows nothing"
        with PositivesStream(loader, b.url, allow_model_change=True, **options) as unpinned:
            assert all(mask.all() for _, _, mask in unpinned)
            assert unpinned.model is None  # any model: nothing pinned
    finally:
        stream.close()
        a.stop()
        b.stop()


@pytest.mark.parametrize(
    ("images", "says"),
    [
        (torch.zeros(B, 1, 16, 16) - 0.5, r"must lie in \[0, 1\]"),
        (torch.zeros(B, 1, 16, 16, dtype=torch.uint8), r"looks like \[B, C, H, W\]"),
        (torch.zeros(B, 16, 16), r"images uint8 \[B, H, W, C\]"),
    ],
)
def test_images_the_pool_would_misread_are_refused_saying_what_to_pass(
    images: torch.Tensor, says: str
) -> None:
    batches = [(images, torch.arange(B))]
    with (
        PositivesStream(_Loader(batches), f"http://127.0.0.1:{free_port()}") as stream,
        pytest.raises(ValueError, match=says),
    ):
        next(iter(stream))


class _Loader(list):
    """A list of batches with the data set a DataLoader would have."""

    dataset = range(N)
