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
into a request. On a Redis Cluster (``redis+cluster://``) the keys of a request
are grouped by the master that owns their slot, and each master is asked, and
backs off, on its own: one failing master makes its own keys misses, not the
request's (docs/design.md §7).
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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

log = logging.getLogger("clsp.service.cache")

_MAGIC = b"CLSP\x02"  # \x01 was an unkeyed checksum: such values now fail the magic
_LATENT_MAGIC = b"CLSP\x03"  # float32 latents (docs/latent.md), little-endian
_KINDS: dict[bytes, np.dtype] = {_MAGIC: np.dtype("u1"), _LATENT_MAGIC: np.dtype("<f4")}
_DIGEST_BYTES = 32
_MAX_NDIM = 8
SECRET_ENV = "CLSP_CACHE_SECRET"
SERVER_SCHEMES = ("redis", "rediss", "unix")
"""URL schemes of one Redis server, as redis-py reads them."""
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes of a Redis Cluster, each with the scheme redis-py reads for its nodes."""


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


class _Outage:
    """The doubling pause (``min_s`` up to ``max_s``) after a failed call to one Redis
    server or one cluster master, during which it is not asked: a dead Redis costs a
    request nothing, and after the pause the next call tries it again."""

    def __init__(self, where: str, min_s: float, max_s: float) -> None:
        self.where = where
        self.min_s = min_s
        self.max_s = max_s
        self.pause = 0.0
        self.until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.until

    def failed(self, op: str, exc: BaseException) -> None:
        self.pause = min(self.max_s, max(self.min_s, self.pause * 2))
        self.until = time.monotonic() + self.pause
        log.warning(
            "%s %s failed (%s: %s); serving uncached, next try in %.1f s",
            self.where,
            op,
            type(exc).__name__,
            exc,
            self.pause,
        )

    def succeeded(self) -> None:
        if self.pause:
            log.info("%s is reachable again; caching resumes", self.where)
        self.pause = 0.0
        self.until = 0.0


async def _guarded(
    stats: CacheStats, outage: _Outage, op: str, call: Awaitable[Any], timeout_s: float
) -> tuple[Any, bool]:
    """``call``'s result and True, or None and False once it failed (counted, and
    ``outage`` starts its pause). Socket timeouts bound each read; ``timeout_s`` also
    bounds connecting and queueing."""
    try:
        result = await asyncio.wait_for(call, timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any Redis failure means "uncached", never a 5xx
        stats.errors += 1
        outage.failed(op, exc)
        return None, False
    outage.succeeded()
    return result, True


def _client_options(timeout_s: float) -> dict[str, Any]:
    """What both Redis clients are built with: every socket operation bounded by
    ``timeout_s``, and no client-side retries, so a failed call falls back to uncached at
    once and the cache's own backoff decides when to try again (docs/reliability.md)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


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

        self.url = url
        # Without a key of its own no other process can read this one's entries.
        self.mac_key = mac_key or cache_secret(None, None).key
        self.timeout_s = timeout_s
        self.stats = CacheStats()
        self._client = aioredis.Redis.from_url(url, **_client_options(timeout_s))
        self._outage = _Outage("redis", backoff_min_s, backoff_max_s)

    @property
    def available(self) -> bool:
        """False while backing off after an error."""
        return self._outage.available

    async def _guard(self, op: str, call: Awaitable[Any]) -> tuple[Any, bool]:
        return await _guarded(self.stats, self._outage, op, call, self.timeout_s * 3)

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


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or
    ``rediss+cluster://``, any one node of it) rather than one Redis server."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


class RedisClusterCache:
    """Redis Cluster through ``redis.asyncio.cluster``: the keys of a call grouped by
    the master that owns their hash slot, one pipeline of GETs (or SET EXs) per master,
    the masters asked side by side. One MGET would span many slots, which a cluster
    refuses (docs/design.md §7).

    Each master has its own backoff: a master that fails or times out makes its own
    keys misses (its writes dropped) while the other masters keep serving, and it is
    asked again after its pause. The cluster client does not retry either; the
    failure it saw makes it refresh the slot map on a later call, so a failover to a
    replica is found without a restart. Values, MACs and TTLs are those of
    ``RedisCache``."""

    def __init__(
        self,
        url: str,
        *,
        mac_key: bytes | None = None,
        timeout_s: float = 0.3,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        from redis.asyncio.cluster import RedisCluster

        parts = urlsplit(url)
        if parts.scheme not in CLUSTER_SCHEMES:
            raise ValueError(f"not a Redis Cluster URL (redis+cluster://HOST:PORT): {url!r}")
        self.url = url
        self.mac_key = mac_key or cache_secret(None, None).key
        self.timeout_s = timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.stats = CacheStats()
        self._client = RedisCluster.from_url(
            parts._replace(scheme=CLUSTER_SCHEMES[parts.scheme]).geturl(),
            **_client_options(timeout_s),
        )
        # Reaching the cluster at all (its slot map), then each master on its own.
        self._topology = _Outage("redis cluster", backoff_min_s, backoff_max_s)
        self._masters: dict[str, _Outage] = {}

    def _outage(self, node: str) -> _Outage:
        if node not in self._masters:
            where = f"redis cluster master {node}"
            self._masters[node] = _Outage(where, self.backoff_min_s, self.backoff_max_s)
        return self._masters[node]

    async def _by_master(self, names: Sequence[str]) -> dict[str, list[int]]:
        """Indices of ``names`` by the master owning their slot, less those of masters
        backing off (counted as skipped); none when the slot map cannot be had."""
        from redis.exceptions import SlotNotCoveredError

        if not self._topology.available:
            self.stats.skipped += len(names)
            return {}
        _, ok = await _guarded(
            self.stats,
            self._topology,
            "CLUSTER SLOTS",
            self._client.initialize(),
            3 * self.timeout_s,
        )
        if not ok:
            return {}
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            try:
                node = self._client.get_node_from_key(name)
            except SlotNotCoveredError:  # the cluster serves no such slot now
                self.stats.skipped += 1
                continue
            if node is not None:
                groups.setdefault(node.name, []).append(i)
        for node in [n for n in groups if not self._outage(n).available]:
            self.stats.skipped += len(groups.pop(node))
        return groups

    async def _on_master(self, node: str, op: str, pipe: Any) -> tuple[Any, bool]:
        return await _guarded(
            self.stats, self._outage(node), op, pipe.execute(), self.timeout_s * 3
        )

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        if not keys:
            return []
        names = [entry_name(namespace, k) for k in keys]
        found: list[np.ndarray | None] = [None] * len(keys)
        groups = await self._by_master(names)

        async def read(node: str, indices: list[int]) -> None:
            pipe = self._client.pipeline(transaction=False)
            for i in indices:
                pipe.get(names[i])
            blobs, ok = await self._on_master(node, "GET", pipe)
            if ok:
                values = _decode_all(self.stats, [names[i] for i in indices], blobs, self.mac_key)
                for i, value in zip(indices, values, strict=True):
                    found[i] = value

        await asyncio.gather(*(read(node, indices) for node, indices in groups.items()))
        return found

    async def set_many(
        self, namespace: str, items: Sequence[tuple[bytes, np.ndarray]], ttl_s: int
    ) -> None:
        if not items:
            return
        names = [entry_name(namespace, key) for key, _ in items]
        groups = await self._by_master(names)

        async def write(node: str, indices: list[int]) -> None:
            pipe = self._client.pipeline(transaction=False)
            for i in indices:
                value = encode_value(items[i][1], names[i], self.mac_key)
                pipe.set(names[i], value, ex=int(ttl_s))
            _, ok = await self._on_master(node, "SET", pipe)
            if ok:
                self.stats.writes += len(indices)

        await asyncio.gather(*(write(node, indices) for node, indices in groups.items()))

    async def put_raw(self, namespace: str, key: bytes, blob: bytes, ttl_s: int = 3600) -> None:
        """Store bytes as they are (tests use it to plant a corrupt value)."""
        await self._client.set(entry_name(namespace, key), blob, ex=ttl_s)

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a dead connection may fail; nothing to do
            log.debug("closing redis cluster: %s", exc)


def build_cache(
    redis_url: str | None,
    *,
    mac_key: bytes | None = None,
    cache_mb: float = 256.0,
    timeout_s: float = 0.3,
    backoff_max_s: float = 5.0,
) -> PositivesCache:
    """Redis (a Redis Cluster for ``redis+cluster://``) when a URL is given, else the
    in-process LRU; all MAC their values with ``mac_key`` (random to this process
    when None)."""
    if redis_url:
        kind = RedisClusterCache if is_cluster_url(redis_url) else RedisCache
        return kind(redis_url, mac_key=mac_key, timeout_s=timeout_s, backoff_max_s=backoff_max_s)
    return MemoryCache(cache_mb, mac_key=mac_key)
