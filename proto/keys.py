"""Cache keys and per-sample seeds (docs/design.md §2).

A positive is addressed by ``(model fingerprint, canonical params, anchor
content, candidate index)``. The anchor is canonicalised before hashing so
that the uint8 ``[H, W, C]`` and float32 ``[C, H, W]`` forms of one image give
one key, and all randomness of a candidate is derived from its key, so the
same key always yields the same positive. A latent anchor (a latent model's
``anchor_latents``) is hashed by its canonical float32 ``[c, h, w]`` bytes under
a marker of its own, so it never shares a key with a picture of the same bytes
(docs/design.md §2).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from clsp_positives.proto.params import AnchorSpace, GenerationParams

KEY_DOMAIN = b"clsp-positives/key/v1"
ANCHOR_SEED_DOMAIN = b"clsp-positives/anchor-seed/v1"
SEED_BITS = 63


def uint8_to_unit(images: np.ndarray) -> np.ndarray:
    """Map uint8 pixels to float32 in [-1, 1] as ``(x - 127.5) / 127.5``.

    ``x - 127.5`` is exact in float32, so the only rounding is the division:
    every value is the float32 nearest to the true one, and a client that
    computes in float64 and casts gets the same bits.
    """
    return (images.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    """Inverse of ``uint8_to_unit`` for values in [-1, 1], rounding to nearest."""
    scaled = np.rint((images.astype(np.float32) + np.float32(1.0)) * np.float32(127.5))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def canonical_anchors(anchors: np.ndarray) -> np.ndarray:
    """Anchors as C-contiguous float32 ``[N, C, H, W]`` in [-1, 1].

    uint8 input is ``[N, H, W, C]`` (pixels); float16/float32 input is already
    ``[N, C, H, W]``. float16 converts to float32 exactly.
    """
    if anchors.ndim != 4:
        raise ValueError(f"anchors must have rank 4, got shape {anchors.shape}")
    if anchors.dtype == np.uint8:
        return np.ascontiguousarray(uint8_to_unit(anchors).transpose(0, 3, 1, 2))
    if anchors.dtype in (np.float16, np.float32):
        return np.ascontiguousarray(anchors, dtype=np.float32)
    raise ValueError(f"anchors must be uint8, float16 or float32, got {anchors.dtype}")


def canonical_latents(latents: np.ndarray) -> np.ndarray:
    """Latent anchors as C-contiguous float32 ``[N, c, h, w]`` (float16 converts exactly)."""
    if latents.ndim != 4:
        raise ValueError(f"latents must have rank 4, got shape {latents.shape}")
    if latents.dtype not in (np.float16, np.float32):
        raise ValueError(f"latents must be float16 or float32, got {latents.dtype}")
    return np.ascontiguousarray(latents, dtype=np.float32)


def positive_key(
    fingerprint: str,
    params: GenerationParams,
    anchor_chw: np.ndarray,
    candidate: int,
    space: AnchorSpace = "image",
) -> bytes:
    """sha256 of one positive's identity; ``anchor_chw`` is one canonical anchor,
    a picture or (``space="latent"``) a latent. Picture keys hash exactly as before
    latents existed.

    ``params.output`` latents changes the key but not its seed (``seed_from_key``
    reads the first 8 bytes): the first 8 bytes are those of the images key, the
    other 24 hash that key with the output form. The latents and the picture of
    one positive are then one sample, cached and batched as two values
    (docs/design.md §2).
    """
    return _positive_key(_key_prefix(fingerprint, params, space), params, anchor_chw, candidate)


def _key_prefix(fingerprint: str, params: GenerationParams, space: AnchorSpace) -> Any:
    """The hash state of what every key of one request shares: the domain, the model,
    the params and the anchor space, hashed once per batch rather than once per key."""
    h = hashlib.sha256()
    h.update(KEY_DOMAIN)
    h.update(b"|" + fingerprint.encode())
    h.update(b"|" + params.canonical())
    if space == "latent":
        h.update(b"|latent")
    return h


def _positive_key(
    prefix: Any, params: GenerationParams, anchor_chw: np.ndarray, candidate: int
) -> bytes:
    if anchor_chw.dtype != np.float32 or anchor_chw.ndim != 3:
        raise ValueError("positive_key takes one canonical float32 [C, H, W] anchor")
    if candidate < 0:
        raise ValueError(f"candidate index must be >= 0, got {candidate}")
    h = prefix.copy()
    h.update(b"|" + _anchor_bytes(anchor_chw))
    h.update(b"|" + int(candidate).to_bytes(8, "little"))
    key = h.digest()
    if params.output == "images":
        return key
    tail = hashlib.sha256(KEY_DOMAIN + b"|output=" + params.output.encode() + b"|" + key)
    return key[:8] + tail.digest()[:24]


def positive_keys(
    fingerprint: str,
    params: GenerationParams,
    anchors: np.ndarray,
    candidates: Sequence[int] | np.ndarray,
    space: AnchorSpace = "image",
) -> list[bytes]:
    """Keys of a batch: ``anchors`` in any accepted form of ``space``, one candidate
    per anchor."""
    canon = canonical_latents(anchors) if space == "latent" else canonical_anchors(anchors)
    if len(candidates) != len(canon):
        raise ValueError(f"{len(canon)} anchors but {len(candidates)} candidate indices")
    prefix = _key_prefix(fingerprint, params, space)
    pairs = zip(canon, candidates, strict=True)
    return [_positive_key(prefix, params, a, int(c)) for a, c in pairs]


def seed_from_key(key: bytes) -> int:
    """The per-sample seed: the key's first 8 bytes, as a non-negative int64."""
    return int.from_bytes(key[:8], "little") & ((1 << SEED_BITS) - 1)


def anchor_seed(anchor_chw: np.ndarray) -> int:
    """The seed of an anchor's own noise, from its content alone.

    With ``share_anchor`` the anchor is noised by this seed rather than by each
    candidate's, so every candidate of the anchor, in whatever batch, sees the same
    noised anchor and one encoder pass serves them all (docs/design.md §2).
    """
    if anchor_chw.dtype != np.float32 or anchor_chw.ndim != 3:
        raise ValueError("anchor_seed takes one canonical float32 [C, H, W] anchor")
    return seed_from_key(
        hashlib.sha256(ANCHOR_SEED_DOMAIN + b"|" + _anchor_bytes(anchor_chw)).digest()
    )


def _anchor_bytes(anchor_chw: np.ndarray) -> bytes:
    """An anchor's shape and content as hashed into keys and anchor seeds."""
    shape = ",".join(str(d) for d in anchor_chw.shape).encode()
    # + 0 folds -0.0 into 0.0, which the model cannot tell apart
    return shape + b"|" + (np.ascontiguousarray(anchor_chw) + np.float32(0)).astype("<f4").tobytes()
