"""Cache values an attacker with write access to Redis, but without the pool's
cache secret, can build (docs/reliability.md §4): the tests plant them and check
that no generator serves them."""

from __future__ import annotations

import hashlib
import struct

import numpy as np


def _header(magic: bytes, image: np.ndarray) -> bytes:
    return magic + struct.pack(f"<B{image.ndim}I", image.ndim, *image.shape)


def with_plain_checksum(image: np.ndarray) -> bytes:
    """Today's layout with an unkeyed blake2b-256 of header and pixels where the MAC
    goes: well-formed, and its checksum is valid, but nobody keyed it."""
    header = _header(b"CLSP\x02", image)
    data = np.ascontiguousarray(image, np.uint8).tobytes()
    return header + hashlib.blake2b(header + data, digest_size=32).digest() + data


def first_format(image: np.ndarray) -> bytes:
    """The first value format: a blake2b-128 checksum that anyone can compute."""
    header = _header(b"CLSP\x01", image)
    data = np.ascontiguousarray(image, np.uint8).tobytes()
    return header + hashlib.blake2b(header + data, digest_size=16).digest() + data
