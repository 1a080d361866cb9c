"""Caches of generated positives: Redis (shared by a pool) or an in-process LRU.

The cache knows keys and bytes, not HTTP or diffusion. Values are the compact
uint8 image with its shape and a blake2b checksum, never a pickle: a value
that fails its checksum (a torn write, a bit flip, someone else's data) is a
miss, counted, and the service regenerates and overwrites it.

Redis is an optimisation, never a dependency: every call has a short socket
timeout, a failure is counted and starts a backoff during which lookups are
skipped, and after the backoff the next call reconnects. Nothing here raises
into a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger("clsp.service.cache")

_MAGIC = b"CLSP\x01"
_DIGEST_BYTES = 16
_MAX_NDIM = 8


class CorruptValue(ValueError):
    """A cached value whose layout or checksum does not hold."""


def encode_value(image: np.ndarray) -> bytes:
    """uint8 array -> magic | ndim | shape (uint32 each) | blake2b-128 | raw bytes."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"only uint8 images are cached, got {image.dtype}")
    if image.ndim > _MAX_NDIM:
        raise ValueError(f"at most {_MAX_NDIM} dimensions, got {image.ndim}")
    header = _MAGIC + struct.pack(f"<B{image.ndim}I", image.ndim, *image.shape)
    data = image.tobytes()
    digest = hashlib.blake2b(header + data, digest_size=_DIGEST_BYTES).digest()
    return header + digest + data


def decode_value(blob: bytes) -> np.ndarray:
    """Inverse of ``encode_value``; raise ``CorruptValue`` unless every check holds."""
    if len(blob) < len(_MAGIC) + 1 or not blob.startswith(_MAGIC):
        raise CorruptValue("not a cached positive (bad magic)")
    ndim = blob[len(_MAGIC)]
    if ndim > _MAX_NDIM:
        raise CorruptValue(f"bad rank {ndim}")
    head_end = len(_MAGIC) + 1 + 4 * ndim
    if len(blob) < head_end + _DIGEST_BYTES:
        raise CorruptValue("truncated header")
    shape = struct.unpack(f"<{ndim}I", blob[len(_MAGIC) + 1 : head_end])
    digest = blob[head_end : head_end + _DIGEST_BYTES]
    data = blob[head_end + _DIGEST_BYTES :]
    if len(data) != int(np.prod(shape, dtype=np.int64)):
        raise CorruptValue(f"{len(data)} data bytes for shape {shape}")
    check = hashlib.blake2b(blob[:head_end] + data, digest_size=_DIGEST_BYTES).digest()
    if check != digest:
        raise CorruptValue("checksum mismatch")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def entry_name(namespace: str, key: bytes) -> str:
    """Redis key of one positive: ``clsp:{fingerprint}:{hex key}``, so two models
    never share entries and one model's entries can be listed or dropped."""
    return f"clsp:{namespace}:{key.hex()}"


@dataclass
class CacheStats:
    """Running counts since start (exported as Prometheus counters)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0  # failed Redis calls (down, timeout, protocol error)
    skipped: int = 0  # lookups and writes skipped while backing off after an error
    corrupt: int = 0  # values that failed their checksum (served as misses)
    writes: int = 0


class PositivesCache(Protocol):
    """What the service needs of a cache; neither method ever raises."""

    stats: CacheStats

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """One lookup for all keys; ``None`` for a miss (or when the cache is unavailable)."""
        ...

    async def set_many(
        self, namespace: str, items: Sequence[tuple[bytes, np.ndarray]], ttl_s: int
    ) -> None:
        """Store positives for ``ttl_s`` seconds (best effort)."""
        ...

    async def close(self) -> None: ...


def _decode_all(stats: CacheStats, blobs: Sequence[bytes | None]) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for blob in blobs:
        if blob is None:
            stats.misses += 1
            out.append(None)
            continue
        try:
            out.append(decode_value(blob))
            stats.hits += 1
        except CorruptValue as exc:
            stats.corrupt += 1
            stats.misses += 1
            log.warning("cached value failed its check (%s); regenerating", exc)
            out.append(None)
    return out


class MemoryCache:
    """In-process LRU bounded by the total size of its values: the embedded default."""

    _OVERHEAD = 96  # rough bytes per entry beyond the value (key string, dict slot)

    def __init__(self, max_mb: float = 256.0) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.stats = CacheStats()
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        now = time.monotonic()
        blobs: list[bytes | None] = []
        for key in keys:
            name = entry_name(namespace, key)
            found = self._entries.get(name)
            if found is not None and found[1] < now:
                self._drop(name)
                found = None
            if found is not None:
                self._entries.move_to_end(name)
            blobs.append(found[0] if found else None)
        return _decode_all(self.stats, blobs)

    async def set_many(
        self, namespace: str, items: Sequence[tuple[bytes, np.ndarray]], ttl_s: int
    ) -> None:
        expires = time.monotonic() + ttl_s
        for key, image in items:
            blob = encode_value(image)
            cost = len(blob) + self._OVERHEAD
            if cost > self.max_bytes:
                continue
            name = entry_name(namespace, key)
            self._drop(name)
            self._entries[name] = (blob, expires)
            self._bytes += cost
            self.stats.writes += 1
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, name: str) -> None:
        found = self._entries.pop(name, None)
        if found is not None:
            self._bytes -= len(found[0]) + self._OVERHEAD

    def put_raw(self, namespace: str, key: bytes, blob: bytes, ttl_s: int = 3600) -> None:
        """Store bytes as they are (tests use it to plant a corrupt value)."""
        name = entry_name(namespace, key)
        self._drop(name)
        self._entries[name] = (blob, time.monotonic() + ttl_s)
        self._bytes += len(blob) + self._OVERHEAD

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisCache:
    """Redis through ``redis.asyncio``: one MGET per lookup, pipelined SET EX per write."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.3,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout_s = timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stats = CacheStats()
        # No client-side retries: a failed call falls back to uncached at once and
        # our own backoff decides when to try again.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._backoff = 0.0
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        """False while backing off after an error."""
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self._backoff = min(self.backoff_max_s, max(self.backoff_min_s, self._backoff * 2))
        self._down_until = time.monotonic() + self._backoff
        log.warning(
            "redis %s failed (%s: %s); serving uncached, next try in %.1f s",
            op,
            type(exc).__name__,
            exc,
            self._backoff,
        )

    def _succeeded(self) -> None:
        if self._backoff:
            log.info("redis is reachable again; caching resumes")
        self._backoff = 0.0
        self._down_until = 0.0

    async def _guard(self, op: str, coro):
        # socket timeouts bound each read; wait_for also bounds connect + queueing.
        try:
            result = await asyncio.wait_for(coro, self.timeout_s * 3)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any Redis failure means "uncached", never a 5xx
            self._failed(op, exc)
            return None, False
        self._succeeded()
        return result, True

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        if not keys:
            return []
        if not self.available:
            self.stats.skipped += len(keys)
            return [None] * len(keys)
        blobs, ok = await self._guard(
            "MGET", self._client.mget([entry_name(namespace, k) for k in keys])
        )
        if not ok:
            return [None] * len(keys)
        return _decode_all(self.stats, blobs)

    async def set_many(
        self, namespace: str, items: Sequence[tuple[bytes, np.ndarray]], ttl_s: int
    ) -> None:
        if not items:
            return
        if not self.available:
            self.stats.skipped += len(items)
            return
        pipe = self._client.pipeline(transaction=False)
        for key, image in items:
            pipe.set(entry_name(namespace, key), encode_value(image), ex=int(ttl_s))
        _, ok = await self._guard("SET", pipe.execute())
        if ok:
            self.stats.writes += len(items)

    async def put_raw(self, namespace: str, key: bytes, blob: bytes, ttl_s: int = 3600) -> None:
        """Store bytes as they are (tests use it to plant a corrupt value)."""
        await self._client.set(entry_name(namespace, key), blob, ex=ttl_s)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a dead connection may fail; nothing to do
            log.debug("closing redis: %s", exc)


def build_cache(
    redis_url: str | None,
    *,
    cache_mb: float = 256.0,
    timeout_s: float = 0.3,
    backoff_max_s: float = 5.0,
) -> PositivesCache:
    """Redis when a URL is given, else the in-process LRU."""
    if redis_url:
        return RedisCache(redis_url, timeout_s=timeout_s, backoff_max_s=backoff_max_s)
    return MemoryCache(cache_mb)
