"""The service over real HTTP: uvicorn on loopback, a real redis-server, the tiny model.

Two instances share one Redis (module scope, so the model loads twice per run).
Every test uses anchors of its own seed, so cache keys never collide between tests.
"""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest

from clsp_positives.proto.codec import decode_response, encode_request, encode_safetensors
from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import entry_name
from tests.support.service import (
    anchors_u8,
    apost_positives,
    auth,
    post_positives,
    run,
    scrape,
    start_service,
    total,
)

TOKEN = "test-token-0123"
STEPS = 3
PARAMS = {"steps": STEPS, "eta": 0.1, "interpolation_weight": 0.1}
ST = "application/x-safetensors"
MAX_ANCHORS = 64
MAX_BODY_MB = 0.25
MAX_COST = 5000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tiny_model_dir, redis_server):
    server = start_service(
        tiny_model_dir,
        redis_url=redis_server.url,
        token=TOKEN,
        max_batch=64,
        max_wait_ms=50,
        max_anchors=MAX_ANCHORS,
        max_body_mb=MAX_BODY_MB,
        max_cost=MAX_COST,
        max_k=8,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_service(tiny_model_dir, redis_server, service):
    server = start_service(tiny_model_dir, redis_url=redis_server.url, token=TOKEN)
    yield server
    server.stop()


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    from clsp_positives.service.sampling.generator import PositivesGenerator

    return PositivesGenerator.from_dir(tiny_model_dir)


def _fingerprint(client: httpx.Client) -> str:
    return client.get("/v1/model", headers=auth(TOKEN)).json()["fingerprint"]


# ------------------------------------------------------------------- batching


def test_concurrent_clients_share_batches_and_match_one_by_one_generation(service, generator):
    clients, per_client = 16, 8
    anchors = [anchors_u8(per_client, seed=100 + i) for i in range(clients)]
    before = scrape(service.url, TOKEN)

    async def main():
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as c:
            return await asyncio.gather(
                *(apost_positives(c, a, PARAMS, token=TOKEN) for a in anchors)
            )

    results = run(main())
    after = scrape(service.url, TOKEN)
    for (response, reply), _ in zip(results, anchors, strict=True):
        assert response.status_code == 200, response.text
        assert reply.positives.shape == (per_client, 16, 16, 1)
        assert reply.positives.dtype == np.uint8
        assert reply.cache_hit.tolist() == [0] * per_client
        assert reply.model == generator.fingerprint
    # More than one request's items went through one sampler call.
    batches = after["clsp_batch_size_count"] - before["clsp_batch_size_count"]
    small = after["clsp_batch_size_bucket{le=8.0}"] - before["clsp_batch_size_bucket{le=8.0}"]
    assert batches >= 1 and small < batches, "no batch held more than one request's items"
    assert (
        after["clsp_positives_generated_total"] - before["clsp_positives_generated_total"]
        == clients * per_client
    )
    # docs/design.md §2: the same key gives the same positive however it was batched: all 128
    # in one direct call, and one anchor of every fourth client truly alone (each
    # single call costs as much as a batch on a CPU, so not all 128).
    params = GenerationParams(**PARAMS)
    served = np.concatenate([reply.positives for _, reply in results])
    direct = generator.positives(np.concatenate(anchors), np.zeros(len(served), np.int64), params)
    assert _levels_apart(direct, served) <= 1
    for c in range(0, clients, 4):
        a, reply, i = anchors[c], results[c][1], c % per_client
        alone = generator.positives(a[i : i + 1], np.zeros(1, np.int64), params)
        assert _levels_apart(alone[0], reply.positives[i]) <= 1


def _levels_apart(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# ---------------------------------------------------------------------- cache


def test_repeated_request_is_all_hits_byte_identical_without_sampler_call(service, client):
    anchors = anchors_u8(6, seed=200)
    first, a = post_positives(client, anchors, PARAMS, token=TOKEN)
    assert first.status_code == 200 and a.cache_hit.tolist() == [0] * 6
    before = scrape(service.url, TOKEN)
    second, b = post_positives(client, anchors, PARAMS, token=TOKEN)
    assert second.status_code == 200
    after = scrape(service.url, TOKEN)
    assert b.cache_hit.tolist() == [1] * 6
    assert a.positives.tobytes() == b.positives.tobytes()
    assert after["clsp_sampler_seconds_count"] == before["clsp_sampler_seconds_count"]
    assert after["clsp_positives_generated_total"] == before["clsp_positives_generated_total"]
    assert after["clsp_cache_hits_total"] - before["clsp_cache_hits_total"] == 6


def test_second_instance_sharing_redis_hits_the_first_ones_entries(service, second_service, client):
    anchors = anchors_u8(5, seed=300)
    _, a = post_positives(client, anchors, PARAMS, token=TOKEN)
    with httpx.Client(base_url=second_service.url, timeout=60) as other:
        r, b = post_positives(other, anchors, PARAMS, token=TOKEN)
    assert r.status_code == 200
    assert b.cache_hit.tolist() == [1] * 5
    assert a.positives.tobytes() == b.positives.tobytes()
    assert scrape(second_service.url, TOKEN).get("clsp_positives_generated_total", 0) == 0


def test_entries_are_namespaced_by_fingerprint(service, client, redis_server):
    anchors = anchors_u8(1, seed=350)
    post_positives(client, anchors, PARAMS, token=TOKEN)
    fp = _fingerprint(client)
    key = positive_key(fp, GenerationParams(**PARAMS), canonical_anchors(anchors)[0], 0)
    assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":1"
    assert entry_name(fp, key).startswith(f"clsp:{fp}:")


def test_the_sampling_mode_is_resolved_keyed_and_answered(service, client, redis_server):
    assert client.get("/v1/model", headers=auth(TOKEN)).json()["sampling"] == "authors"
    anchors = anchors_u8(1, seed=360)
    _, default = post_positives(client, anchors, PARAMS, token=TOKEN)
    assert default.params.sampling == "authors"  # None resolved to the service's mode
    _, authors = post_positives(client, anchors, {**PARAMS, "sampling": "authors"}, token=TOKEN)
    assert authors.cache_hit.tolist() == [1]
    _, model = post_positives(client, anchors, {**PARAMS, "sampling": "model"}, token=TOKEN)
    assert model.params.sampling == "model" and model.cache_hit.tolist() == [0]
    _, clipped = post_positives(
        client, anchors, {**PARAMS, "sampling": "authors-clipped"}, token=TOKEN
    )
    assert clipped.params.sampling == "authors-clipped" and clipped.cache_hit.tolist() == [0]
    fp = _fingerprint(client)
    canon = canonical_anchors(anchors)[0]
    for mode in ("authors", "authors-clipped", "model"):
        key = positive_key(fp, GenerationParams(**PARAMS, sampling=mode), canon, 0)
        assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":1"


def test_low_skips_interpolation_is_keyed_and_answered(service, client, redis_server):
    anchors = anchors_u8(1, seed=370)
    _, plain = post_positives(client, anchors, PARAMS, token=TOKEN)
    low_params = {**PARAMS, "interpolate": "bottleneck+low-skips"}
    _, low = post_positives(client, anchors, low_params, token=TOKEN)
    assert low.params.interpolate == "bottleneck+low-skips" and low.cache_hit.tolist() == [0]
    assert np.abs(low.positives.astype(int) - plain.positives.astype(int)).max() > 1
    _, again = post_positives(client, anchors, low_params, token=TOKEN)
    assert again.cache_hit.tolist() == [1] and np.array_equal(again.positives, low.positives)
    fp = _fingerprint(client)
    key = positive_key(
        fp, GenerationParams(**low_params, sampling="authors"), canonical_anchors(anchors)[0], 0
    )
    assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":1"


def test_anchor_reuse_options_are_keyed_and_answered(service, client, redis_server):
    """Each reuse option is its own key, and sharing makes a candidate's positive the
    same whether its siblings come in the same request or in another."""
    anchors = anchors_u8(1, seed=375)
    shared = {**PARAMS, "share_anchor": True, "anchor_refresh": 2}
    _, plain = post_positives(client, anchors, {**PARAMS, "k": 2}, token=TOKEN)
    _, both = post_positives(client, anchors, {**shared, "k": 2}, token=TOKEN)
    assert both.cache_hit.tolist() == [[0, 0]] and both.params.share_anchor
    assert np.abs(both.positives.astype(int) - plain.positives.astype(int)).max() > 1
    fp = _fingerprint(client)
    canon = canonical_anchors(anchors)[0]
    key = positive_key(fp, GenerationParams(**shared, sampling="authors"), canon, 1)
    assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":1"
    # candidate 1 alone (cache bypassed, so generated again) equals it beside candidate 0
    _, alone = post_positives(
        client, anchors, {**shared, "cache": "bypass"}, token=TOKEN, candidates=np.array([1])
    )
    assert np.array_equal(
        alone.positives.reshape(both.positives[:, 1:].shape), both.positives[:, 1:]
    )


def test_expect_model_pins_the_generator(service, client, redis_server):
    """``expect_model``: the right fingerprint answers as without it (same key, so a
    cache hit); another one is 409 model_mismatch naming both fingerprints."""
    anchors = anchors_u8(1, seed=377)
    fp = _fingerprint(client)
    _, first = post_positives(client, anchors, PARAMS, token=TOKEN)
    _, pinned = post_positives(client, anchors, {**PARAMS, "expect_model": fp}, token=TOKEN)
    assert pinned.cache_hit.tolist() == [1] and np.array_equal(pinned.positives, first.positives)
    r, _ = post_positives(client, anchors, {**PARAMS, "expect_model": "f" * 16}, token=TOKEN)
    assert r.status_code == 409 and r.json()["error"] == "model_mismatch"
    assert fp in r.json()["detail"] and "f" * 16 in r.json()["detail"]


def test_dpmpp_2m_is_keyed_apart_from_ddim_and_eta_free(service, client, redis_server, generator):
    anchors = anchors_u8(1, seed=380)
    dpmpp = {**PARAMS, "method": "dpmpp-2m"}
    r, first = post_positives(client, anchors, dpmpp, token=TOKEN)
    assert r.status_code == 200, r.text
    assert first.params.method == "dpmpp-2m" and first.cache_hit.tolist() == [0]
    _, ddim = post_positives(client, anchors, PARAMS, token=TOKEN)
    assert ddim.cache_hit.tolist() == [0]  # another method, another key
    assert np.abs(ddim.positives.astype(int) - first.positives.astype(int)).max() > 1
    # eta does not enter a dpmpp-2m key: another eta is a hit on the same positive
    _, other_eta = post_positives(client, anchors, {**dpmpp, "eta": 0.9}, token=TOKEN)
    assert other_eta.cache_hit.tolist() == [1]
    assert np.array_equal(other_eta.positives, first.positives)
    fp = _fingerprint(client)
    key = positive_key(
        fp, GenerationParams(**dpmpp, sampling="authors"), canonical_anchors(anchors)[0], 0
    )
    assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":1"
    # what the service made is what the in-process generator makes for that key
    direct = generator.positives(anchors, None, GenerationParams(**dpmpp))
    assert _levels_apart(direct, first.positives) <= 1


def test_refresh_regenerates_and_bypass_neither_reads_nor_writes(service, client, redis_server):
    anchors = anchors_u8(3, seed=400)
    _, first = post_positives(client, anchors, PARAMS, token=TOKEN)
    _, refreshed = post_positives(client, anchors, {**PARAMS, "cache": "refresh"}, token=TOKEN)
    assert refreshed.cache_hit.tolist() == [0, 0, 0]
    assert np.abs(refreshed.positives.astype(int) - first.positives.astype(int)).max() <= 1
    fresh = anchors_u8(2, seed=401)
    fp = _fingerprint(client)
    _, bypassed = post_positives(client, fresh, {**PARAMS, "cache": "bypass"}, token=TOKEN)
    assert bypassed.cache_hit.tolist() == [0, 0]
    key = positive_key(fp, GenerationParams(**PARAMS), canonical_anchors(fresh)[0], 0)
    assert redis_server.command("EXISTS", entry_name(fp, key)).strip() == b":0"
    _, again = post_positives(client, anchors, {**PARAMS, "cache": "bypass"}, token=TOKEN)
    assert again.cache_hit.tolist() == [0, 0, 0]  # bypass does not read either


# ------------------------------------------------------------ shapes & routes


def test_k_candidates_and_the_unversioned_alias(service, client):
    anchors = anchors_u8(2, seed=500)
    r, k3 = post_positives(client, anchors, {**PARAMS, "k": 3}, token=TOKEN, path="/positives")
    assert r.status_code == 200
    assert k3.positives.shape == (2, 3, 16, 16, 1) and k3.cache_hit.shape == (2, 3)
    assert k3.params.k == 3
    # Candidate 2 of anchor 1, asked for alone, is the same positive (now from the cache).
    _, one = post_positives(
        client, anchors[1:], PARAMS, token=TOKEN, candidates=np.array([2], np.int64)
    )
    assert one.cache_hit.tolist() == [1]
    assert np.array_equal(one.positives[0], k3.positives[1, 2])
    # Different candidates of one anchor differ.
    assert not np.array_equal(k3.positives[0, 0], k3.positives[0, 1])


def test_json_encoding_and_accept_negotiation(service, client):
    anchors = anchors_u8(2, seed=600)
    r, via_json = post_positives(client, anchors, PARAMS, token=TOKEN, encoding="application/json")
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) >= {"positives", "cache_hit", "model", "params"}
    assert body["params"]["steps"] == STEPS and body["params"]["method"] == "ddim"
    r2, via_st = post_positives(
        client, anchors, PARAMS, token=TOKEN, encoding="application/json", accept=ST
    )
    assert r2.headers["content-type"] == ST
    assert np.array_equal(via_json.positives, via_st.positives)
    # float32 [N, C, H, W] anchors address the same positives as uint8 pixels.
    as_float = canonical_anchors(anchors)
    _, via_float = post_positives(client, as_float, PARAMS, token=TOKEN)
    assert via_float.cache_hit.tolist() == [1, 1]
    assert np.array_equal(via_float.positives, via_json.positives)


def test_model_health_docs_openapi_and_metrics_routes(service, client):
    info = client.get("/v1/model", headers=auth(TOKEN)).json()
    assert info["sample_size"] == 16 and info["channels"] == 1
    assert info["max_anchors"] == MAX_ANCHORS and info["max_k"] == 8
    assert info["dtype"] == "float32" and info["device"] == "cpu"
    assert "num_train_timesteps" in info["scheduler"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    from clsp_positives.proto.openapi import build_openapi

    assert client.get("/openapi.json", headers=auth(TOKEN)).json() == json.loads(
        json.dumps(build_openapi())
    )
    docs = client.get("/docs", headers=auth(TOKEN))
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    text = client.get("/metrics", headers=auth(TOKEN)).text
    for name in (
        "clsp_requests_total",
        "clsp_request_seconds_bucket",
        "clsp_queue_depth",
        "clsp_batch_size_bucket",
        "clsp_sampler_seconds_bucket",
        "clsp_positives_generated_total",
        "clsp_cache_hits_total",
        "clsp_cache_misses_total",
        "clsp_cache_errors_total",
        "clsp_deduplicated_items_total",
    ):
        assert name in text, name
    m = scrape(service.url, TOKEN)
    assert total(m, "clsp_requests_total{route=/v1/model,status=200}") >= 1


def test_once_ready_no_request_pays_for_a_first_call(service, client):
    """The warm-up before /readyz ran every sampler path, so neither a CLSP request
    (w = 0.1: the anchor path) nor a plain one (w = 1) runs a path for the first
    time. The count is of the whole module's requests: a warm-up at w = 1 alone
    leaves the anchor path to the first w < 1 request, whichever test sends it."""
    assert client.get("/readyz").status_code == 200
    before = scrape(service.url, TOKEN)
    for weight, seed in ((0.1, 900), (1.0, 901)):
        params = {**PARAMS, "interpolation_weight": weight}
        r, reply = post_positives(client, anchors_u8(3, seed=seed), params, token=TOKEN)
        assert r.status_code == 200, r.text
        assert reply.cache_hit.tolist() == [0, 0, 0]
    after = scrape(service.url, TOKEN)
    generated = "clsp_positives_generated_total"
    assert after[generated] - before[generated] == 6  # both were sampled, not cached
    assert after["clsp_sampler_cold_calls_total"] == 0


# ----------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "path,method",
    [
        ("/v1/positives", "POST"),
        ("/positives", "POST"),
        ("/v1/model", "GET"),
        ("/metrics", "GET"),
        ("/docs", "GET"),
        ("/openapi.json", "GET"),
    ],
)
@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token", "Basic dGVzdA==", f"bearer {TOKEN}x"]
)
def test_every_route_but_health_needs_the_token(service, client, path, method, header):
    r = client.request(method, path, headers={"Authorization": header} if header else {})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "unauthorized" and "token" in r.json()["detail"]


def test_health_checks_answer_without_the_token(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


# ----------------------------------------------------------------- bad input


def _st(tensors, params=None, raw_meta=None) -> bytes:
    meta = raw_meta if raw_meta is not None else {"params": json.dumps(params or PARAMS)}
    return encode_safetensors(tensors, meta)


def _json_tensor(arr: np.ndarray) -> dict:
    return {
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.tobytes()).decode(),
    }


def _good_st() -> bytes:
    return _st({"anchors": anchors_u8(2, seed=1)})


def _nan() -> np.ndarray:
    a = np.zeros((1, 1, 16, 16), np.float32)
    a[0, 0, 3, 3] = np.nan
    return a


def _inf() -> np.ndarray:
    a = np.zeros((1, 1, 16, 16), np.float32)
    a[0, 0, 0, 0] = np.inf
    return a


BAD_INPUTS = {
    "wrong dtype": (lambda: _st({"anchors": np.zeros((1, 16, 16, 1), np.int32)}), ST, 400, "dtype"),
    "wrong rank": (lambda: _st({"anchors": np.zeros((16, 16, 1), np.uint8)}), ST, 400, "rank"),
    "wrong channels": (
        lambda: _st({"anchors": np.zeros((1, 16, 16, 3), np.uint8)}),
        ST,
        400,
        "channels",
    ),
    "wrong size": (lambda: _st({"anchors": np.zeros((1, 8, 8, 1), np.uint8)}), ST, 400, "16x16"),
    "nan": (lambda: _st({"anchors": _nan()}), ST, 400, "NaN"),
    "inf": (lambda: _st({"anchors": _inf()}), ST, 400, "Inf"),
    "out of range": (
        lambda: _st({"anchors": np.full((1, 1, 16, 16), 1.5, np.float32)}),
        ST,
        400,
        "[-1, 1]",
    ),
    "zero anchors": (
        lambda: _st({"anchors": np.zeros((0, 16, 16, 1), np.uint8)}),
        ST,
        400,
        "anchor",
    ),
    "too many anchors": (
        lambda: _st({"anchors": np.zeros((MAX_ANCHORS + 1, 16, 16, 1), np.uint8)}),
        ST,
        413,
        "limit",
    ),
    "body too large": (lambda: b"\0" * int(MAX_BODY_MB * 1024 * 1024 + 1), ST, 413, "limit"),
    "truncated safetensors": (lambda: _good_st()[:-7], ST, 400, "truncated"),
    "garbage safetensors": (
        lambda: (16).to_bytes(8, "little") + b"\xffnot a header!!!" * 4,
        ST,
        400,
        "safetensors",
    ),
    "bad base64": (
        lambda: json.dumps(
            {"anchors": {"dtype": "uint8", "shape": [1, 16, 16, 1], "data": "!!not base64!!"}}
        ).encode(),
        "application/json",
        400,
        "base64",
    ),
    "not json": (lambda: b"{anchors:", "application/json", 400, "JSON"),
    "unknown param": (lambda: _st({"anchors": anchors_u8(1, 2)}, {"stepz": 3}), ST, 422, "stepz"),
    "steps out of range": (
        lambda: _st({"anchors": anchors_u8(1, 2)}, {"steps": 0}),
        ST,
        422,
        "steps",
    ),
    "weight out of range": (
        lambda: _st({"anchors": anchors_u8(1, 2)}, {"interpolation_weight": 2.0}),
        ST,
        422,
        "interpolation_weight",
    ),
    "bad method": (
        lambda: _st({"anchors": anchors_u8(1, 2)}, {"method": "euler"}),
        ST,
        422,
        "method",
    ),
    "k above limit": (
        lambda: _st({"anchors": anchors_u8(1, 2)}, {"k": 9, "steps": 2}),
        ST,
        422,
        "k",
    ),
    "candidate out of range": (
        lambda: _st({"anchors": anchors_u8(1, 2), "candidates": np.array([8], np.int64)}),
        ST,
        400,
        "candidate",
    ),
    "cost too high": (
        lambda: _st({"anchors": anchors_u8(8, 2)}, {"steps": 1000}),
        ST,
        413,
        "steps",
    ),
    "unsupported content type": (lambda: b"hello", "text/plain", 415, "content type"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_what_to_fix_and_never_touches_the_cache(
    service, client, redis_server, case
):
    make_body, ctype, status, fragment = BAD_INPUTS[case]
    keys_before = redis_server.command("DBSIZE")
    r = client.post(
        "/v1/positives", content=make_body(), headers={"Content-Type": ctype, **auth(TOKEN)}
    )
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    assert fragment.lower() in body["detail"].lower(), body
    assert client.get("/healthz").status_code == 200
    assert redis_server.command("DBSIZE") == keys_before


def test_framework_errors_use_the_same_error_body(client):
    missing = client.get("/v2/nothing", headers=auth(TOKEN))
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = client.get("/v1/positives", headers=auth(TOKEN))
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"
    bad_length = client.post(
        "/v1/positives", content=b"", headers={"Content-Type": ST, **auth(TOKEN)}
    )
    assert bad_length.status_code == 400 and "error" in bad_length.json()


def test_client_side_encode_request_default_answers(client):
    """The plain client path (encode_request with defaults but few steps) works end to end."""
    body, ctype = encode_request(anchors_u8(1, seed=700), None, {"steps": 2})
    r = client.post("/v1/positives", content=body, headers={"Content-Type": ctype, **auth(TOKEN)})
    reply = decode_response(r.content, r.headers["content-type"])
    assert reply.params.steps == 2 and reply.params.interpolation_weight == 0.1
