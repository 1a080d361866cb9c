"""Params this model's scheduler cannot be sampled with are the caller's 422, refused
before they are queued, never a failed batch's 500 (docs/design.md §6): DPM-Solver++ 2M
over 1000 steps of a ``leading`` grid repeats a noise level."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from tests.support.service import anchors_u8, post_positives, scrape, start_service, total

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def leading_model(tiny_model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("leading") / "model"
    shutil.copytree(tiny_model_dir, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_spacing": "leading"}))
    server = start_service(model)
    yield server
    server.stop()


def test_params_the_scheduler_cannot_take_are_a_422_naming_them(leading_model):
    refused = {"method": "dpmpp-2m", "steps": 1000, "sampling": "model"}
    with httpx.Client(base_url=leading_model.url, timeout=60) as client:
        r, _ = post_positives(client, anchors_u8(1, seed=1), refused)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "invalid_params"
        assert "this model" in body["detail"] and "noise level" in body["detail"]
        # The same model takes the method at a step count its grid allows.
        ok, reply = post_positives(client, anchors_u8(1, seed=1), {**refused, "steps": 3})
        assert ok.status_code == 200 and reply is not None
    metrics = scrape(leading_model.url)
    assert total(metrics, "clsp_sampler_errors_total") == 0  # nothing reached the sampler
