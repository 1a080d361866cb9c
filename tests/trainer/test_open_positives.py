"""What the train loop asks of the pool: the generation params of its
``TrainConfig``, through ``generation_params()``, the one place they are built."""

from __future__ import annotations

import numpy as np

from clsp_positives.trainer.config import TrainConfig
from clsp_positives.trainer.data.epochs import ShardedBatchSampler
from clsp_positives.trainer.train_loop import _open_positives


def test_the_pool_is_asked_for_every_generation_param_of_the_config() -> None:
    config = TrainConfig(
        clsp_weight=1.0, positives="http://127.0.0.1:9", epochs=1, batch_size=4,
        interpolation_weight=0.3, gen_steps=7, gen_eta=0.5, gen_sampling="model",
    )  # fmt: skip
    images = np.zeros((8, 8, 8, 1), np.uint8)
    feed = _open_positives(config, images, ShardedBatchSampler(8, 4, seed=0))
    assert feed is not None
    try:
        params = feed.feed.prefetcher.source.params
        assert params == config.generation_params()
        assert params.sampling == "model" and params.steps == 7 and params.k is None
    finally:
        feed.close()
