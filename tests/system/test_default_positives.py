"""Positives good by default: a small trained model, calibrated as ``clsp diffusion train``
ends, served by a real ``clsp serve`` and asked with every param left unset, keeps its
anchors' class on the project's own probe (docs/method.md, "Positive quality").

Without the calibration the same request gets the authors' settings, which this model
keeps the class with about a third of the time; an explicit ``"sampling": "authors"``
still gets the authors' loop.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from clsp_positives.closing_calibration import calibrate_trained
from clsp_positives.images import load_images
from clsp_positives.proto.codec import decode_response, encode_safetensors
from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.model_settings import read_generation_defaults
from clsp_positives.service.ddpm.config import DiffusionTrainConfig
from clsp_positives.trainer.positive_tools.calibrate import held_out_indices
from clsp_positives.trainer.positive_tools.quality import class_kept, fit_probe
from tests.support.service import clsp_serve

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parents[1] / "data" / "digits-ddpm"
CLASS_KEPT = 0.8


def positives(url: str, anchors: np.ndarray, params: dict) -> ResponseArrays:
    body = encode_safetensors({"anchors": anchors}, {"params": json.dumps(params)})
    headers = {"Content-Type": "application/x-safetensors"}
    r = httpx.post(url + "/v1/positives", content=body, headers=headers, timeout=600)
    assert r.status_code == 200, r.text
    return decode_response(r.content, r.headers["content-type"])


def test_a_calibrated_small_model_keeps_the_class_with_default_params(tmp_path: Path) -> None:
    model = tmp_path / "digits-ddpm"
    shutil.copytree(MODEL, model)
    lines: list[str] = []
    # A minute: the grid's first setting, then what fits (the one thread is slow).
    config = DiffusionTrainConfig(out=str(model), steps=1, threads=1, calibrate_minutes=1.0)
    assert calibrate_trained(config, model, say=lines.append) is not None, "\n".join(lines)
    stored = read_generation_defaults(model)
    assert stored is not None and stored.measured is not None

    # The probe and anchors the calibration did not see: the rest of the test split.
    train, test = load_images("digits", split="train"), load_images("digits", split="test")
    seen = held_out_indices(len(test.images), stored.measured.anchors)
    unseen = np.setdiff1d(np.arange(len(test.images)), seen)
    anchors, labels = test.images[unseen], test.labels[unseen]
    probe = fit_probe(train.images, train.labels)
    assert class_kept(probe, anchors, labels) > 0.9  # the probe reads real digits

    server = clsp_serve(model, args=("--max-batch", "64", "--max-wait-ms", "20")).start(180)
    try:
        answer = positives(server.url, anchors, {})
        for name, value in stored.stored().items():
            assert getattr(answer.params, name) == value, name
        kept = class_kept(probe, answer.positives, labels)
        assert kept >= CLASS_KEPT, f"class kept {kept:.3f} with {stored.stored()}"
        # The authors' loop, asked for explicitly, is still served, under its own key.
        few = slice(0, 8)
        authors = positives(server.url, anchors[few], {"sampling": "authors"})
        assert authors.params.sampling == "authors" and authors.cache_hit.sum() == 0
        assert not np.array_equal(authors.positives, answer.positives[few])
    finally:
        server.stop()
