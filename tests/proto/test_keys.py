"""Cache keys and seeds: one key per positive, whatever form the anchor came in,
and a different key whenever anything that changes the positive changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clsp_positives.proto import (
    GenerationParams,
    canonical_anchors,
    positive_key,
    positive_keys,
    seed_from_key,
    uint8_to_unit,
    unit_to_uint8,
)

FP = "sha256:model-a"
PARAMS = GenerationParams()
PROPERTY = settings(max_examples=40, deadline=None)


def image(seed: int = 0, shape: tuple[int, ...] = (2, 5, 4, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def key_of(
    anchors: np.ndarray,
    *,
    params: GenerationParams = PARAMS,
    fingerprint: str = FP,
    candidate: int = 0,
) -> bytes:
    return positive_keys(fingerprint, params, anchors, [candidate] * len(anchors))[0]


# ------------------------------------------------------ canonical anchors


def test_uint8_to_unit_is_the_correctly_rounded_float64_formula() -> None:
    pixels = np.arange(256, dtype=np.uint8)
    independent = ((pixels.astype(np.float64) - 127.5) / 127.5).astype(np.float32)
    assert uint8_to_unit(pixels).tobytes() == independent.tobytes()
    assert uint8_to_unit(pixels).dtype == np.float32
    assert uint8_to_unit(pixels)[[0, -1]].tolist() == [-1.0, 1.0]
    np.testing.assert_array_equal(unit_to_uint8(uint8_to_unit(pixels)), pixels)


def test_unit_to_uint8_rounds_and_clips() -> None:
    values = np.array([-2.0, -1.0, 0.0, 1.0, 3.0, -0.99], np.float32)
    assert unit_to_uint8(values).tolist() == [0, 0, 128, 255, 255, 1]


@PROPERTY
@given(
    images=hnp.arrays(
        np.uint8,
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3)),
    )
)
def test_uint8_hwc_and_float32_chw_give_the_same_key(images: np.ndarray) -> None:
    chw = uint8_to_unit(images).transpose(0, 3, 1, 2)  # a strided view: canonicalised anyway
    by_formula = ((images.astype(np.float64) - 127.5) / 127.5).astype(np.float32)
    by_formula = np.ascontiguousarray(by_formula.transpose(0, 3, 1, 2))
    candidates = list(range(len(images)))
    keys = positive_keys(FP, PARAMS, images, candidates)
    assert positive_keys(FP, PARAMS, chw, candidates) == keys
    assert positive_keys(FP, PARAMS, by_formula, candidates) == keys
    assert len(set(keys)) == len(keys) and all(len(k) == 32 for k in keys)


@PROPERTY
@given(anchors=hnp.arrays(np.float16, (2, 1, 3, 3), elements=st.floats(-1, 1, width=16)))
def test_float16_and_float32_forms_give_the_same_key(anchors: np.ndarray) -> None:
    assert positive_keys(FP, PARAMS, anchors, [0, 1]) == positive_keys(
        FP, PARAMS, anchors.astype(np.float32), [0, 1]
    )


def test_canonical_anchors_layout_and_errors() -> None:
    u8 = image()
    canon = canonical_anchors(u8)
    assert canon.shape == (2, 3, 5, 4) and canon.dtype == np.float32
    assert canon.flags.c_contiguous
    assert canon[1, 2, 4, 3] == uint8_to_unit(u8[1, 4, 3, 2])
    with pytest.raises(ValueError, match="rank 4"):
        canonical_anchors(u8[0])
    with pytest.raises(ValueError, match="uint8, float16 or float32"):
        canonical_anchors(u8.astype(np.int32))


def test_negative_zero_keys_like_zero() -> None:
    zeros = np.zeros((1, 1, 2, 2), np.float32)
    assert key_of(zeros) == key_of(-zeros)
    weight0 = GenerationParams(interpolation_weight=0.0)
    assert key_of(zeros, params=weight0) == key_of(
        zeros, params=GenerationParams(interpolation_weight=-0.0)
    )


# ------------------------------------------------------ what changes a key


@pytest.mark.parametrize(
    "change",
    [
        {"interpolation_weight": 0.2},
        {"interpolation_weight": 0.1 + 1e-12},
        {"steps": 99},
        {"eta": 0.0},
        {"method": "ddpm"},
        {"method": "dpmpp-2m"},
        {"sampling": "model"},
    ],
)
def test_every_generation_field_changes_the_key(change: dict) -> None:
    assert key_of(image()) != key_of(image(), params=GenerationParams(**change))


def test_model_anchor_and_candidate_change_the_key() -> None:
    base = image()
    one_pixel = base.copy()
    one_pixel[0, 4, 3, 2] ^= 1
    assert key_of(base) != key_of(base, fingerprint="sha256:model-b")
    assert key_of(base) != key_of(one_pixel)
    assert key_of(base) != key_of(base, candidate=1)
    # the same values in another shape are another image
    assert key_of(base[:, :4, :4, :]) != key_of(base[:, :4, :4, :].reshape(2, 4, 2, 6))


def test_k_cache_and_ddpm_eta_do_not_change_the_key() -> None:
    base = key_of(image())
    assert key_of(image(), params=GenerationParams(k=8)) == base
    for cache in ("refresh", "bypass"):
        assert key_of(image(), params=GenerationParams(cache=cache)) == base
    for method in ("ddpm", "dpmpp-2m"):  # their steps have no eta
        without_eta = GenerationParams(method=method, eta=0.0)
        assert key_of(image(), params=GenerationParams(method=method, eta=0.9)) == key_of(
            image(), params=without_eta
        )
    assert key_of(image(), params=GenerationParams(method="dpmpp-2m")) != key_of(
        image(), params=GenerationParams(method="ddpm")
    )
    assert (
        GenerationParams(interpolation_weight=1).canonical()
        == GenerationParams(interpolation_weight=1.0).canonical()
    )
    # None is the default mode, the one a service left at its default resolves it to.
    assert key_of(image(), params=GenerationParams(sampling="authors")) == base


def test_keys_of_a_batch_are_the_keys_of_its_items() -> None:
    batch = image(shape=(4, 3, 3, 1))
    candidates = np.array([0, 5, 5, 2], np.int64)
    keys = positive_keys(FP, PARAMS, batch, candidates)
    canon = canonical_anchors(batch)
    assert keys == [positive_key(FP, PARAMS, canon[i], int(c)) for i, c in enumerate(candidates)]
    assert keys[1:3] == positive_keys(FP, PARAMS, batch[1:3], candidates[1:3])


def test_key_derivation_is_pinned() -> None:
    """Changing the derivation silently orphans every cached positive: do it on
    purpose (bump KEY_DOMAIN) and update this value."""
    anchors = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    assert key_of(anchors).hex() == PINNED_KEY


# Changed when the sampling mode joined the canonical params ("sampling":
# "authors" for these default params): positives cached before were made under
# the model's own scheduler config, and must not be served as the authors' loop.
PINNED_KEY = "d403853b435ea6b46f95d09a67460287c3e3d27f192bfae781862cafaa7b2475"


def test_key_argument_errors() -> None:
    canon = canonical_anchors(image())[0]
    with pytest.raises(ValueError, match="candidate index"):
        positive_key(FP, PARAMS, canon, -1)
    with pytest.raises(ValueError, match="canonical float32"):
        positive_key(FP, PARAMS, canon.astype(np.float16), 0)
    with pytest.raises(ValueError, match="2 anchors but 3"):
        positive_keys(FP, PARAMS, image(), [0, 1, 2])


# ------------------------------------------------------------------ seeds


@PROPERTY
@given(key=st.binary(min_size=32, max_size=32))
def test_seed_from_key_is_a_deterministic_63_bit_int(key: bytes) -> None:
    seed = seed_from_key(key)
    assert seed == seed_from_key(bytes(key))
    assert 0 <= seed < 2**63
    assert np.int64(seed) == seed  # fits the int64 seed tensors


def test_seeds_follow_keys() -> None:
    keys = positive_keys(FP, PARAMS, image(shape=(64, 2, 2, 1)), list(range(64)))
    seeds = [seed_from_key(k) for k in keys]
    assert len(set(seeds)) == 64
    assert seed_from_key(b"\xff" * 32) == 2**63 - 1
    assert seed_from_key(bytes(32)) == 0


def test_latent_anchors_and_latent_outputs_key_apart_but_seed_alike() -> None:
    """A latent anchor never shares a key with a picture of the same bytes; latents
    out change the key's tail but not its seed (docs/design.md §2)."""
    from clsp_positives.proto.keys import positive_key, seed_from_key
    from clsp_positives.proto.params import GenerationParams

    anchor = np.random.default_rng(5).uniform(-1, 1, (3, 4, 4)).astype(np.float32)
    images, latents = GenerationParams(), GenerationParams(output="latents")
    picture_key = positive_key("fp", images, anchor, 0)
    latent_key = positive_key("fp", images, anchor, 0, "latent")
    assert picture_key != latent_key
    assert positive_key("fp", images, anchor, 0, "image") == picture_key  # the default
    out_key = positive_key("fp", latents, anchor, 0)
    assert out_key != picture_key and out_key[:8] == picture_key[:8]
    assert seed_from_key(out_key) == seed_from_key(picture_key)
    assert positive_key("fp", latents, anchor, 1)[:8] != out_key[:8]
