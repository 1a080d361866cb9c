"""Service benchmark: what HTTP, batching and the cache cost, as ratios.

* cache miss: positives/s through HTTP (``clsp`` service under uvicorn, Redis,
  fresh anchors, requests of ``--batch`` anchors, ``--clients`` at a time so the
  worker never idles) against ``PositivesGenerator.sample`` called directly at the same
  batch size in this process, with the same torch thread count as the server.
  Direct and HTTP rounds interleave and the best round of each is kept, so load
  from other processes biases neither side; a first round of each is warm-up.
  Target: overhead <= 10%.
* cache hit: p50/p99 latency and positives/s of requests of ``--hit-anchors``
  anchors (256) over loopback, every positive already in Redis; sequential and
  with ``4 * --clients`` concurrent clients.

Usage: ``python tests/bench/service.py [--model DIR] [--steps 10] [--batch 64]
[--json OUT]``; without ``--model`` a random "tiny" 16x16 model is made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.servers import RedisServer  # noqa: E402
from tests.support.service import anchors_u8, start_service  # noqa: E402


def _direct(generator, batch: int, steps: int, rounds: int, seed: int) -> float:
    """positives/s of ``PositivesGenerator.sample`` at ``batch``, best of ``rounds``."""
    from clsp_positives.proto.keys import canonical_anchors
    from clsp_positives.proto.params import GenerationParams

    group = GenerationParams(steps=steps, eta=0.1).group()
    c, s = generator.channels, generator.sample_size
    best = float("inf")
    for r in range(rounds):
        anchors = canonical_anchors(anchors_u8(batch, seed + r, size=s, channels=c))
        seeds = np.arange(r * batch, (r + 1) * batch, dtype=np.int64)
        weights = np.full(batch, 0.1, np.float32)
        t0 = time.perf_counter()
        generator.sample(anchors, seeds, weights, group)
        best = min(best, time.perf_counter() - t0)
    return batch / best


async def _http_misses(
    url: str,
    *,
    batch: int,
    steps: int,
    requests: int,
    clients: int,
    size: int,
    channels: int,
    seed: int,
) -> float:
    import httpx

    from clsp_positives.proto.codec import encode_request

    params = {"steps": steps, "eta": 0.1, "interpolation_weight": 0.1}
    bodies = [
        encode_request(anchors_u8(batch, seed + i, size=size, channels=channels), None, params)[0]
        for i in range(requests)
    ]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client(c: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            r = await c.post(
                "/v1/positives", content=body, headers={"Content-Type": "application/x-safetensors"}
            )
            r.raise_for_status()

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return requests * batch / (time.perf_counter() - t0)


async def _http_hits(
    url: str, body: bytes, *, requests: int, clients: int
) -> tuple[list[float], float]:
    import httpx

    latencies: list[float] = []
    per_client = requests // clients

    async def client(c: httpx.AsyncClient) -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            r = await c.post(
                "/v1/positives", content=body, headers={"Content-Type": "application/x-safetensors"}
            )
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            assert r.headers["content-type"] == "application/x-safetensors"

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        return latencies, time.perf_counter() - t0


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: a random tiny 16x16 model)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--miss-requests", type=int, default=4, help="per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--hit-anchors", type=int, default=256)
    ap.add_argument("--hit-requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from clsp_positives.proto.codec import decode_response, encode_request
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from tests.support.models import random_model_dir

    tmp = tempfile.mkdtemp(prefix="clsp-bench-")
    model_dir = args.model or str(random_model_dir(Path(tmp) / "tiny"))
    generator = PositivesGenerator.from_dir(model_dir, device=args.device, dtype=args.dtype)
    size, channels = generator.sample_size, generator.channels
    _direct(generator, args.batch, args.steps, 1, seed=0)  # warm-up

    redis = RedisServer(maxmemory="1gb").start()
    server = start_service(
        model_dir,
        redis_url=redis.url,
        max_batch=args.batch,
        max_wait_ms=5,
        max_anchors=max(args.hit_anchors, args.batch),
        max_queue=64 * args.batch,
        max_cost=10**9,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        # Interleaved rounds, best of each: load from other processes on a shared
        # machine then biases neither side. The first HTTP round warms the server up.
        direct_runs, http_runs = [], []
        for r in range(args.rounds + 1):
            direct_runs.append(_direct(generator, args.batch, args.steps, 2, seed=100 + 10 * r))
            http_runs.append(
                asyncio.run(
                    _http_misses(
                        server.url,
                        batch=args.batch,
                        steps=args.steps,
                        requests=args.miss_requests,
                        clients=args.clients,
                        size=size,
                        channels=channels,
                        seed=1000 + 100 * r,
                    )
                )
            )
        direct, http = max(direct_runs[1:]), max(http_runs[1:])

        params = {"steps": args.steps, "eta": 0.1, "interpolation_weight": 0.1}
        body = encode_request(
            anchors_u8(args.hit_anchors, 5000, size=size, channels=channels), None, params
        )[0]
        import httpx

        r = httpx.post(
            server.url + "/v1/positives",
            content=body,
            timeout=600,
            headers={"Content-Type": "application/x-safetensors"},
        )
        r.raise_for_status()
        r = httpx.post(
            server.url + "/v1/positives",
            content=body,
            timeout=600,
            headers={"Content-Type": "application/x-safetensors"},
        )
        assert decode_response(r.content, r.headers["content-type"]).cache_hit.all()
        hit_runs = {}
        for clients in (1, args.clients * 4):
            lat, seconds = asyncio.run(
                _http_hits(server.url, body, requests=args.hit_requests, clients=clients)
            )
            lat_ms = np.array(lat) * 1000
            hit_runs[clients] = {
                "p50_ms": float(np.percentile(lat_ms, 50)),
                "p99_ms": float(np.percentile(lat_ms, 99)),
                "positives_per_s": len(lat) * args.hit_anchors / seconds,
            }
    finally:
        server.stop()
        redis.close()

    figures = {
        "model": f"{size}x{size}x{channels}",
        "steps": args.steps,
        "batch": args.batch,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "miss_direct_positives_per_s": direct,
        "miss_http_positives_per_s": http,
        "miss_overhead": direct / http - 1.0,
        "hit_anchors": args.hit_anchors,
        "hits": hit_runs,
    }
    print(
        f"\nservice benchmark: model {figures['model']} on {args.device}/{args.dtype}, "
        f"{args.steps} DDIM steps, batch {args.batch}, {args.threads} torch thread(s), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'measure':52s} {'value':>12s}")
    print(f"{'cache miss, generator.sample direct (positives/s)':52s} {direct:12.1f}")
    print(f"{'cache miss, HTTP + batcher + Redis (positives/s)':52s} {http:12.1f}")
    print(f"{'cache miss overhead (direct/HTTP - 1)':52s} {figures['miss_overhead']:12.1%}")
    for clients, run in hit_runs.items():
        label = f"cache hit, {args.hit_anchors} anchors, {clients} client(s)"
        print(f"{label + ' p50 (ms)':52s} {run['p50_ms']:12.2f}")
        print(f"{label + ' p99 (ms)':52s} {run['p99_ms']:12.2f}")
        print(f"{label + ' positives/s':52s} {run['positives_per_s']:12.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
