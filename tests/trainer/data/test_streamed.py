"""An image folder streamed from disk (``--data-workers N``): the same images, in the
same order, as the in-memory load, decoded by real DataLoader workers; batches in the
sampler's order; the positives feed given the anchors of the batches it trains on;
a run that trains as the in-memory run does (docs/training.md, "Large data sets")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clsp_positives.images import load_images
from clsp_positives.streamed import PathTable, StreamedImages, open_streamed
from clsp_positives.trainer.data.epochs import ShardedBatchSampler, channel_stats, epoch_candidates
from clsp_positives.trainer.data.streamed import StreamedBatches
from clsp_positives.trainer.eval.linear_protocol import frozen_features

SIZE = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 RGB PNGs of varied sizes in 3 class folders (20 each) and a file that is no
    image."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(60):
        d = root / f"class-{i % 3}"
        d.mkdir(exist_ok=True)
        h, w = rng.integers(6, 20, 2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"{i:03d}.png")
    (root / "class-1" / "notes.txt").write_text("not an image")
    return root


def streamed(folder: Path, *, workers: int, channels: int | None = None) -> StreamedImages:
    return open_streamed(
        str(folder),
        split="train",
        size=SIZE,
        channels=channels,
        workers=workers,
        pin_memory=False,
    )


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_a_streamed_folder_reads_the_images_the_in_memory_load_holds(
    folder: Path, channels: int | None
) -> None:
    memory = load_images(str(folder), size=SIZE, channels=channels)
    stream = streamed(folder, workers=2, channels=channels)
    assert len(stream) == len(memory) == 60 and stream.classes == memory.classes == 3
    assert stream.shape == memory.images.shape
    np.testing.assert_array_equal(stream.labels, memory.labels)
    # Decoded here (the feed's fallback) and by two worker processes (the loader).
    everything = np.arange(len(stream))
    np.testing.assert_array_equal(stream.anchors(everything), memory.images)
    batches = [[5, 0, 59], [58, 1]]
    loaded = list(stream.loader(batches))
    for rows, batch in zip(batches, loaded, strict=True):
        assert batch.indices.tolist() == rows
        np.testing.assert_array_equal(batch.images.numpy(), memory.images[rows])
        np.testing.assert_array_equal(batch.labels.numpy(), memory.labels[rows])


def test_a_large_jpeg_decodes_at_a_reduced_scale_close_to_the_full_decode(
    tmp_path: Path,
) -> None:
    """A photo four times the training size decodes at a quarter scale first
    (``read_rgb(draft=True)``), which is what makes a folder of photos fast to stream."""
    smooth = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(smooth).save(tmp_path / "a" / "photo.jpg", quality=95)
    full = load_images(str(tmp_path), size=16).images[0].astype(float)
    stream = open_streamed(
        str(tmp_path), split="train", size=16, channels=None, workers=0, pin_memory=False
    )
    drafted = stream.anchors(np.array([0]))[0].astype(float)
    assert np.abs(drafted - full).mean() < 4


def test_streamed_batches_follow_the_plan_and_hand_the_feed_the_loaded_ones(
    folder: Path,
) -> None:
    memory = load_images(str(folder), size=SIZE)
    stream = streamed(folder, workers=2)
    sampler = ShardedBatchSampler(len(stream), 8, seed=3)
    lookahead = 2
    batches = StreamedBatches(stream, sampler, epochs=range(1, 3), lookahead=lookahead)
    try:
        plans = [sampler.plan(e).batches for e in (1, 2)]
        order = [b for plan in plans for b in plan]  # the loader reads across epochs
        for step, indices in enumerate(order):
            batch = batches.batch(indices)
            np.testing.assert_array_equal(batch.indices, indices)
            np.testing.assert_array_equal(batch.images, memory.images[indices])
            # What the feed asks while this step trains: this batch up to step + L.
            for ahead in order[step : step + lookahead + 1]:
                np.testing.assert_array_equal(batches.anchors(ahead), memory.images[ahead])
            assert len(batches._window) <= lookahead + 1  # never more than L + 1 held
        assert batches.decoded_here == 0  # every anchor came from a loaded batch
        odd = np.array([4, 2, 0])
        np.testing.assert_array_equal(batches.anchors(odd), memory.images[odd])
        assert batches.decoded_here == 1  # not loaded: decoded on demand
    finally:
        batches.close()


def test_a_batch_out_of_the_plan_is_refused(folder: Path) -> None:
    stream = streamed(folder, workers=0)
    sampler = ShardedBatchSampler(len(stream), 8, seed=0)
    batches = StreamedBatches(stream, sampler, epochs=range(1), lookahead=1)
    with pytest.raises(RuntimeError, match="out of step"):
        batches.batch(sampler.plan(0).batches[1])


def test_the_feed_sends_the_pool_the_anchors_it_trains_on(folder: Path) -> None:
    """Positives line up with the streamed anchors: the stub pool answers each anchor
    with a function of its pixels and candidate index (``stub_positive``)."""
    from clsp_positives.proto.params import GenerationParams
    from clsp_positives.trainer.positives.feed import PlannedFeed, PositivesFeed
    from clsp_positives.trainer.positives.prefetch import Prefetcher
    from clsp_positives.trainer.positives.sources import build_source
    from tests.support.stub_pool import stub_positive, stub_server

    stream = streamed(folder, workers=2, channels=1)
    sampler = ShardedBatchSampler(len(stream), 6, seed=1)
    epochs, k = 2, 4
    batches = StreamedBatches(stream, sampler, epochs=range(epochs), lookahead=3)
    with stub_server(STUB_SIZE=str(SIZE), STUB_CHANNELS="1") as server:
        source = build_source(
            server.url, offline_npy=None, token=None, params=GenerationParams(steps=2)
        )
        prefetcher = Prefetcher(source, lookahead=3, deadline_ms=30_000, strict=True)
        shared = PositivesFeed(prefetcher, size=len(stream), seed=0, k=k)
        feed = PlannedFeed(shared, batches, sampler, epochs=epochs)
        try:
            for epoch in range(epochs):
                cands = epoch_candidates(0, epoch, len(stream), k)
                for step, indices in enumerate(sampler.plan(epoch).batches):
                    anchors = batches.batch(indices).images
                    positives = feed.take(epoch, step)
                    assert positives.mask.all()
                    want = [
                        stub_positive(a, c) for a, c in zip(anchors, cands[indices], strict=True)
                    ]
                    np.testing.assert_array_equal(positives.images, np.stack(want))
        finally:
            feed.close()
            batches.close()
    assert batches.decoded_here == 0


def test_the_normalisation_of_a_streamed_set_is_the_in_memory_one(folder: Path) -> None:
    memory = load_images(str(folder), size=SIZE)
    stream = streamed(folder, workers=1)
    mean, std = stream.channel_stats()
    want_mean, want_std = channel_stats(memory.images)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-9)
    np.testing.assert_allclose(std, want_std, rtol=1e-9)
    # A set larger than the limit is measured on a seeded sample of it, every time.
    sampled = stream.channel_stats(limit=10)
    assert sampled == stream.channel_stats(limit=10) and sampled != (mean, std)


def test_features_of_a_streamed_set_are_the_array_ones(folder: Path) -> None:
    import torch

    memory = load_images(str(folder), size=SIZE)
    stream = streamed(folder, workers=2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE * 3, 5))

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x.float().permute(0, 3, 1, 2) / 255.0

    want = frozen_features(net, memory.images, scale, batch_size=16)
    got = frozen_features(net, stream, scale, batch_size=16)
    torch.testing.assert_close(got, want)


def test_what_cannot_be_streamed_says_why(folder: Path) -> None:
    with pytest.raises(ValueError, match="--data-workers 0"):
        open_streamed("digits", split="train", size=8, channels=None, workers=1, pin_memory=False)
    with pytest.raises(ValueError, match="--image-size"):
        open_streamed(
            str(folder), split="train", size=None, channels=None, workers=1, pin_memory=False
        )


def test_the_path_table_keeps_every_name() -> None:
    names = ["a/1.png", "ünï/çødé.jpg", "b/x y.png", "c/" + "z" * 300 + ".png"]
    table = PathTable.of(names)
    assert len(table) == 4 and [table[i] for i in range(4)] == names
    first = table.first(2)
    assert len(first) == 2 and [first[i] for i in range(2)] == names[:2]


def test_a_streamed_run_trains_as_the_in_memory_run(
    folder: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    """Same images, order, normalisation and evaluation: the same losses and accuracies,
    with the pixels decoded by two worker processes instead of held in memory."""
    from clsp_positives.trainer.config import TrainConfig
    from clsp_positives.trainer.train_loop import evaluate_checkpoint, train

    def run(workers: int) -> list[dict]:
        out = tmp_path / f"workers-{workers}"
        config = TrainConfig(
            dataset=str(folder), image_size=SIZE, channels=1, data_workers=workers,
            backbone="resnet-tiny", proj_hidden_dim=16, proj_dim=8, epochs=2, batch_size=16,
            linear_epochs=2, probe_epochs=2, knn_k=5, device="cpu", progress=False,
            out=str(out),
        )  # fmt: skip
        train(config, echo=lambda *_: None)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] in ("epoch", "summary")]

    memory, stream = run(0), run(2)
    assert len(stream) == len(memory) == 3
    for got, want in zip(stream, memory, strict=True):
        for key in ("loss", "probe_acc", "knn_acc", "linear_acc", "train_size"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # clsp eval streams the checkpoint's folder again and finds the run's accuracies.
    again = evaluate_checkpoint(tmp_path / "workers-2", device="cpu").as_dict()
    for key in ("probe_acc", "knn_acc", "linear_acc"):
        assert again[key] == pytest.approx(stream[-1][key], abs=1e-6), key
