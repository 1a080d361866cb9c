"""``CLSPPipeline`` against a live service of the same model: with ``seed=None`` its
positives are the pool's, byte for byte, the model folder's stored settings included
(docs/library.md, "In a notebook: CLSPPipeline")."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clsp_positives.pipeline import CLSPPipeline, candidate_seed
from clsp_positives.proto.keys import uint8_to_unit
from clsp_positives.proto.model_settings import GenerationDefaults, write_generation_defaults
from tests.support.examples import DOCUMENTED_URL, doc_example, run_example
from tests.support.models import hub_cache_entry, latent_model_dir, use_offline_hub_cache
from tests.support.servers import ServerProcess
from tests.support.service import anchors_u8, post_positives, start_service

STORED = GenerationDefaults(steps=4, interpolate="bottleneck+low-skips")
"""The model folder's clsp_generation.json: what neither the pipeline nor the request sets."""
PARAMS: dict[str, Any] = {"interpolation_weight": 0.3, "eta": 0.5, "method": "ddim"}
"""What both set; ``steps`` and ``interpolate`` are left to the stored settings."""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model with stored generation settings."""
    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("stored") / "model")
    write_generation_defaults(folder, STORED)
    return folder


@pytest.fixture(scope="module")
def service(model_dir: Path) -> Iterator[ServerProcess]:
    server = start_service(str(model_dir))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pipe(model_dir: Path) -> CLSPPipeline:
    return CLSPPipeline.from_pretrained(str(model_dir))


def test_seed_none_gives_the_services_positives_byte_for_byte(
    pipe: CLSPPipeline, service: ServerProcess
) -> None:
    anchors = anchors_u8(3, seed=11)
    with httpx.Client(base_url=service.url, timeout=120) as client:
        r, answer = post_positives(client, anchors, {**PARAMS, "k": 2})
    assert answer is not None, r.text
    assert answer.model == pipe.fingerprint
    assert answer.params.steps == 4 and answer.params.interpolate == "bottleneck+low-skips"

    ours = pipe(anchors, k=2, **PARAMS)
    assert ours.dtype == np.uint8 and ours.shape == (3, 2, 16, 16, 1)
    assert np.array_equal(ours, answer.positives)
    assert pipe.generation_params(**PARAMS) == answer.params.model_copy(update={"k": None})
    assert not np.array_equal(ours[:, 0], ours[:, 1])  # two candidates, not one twice


def test_an_argument_wins_over_the_stored_setting(pipe: CLSPPipeline) -> None:
    anchors = anchors_u8(2, seed=12)
    assert pipe.generation_params(steps=3).steps == 3
    stored, given = pipe(anchors, **PARAMS), pipe(anchors, num_inference_steps=3, **PARAMS)
    assert not np.array_equal(stored, given)


def test_output_types_hold_the_same_positives(pipe: CLSPPipeline) -> None:
    anchors = anchors_u8(2, seed=13)
    arrays = pipe(anchors, k=3, **PARAMS)
    assert arrays.dtype == np.uint8 and arrays.shape == (2, 3, 16, 16, 1)

    tensors = pipe(anchors, k=3, output_type="pt", **PARAMS)
    assert tensors.dtype == torch.float32 and tuple(tensors.shape) == (2, 3, 1, 16, 16)
    assert float(tensors.min()) >= -1.0 and float(tensors.max()) <= 1.0
    expected = uint8_to_unit(arrays).transpose(0, 1, 4, 2, 3)
    assert np.array_equal(tensors.numpy(), expected)

    pictures = pipe(anchors, k=3, output_type="pil", **PARAMS)
    assert len(pictures) == 2 and all(len(row) == 3 for row in pictures)
    assert all(p.mode == "L" and p.size == (16, 16) for row in pictures for p in row)
    assert np.array_equal(np.stack([np.stack(row) for row in pictures])[..., None], arrays)


def test_pil_numpy_and_tensor_anchors_give_the_same_positives(pipe: CLSPPipeline) -> None:
    anchors = anchors_u8(2, seed=14)
    as_pil = [Image.fromarray(a[..., 0]) for a in anchors]
    as_tensor = (torch.from_numpy(anchors).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    from_numpy = pipe(anchors, k=2, **PARAMS)
    assert np.array_equal(pipe(as_pil, k=2, **PARAMS), from_numpy)
    assert np.array_equal(pipe(as_tensor, k=2, **PARAMS), from_numpy)


def test_an_integer_seed_draws_other_reproducible_candidates(pipe: CLSPPipeline) -> None:
    anchors = anchors_u8(3, seed=15)
    keyed = pipe(anchors, k=2, **PARAMS)
    seeded = pipe(anchors, k=2, seed=7, **PARAMS)
    assert np.array_equal(pipe(anchors, k=2, seed=7, batch_size=1, **PARAMS), seeded)
    assert not np.array_equal(seeded, keyed)
    assert not np.array_equal(pipe(anchors, k=2, seed=8, **PARAMS), seeded)
    seeds = {candidate_seed(7, a, j) for a in range(3) for j in range(2)}
    assert len(seeds) == 6 and all(0 <= s < 1 << 63 for s in seeds)


@pytest.mark.parametrize(
    ("anchors", "arguments", "names"),
    [
        (np.zeros((2, 16, 16, 3), np.uint8), {}, "3 channels"),
        (np.zeros((2, 8, 8, 1), np.uint8), {}, "8x8"),
        (np.zeros((16, 16, 1), np.uint8), {}, "rank 4"),
        (torch.full((2, 1, 16, 16), 2.0), {}, r"\[-1, 1\]"),
        ([Image.new("RGB", (16, 16))], {}, r'convert\("L"\)'),
        (np.zeros((2, 16, 16, 1), np.uint8), {"k": 0}, "k must be an integer >= 1"),
        (np.zeros((2, 16, 16, 1), np.uint8), {"num_inference_steps": 0}, "num_inference_steps"),
        (np.zeros((2, 16, 16, 1), np.uint8), {"output_type": "tf"}, "output_type"),
    ],
    ids=["channels", "size", "rank", "range", "pil-mode", "k", "steps", "output-type"],
)
def test_bad_inputs_are_refused_naming_what_to_fix(
    pipe: CLSPPipeline, anchors: Any, arguments: dict[str, Any], names: str
) -> None:
    with pytest.raises(ValueError, match=names):
        pipe(anchors, **arguments)


def test_a_latent_hub_model_gives_pictures_of_its_autoencoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = use_offline_hub_cache(tmp_path / "hf-cache", monkeypatch)
    folder = latent_model_dir(tmp_path / "kl", "kl")
    hub_cache_entry(cache, "someorg/tiny-kl", folder)
    by_id = CLSPPipeline.from_pretrained("someorg/tiny-kl")
    assert by_id.fingerprint == CLSPPipeline.from_pretrained(folder).fingerprint

    anchors = np.random.default_rng(16).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    pictures = by_id(anchors, k=2, num_inference_steps=2, output_type="pil")
    assert all(p.mode == "RGB" and p.size == (64, 64) for row in pictures for p in row)
    arrays = by_id(anchors, k=2, num_inference_steps=2)
    assert arrays.shape == (2, 2, 64, 64, 3)
    assert np.array_equal(np.stack([np.stack(row) for row in pictures]), arrays)


def test_the_notebook_example_runs_as_pasted(tiny_model_dir: Path, tmp_path: Path) -> None:
    library = Path(__file__).resolve().parents[1] / "docs" / "library.md"
    script = doc_example(library, "pipeline", "doc-example", service=False)
    assert '"models/digits"' in script
    script = script.replace('"models/digits"', repr(str(tiny_model_dir)))
    out = run_example(script, DOCUMENTED_URL, tmp_path)
    assert out.splitlines() == ["(4, 3, 16, 16, 1) uint8", "True"]


def test_a_float16_pipeline_waits_for_its_gpu(tiny_model_dir: Path) -> None:
    """diffusers' order, from_pretrained(torch_dtype=torch.float16).to("cuda"): the load
    does not refuse float16, which runs on CUDA only; a call on the CPU does."""
    half = CLSPPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        half(anchors_u8(1, seed=17), num_inference_steps=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            half.to("cuda")
        return
    positives = half.to("cuda")(anchors_u8(1, seed=17), num_inference_steps=2, output_type="pt")
    assert positives.device.type == "cuda" and tuple(positives.shape) == (1, 1, 1, 16, 16)
