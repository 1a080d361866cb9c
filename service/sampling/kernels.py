"""Triton kernels for the sampler's elementwise hot path, each fused with its noise.

Every kernel makes one pass over memory: it loads its inputs, draws the sample's
counter-based noise in registers (no noise tensor is materialised), computes in
float32 and stores in the output dtype. The grid is ``(blocks per sample,
samples)``; each program loads its sample's seed, so the noise of an element
depends only on ``(seed, stream, element)`` exactly as in ``noise.py``:

* integers: ``tl.randint4x(seed, (stream << 32) | element)`` (Philox4x32-10);
* normals: our own Box-Muller on the first two words, in float64, rounded once
  to float32 (``noise.bits_to_normal``), not ``tl.randn``, whose float32
  conversion may change between Triton versions and cannot be matched on CPU.

``element`` is the logical C-order index within ``[C, H, W]`` of one sample.
Samples are contiguous chunks in both NCHW and channels_last memory, so the
kernels accept either layout without a copy; under channels_last they map the
physical position back to the logical index for the noise.

Kernels launch with ``enable_fp_fusion=False``: without contracting ``a*b + c``
into an FMA, the float32 arithmetic rounds exactly like the torch reference's
separate ops, so kernel and reference agree to the bit apart from the float64
transcendentals (one float64 ulp, rarely visible after rounding to float32).
The cost is nil for these memory-bound kernels.

``kernel_check.self_check(device)`` compares every kernel with its reference on a
device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from clsp_positives.service.sampling import noise
from clsp_positives.service.sampling.solvers import StepCoefficients

BLOCK = 1024
PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_LAUNCH = {"num_warps": 4, "enable_fp_fusion": False}


# ----------------------------------------------------------------------------- device functions


@triton.jit
def _element_index(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    """Logical C-order index within a sample of the physical positions ``offs``."""
    if CHANNELS_LAST:
        c = offs % C
        hw = offs // C
        return c.to(tl.int64) * HW + hw
    else:
        return offs.to(tl.int64)


@triton.jit
def _normal(seed, elements, stream_base):
    """Standard normals of ``elements`` for one seed (``noise.bits_to_normal``)."""
    i1, i2, _, _ = tl.randint4x(seed, elements | stream_base)
    u1 = (i1.to(tl.float64) + 0.5) * 2.3283064365386963e-10  # 2**-32
    u2 = i2.to(tl.float64) * 2.3283064365386963e-10
    radius = tl.sqrt(-2.0 * tl.log(u1))
    return (radius * tl.cos(6.283185307179586 * u2)).to(tl.float32)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _randint4x_kernel(
    seed_ptr, o0_ptr, o1_ptr, o2_ptr, o3_ptr, stream_base, M, BLOCK: tl.constexpr
):
    """Raw Philox words as int64 (tests and self_check compare them bitwise)."""
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    seed = tl.load(seed_ptr + n)
    i1, i2, i3, i4 = tl.randint4x(seed, offs.to(tl.int64) | stream_base)
    ptr = n * M + offs
    tl.store(o0_ptr + ptr, i1.to(tl.int64), mask=mask)
    tl.store(o1_ptr + ptr, i2.to(tl.int64), mask=mask)
    tl.store(o2_ptr + ptr, i3.to(tl.int64), mask=mask)
    tl.store(o3_ptr + ptr, i4.to(tl.int64), mask=mask)


@triton.jit
def _normal_kernel(seed_ptr, out_ptr, stream_base, M, BLOCK: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    seed = tl.load(seed_ptr + n)
    z = _normal(seed, offs.to(tl.int64), stream_base)
    tl.store(out_ptr + n * M + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_anchor_kernel(
    a_ptr,
    out_ptr,
    seed_ptr,
    stream_base,
    M,
    C,
    HW,
    sa,
    s1,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptr = n * M + offs
    a = tl.load(a_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr + n)
    z = _normal(seed, _element_index(offs, C, HW, CHANNELS_LAST), stream_base)
    out = sa * a + s1 * z
    tl.store(out_ptr + ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bottleneck_lerp_kernel(h_ptr, ha_ptr, w_ptr, out_ptr, M, BLOCK: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptr = n * M + offs
    h = tl.load(h_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    ha = tl.load(ha_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + n)
    out = w * h + (1.0 - w) * ha
    tl.store(out_ptr + ptr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scheduler_update_kernel(
    x_ptr,
    mo_ptr,
    out_ptr,
    x0p_ptr,
    x0_ptr,
    seed_ptr,
    stream_base,
    M,
    C,
    HW,
    s0,
    s1,
    inv_s0,
    inv_s1,
    coef_x0,
    coef_eps,
    coef_x,
    sigma,
    coef_x0_prev,
    clip,
    PREDICTION: tl.constexpr,
    CLIP: tl.constexpr,
    NOISE: tl.constexpr,
    X0_PREV: tl.constexpr,
    STORE_X0: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``x0p_ptr`` is read only under ``X0_PREV``, ``x0_ptr`` written only under
    ``STORE_X0`` (DPM-Solver++'s multistep terms); DDIM/DDPM steps launch the
    variant without either, whose arithmetic is unchanged by them."""
    n = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    ptr = n * M + offs
    x = tl.load(x_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mo_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
    if PREDICTION == 0:  # epsilon
        x0 = (x - s1 * mo) * inv_s0
        eps = mo
    elif PREDICTION == 1:  # sample
        x0 = mo
        eps = (x - s0 * x0) * inv_s1
    else:  # v_prediction
        x0 = s0 * x - s1 * mo
        eps = s0 * mo + s1 * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    if STORE_X0:
        tl.store(x0_ptr + ptr, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    prev = coef_x0 * x0
    if X0_PREV:
        x0p = tl.load(x0p_ptr + ptr, mask=mask, other=0.0).to(tl.float32)
        prev = prev + coef_x0_prev * x0p
    prev = prev + coef_eps * eps
    prev = prev + coef_x * x
    if NOISE:
        seed = tl.load(seed_ptr + n)
        z = _normal(seed, _element_index(offs, C, HW, CHANNELS_LAST), stream_base)
        prev = prev + sigma * z
    tl.store(out_ptr + ptr, prev.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` with samples as contiguous chunks, and whether it is channels_last.

    NCHW-contiguous and channels_last tensors pass without a copy; anything else
    is made contiguous.
    """
    if x.is_contiguous():
        return x, False
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _like(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` in the memory layout of the main input (a no-op when it already is)."""
    if channels_last:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _chw(x: torch.Tensor) -> tuple[int, int, int]:
    """Elements per sample, channels and pixels per channel (for channels_last indexing)."""
    m = math.prod(x.shape[1:])
    if x.ndim == 4:
        return m, x.shape[1], x.shape[2] * x.shape[3]
    return m, 1, m


def _grid(m: int, n: int) -> tuple[int, int]:
    return (triton.cdiv(m, BLOCK), n)


def _seeds_on(seeds: torch.Tensor, device: torch.device) -> torch.Tensor:
    return seeds.to(device=device, dtype=torch.int64).contiguous()


def randint4x(
    seeds: torch.Tensor, stream: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel twin of ``noise.randint4x``: four ``[N, numel]`` int64 tensors of uint32 words."""
    noise.check_seeds(seeds)
    noise.check_stream(stream)
    seeds = seeds.contiguous()
    outs = tuple(
        torch.empty(seeds.shape[0], numel, dtype=torch.int64, device=seeds.device) for _ in range(4)
    )
    if seeds.shape[0] and numel:
        _randint4x_kernel[_grid(numel, seeds.shape[0])](
            seeds, *outs, stream << 32, numel, BLOCK=BLOCK, **_LAUNCH
        )
    return outs


def normal(
    seeds: torch.Tensor, stream: int, shape: tuple[int, ...], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Kernel twin of ``noise.normal`` on ``seeds.device``."""
    noise.check_seeds(seeds)
    noise.check_stream(stream)
    seeds = seeds.contiguous()
    m = math.prod(shape)
    out = torch.empty(seeds.shape[0], *shape, dtype=dtype, device=seeds.device)
    if out.numel():
        _normal_kernel[_grid(m, seeds.shape[0])](
            seeds, out, stream << 32, m, BLOCK=BLOCK, **_LAUNCH
        )
    return out


def noise_anchor(
    anchors: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    sqrt_alpha_bar: float,
    sqrt_one_minus_alpha_bar: float,
) -> torch.Tensor:
    """Kernel of ``ops.noise_anchor`` (inputs validated there)."""
    a, channels_last = _layout(anchors)
    out = torch.empty_like(a)
    m, c, hw = _chw(a)
    if out.numel():
        _noise_anchor_kernel[_grid(m, a.shape[0])](
            a, out, _seeds_on(seeds, a.device), stream << 32, m, c, hw,
            float(sqrt_alpha_bar), float(sqrt_one_minus_alpha_bar),
            CHANNELS_LAST=channels_last, BLOCK=BLOCK, **_LAUNCH,
        )  # fmt: skip
    return out


def bottleneck_lerp(
    h: torch.Tensor, h_anchor: torch.Tensor, interpolation_weights: torch.Tensor
) -> torch.Tensor:
    """Kernel of ``ops.bottleneck_lerp`` (inputs validated there)."""
    h, channels_last = _layout(h)
    ha = _like(h_anchor.to(h.dtype), channels_last)
    w = interpolation_weights.to(device=h.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(h)
    m = math.prod(h.shape[1:])
    if out.numel():
        _bottleneck_lerp_kernel[_grid(m, h.shape[0])](h, ha, w, out, m, BLOCK=BLOCK, **_LAUNCH)
    return out


def scheduler_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    seeds: torch.Tensor,
    stream: int,
    coefs: StepCoefficients,
    prediction_type: str,
    clip_range: float | None,
    *,
    x0_prev: torch.Tensor | None = None,
    return_x0: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Kernel of ``ops.scheduler_update`` (inputs validated there): one launch of the
    update kernel. ``return_x0`` selects the variant that also stores x0
    (``STORE_X0``), so a step whose x0 nobody reads writes x_prev alone. The
    pointers a variant does not touch (``X0_PREV``, ``STORE_X0`` off) get ``x``/``out``."""
    x, channels_last = _layout(x)
    mo = _like(model_output, channels_last)
    read_prev = coefs.coef_x0_prev != 0
    if read_prev and x0_prev is None:
        raise ValueError("coef_x0_prev is not 0: the previous step's x0 must be given")
    x0p = _like(x0_prev.to(x.dtype), channels_last) if read_prev else x
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else None
    m, c, hw = _chw(x)
    if out.numel():
        _scheduler_update_kernel[_grid(m, x.shape[0])](
            x, mo, out, x0p, out if x0 is None else x0, _seeds_on(seeds, x.device),
            stream << 32, m, c, hw,
            float(coefs.sqrt_alpha_bar), float(coefs.sqrt_one_minus_alpha_bar),
            1.0 / coefs.sqrt_alpha_bar, 1.0 / coefs.sqrt_one_minus_alpha_bar,
            float(coefs.coef_x0), float(coefs.coef_eps), float(coefs.coef_x),
            float(coefs.sigma), float(coefs.coef_x0_prev), float(clip_range or 0.0),
            PREDICTION=PREDICTION_CODES[prediction_type], CLIP=clip_range is not None,
            NOISE=coefs.sigma != 0, X0_PREV=read_prev, STORE_X0=return_x0,
            CHANNELS_LAST=channels_last, BLOCK=BLOCK, **_LAUNCH,
        )  # fmt: skip
    return out if x0 is None else (out, x0)
