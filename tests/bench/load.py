"""Load test of the generation service: many clients, hits and misses, memory.

``--clients`` concurrent clients (32) send requests of ``--anchors`` anchors for
``--seconds`` (60) over loopback to a real service (uvicorn, the tiny model
unless ``--model``, a real redis-server). A request repeats one of a few warm
anchor sets with probability ``--hit-ratio`` (its positives are in the cache
and must come back byte-identical) and otherwise sends fresh anchors (every
positive generated). Only two answers are allowed: 200 with the right
positives, or the documented 429 with ``Retry-After`` (the client then waits
that long). Reported: requests and positives per second, p50/p90/p99 latency
(all, hits, misses), and the server's resident memory after a warm-up phase
against its peak during the run.

``drive()`` and ``warm_sets()`` are also the engine of the CI version
(``tests/system/test_load.py``: ~10 s) and of the Redis-restart-under-load test.

Usage: ``python tests/bench/load.py [--seconds 60] [--clients 32] [--model DIR]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clsp_positives.proto.codec import decode_response, encode_request  # noqa: E402
from tests.support.service import anchors_u8, auth  # noqa: E402

WARM_SEED = 7_000_000
"""Seeds of the warm (cached) anchor sets; fresh sets use seeds far from these."""


@dataclass(frozen=True)
class Record:
    """One request: when it started (s since the run began), what it was, how it went."""

    start: float
    kind: str  # "hit" (a warm set) or "miss" (fresh anchors)
    status: int  # HTTP status, or 0 for a transport error
    seconds: float
    items: int
    cached: int  # items answered from the cache


@dataclass
class LoadResult:
    seconds: float
    records: list[Record]
    failures: list[str]
    rss: list[tuple[float, int]] = field(default_factory=list)  # (t, bytes) of the server
    rss_baseline: int | None = None

    @property
    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    def ok(self, kind: str | None = None) -> list[Record]:
        return [r for r in self.records if r.status == 200 and kind in (None, r.kind)]

    def latency(self, q: float, kind: str | None = None) -> float:
        values = [r.seconds for r in self.ok(kind)]
        return float(np.percentile(values, q)) if values else float("nan")

    @property
    def positives_per_s(self) -> float:
        return sum(r.items for r in self.ok()) / self.seconds

    @property
    def requests_per_s(self) -> float:
        return len(self.ok()) / self.seconds

    @property
    def rss_peak(self) -> int | None:
        return max((b for _, b in self.rss), default=None)

    @property
    def rss_growth(self) -> float | None:
        """Peak RSS during the run over the RSS after warm-up, minus one."""
        if not self.rss_baseline or self.rss_peak is None:
            return None
        return self.rss_peak / self.rss_baseline - 1.0

    def summary(self) -> dict[str, Any]:
        s = self.statuses
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 2),
            "requests": len(self.records),
            "ok": s.get(200, 0),
            "rejected_429": s.get(429, 0),
            "failures": len(self.failures),
            "requests_per_s": round(self.requests_per_s, 2),
            "positives_per_s": round(self.positives_per_s, 1),
            "cached_fraction": round(
                sum(r.cached for r in self.ok()) / max(1, sum(r.items for r in self.ok())), 3
            ),
        }
        for kind in (None, "hit", "miss"):
            for q in (50, 90, 99):
                out[f"p{q}_{kind or 'all'}_ms"] = round(1000 * self.latency(q, kind), 1)
        if self.rss_baseline:
            out["rss_after_warmup_mb"] = round(self.rss_baseline / 2**20, 1)
            out["rss_peak_mb"] = round((self.rss_peak or 0) / 2**20, 1)
            out["rss_end_mb"] = round(self.rss[-1][1] / 2**20, 1) if self.rss else None
            out["rss_growth_pct"] = round(100 * (self.rss_growth or 0.0), 2)
        return out

    def table(self) -> str:
        s = self.summary()
        rows = [
            ("requests (200 / 429 / failed)", f"{s['ok']} / {s['rejected_429']} / {s['failures']}"),
            (
                "throughput",
                f"{s['requests_per_s']:.1f} req/s, {s['positives_per_s']:.1f} positives/s",
            ),
            ("answered from the cache", f"{100 * s['cached_fraction']:.1f}% of positives"),
        ]
        for kind in ("all", "hit", "miss"):
            rows.append(
                (
                    f"latency {kind} p50 / p90 / p99",
                    f"{s[f'p50_{kind}_ms']:.1f} / {s[f'p90_{kind}_ms']:.1f} / "
                    f"{s[f'p99_{kind}_ms']:.1f} ms",
                )
            )
        if "rss_growth_pct" in s:
            rows.append(
                (
                    "server RSS after warm-up -> peak (end)",
                    f"{s['rss_after_warmup_mb']:.1f} -> {s['rss_peak_mb']:.1f} "
                    f"({s['rss_end_mb']:.1f}) MB, {s['rss_growth_pct']:+.2f}%",
                )
            )
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


async def warm_sets(
    url: str, count: int, anchors: int, params: Mapping[str, Any], *, token: str | None = None
) -> dict[int, np.ndarray]:
    """Send ``count`` anchor sets once so they are cached; their positives by seed."""
    out: dict[int, np.ndarray] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i in range(count):
            seed = WARM_SEED + i
            body, ctype = encode_request(anchors_u8(anchors, seed), None, dict(params))
            r = await client.post(
                "/v1/positives", content=body, headers={"Content-Type": ctype, **auth(token)}
            )
            r.raise_for_status()
            out[seed] = decode_response(r.content, r.headers["content-type"]).positives
    return out


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


async def drive(
    url: str,
    *,
    clients: int,
    seconds: float,
    anchors: int,
    params: Mapping[str, Any],
    warm: Mapping[int, np.ndarray],
    hit_ratio: float = 0.5,
    token: str | None = None,
    seed: int = 0,
    pid: int | None = None,
    rss_interval_s: float = 0.25,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
    hits_required: bool = True,
) -> LoadResult:
    """Run the load; never raises for a bad answer, it lands in ``failures``.

    ``events``: (seconds after the start, blocking callable) run in a thread at
    that time (e.g. kill Redis). ``hits_required``: a warm set answered other
    than fully from the cache is a failure (False while faults are injected; its
    positives must then still be the cached ones, up to float rounding).
    """
    records: list[Record] = []
    failures: list[str] = []
    rss: list[tuple[float, int]] = []
    warm_seeds = sorted(warm)
    warm_shape = next(iter(warm.values())).shape[1:] if warm else (16, 16, 1)
    t0 = time.monotonic()
    stop_at = t0 + seconds
    body_params = dict(params)

    async def client_loop(c: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + c)
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            if warm_seeds and rng.random() < hit_ratio:
                kind, s = "hit", rng.choice(warm_seeds)
            else:
                kind, s = "miss", 10_000_000 * (seed + 1) + 100_000 * c + n
            body, ctype = encode_request(anchors_u8(anchors, s), None, body_params)
            start = time.monotonic()
            try:
                r = await http.post(
                    "/v1/positives", content=body, headers={"Content-Type": ctype, **auth(token)}
                )
            except httpx.HTTPError as exc:
                records.append(Record(start - t0, kind, 0, time.monotonic() - start, 0, 0))
                failures.append(f"{kind} seed {s}: {type(exc).__name__}: {exc}")
                continue
            took = time.monotonic() - start
            if r.status_code == 429:
                records.append(Record(start - t0, kind, 429, took, 0, 0))
                retry = r.headers.get("retry-after")
                if retry is None or r.json().get("error") != "queue_full":
                    failures.append(f"429 without Retry-After or queue_full: {r.text[:200]}")
                await asyncio.sleep(min(float(retry or 1), max(0.0, stop_at - time.monotonic())))
                continue
            if r.status_code != 200:
                records.append(Record(start - t0, kind, r.status_code, took, 0, 0))
                failures.append(f"{kind} seed {s}: HTTP {r.status_code}: {r.text[:200]}")
                continue
            reply = decode_response(r.content, r.headers["content-type"])
            cached = int(reply.cache_hit.sum())
            records.append(Record(start - t0, kind, 200, took, anchors, cached))
            if reply.positives.shape != (anchors, *warm_shape):
                failures.append(f"{kind} seed {s}: shape {reply.positives.shape}")
            elif kind == "miss" and cached:
                failures.append(f"fresh anchors (seed {s}) came back as cache hits")
            elif kind == "hit":
                if cached == anchors:
                    if reply.positives.tobytes() != warm[s].tobytes():
                        failures.append(f"cached positives of seed {s} changed")
                elif hits_required:
                    failures.append(f"warm set {s}: only {cached}/{anchors} from the cache")
                elif _levels_apart(reply.positives, warm[s]) > 1:
                    failures.append(f"regenerated positives of seed {s} differ from cached")

    async def sample_rss() -> None:
        import psutil

        proc = psutil.Process(pid)
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - t0, proc.memory_info().rss))
            await asyncio.sleep(rss_interval_s)
        rss.append((time.monotonic() - t0, proc.memory_info().rss))

    async def fire(at: float, action: Callable[[], Any]) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        await asyncio.to_thread(action)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [client_loop(c, http) for c in range(clients)]
        tasks += [fire(at, action) for at, action in events]
        if pid is not None:
            tasks.append(sample_rss())
        await asyncio.gather(*tasks)
    return LoadResult(time.monotonic() - t0, records, failures, rss)


async def run_with_warmup(
    url: str,
    *,
    pid: int | None,
    clients: int,
    seconds: float,
    warmup_s: float,
    anchors: int,
    params: Mapping[str, Any],
    warm_count: int,
    hit_ratio: float,
    token: str | None = None,
) -> LoadResult:
    """Cache the warm sets, run ``warmup_s`` of the same load, then the measured run
    whose RSS baseline is the server's RSS at the end of the warm-up."""
    warm = await warm_sets(url, warm_count, anchors, params, token=token)
    pre = await drive(
        url,
        clients=clients,
        seconds=warmup_s,
        anchors=anchors,
        params=params,
        warm=warm,
        hit_ratio=hit_ratio,
        token=token,
        seed=1,
        pid=pid,
    )
    result = await drive(
        url,
        clients=clients,
        seconds=seconds,
        anchors=anchors,
        params=params,
        warm=warm,
        hit_ratio=hit_ratio,
        token=token,
        seed=2,
        pid=pid,
    )
    result.failures = pre.failures + result.failures
    if pre.rss:
        result.rss_baseline = pre.rss[-1][1]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help="seconds of load before the measured run (its end is the RSS baseline)",
    )
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--anchors", type=int, default=4, help="anchors per request")
    ap.add_argument("--hit-ratio", type=float, default=0.5)
    ap.add_argument("--warm-sets", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", help="model directory (default: a random tiny 16x16 model)")
    ap.add_argument("--redis", help="Redis URL (default: a throwaway redis-server)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--max-queue", type=int, default=4096)
    ap.add_argument("--json", help="write the summary here")
    args = ap.parse_args(argv)

    from tests.support.servers import RedisServer
    from tests.support.service import start_service

    redis = None if args.redis else RedisServer().start()
    tmp = tempfile.TemporaryDirectory(prefix="clsp-load-")
    try:
        model = args.model
        if model is None:
            from tests.support.models import random_model_dir

            model = str(
                random_model_dir(
                    Path(tmp.name) / "tiny", preset="tiny", sample_size=16, channels=1, seed=0
                )
            )
        server = start_service(
            model, redis_url=args.redis or redis.url, threads=args.threads, max_queue=args.max_queue
        )
        try:
            params = {"steps": args.steps, "eta": 0.1, "interpolation_weight": 0.1}
            result = asyncio.run(
                run_with_warmup(
                    server.url,
                    pid=server.proc.pid,
                    clients=args.clients,
                    seconds=args.seconds,
                    warmup_s=args.warmup,
                    anchors=args.anchors,
                    params=params,
                    warm_count=args.warm_sets,
                    hit_ratio=args.hit_ratio,
                )
            )
        finally:
            server.stop()
    finally:
        if redis:
            redis.close()
        tmp.cleanup()
    print(
        f"load: {args.clients} clients x {args.seconds:g} s, {args.anchors} anchors/request, "
        f"hit ratio {args.hit_ratio:g}, steps {args.steps}"
    )
    print(result.table())
    for line in result.failures[:20]:
        print("FAILURE:", line)
    if args.json:
        Path(args.json).write_text(json.dumps(result.summary(), indent=2) + "\n")
    growth = result.rss_growth
    ok = (
        not result.failures
        and set(result.statuses) <= {200, 429}
        and (growth is None or growth < 0.10)
    )
    print("PASS" if ok else "FAIL: failures, unexpected statuses or RSS growth >= 10%")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
