"""The PositivesGenerator API: keyed positives, uint8 output, batch independence, clear errors."""

from __future__ import annotations

import threading
import typing
from pathlib import Path

import numpy as np
import pytest

from clsp_positives.proto.keys import seed_from_key, uint8_to_unit
from clsp_positives.proto.params import GenerationParams, Method
from clsp_positives.service.sampling import generator as generator_module
from clsp_positives.service.sampling import ops
from clsp_positives.service.sampling.generator import (
    GeneratorInputError,
    PositivesGenerator,
    WarmupStopped,
)
from clsp_positives.service.sampling.sampler import ANCHOR_PATH, PLAIN_PATH

PARAMS = GenerationParams(steps=5, eta=0.1, interpolation_weight=0.1)


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path) -> PositivesGenerator:
    return PositivesGenerator.from_dir(tiny_model_dir)


def _anchors(n: int, seed: int = 0) -> np.ndarray:
    """uint8 NHWC anchors (what clients send)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def test_attributes(gen: PositivesGenerator) -> None:
    assert (gen.sample_size, gen.channels, str(gen.device)) == (16, 1, "cpu")
    assert len(gen.fingerprint) == 16
    assert gen.scheduler_config["num_train_timesteps"] == 1000
    info = gen.model_info(max_k=8, max_anchors=4)
    assert (info.fingerprint, info.sample_size, info.channels) == (gen.fingerprint, 16, 1)
    assert (info.device, info.dtype, info.max_k, info.max_anchors) == ("cpu", "float32", 8, 4)
    assert info.scheduler["num_train_timesteps"] == 1000
    assert info.sampling == "authors"  # the default mode unless the service says otherwise
    assert gen.model_info(max_k=8, max_anchors=4, sampling="model").sampling == "model"
    assert not [k for k in info.scheduler if k.startswith("_")]  # diffusers' bookkeeping


def test_positives_are_keyed_and_deterministic(gen: PositivesGenerator) -> None:
    anchors = _anchors(3)
    cands = np.array([0, 1, 0], dtype=np.int64)
    out = gen.positives(anchors, cands, PARAMS)
    assert out.dtype == np.uint8 and out.shape == (3, 16, 16, 1)
    assert np.array_equal(out, gen.positives(anchors, cands, PARAMS))
    # The float NCHW form of the same anchors is the same request.
    as_float = uint8_to_unit(anchors).transpose(0, 3, 1, 2).copy()
    assert np.array_equal(out, gen.positives(as_float, cands, PARAMS))
    # positives == sample with the seeds of the keys.
    seeds = np.array([seed_from_key(k) for k in gen.keys(anchors, cands, PARAMS)], np.int64)
    direct = gen.sample(as_float, seeds, np.full(3, 0.1, np.float32), PARAMS.group())
    assert np.array_equal(out, direct)
    keyed = gen.sample_keyed(
        as_float,
        gen.keys(anchors, cands, PARAMS),
        np.full(3, 0.1, np.float32),
        PARAMS.group(),
    )
    assert np.array_equal(out, keyed)
    # The positive is not a copy of its anchor.
    assert np.abs(out.astype(float) - anchors).mean() / 255 > 0.05


def test_alone_equals_inside_a_mixed_batch(gen: PositivesGenerator) -> None:
    n = 64
    anchors = uint8_to_unit(_anchors(n, seed=1)).transpose(0, 3, 1, 2).copy()
    rng = np.random.default_rng(2)
    seeds = rng.integers(0, 2**62, n, dtype=np.int64)
    weights = rng.choice(np.array([0.0, 0.1, 0.5, 1.0], np.float32), n)
    for method in typing.get_args(Method):
        group = GenerationParams(steps=4, eta=0.1, method=method).group()
        batch = gen.sample(anchors, seeds, weights, group)
        for j in (0, 31, 63):
            alone = gen.sample(anchors[j : j + 1], seeds[j : j + 1], weights[j : j + 1], group)
            assert np.abs(alone[0].astype(int) - batch[j]).max() <= 1


def test_weight_and_candidate_change_the_positive(gen: PositivesGenerator) -> None:
    anchors = _anchors(1, seed=3)
    w1 = gen.positives(anchors, None, PARAMS.model_copy(update={"interpolation_weight": 1.0}))
    w0 = gen.positives(anchors, None, PARAMS.model_copy(update={"interpolation_weight": 0.0}))
    assert np.abs(w1.astype(int) - w0).mean() > 3
    k = gen.positives(np.repeat(anchors, 3, 0), np.arange(3, dtype=np.int64), PARAMS)
    assert np.abs(k[0].astype(int) - k[1]).mean() > 3
    assert np.abs(k[1].astype(int) - k[2]).mean() > 3


def test_works_from_a_worker_thread(gen: PositivesGenerator) -> None:
    result = {}

    def work() -> None:
        result["out"] = gen.positives(_anchors(2), None, PARAMS)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert np.array_equal(result["out"], gen.positives(_anchors(2), None, PARAMS))


def test_after_warmup_requests_run_no_path_for_the_first_time(tiny_model_dir: Path) -> None:
    """``paths_run`` grows on a first call; ``warmup`` leaves none to a request, of
    CLSP's weight 0.1 or of weight 1, while a warm-up at weight 1 would leave the
    anchor path (its 2N encoder batch and two kernels) to the first CLSP request."""
    plain_warmed = PositivesGenerator.from_dir(tiny_model_dir)
    plain_warmed.positives(
        _anchors(1), None, PARAMS.model_copy(update={"interpolation_weight": 1.0})
    )
    assert plain_warmed.paths_run == {(PLAIN_PATH, None)}
    plain_warmed.positives(_anchors(2), None, PARAMS)
    assert plain_warmed.paths_run == {(PLAIN_PATH, None), (ANCHOR_PATH, None)}

    gen = PositivesGenerator.from_dir(tiny_model_dir)
    assert gen.paths_run == set()
    gen.warmup(steps=1)
    warmed = set(gen.paths_run)
    assert warmed == {(PLAIN_PATH, None), (ANCHOR_PATH, None)}
    gen.positives(_anchors(3, seed=5), None, PARAMS)
    gen.positives(
        _anchors(2, seed=6), None, PARAMS.model_copy(update={"interpolation_weight": 1.0})
    )
    assert gen.paths_run == warmed


def test_warmup_times_one_warm_call_per_batch_size(tiny_model_dir: Path) -> None:
    """The service seeds its call-time model with these: a call of one item and a full
    one, so the fixed part is told from the part per item-step (docs/design.md §4)."""
    seconds = PositivesGenerator.from_dir(tiny_model_dir).warmup(steps=1, batch_sizes=(1, 3))
    assert sorted(seconds) == [1, 3] and all(s > 0 for s in seconds.values())


def test_warmup_stops_before_its_next_call_once_told(tiny_model_dir: Path) -> None:
    """A service shutting down sets ``stop``: no further sampler call runs
    (docs/reliability.md, Shutdown)."""
    gen = PositivesGenerator.from_dir(tiny_model_dir)
    stop = threading.Event()
    real = gen.sample
    calls: list[int] = []

    def sample(*args, **kwargs):
        calls.append(len(args[0]))
        stop.set()  # as a SIGTERM during the first call would
        return real(*args, **kwargs)

    gen.sample = sample  # type: ignore[method-assign]
    with pytest.raises(WarmupStopped):
        gen.warmup(steps=1, batch_sizes=(1, 2), stop=stop)
    assert calls == [1]


@pytest.mark.parametrize("sampling", ["authors", "authors-clipped"])
def test_warmup_launches_every_update_variant_a_request_launches(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, sampling: str
) -> None:
    """Each variant of the fused update (noise or not; DPM-Solver++'s previous x0
    read or not, its x0 kept or not; x0 clipped or not) is a Triton kernel of its own,
    compiled on its first launch on CUDA: the warm-up launches every one that a
    request of any method, in the service's sampling mode, can launch."""
    launched: set[tuple[bool, bool, bool, bool]] = set()

    real = ops.scheduler_update

    def update(*args, **kwargs):
        coefs = args[4]
        clipped = args[6] is not None
        keep_x0 = bool(kwargs.get("return_x0", False))
        launched.add((coefs.sigma != 0, coefs.coef_x0_prev != 0, keep_x0, clipped))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "scheduler_update", update)
    gen = PositivesGenerator.from_dir(tiny_model_dir)
    gen.warmup(steps=2, sampling=sampling)
    warmed = set(launched)
    clip = sampling == "authors-clipped"
    assert (False, False, True, clip) in warmed and (False, True, True, clip) in warmed
    for method in typing.get_args(Method):
        for eta, weight, steps in ((0.0, 1.0, 3), (0.1, 0.1, 7)):
            params = GenerationParams(
                steps=steps, eta=eta, interpolation_weight=weight, method=method, sampling=sampling
            )
            gen.positives(_anchors(2, seed=7), None, params)
    assert launched == warmed


def test_empty_batch(gen: PositivesGenerator) -> None:
    out = gen.sample(
        np.zeros((0, 1, 16, 16), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        GenerationParams(steps=3, eta=0.0).group(),
    )
    assert out.shape == (0, 16, 16, 1)


@pytest.mark.parametrize(
    ("anchors", "match"),
    [
        (np.zeros((2, 16, 16, 3), np.uint8), r"anchors must be \[N, 1, 16, 16\]"),
        (np.zeros((2, 8, 8, 1), np.uint8), r"got shape \(2, 1, 8, 8\)"),
        (np.zeros((2, 1, 32, 32), np.float32), r"got shape \(2, 1, 32, 32\)"),
    ],
)
def test_mismatched_anchors_are_refused(gen: PositivesGenerator, anchors, match) -> None:
    with pytest.raises(GeneratorInputError, match=match):
        gen.positives(anchors, None, PARAMS)


def test_bad_sample_inputs_are_refused(gen: PositivesGenerator) -> None:
    a = np.zeros((2, 1, 16, 16), np.float32)
    s = np.arange(2, dtype=np.int64)
    w = np.full(2, 0.1, np.float32)
    group = GenerationParams(steps=3, eta=0.1).group()
    with pytest.raises(GeneratorInputError, match="weights must be finite and in"):
        gen.sample(a, s, np.array([0.1, 1.5], np.float32), group)
    with pytest.raises(GeneratorInputError, match="seeds must be int64"):
        gen.sample(a, s.astype(np.int32), w, group)
    with pytest.raises(GeneratorInputError, match="NaN"):
        gen.sample(np.full_like(a, np.nan), s, w, group)
    with pytest.raises(GeneratorInputError, match="candidates must be integer"):
        gen.positives(a, np.zeros(3, np.int64), PARAMS)
    with pytest.raises(ValueError, match="method"):
        gen.sample(a, s, w, group._replace(solver="euler"))


def test_float16_needs_cuda(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        PositivesGenerator.from_dir(tiny_model_dir, dtype="float16")


def test_bfloat16_on_the_cpu_only_where_it_is_native(
    tiny_model_dir: Path, gen: PositivesGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 UNet on a CPU with native bf16 gives nearly the float32 positives; on
    one without, it is refused rather than emulated slowly."""
    if generator_module.cpu_has_bf16():
        bf16 = PositivesGenerator.from_dir(tiny_model_dir, dtype="bfloat16")
        anchors = _anchors(4, seed=11)
        diff = bf16.positives(anchors, None, PARAMS).astype(int) - gen.positives(
            anchors, None, PARAMS
        ).astype(int)
        assert bf16.model_info(max_k=1, max_anchors=1).dtype == "bfloat16"
        # bf16 did run (not float32), and all but a few pixels of this random,
        # chaotic UNet land within 2/255 of float32
        assert np.abs(diff).max() > 0 and np.mean(np.abs(diff) > 2) < 0.01
    monkeypatch.setattr(generator_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="emulated"):
        PositivesGenerator.from_dir(tiny_model_dir, dtype="bfloat16")


def test_unknown_dtype(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        PositivesGenerator.from_dir(tiny_model_dir, dtype="int8")


@pytest.mark.slow
def test_compiled_generator_keeps_the_contract(
    tiny_model_dir: Path, gen: PositivesGenerator
) -> None:
    """torch.compile changes speed, not results: alone == in batch, and == eager (1 level)."""
    compiled = PositivesGenerator.from_dir(tiny_model_dir, compile=True)
    n = 8
    anchors = uint8_to_unit(_anchors(n, seed=7)).transpose(0, 3, 1, 2).copy()
    seeds = np.arange(n, dtype=np.int64) * 7919
    weights = np.linspace(0, 1, n).astype(np.float32)
    group = GenerationParams(steps=3, eta=0.1).group()
    batch = compiled.sample(anchors, seeds, weights, group)
    alone = compiled.sample(anchors[2:3], seeds[2:3], weights[2:3], group)
    assert np.abs(alone[0].astype(int) - batch[2]).max() <= 1
    assert np.abs(batch.astype(int) - gen.sample(anchors, seeds, weights, group)).max() <= 1
    # Compiled, each batch bucket is a first call of its own.
    assert compiled.paths_run == {(ANCHOR_PATH, 8), (ANCHOR_PATH, 1)}
