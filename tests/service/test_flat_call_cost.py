"""Deadline sizing when a sampler call's time is flat in its size, as on a GPU where
the fixed part of a call dominates (docs/design.md §4).

The app, its batcher and the tiny model are real, served by a real uvicorn on
loopback; only the sampler's cost is simulated: each call is padded to ``CALL_S``
whatever its size. 64 items due in a little over four calls' time fit only in four
full calls, so a call-time model that took small calls for cheap would waste a call
and expire items that could have made it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn

from clsp_positives.service.app import create_app
from clsp_positives.service.cache import MemoryCache
from clsp_positives.service.sampling.generator import PositivesGenerator
from clsp_positives.service.settings import ServiceSettings
from tests.support.servers import free_port
from tests.support.service import anchors_u8, apost_positives, scrape

CALL_S = 0.5
"""Every sampler call, of one item or a full batch."""
MAX_BATCH = 16
REQUESTS, ANCHORS = 8, 8  # 64 items: four full calls
DEADLINE_MS = 4 * CALL_S * 1000 + 450  # four calls and some slack, but not a fifth call
PARAMS = {"steps": 2, "k": 1, "cache": "bypass", "deadline_ms": DEADLINE_MS}


class FlatCostGenerator(PositivesGenerator):
    """The real generator, each call padded to ``CALL_S``: the sampler's cost is all
    that is simulated (the warm-up's calls are padded too, as a GPU's would be)."""

    def sample(self, *args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        images = super().sample(*args, **kwargs)
        time.sleep(max(0.0, CALL_S - (time.perf_counter() - started)))
        return images


@pytest.fixture(scope="module")
def flat_service(tiny_model_dir: Path) -> Iterator[str]:
    """``create_app`` on the flat-cost generator under uvicorn; its base URL once ready."""
    settings = ServiceSettings(
        model=str(tiny_model_dir), max_batch=MAX_BATCH, max_wait_ms=100, warmup_steps=1
    )
    generator = FlatCostGenerator.from_dir(tiny_model_dir, device="cpu")
    app = create_app(settings, generator, MemoryCache(16))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)  # no signal handlers there
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1, trust_env=False).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    else:
        raise TimeoutError("the flat-cost service never became ready")
    yield url
    server.should_exit = True
    thread.join(30)


async def _wave(url: str, seed: int) -> list[httpx.Response]:
    """``REQUESTS`` concurrent requests of ``ANCHORS`` new anchors each."""
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as client:
        sent = [
            apost_positives(client, anchors_u8(ANCHORS, seed=seed * 100 + i), PARAMS)
            for i in range(REQUESTS)
        ]
        return [r for r, _ in await asyncio.gather(*sent)]


def test_flat_calls_are_filled_and_every_item_that_could_make_it_does(flat_service: str) -> None:
    before = scrape(flat_service)
    for wave in range(3):  # later waves run on the model refitted to their calls
        answers = asyncio.run(_wave(flat_service, seed=40 + wave))
        assert [r.status_code for r in answers] == [200] * REQUESTS, answers[0].text
    after = scrape(flat_service)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("clsp_deadline_expired_items_total") == 0
    assert grew("clsp_deadline_dropped_items_total") == 0
    assert grew("clsp_batch_size_sum") == 3 * REQUESTS * ANCHORS
    # every call full: 64 items in four calls a wave, none wasted on a small call
    assert grew("clsp_batch_size_count") == 3 * REQUESTS * ANCHORS / MAX_BATCH
