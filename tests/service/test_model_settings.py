"""A model folder's ``clsp_generation.json`` over real HTTP: uvicorn on loopback, the tiny
model with the file and without it, requests whose params leave fields out.

The requests are built by hand (``encode_safetensors`` with a params object of only the
fields the test sets): what a curl user sends. Which params a positive was made with is
shown by the cache: a second request is a hit exactly when it maps to the same key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from clsp_positives.proto.codec import decode_response, encode_safetensors
from clsp_positives.proto.messages import ResponseArrays
from clsp_positives.proto.model_settings import GENERATION_DEFAULTS_FILE, as_pool_applies
from clsp_positives.proto.params import parse_params
from clsp_positives.service.requests import RequestDefaults
from clsp_positives.service.settings import ServiceSettings
from tests.support.servers import free_port
from tests.support.service import anchors_u8, start_service

STORED = {
    "sampling": "authors-clipped",
    "interpolate": "bottleneck+low-skips",
    "interpolation_weight": 0.3,
    "steps": 3,
}
AUTHORS = {"sampling": "authors", "interpolate": "bottleneck", "interpolation_weight": 0.1}
ST = "application/x-safetensors"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def settled_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's weights in a folder of their own, with the file."""
    folder = tmp_path_factory.mktemp("settled") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / GENERATION_DEFAULTS_FILE).write_text(json.dumps(STORED))
    return folder


@pytest.fixture(scope="module")
def settled(settled_dir: Path):
    server = start_service(settled_dir, log_level="info")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path):
    server = start_service(tiny_model_dir)
    yield server
    server.stop()


def post(url: str, anchors: np.ndarray, params: dict) -> ResponseArrays:
    """``POST /v1/positives`` with exactly these params fields (the rest left unset)."""
    body = encode_safetensors({"anchors": anchors}, {"params": json.dumps(params)})
    r = httpx.post(url + "/v1/positives", content=body, headers={"Content-Type": ST}, timeout=60)
    assert r.status_code == 200, r.text
    return decode_response(r.content, r.headers["content-type"])


def test_unset_params_get_the_stored_ones_and_a_request_still_wins(settled):
    anchors = anchors_u8(2, seed=900)
    default = post(settled.url, anchors, {})
    assert default.cache_hit.tolist() == [0, 0]
    assert {n: getattr(default.params, n) for n in STORED} == STORED
    # The same settings sent explicitly: the same key, so a hit on the same positives.
    explicit = post(settled.url, anchors, STORED)
    assert explicit.cache_hit.tolist() == [1, 1]
    assert np.array_equal(explicit.positives, default.positives)
    assert explicit.params == default.params
    # A request asking for the authors' loop gets it, under a key of its own.
    authors = post(settled.url, anchors, {**STORED, "sampling": "authors"})
    assert authors.params.sampling == "authors" and authors.cache_hit.tolist() == [0, 0]
    assert not np.array_equal(authors.positives, default.positives)
    # null sampling is "the service's default", which the file is part of
    null = post(settled.url, anchors, {"sampling": None})
    assert null.cache_hit.tolist() == [1, 1] and null.params == default.params


def test_model_info_reports_and_the_log_names_the_stored_defaults(settled, plain):
    info = httpx.get(settled.url + "/v1/model", timeout=10).json()
    assert info["generation_defaults"] == STORED
    assert info["sampling"] == "authors-clipped"
    # settings, not weights: the fingerprint is the same weights' without the file
    assert (
        info["fingerprint"] == httpx.get(plain.url + "/v1/model", timeout=10).json()["fingerprint"]
    )
    assert f"generation defaults from the model's {GENERATION_DEFAULTS_FILE}" in settled.log()
    assert '"interpolate": "bottleneck+low-skips"' in settled.log()


def test_without_the_file_unset_params_get_the_authors_settings(settled, plain):
    info = httpx.get(plain.url + "/v1/model", timeout=10).json()
    assert info["generation_defaults"] is None and info["sampling"] == "authors"
    anchors = anchors_u8(2, seed=910)
    default = post(plain.url, anchors, {"steps": 3})
    assert {n: getattr(default.params, n) for n in AUTHORS} == AUTHORS
    explicit = post(plain.url, anchors, {**AUTHORS, "steps": 3, "eta": 0.1, "method": "ddim"})
    assert explicit.cache_hit.tolist() == [1, 1]
    assert np.array_equal(explicit.positives, default.positives)
    # The file's settings asked of the plain service: the positives the settled one
    # makes for params left unset (same weights, same key, same image).
    asked = post(plain.url, anchors, STORED)
    assert np.array_equal(asked.positives, post(settled.url, anchors, {}).positives)


def test_the_operators_sampling_flag_wins_over_the_stored_mode(settled_dir: Path, tiny_model_dir):
    from clsp_positives.service.sampling.generator import PositivesGenerator

    generator = PositivesGenerator.from_dir(settled_dir)
    stored = RequestDefaults.of(ServiceSettings(model=str(settled_dir)), generator)
    assert stored.sampling == "authors-clipped"
    chosen = RequestDefaults.of(
        ServiceSettings(model=str(settled_dir), sampling="model"), generator
    )
    applied = chosen.apply(parse_params({}))
    assert (applied.sampling, applied.interpolate) == ("model", "bottleneck+low-skips")
    bare = PositivesGenerator.from_dir(tiny_model_dir)
    assert bare.fingerprint == generator.fingerprint
    none = RequestDefaults.of(ServiceSettings(model=str(tiny_model_dir)), bare)
    assert none.stored is None and none.apply(parse_params({})).sampling == "authors"


def test_a_malformed_file_stops_clsp_serve_naming_the_file_and_field(
    settled_dir: Path, tmp_path: Path
):
    folder = tmp_path / "model"
    shutil.copytree(settled_dir, folder)
    (folder / GENERATION_DEFAULTS_FILE).write_text(json.dumps({**STORED, "sampling": "clipped"}))
    cmd = [sys.executable, "-m", "clsp_positives.cli", "serve", "--model", str(folder)]
    done = subprocess.run(
        [*cmd, "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert str(folder / GENERATION_DEFAULTS_FILE) in done.stderr
    assert "sampling: Input should be 'authors', 'authors-clipped' or 'model'" in done.stderr


@pytest.mark.parametrize(
    "sent",
    [{}, {"steps": 2}, {"interpolate": "bottleneck", "eta": 0.5}, {"sampling": "authors"}],
)
def test_a_client_resolves_unset_params_as_the_pool_does(settled, plain, sent: dict):
    """``as_pool_applies`` on ``GET /v1/model`` gives the params the service itself answers
    with (the response's own), with the file and without it."""
    for server in (settled, plain):
        info = httpx.get(server.url + "/v1/model", timeout=10).json()
        answered = post(server.url, anchors_u8(1, seed=920), {"steps": 3, **sent}).params
        resolved = as_pool_applies(parse_params({"steps": 3, **sent}), info)
        assert resolved.canonical() == answered.canonical()


def test_clsp_generate_asks_and_keeps_the_models_stored_settings(settled, tmp_path: Path):
    """Without generation flags a bank is made with the model's stored settings, sent
    explicitly and written to its metadata and config; a flag still wins."""
    from typer.testing import CliRunner

    from clsp_positives.cli import app
    from clsp_positives.trainer.positives.offline import config_path, meta_path

    out = tmp_path / "bank.npy"
    args = ["generate", "--dataset", "digits", "--split", "test", "--k", "1", "--no-progress"]
    args += ["--positives", settled.url, "--out", str(out), "--gen-interpolate-until", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads(meta_path(out).read_text())["params"]
    assert {n: meta[n] for n in STORED} == STORED and meta["interpolate_until"] == 0.5
    written = yaml.safe_load(config_path(out).read_text())
    assert written["gen_interpolate"] == STORED["interpolate"] and written["gen_steps"] == 3
