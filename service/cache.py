"""Caches of generated positives: Redis (shared by a pool) or an in-process LRU.

The cache knows keys and bytes, not HTTP or diffusion. Values are the compact
uint8 image (or a latent model's float32 latents, under a magic of their own,
so a value always says which it is) with its shape and a MAC, never a pickle. The MAC is a keyed
blake2b over the entry's name and the value, keyed by the pool's cache secret:
whoever can write to a shared Redis but lacks the secret can neither forge a
positive nor copy one under another key (docs/design.md §7). A value that
fails its layout or its MAC (a torn write, a bit flip, a copied or forged
entry, another pool's) is a miss, counted, and the service regenerates and
overwrites it.

Redis is an optimisation, never a dependency: every call has a short socket
timeout, a failure is counted and starts a backoff during which lookups are
skipped, and after the backoff the next call reconnects. Nothing here raises
into a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger("clsp.service.cache")

_MAGIC = b"CLSP\x02"  # \x01 was an unkeyed checksum: such values now fail the magic
_LATENT_MAGIC = b"CLSP\x03"  # float32 latents (docs/latent.md), little-endian
_KINDS: dict[bytes, np.dtype] = {_MAGIC: np.dtype("u1"), _LATENT_MAGIC: np.dtype("<f4")}
_DIGEST_BYTES = 32
_MAX_NDIM = 8
SECRET_ENV = "CLSP_CACHE_SECRET"


class CorruptValue(ValueError):
    """A cached value whose layout or MAC does not hold."""


class UntrustedValue(CorruptValue):
    """A well-formed value whose MAC does not hold: copied from another key, forged,
    written with another secret, or damaged in its pixels."""


@dataclass(frozen=True)
class CacheSecret:
    """The MAC key of a pool's values and where it came from (logged at start-up)."""

    key: bytes
    source: str

    def __repr__(self) -> str:  # never the key itself in a log line or traceback
        return f"CacheSecret(source={self.source!r})"


def cache_secret(secret: str | None, token: str | None) -> CacheSecret:
    """The MAC key by precedence: ``CLSP_CACHE_SECRET``, else derived from the API
    token (a pool shares its token, so it shares this key too), else random to
    this process, which no other generator can read (docs/design.md §7).

    Each source is hashed under its own personalisation, so the key is never the
    token itself and a secret equal to a token gives another key."""
    if secret:
        key = hashlib.blake2b(secret.encode(), digest_size=32, person=b"clsp-cache-sec")
        return CacheSecret(key.digest(), SECRET_ENV)
    if token:
        key = hashlib.blake2b(token.encode(), digest_size=32, person=b"clsp-cache-tok")
        return CacheSecret(key.digest(), "the API token")
    return CacheSecret(os.urandom(32), "random, this process only")


def _mac(mac_key: bytes, name: str, header: bytes, data: bytes) -> bytes:
    """Keyed blake2b over the entry's name (length-prefixed) and the whole value:
    the MAC holds only for these bytes under this name."""
    h = hashlib.blake2b(key=mac_key, digest_size=_DIGEST_BYTES, person=b"clsp-cache-mac")
    raw = name.encode()
    h.update(struct.pack("<I", len(raw)) + raw)
    h.update(header)
    h.update(data)
    return h.digest()


def encode_value(image: np.ndarray, name: str, mac_key: bytes) -> bytes:
    """uint8 image or float32 latents stored as ``name`` -> magic (which of the two)
    | ndim | shape (uint32 each) | MAC (keyed blake2b-256 over name, header and
    data) | raw little-endian bytes."""
    image = np.ascontiguousarray(image)
    if image.dtype == np.uint8:
        magic = _MAGIC
    elif image.dtype == np.float32:
        magic = _LATENT_MAGIC
    else:
        raise TypeError(f"only uint8 images and float32 latents are cached, got {image.dtype}")
    if image.ndim > _MAX_NDIM:
        raise ValueError(f"at most {_MAX_NDIM} dimensions, got {image.ndim}")
    header = magic + struct.pack(f"<B{image.ndim}I", image.ndim, *image.shape)
    data = image.astype(_KINDS[magic], copy=False).tobytes()
    return header + _mac(mac_key, name, header, data) + data


def decode_value(blob: bytes, name: str, mac_key: bytes) -> np.ndarray:
    """Inverse of ``encode_value`` for the value read under ``name``; raise
    ``CorruptValue`` unless the layout holds and ``UntrustedValue`` unless the MAC does."""
    dtype = _KINDS.get(bytes(blob[: len(_MAGIC)]))
    if len(blob) < len(_MAGIC) + 1 or dtype is None:
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
    if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CorruptValue(f"{len(data)} data bytes for shape {shape} of {dtype.name}")
    if not hmac.compare_digest(_mac(mac_key, name, blob[:head_end], data), digest):
        raise UntrustedValue("MAC mismatch (copied, forged, another secret, or damaged)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


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
    corrupt: int = 0  # values that failed their layout or MAC (served as misses)
    untrusted: int = 0  # of those, well-formed ones whose MAC failed
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


def _decode_all(
    stats: CacheStats, names: Sequence[str], blobs: Sequence[bytes | None], mac_key: bytes
) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for name, blob in zip(names, blobs, strict=True):
        if blob is None:
            stats.misses += 1
            out.append(None)
            continue
        try:
            out.append(decode_value(blob, name, mac_key))
            stats.hits += 1
        except CorruptValue as exc:
            stats.corrupt += 1
            stats.untrusted += isinstance(exc, UntrustedValue)
            stats.misses += 1
            log.warning("cached value failed its check (%s); regenerating", exc)
            out.append(None)
    return out


class MemoryCache:
    """In-process LRU bounded by the total size of its values: the embedded default."""

    _OVERHEAD = 96  # rough bytes per entry beyond the value (key string, dict slot)

    def __init__(self, max_mb: float = 256.0, *, mac_key: bytes | None = None) -> None:
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.mac_key = mac_key or cache_secret(None, None).key
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
        names = [entry_name(namespace, key) for key in keys]
        for name in names:
            found = self._entries.get(name)
            if found is not None and found[1] < now:
                self._drop(name)
                found = None
            if found is not None:
                self._entries.move_to_end(name)
            blobs.append(found[0] if found else None)
        return _decode_all(self.stats, names, blobs, self.mac_key)

    async def set_many(
        self, namespace: str, items: Sequence[tuple[bytes, np.ndarray]], ttl_s: int
    ) -> None:
        expires = time.monotonic() + ttl_s
        for key, image in items:
            name = entry_name(namespace, key)
            blob = encode_value(image, name, self.mac_key)
            cost = len(blob) + self._OVERHEAD
            if cost > self.max_bytes:
                continue
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
        mac_key: bytes | None = None,
        timeout_s: float = 0.3,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        # Without a key of its own no other process can read this one's entries.
        self.mac_key = mac_key or cache_secret(None, None).key
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
        names = [entry_name(namespace, k) for k in keys]
        blobs, ok = await self._guard("MGET", self._client.mget(names))
        if not ok:
            return [None] * len(keys)
        return _decode_all(self.stats, names, blobs, self.mac_key)

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
            name = entry_name(namespace, key)
            pipe.set(name, encode_value(image, name, self.mac_key), ex=int(ttl_s))
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
    mac_key: bytes | None = None,
    cache_mb: float = 256.0,
    timeout_s: float = 0.3,
    backoff_max_s: float = 5.0,
) -> PositivesCache:
    """Redis when a URL is given, else the in-process LRU; both MAC their values
    with ``mac_key`` (random to this process when None)."""
    if redis_url:
        return RedisCache(
            redis_url, mac_key=mac_key, timeout_s=timeout_s, backoff_max_s=backoff_max_s
        )
    return MemoryCache(cache_mb, mac_key=mac_key)
