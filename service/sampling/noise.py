"""Per-sample counter-based Gaussian noise (docs/design.md §2), torch reference path.

Every random number of one candidate is a pure function of ``(seed, stream,
element)``: Philox4x32-10 keyed by the sample's 63-bit seed and counted by the
64-bit offset ``(stream << 32) | element``, where ``element`` is the flat index in
logical C order ``[C, H, W]`` of one sample. Nothing depends on the batch, its
order, or its size, so a positive is the same alone or in a batch of 500.

The integers are exactly those of Triton's ``tl.randint4x(seed, offset)`` (same
rounds, constants, key and counter layout), so the Triton kernels in
``kernels.py`` and this path draw the same bits. The conversion to normals is
ours, not ``tl.randn``'s, so it cannot change with the Triton version and can
be reproduced here: from the first two words ``i1, i2``

    u1 = (i1 + 0.5) * 2**-32          # in (0, 1), never 0
    u2 = i2 * 2**-32                  # in [0, 1)
    z  = sqrt(-2 log u1) * cos(2 pi u2)

computed in float64 and rounded once to float32. Doing the transcendental part
in float64 keeps an element's value independent of where it falls in a SIMD
vector (torch's vectorised and scalar-tail ``log``/``cos`` may differ by one
float64 ulp, which survives the rounding to float32 only with probability
about 2**-29 per element), and makes the CPU and GPU normals agree to the last
float32 bit in practice.

The 32x32 -> 64 bit products of Philox are done in int64 tensors without
overflow by splitting the data word into 16-bit halves.
"""

from __future__ import annotations

import math

import torch

STREAM_INITIAL = 0
"""Stream of the initial noise ``x_T``."""

MAX_STREAM = 2**31 - 1
"""Largest stream index: ``stream << 32`` must stay a non-negative int64."""

MAX_ELEMENTS = 2**32
"""Elements per sample are counted in the low 32 bits of the offset."""

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10

TWO_POW_MINUS_32 = 2.0**-32
TWO_PI = 2.0 * math.pi


def anchor_stream(step_index: int) -> int:
    """Stream of the anchor's noise ``n_t`` at sampling step ``step_index`` (0-based)."""
    return 1 + 2 * step_index


def step_stream(step_index: int) -> int:
    """Stream of the DDIM/DDPM update's noise at sampling step ``step_index`` (0-based)."""
    return 2 + 2 * step_index


def check_stream(stream: int) -> int:
    """Validate a stream index; it forms the high 32 bits of the Philox offset."""
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int, got {type(stream).__name__}")
    if not 0 <= stream <= MAX_STREAM:
        raise ValueError(f"stream must be in [0, {MAX_STREAM}], got {stream}")
    return stream


def check_seeds(seeds: torch.Tensor) -> torch.Tensor:
    """Validate per-sample seeds: a 1-D int64 tensor (one 63-bit seed per sample)."""
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds must be a torch.Tensor, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64 or seeds.ndim != 1:
        raise ValueError(
            f"seeds must be a 1-D int64 tensor [N], got dtype {seeds.dtype} shape "
            f"{tuple(seeds.shape)}"
        )
    return seeds


def _mul_hi_lo(const: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``const * x`` for a 32-bit constant and uint32 values.

    ``x`` holds values in [0, 2**32) in int64; each partial product of ``const``
    with a 16-bit half of ``x`` is < 2**48, so nothing overflows int64.
    """
    lo_part = const * (x & _MASK16)
    hi_part = const * (x >> 16)
    mid = hi_part + (lo_part >> 16)
    high = mid >> 16
    low = ((mid & _MASK16) << 16) | (lo_part & _MASK16)
    return high, low


def philox4x32(
    seeds: torch.Tensor, offsets: torch.Tensor, n_rounds: int = N_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton's ``tl.randint4x(seed, offset)``: four uint32 words, as int64 in [0, 2**32).

    ``seeds`` (int64) and ``offsets`` (non-negative int64) broadcast against each
    other. Key: ``(seed_lo, seed_hi)``; counter: ``(offset_lo, offset_hi, 0, 0)``.
    """
    k0 = seeds & _MASK32
    k1 = (seeds >> 32) & _MASK32
    c0 = (offsets & _MASK32).expand(torch.broadcast_shapes(seeds.shape, offsets.shape))
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    return philox_rounds(c0, c1, c2, c2, k0, k1, n_rounds)


def philox_rounds(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    n_rounds: int = N_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 on a full counter ``(c0..c3)`` and key ``(k0, k1)``, words as int64."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def bits_to_normal(i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """Box-Muller on two uint32 words (as int64), in float64: ``sqrt(-2 ln u1) cos(2 pi u2)``."""
    u1 = (i1.to(torch.float64) + 0.5) * TWO_POW_MINUS_32
    u2 = i2.to(torch.float64) * TWO_POW_MINUS_32
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(TWO_PI * u2)


def element_offsets(
    stream: int, numel: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Philox offsets ``(stream << 32) | e`` for elements ``e = 0..numel-1`` of one sample."""
    check_stream(stream)
    if numel > MAX_ELEMENTS:
        raise ValueError(f"a sample may have at most {MAX_ELEMENTS} elements, got {numel}")
    return torch.arange(numel, dtype=torch.int64, device=device) | (stream << 32)


def randint4x(
    seeds: torch.Tensor, stream: int, numel: int, *, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four Philox words of elements ``0..numel-1`` of ``stream``, each ``[N, numel]``."""
    check_seeds(seeds)
    device = seeds.device if device is None else torch.device(device)
    offsets = element_offsets(stream, numel, device)
    return philox4x32(seeds.to(device).unsqueeze(1), offsets.unsqueeze(0))


def normal(
    seeds: torch.Tensor,
    stream: int,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise ``[N, *shape]``, row i a pure function of ``(seeds[i], stream)``.

    Element ``e`` of a row is the flat C-order index into ``shape``. The values are
    float32-rounded first, then cast to ``dtype``, so every dtype sees the same noise.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape must be non-negative, got {shape}")
    numel = math.prod(shape)
    i1, i2, _, _ = randint4x(seeds, stream, numel, device=device)
    z = bits_to_normal(i1, i2).to(torch.float32)
    return z.to(dtype).reshape(seeds.shape[0], *shape)
