"""A latent model served by ``clsp serve`` over real HTTP with a real Redis: pictures
and latents in, pictures and latents out, in both encodings (docs/latent.md)."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from clsp_positives.proto.codec import encode_request
from clsp_positives.proto.keys import canonical_latents, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import entry_name
from tests.support.models import latent_model_dir
from tests.support.service import clsp_serve, post_positives, scrape

pytestmark = pytest.mark.slow

ST = "application/x-safetensors"
JSON = "application/json"
ENCODINGS = (ST, JSON)
STEPS = 3
LATENT = (4, 16, 16)
MAX_COST = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    return latent_model_dir(tmp_path_factory.mktemp("latent") / "model", "kl", output_scale=0.2)


@pytest.fixture(scope="module")
def service(model_dir, redis_server):
    args = ("--max-batch", "16", "--max-wait-ms", "20", "--max-cost", str(MAX_COST))
    server = clsp_serve(model_dir, redis_server.url, args=(*args, "--autoencoder-cost", "2"))
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def generator(model_dir):
    from clsp_positives.service.sampling.generator import PositivesGenerator

    return PositivesGenerator.from_dir(model_dir)


def pictures(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def latents(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *LATENT)).astype(np.float32)


def params(**extra) -> dict:
    return {"steps": STEPS, **extra}


def test_the_model_route_reports_both_shapes(client, generator) -> None:
    info = client.get("/v1/model").json()
    assert info["fingerprint"] == generator.fingerprint
    assert (info["sample_size"], info["channels"]) == (64, 3)
    assert (info["latent_size"], info["latent_channels"], info["autoencoder"]) == (16, 4, "kl")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_pictures_in_pictures_and_latents_out(client, generator, encoding) -> None:
    anchors = pictures(2, seed=10 + len(encoding))
    r, img = post_positives(client, anchors, params(k=2), encoding=encoding)
    assert r.status_code == 200, r.text
    assert img.positives.shape == (2, 2, 64, 64, 3) and img.positives.dtype == np.uint8
    r, lat = post_positives(client, anchors, params(k=2, output="latents"), encoding=encoding)
    assert r.status_code == 200, r.text
    assert lat.positives.shape == (2, 2, *LATENT) and lat.positives.dtype == np.float32
    assert lat.params.output == "latents" and lat.cache_hit.sum() == 0
    # one positive, two forms: the latents decode to the pictures served
    decoded = generator.decode_latents(lat.positives.reshape(4, *LATENT))
    assert np.abs(decoded.astype(int) - img.positives.reshape(4, 64, 64, 3)).max() <= 1
    # the same as the service makes in process
    direct = generator.positives(
        np.repeat(anchors, 2, axis=0),
        np.tile([0, 1], 2),
        GenerationParams(**params(output="latents")),
    )
    assert np.allclose(direct, lat.positives.reshape(4, *LATENT), atol=1e-4)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_latents_in_latents_and_pictures_out(client, generator, encoding) -> None:
    anchors = latents(3, seed=20 + len(encoding))
    r, lat = post_positives(
        client, anchors, params(output="latents"), encoding=encoding, latents=True
    )
    assert r.status_code == 200, r.text
    assert lat.positives.shape == (3, *LATENT) and lat.positives.dtype == np.float32
    r, img = post_positives(client, anchors, params(), encoding=encoding, latents=True)
    assert r.status_code == 200, r.text
    assert img.positives.shape == (3, 64, 64, 3)
    decoded = generator.decode_latents(lat.positives)
    assert np.abs(decoded.astype(int) - img.positives.astype(int)).max() <= 1
    # float16 latents are the same anchors (they convert to float32 exactly)
    half = anchors.astype(np.float16)
    r, again = post_positives(
        client, half, params(output="latents"), encoding=encoding, latents=True
    )
    _, want = post_positives(
        client,
        half.astype(np.float32),
        params(output="latents"),
        encoding=encoding,
        latents=True,
    )
    assert again.positives.tobytes() == want.positives.tobytes()


def test_latent_requests_are_cached_deterministic_and_batch_independent(
    service, client, generator, redis_server
) -> None:
    anchors = latents(4, seed=30)
    p = params(output="latents")
    _, first = post_positives(client, anchors, p, latents=True)
    before = scrape(service.url)
    _, second = post_positives(client, anchors, p, latents=True)
    after = scrape(service.url)
    assert first.cache_hit.tolist() == [0] * 4 and second.cache_hit.tolist() == [1] * 4
    assert first.positives.tobytes() == second.positives.tobytes()
    assert after["clsp_positives_generated_total"] == before["clsp_positives_generated_total"]
    # alone, in a batch of its own, the same positive (within float32 rounding)
    _, alone = post_positives(client, anchors[2:3], {**p, "cache": "bypass"}, latents=True)
    assert np.allclose(alone.positives[0], first.positives[2], atol=1e-4)
    # the Redis entry is the latent key's, and says it holds float32 latents
    key = positive_key(
        generator.fingerprint,
        GenerationParams(**p).resolved("authors"),
        canonical_latents(anchors)[0],
        0,
        "latent",
    )
    import redis

    blob = redis.Redis.from_url(redis_server.url).get(entry_name(generator.fingerprint, key))
    assert blob is not None and blob.startswith(b"CLSP\x03")


def _json_request(**tensors) -> bytes:
    body = {
        name: {
            "dtype": str(arr.dtype),
            "shape": list(arr.shape),
            "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode(),
        }
        for name, arr in tensors.items()
    }
    body["params"] = params()
    return json.dumps(body).encode()


BAD = {
    "wrong latent shape": (
        _json_request(anchor_latents=np.zeros((1, 4, 8, 8), np.float32)),
        400,
        "[N, 4, 16, 16]",
    ),
    "float64 latents": (
        _json_request(anchor_latents=np.zeros((1, *LATENT), np.float64)),
        400,
        "anchor_latents: dtype float64",
    ),
    "NaN latents": (
        _json_request(anchor_latents=np.full((1, *LATENT), np.nan, np.float32)),
        400,
        "NaN",
    ),
    "both anchors": (
        _json_request(anchors=pictures(1, 0), anchor_latents=np.zeros((1, *LATENT), np.float32)),
        400,
        "both",
    ),
    "neither anchors": (json.dumps({"params": params()}).encode(), 400, "neither"),
    "null latents": (
        json.dumps({"anchor_latents": None, "params": params()}).encode(),
        400,
        "anchor_latents is null",
    ),
    "uint8 latents": (
        _json_request(anchor_latents=np.zeros((1, *LATENT), np.uint8)),
        400,
        "anchor_latents: dtype uint8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_latent_requests_are_4xx_and_nothing_is_generated(service, client, case) -> None:
    body, status, words = BAD[case]
    before = scrape(service.url)
    r = client.post("/v1/positives", content=body, headers={"Content-Type": JSON})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    after = scrape(service.url)
    assert after.get("clsp_positives_generated_total", 0) == before.get(
        "clsp_positives_generated_total", 0
    )
    assert client.get("/readyz").status_code == 200


def test_the_autoencoder_counts_toward_the_cost_limit(client) -> None:
    """max_cost 40 with each autoencoder pass counting 2: 4 latents x 3 steps (12) pass;
    as pictures out they also decode 4 (+8); as pictures in and out 4 x 3 + 8 encodes
    and decodes x 2 = 28 pass, 5 x 3 + 10 x 2 = 35 pass, 6 x 3 + 12 x 2 = 42 does not."""
    r, _ = post_positives(client, latents(4, 40), params(output="latents"), latents=True)
    assert r.status_code == 200, r.text
    r, _ = post_positives(client, pictures(5, 41), params())
    assert r.status_code == 200, r.text
    r, _ = post_positives(client, pictures(6, 42), params())
    assert r.status_code == 413
    assert r.json()["error"] == "cost_too_high"
    assert "12 autoencoder passes x 2" in r.json()["detail"]
    r, _ = post_positives(client, latents(6, 42), params(output="latents"), latents=True)
    assert r.status_code == 200, r.text  # 18: no autoencoder pass


def test_a_pixel_generator_refuses_latents(tiny_model_dir) -> None:
    """Decoded by the codec with a pixel model's shapes: both refusals name the field."""
    from clsp_positives.proto.codec import ModelShapes, decode_request
    from clsp_positives.proto.errors import ProtocolError

    pixel = ModelShapes((1, 16, 16))
    body, ctype = encode_request(np.zeros((1, 4, 4, 4), np.float32), latents=True)
    with pytest.raises(ProtocolError, match="anchor_latents: this model samples pixels"):
        decode_request(body, ctype, model=pixel)
    body, ctype = encode_request(np.zeros((1, 16, 16, 1), np.uint8), params={"output": "latents"})
    with pytest.raises(ProtocolError, match=r"params\.output: latents needs a latent model") as e:
        decode_request(body, ctype, model=pixel)
    assert e.value.status == 422
