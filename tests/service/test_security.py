"""Security and cost limits of the service, beyond what tests/service/test_app.py
already proves (the token on the six main routes, the safetensors-encoded size,
anchor, k and cost limits, the key layout of one model):

* every route the app has, enumerated from the app itself, is guarded but the
  two health checks; unknown and look-alike paths too. /openapi.json and /docs
  stay behind the token (the contract is public in the repository; a running
  generator has no reason to describe itself to anyone without the token);
* body limits against JSON bodies, a lying Content-Length (larger and smaller
  than the body) and a chunked body with no length at all, over raw sockets;
* the anchor, k and cost limits in the JSON encoding, a JSON shape that claims
  far more data than it carries, and the safetensors header cap over HTTP;
* nothing is unpickled: no unpickling call in the code outside a short,
  justified list of local-file loaders, and a full request cycle through the
  app with pickle booby-trapped;
* two services with two different models on one Redis never share entries.
"""

from __future__ import annotations

import base64
import json
import pickle
import re
import socket
import struct
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from clsp_positives.proto.codec import encode_request, encode_safetensors
from clsp_positives.proto.keys import canonical_anchors, positive_key
from clsp_positives.proto.params import GenerationParams
from clsp_positives.service.cache import entry_name
from tests.support.service import anchors_u8, auth, post_positives, start_service

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOKEN = "sec-token-7f3a"
ST = "application/x-safetensors"
JS = "application/json"
MAX_BODY_MB = 0.25
MAX_ANCHORS = 16
MAX_K = 4
MAX_COST = 200
PARAMS = {"steps": 2, "eta": 0.1, "interpolation_weight": 0.1}
OPEN = {"/healthz", "/readyz"}
ROUTES = {
    "/v1/positives",
    "/positives",
    "/v1/model",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}
"""Every route the app has today: a new one fails the enumeration test until its
guard has been decided here."""


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from tests.support.models import random_model_dir

    return random_model_dir(
        tmp_path_factory.mktemp("other-model"), preset="tiny", sample_size=16, channels=1, seed=1
    )


@pytest.fixture(scope="module")
def services(tiny_model_dir, other_model_dir, own_redis):
    """Two services, two models, one Redis; the first with small limits."""
    import concurrent.futures

    limits = {
        "max_body_mb": MAX_BODY_MB,
        "max_anchors": MAX_ANCHORS,
        "max_k": MAX_K,
        "max_cost": MAX_COST,
    }
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        first = ex.submit(
            start_service, tiny_model_dir, redis_url=own_redis.url, token=TOKEN, **limits
        )
        second = ex.submit(start_service, other_model_dir, redis_url=own_redis.url, token=TOKEN)
        started = [first.exception() or first.result(), second.exception() or second.result()]
    if any(isinstance(s, BaseException) for s in started):
        for s in started:
            if not isinstance(s, BaseException):
                s.stop()
        raise next(s for s in started if isinstance(s, BaseException))
    yield started
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def service(services):
    return services[0]


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


# ------------------------------------------------------------------ the token


def _app_routes(model_dir) -> dict[str, set[str]]:
    from clsp_positives.service.app import create_app
    from clsp_positives.service.cache import MemoryCache
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from clsp_positives.service.settings import ServiceSettings

    app = create_app(
        ServiceSettings(model=str(model_dir), token=TOKEN),
        PositivesGenerator.from_dir(model_dir),
        MemoryCache(1),
    )
    return {r.path: set(getattr(r, "methods", None) or {"GET"}) for r in app.routes}


def test_every_route_of_the_app_needs_the_token_but_the_health_checks(
    service, client, tiny_model_dir
):
    routes = _app_routes(tiny_model_dir)
    assert set(routes) == ROUTES, "a route was added or removed: decide its guard here"
    for path, methods in routes.items():
        for method in sorted(methods | {"OPTIONS", "PUT", "DELETE"}):
            r = client.request(method, path)
            if path in OPEN:
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code)
                assert method == "HEAD" or r.json()["error"] == "unauthorized"
            with_token = client.request(method, path, headers=auth(TOKEN))
            assert with_token.status_code != 401 and with_token.status_code < 500, (
                method,
                path,
                with_token.status_code,
            )


@pytest.mark.parametrize(
    "path",
    [
        "/healthz/",
        "/readyz/../v1/model",
        "//v1/model",
        "/v1/model/",
        "/HEALTHZ",
        "/v1//positives",
        "/nothing",
        "/healthz%2f..%2fmetrics",
        "/metrics?healthz",
    ],
)
def test_look_alike_and_unknown_paths_are_guarded_too(service, path):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, _, _ = _read_response(s)
    assert status == 401, (path, status)


def test_the_token_is_compared_whole(client):
    for value in (
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}{TOKEN}",
        f"Bearer  {TOKEN} x",
        "Bearer",
        f"Token {TOKEN}",
        f"Bearer {TOKEN.upper()}",
    ):
        r = client.get("/v1/model", headers={"Authorization": value})
        assert r.status_code == 401, value
    assert client.get("/v1/model", headers=auth(TOKEN)).status_code == 200


# ----------------------------------------------------------------- body size


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
    }
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def _raw_post(port: int, headers: dict[str, str], parts: list[bytes]) -> tuple[int, bytes]:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/positives HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        try:
            for part in parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: that is the point
        status, _, body = _read_response(s)
    return status, body


def test_json_body_over_the_limit_is_413(client):
    big = np.zeros((200, 16, 16, 1), np.uint8)  # ~68 KB of base64 ... repeated below
    body, ctype = encode_request(big, None, PARAMS, encoding=JS)
    body = body + b" " * int(MAX_BODY_MB * 2**20)  # valid JSON with trailing blanks
    r = client.post("/v1/positives", content=body, headers={"Content-Type": ctype, **auth(TOKEN)})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large", r.text


def test_a_huge_declared_content_length_is_refused_before_reading(service):
    status, body = _raw_post(
        service.port,
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": ST, "Content-Length": str(10 * 2**30)},
        [b"x" * 100],
    )
    assert status == 413 and b"body_too_large" in body


def test_a_chunked_body_without_length_is_cut_at_the_limit(service):
    chunk = b"\0" * 65536
    frames = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (int(MAX_BODY_MB * 16) + 4)
    status, body = _raw_post(
        service.port,
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": ST, "Transfer-Encoding": "chunked"},
        [*frames, b"0\r\n\r\n"],
    )
    assert status == 413 and b"body_too_large" in body


def test_a_content_length_shorter_than_the_body_reads_only_what_it_declares(service, client):
    body, ctype = encode_request(anchors_u8(1, seed=5), None, PARAMS, encoding=JS)
    status, answer = _raw_post(
        service.port,
        {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": ctype,
            "Content-Length": str(len(body) // 2),
        },
        [body],
    )
    # Either the app sees half a JSON document, or the HTTP parser sees the rest as a
    # malformed pipelined request and drops the connection: a 400 and nothing served.
    assert status == 400, (status, answer)
    assert b"JSON" in answer or b"Invalid HTTP request" in answer, answer
    assert client.get("/healthz").status_code == 200
    ok, _ = post_positives(client, anchors_u8(1, seed=5), PARAMS, token=TOKEN)
    assert ok.status_code == 200


# ------------------------------------------------------------ cost and shape


def _json_tensor(arr: np.ndarray, shape: list[int] | None = None) -> dict:
    return {
        "dtype": arr.dtype.name,
        "shape": shape or list(arr.shape),
        "data": base64.b64encode(arr.tobytes()).decode(),
    }


JSON_LIMITS = {
    "too many anchors": (
        {"anchors": _json_tensor(np.zeros((MAX_ANCHORS + 1, 16, 16, 1), np.uint8))},
        413,
        "limit",
    ),
    "k above max_k": (
        {
            "anchors": _json_tensor(np.zeros((1, 16, 16, 1), np.uint8)),
            "params": {"k": MAX_K + 1, "steps": 2},
        },
        422,
        "k",
    ),
    "anchors x k x steps over the budget": (
        {
            "anchors": _json_tensor(np.zeros((MAX_ANCHORS, 16, 16, 1), np.uint8)),
            "params": {"k": MAX_K, "steps": 4},
        },
        413,
        "limit is 200",
    ),
    "steps alone over the budget": (
        {
            "anchors": _json_tensor(np.zeros((1, 16, 16, 1), np.uint8)),
            "params": {"steps": MAX_COST + 1},
        },
        413,
        "steps",
    ),
    "shape claims a billion anchors": (
        {"anchors": _json_tensor(np.zeros((1, 16, 16, 1), np.uint8), shape=[10**9, 16, 16, 1])},
        400,
        "bytes",
    ),
    "shape claims 2**62 elements": (
        {
            "anchors": _json_tensor(
                np.zeros((1, 16, 16, 1), np.uint8), shape=[2**31 - 1, 2**31 - 1, 1, 1]
            )
        },
        400,
        "bytes",
    ),
}


@pytest.mark.parametrize("case", list(JSON_LIMITS))
def test_limits_hold_in_the_json_encoding(client, case):
    obj, status, fragment = JSON_LIMITS[case]
    r = client.post(
        "/v1/positives",
        content=json.dumps(obj).encode(),
        headers={"Content-Type": JS, **auth(TOKEN)},
    )
    assert r.status_code == status, r.text
    assert fragment.lower() in r.json()["detail"].lower(), r.json()


def test_the_cost_budget_counts_k_in_safetensors_too(client):
    r, _ = post_positives(
        client, anchors_u8(MAX_ANCHORS, seed=6), {"k": MAX_K, "steps": 4}, token=TOKEN
    )
    assert r.status_code == 413 and r.json()["error"] == "cost_too_high", r.text
    ok, reply = post_positives(client, anchors_u8(2, seed=6), {"k": 2, "steps": 2}, token=TOKEN)
    assert ok.status_code == 200 and reply.positives.shape == (2, 2, 16, 16, 1)


def test_safetensors_header_cap_over_http(client):
    good = encode_safetensors(
        {"anchors": anchors_u8(1, seed=7)}, {"params": json.dumps(PARAMS), "pad": "x" * (70 * 1024)}
    )
    r = client.post("/v1/positives", content=good, headers={"Content-Type": ST, **auth(TOKEN)})
    assert r.status_code == 413 and r.json()["error"] == "header_too_large", r.text
    lying = struct.pack("<Q", 2**62) + b"{}"
    r = client.post("/v1/positives", content=lying, headers={"Content-Type": ST, **auth(TOKEN)})
    assert r.status_code == 413 and r.json()["error"] == "header_too_large", r.text


# ------------------------------------------------------------------- pickles

UNPICKLING = re.compile(
    r"\bpickle\.loads?\b|\bUnpickler\b|\bcloudpickle\b|\bdill\b|\bjoblib\.load\b|\bshelve\b"
    r"|\bmarshal\.loads?\b|allow_pickle\s*=\s*True|\byaml\.load\(|\bweights_only\s*=\s*False"
    r"|\btorch\.load\(|\bnp\.load\(|\bnumpy\.load\(|all_gather_object|\bload_state_dict_from_url"
    r"|\b(?:add_)?safe_globals\b"
)
SAFE_TORCH_LOAD = re.compile(r"weights_only\s*=\s*True")
ALLOWED = {
    # Checkpoints load with weights_only=True (the scan accepts those torch.load
    # calls); converting a format-1 file admits NumPy's array constructor, nothing more.
    "trainer/checkpoint.py": {"safe_globals"},
    # .npy files of uint8 positives: np.load refuses pickled object arrays by default.
    "trainer/positives/offline.py": {"np.load("},
    # Between the ranks of one DDP job (one user's processes), never from the network.
    "clsp_positives/distributed.py": {"all_gather_object"},
}


def _unpickling_calls(code: str) -> set[str]:
    """Every match of UNPICKLING, whitespace removed; a torch.load whose line says
    weights_only=True (tensors and plain containers only) does not count."""
    hits = set()
    for m in UNPICKLING.finditer(code):
        line = code[code.rfind("\n", 0, m.start()) + 1 : code.find("\n", m.end())]
        if m.group(0).startswith("torch.load") and SAFE_TORCH_LOAD.search(line):
            continue
        hits.add(re.sub(r"\s+", "", m.group(0)))
    return hits


def test_nothing_on_the_wire_or_in_the_cache_can_unpickle():
    found: dict[str, set[str]] = {}
    for folder in ("proto", "service", "trainer", "clsp_positives"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            code = "\n".join(ln.split("#", 1)[0] for ln in path.read_text().splitlines())
            hits = _unpickling_calls(code)
            if hits:
                found[rel] = hits
    unexpected = {
        f: h - {re.sub(r"\s+", "", a) for a in ALLOWED.get(f, set())} for f, h in found.items()
    }
    unexpected = {f: h for f, h in unexpected.items() if h}
    assert not unexpected, f"unpickling outside the reviewed places: {unexpected}"
    assert set(ALLOWED) <= set(found), "the pattern no longer finds the reviewed places"
    assert "allow_pickle=True" not in (REPO / "trainer/positives/offline.py").read_text()
    for wire in (
        "proto",
        "service/app.py",
        "service/cache.py",
        "service/batcher.py",
        "service/sampling/model.py",
        "service/sampling/generator.py",
    ):
        assert not any(f.startswith(wire) for f in found), found
    assert _unpickling_calls("torch.load(p, weights_only=False)")  # the scan sees them
    assert _unpickling_calls("torch.serialization.add_safe_globals([Anything])")
    assert not _unpickling_calls("torch.load(p, map_location='cpu', weights_only=True)")


@pytest.fixture()
def pickle_trap(monkeypatch):
    """Every unpickling entry point of the standard library raises when called."""
    calls: list[str] = []

    def trap(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called")

        return refuse

    import _pickle

    for mod in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(mod, name, trap(f"{mod.__name__}.{name}"))
    return calls


def test_a_full_request_cycle_never_unpickles(tiny_model_dir, own_redis, pickle_trap):
    """Model loading, both encodings in and out, a Redis miss, write and hit: with
    pickle booby-trapped, in this process, through the real app."""
    from starlette.testclient import TestClient

    from clsp_positives.proto.codec import decode_response
    from clsp_positives.service.app import create_app
    from clsp_positives.service.cache import RedisCache
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from clsp_positives.service.settings import ServiceSettings

    with pytest.raises(AssertionError, match="pickle"):  # the trap works
        np.load(_pickled_npy(), allow_pickle=True)
    pickle_trap.clear()
    generator = PositivesGenerator.from_dir(tiny_model_dir)
    app = create_app(
        ServiceSettings(model=str(tiny_model_dir), warmup_steps=1),
        generator,
        RedisCache(own_redis.url),
    )
    anchors = anchors_u8(2, seed=8)
    with TestClient(app) as tc:
        for encoding in (ST, JS):
            for expect_hit in (0, 1):
                body, ctype = encode_request(
                    anchors, None, {**PARAMS, "eta": 0.2}, encoding=encoding
                )
                r = tc.post("/v1/positives", content=body, headers={"Content-Type": ctype})
                assert r.status_code == 200, r.text
                reply = decode_response(r.content, r.headers["content-type"])
                assert reply.cache_hit.tolist() == [expect_hit or int(encoding == JS)] * 2
    assert pickle_trap == []


def _pickled_npy() -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "objects.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


# -------------------------------------------------------------- namespacing


def test_two_models_on_one_redis_never_share_entries(
    services, own_redis, tiny_model_dir, other_model_dir
):
    first, second = services
    anchors = anchors_u8(3, seed=9)
    with (
        httpx.Client(base_url=first.url, timeout=60) as a,
        httpx.Client(base_url=second.url, timeout=60) as b,
    ):
        _, one = post_positives(a, anchors, PARAMS, token=TOKEN)
        r, two = post_positives(b, anchors, PARAMS, token=TOKEN)  # same anchors, other model
        assert r.status_code == 200
        assert two.cache_hit.tolist() == [0, 0, 0]  # not the first model's entries
        _, two_again = post_positives(b, anchors, PARAMS, token=TOKEN)
        _, one_again = post_positives(a, anchors, PARAMS, token=TOKEN)
    assert one.model != two.model
    assert two_again.cache_hit.tolist() == [1, 1, 1] and one_again.cache_hit.tolist() == [1] * 3
    assert np.array_equal(one_again.positives, one.positives)
    assert np.array_equal(two_again.positives, two.positives)
    assert not np.array_equal(one.positives, two.positives)
    params = GenerationParams(**PARAMS)
    canon = canonical_anchors(anchors)
    for fp in (one.model, two.model):
        for i in range(3):
            name = entry_name(fp, positive_key(fp, params, canon[i], 0))
            assert own_redis.command("EXISTS", name).strip() == b":1", name
    keys = own_redis.command("KEYS", "clsp:*").decode("latin-1")
    prefixes = set(re.findall(r"clsp:([0-9a-zA-Z_-]+):", keys))
    assert {one.model, two.model} <= prefixes
    # Each model's entry under the same anchor is its own: the keys differ.
    assert positive_key(one.model, params, canon[0], 0) != positive_key(
        two.model, params, canon[0], 0
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
