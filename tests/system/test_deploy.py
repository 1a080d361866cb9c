"""The deployable stack renders and validates: compose files, the image recipe, Kubernetes.

There is no Docker engine or cluster in CI, so these tests check what can be
checked without one, with the real tools where they exist:
Debian's ``docker-compose config`` renders the compose files (with and without
the CPU override), a small kustomize renderer expands ``deploy/k8s`` (and is
compared with ``kubectl kustomize`` where that binary exists), and
``kubernetes-validate`` checks every rendered manifest against the API schemas.
On top of the schemas, the tests check the facts that make the stack work:
the GPU reservation, health checks, scalability, and that names agree across
files (Services select pods, probes name ports, flags exist on ``clsp serve``).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra (kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [
    "base",
    "overlays/job",
    "overlays/pytorchjob",
    "overlays/ddpm-pytorchjob",
    "overlays/autoscaling",
]
# The oldest Kubernetes we claim to run on, and the newest schemas we have.
K8S_VERSIONS = ["1.27.0", "latest"]

# Variables of the host environment that would change what compose renders.
_COMPOSE_ENV_PREFIXES = ("CLSP_", "REDIS_", "MODEL_DIR", "COMPOSE_", "DOCKER_")


# --- docker-compose ---------------------------------------------------------


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "Debian's docker-compose is not installed (apt-get install docker-compose; "
            "`make test` does it as root)"
        )
    return exe


def compose_config(
    *files: Path, env: dict[str, str] | None = None, env_file: Path | None = None, tmp_path: Path
) -> dict[str, Any]:
    """Render compose files with `docker-compose config`, in a controlled environment."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    cmd = [_docker_compose(), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    cmd.append("config")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(_COMPOSE_ENV_PREFIXES)}
    environ.update(env or {})
    proc = subprocess.run(
        cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in reservations.get("devices", []) if "gpu" in d.get("capabilities", [])]


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _flag_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def test_compose_default_reserves_a_gpu_and_is_scalable(tmp_path: Path) -> None:
    config = compose_config(COMPOSE, tmp_path=tmp_path)
    services = config["services"]
    assert set(services) == {"redis", "generator", "trainer"}

    gen = services["generator"]
    devices = _gpu_devices(gen)
    assert devices and devices[0]["driver"] == "nvidia" and devices[0]["count"] == 1
    assert _gpu_devices(services["trainer"]), "the trainer trains on the GPU too"

    # `--scale generator=N` needs no fixed name and no fixed host port.
    assert "container_name" not in gen
    for port in gen.get("ports", []):
        spec = port if isinstance(port, str) else f"{port.get('published', '')}:"
        parts = spec.split("/")[0].split(":")
        published = parts[-2] if len(parts) >= 2 else ""
        assert published == "", f"generator publishes a fixed host port: {port}"

    argv = _argv(gen["command"])
    assert argv[:2] == ["clsp", "serve"]
    assert _flag_value(argv, "--model") == "/models/model"
    assert _flag_value(argv, "--redis") == "redis://redis:6379/0"
    assert _flag_value(argv, "--host") == "0.0.0.0"
    assert _flag_value(argv, "--port") == "8000"
    assert _flag_value(argv, "--device") == "cuda"
    model_mounts = [v for v in gen["volumes"] if v["target"] == "/models/model"]
    assert model_mounts and model_mounts[0]["read_only"] is True
    assert "/readyz" in " ".join(gen["healthcheck"]["test"])
    assert gen["depends_on"]["redis"]["condition"] == "service_healthy"

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    redis_argv = _argv(redis["command"])
    assert _flag_value(redis_argv, "--maxmemory-policy") == "allkeys-lru"
    assert re.fullmatch(r"\d+[kmg]b", _flag_value(redis_argv, "--maxmemory"))
    assert "redis-cli" in redis["healthcheck"]["test"]

    trainer = services["trainer"]
    assert trainer["depends_on"]["generator"]["condition"] == "service_healthy"
    train_argv = _argv(trainer["command"])
    assert train_argv[:2] == ["clsp", "train"]
    assert _flag_value(train_argv, "--positives") == "dns+http://generator:8000"
    assert any(v.split(":")[1] == "/out" for v in trainer["volumes"] if isinstance(v, str))

    for name, target in (("generator", "service"), ("trainer", "trainer")):
        build = services[name]["build"]
        assert build["target"] == target
        assert build["dockerfile"] == "deploy/docker/Dockerfile"


@pytest.mark.parametrize(
    ("files", "env"),
    [
        pytest.param([COMPOSE, COMPOSE_CPU], {}, id="override"),
        pytest.param([COMPOSE, COMPOSE_CPU], {"CLSP_ACCELERATOR": "cpu"}, id="override+variable"),
    ],
)
def test_compose_cpu_override_drops_the_gpu(
    files: list[Path], env: dict[str, str], tmp_path: Path
) -> None:
    services = compose_config(*files, env=env, tmp_path=tmp_path)["services"]
    for name, service in services.items():
        assert not _gpu_devices(service), f"{name} still reserves a GPU"
    assert _flag_value(_argv(services["generator"]["command"]), "--device") == "cpu"
    # What the override does not touch stays as in the base file.
    assert "/readyz" in " ".join(services["generator"]["healthcheck"]["test"])
    assert services["trainer"]["depends_on"]["generator"]["condition"] == "service_healthy"


def test_compose_accelerator_variable_alone_drops_the_gpu(tmp_path: Path) -> None:
    """Compose v2 resolves `extends` per file, so there the variable does the removal."""
    services = compose_config(COMPOSE, env={"CLSP_ACCELERATOR": "cpu"}, tmp_path=tmp_path)[
        "services"
    ]
    assert not any(_gpu_devices(s) for s in services.values())


def test_compose_knobs_come_from_the_environment(tmp_path: Path) -> None:
    config = compose_config(
        COMPOSE,
        env_file=ENV_EXAMPLE,
        tmp_path=tmp_path,
        env={
            "CLSP_MAX_BATCH": "77",
            "MODEL_DIR": "/srv/models/cifar",
            "REDIS_MAXMEMORY": "512mb",
            "CLSP_API_TOKEN": "s3cret",
        },
    )
    services = config["services"]
    gen = services["generator"]
    assert _flag_value(_argv(gen["command"]), "--max-batch") == "77"
    assert gen["volumes"][0]["source"] == "/srv/models/cifar"
    assert gen["environment"]["CLSP_API_TOKEN"] == "s3cret"
    assert _flag_value(_argv(services["redis"]["command"]), "--maxmemory") == "512mb"
    # .env.example's own values render too (--download from CLSP_TRAIN_EXTRA_ARGS).
    assert "--download" in _argv(services["trainer"]["command"])


def test_env_example_lists_exactly_the_knobs_the_compose_files_use() -> None:
    used: set[str] = set()
    for path in (COMPOSE, COMPOSE_CPU, ROOT / "deploy" / "compose" / "accelerators.yml"):
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
        )
        used |= set(re.findall(r"\$\{([A-Z0-9_]+)", code))
    listed = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used - listed == set(), "knobs missing from .env.example"
    assert listed - used == set(), ".env.example lists knobs nothing uses"


# --- the image recipe -----------------------------------------------------------


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        stages[current].append(line)
    return stages


def test_dockerfile_targets_run_as_non_root_on_a_pinned_pytorch_base() -> None:
    stages = _dockerfile_stages()
    assert {"service", "trainer"} <= set(stages)

    base_arg = next(line for line in stages[""] if line.startswith("ARG BASE_IMAGE="))
    image = base_arg.split("=", 1)[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn9-runtime", image)
    assert match, f"base is not an official PyTorch CUDA runtime image: {image}"
    from packaging.specifiers import SpecifierSet

    torch_pins = re.findall(r'"torch([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert torch_pins, "no torch requirement in pyproject.toml"
    for pin in torch_pins:
        spec = SpecifierSet(pin)
        assert match.group(1) in spec, f"the base's torch {match.group(1)} is outside {spec}"

    for target, extra in (("service", "[service]"), ("trainer", "[trainer]")):
        lines = stages[target]
        installs = [line for line in lines if "pip install" in line]
        assert installs and all(extra in line for line in installs)
        assert not any(
            re.search(r"requirements|\[dev\]|\[all\]|pytest|ruff", line) for line in installs
        ), "dev tools or a second source of dependencies"
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{target} runs as root"
        assert any(line.startswith("HEALTHCHECK") for line in lines)
    service_health = next(line for line in stages["service"] if line.startswith("HEALTHCHECK"))
    assert "/readyz" in service_health


def test_dockerfile_copies_only_what_the_context_keeps() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [
        line
        for lines in _dockerfile_stages().values()
        for line in lines
        if line.startswith("COPY ") and "--from=" not in line
    ]
    assert copies
    for line in copies:
        for src in line.split()[1:-1]:
            path = src.rstrip("/")
            assert (ROOT / path).exists(), f"COPY {src}: not in the repository"
            assert path not in {p.rstrip("/") for p in ignored}, f"COPY {src} is in .dockerignore"


# Import names of the distributions in the extras, and what the base image has.
_IMPORT_NAMES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "triton": "triton",
    "diffusers": "diffusers",
    "fastapi": "fastapi",
    "uvicorn": "uvicorn",
    "redis": "redis",
    "prometheus-client": "prometheus_client",
    "pillow": "PIL",
    "tqdm": "tqdm",
    "httpx": "httpx",
    "pyyaml": "yaml",
    "scikit-learn": "sklearn",
}
_IN_BASE_IMAGE = {"torch", "torchvision", "triton"}

_IMPORT_ALL = """
import importlib, pkgutil, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
import clsp_positives.cli
pkg = importlib.import_module(sys.argv[2])
for info in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(pkg.__name__ + "." + info.name)
"""


def _extra_imports(extra: str) -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(rf"^{extra} = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, f"no [{extra}] extra in pyproject.toml"
    names = {
        re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        for req in re.findall(r'"([^"]+)"', block.group(1))
    }
    unknown = names - set(_IMPORT_NAMES)
    assert not unknown, f"add the import names of {sorted(unknown)} to _IMPORT_NAMES"
    return {_IMPORT_NAMES[n] for n in names}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("image", "other"),
    [
        ("trainer", "service"),
        ("service", "trainer"),
    ],
)
def test_each_image_imports_its_component_without_the_other_extra(image: str, other: str) -> None:
    """An image has the base's torch plus its own extra: its code must not need the other's."""
    missing = _extra_imports(other) - _extra_imports(image) - _IN_BASE_IMAGE
    assert missing, "the extras no longer differ: this test checks nothing"
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, ",".join(sorted(missing)), f"clsp_positives.{image}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"the {image} image lacks {sorted(missing)}, but importing "
        f"clsp_positives.{image} needs one:\n{proc.stderr[-2000:]}"
    )


# --- Kubernetes -----------------------------------------------------------------

_KUSTOMIZE_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "patches",
    "namespace",
    "labels",
    "images",
}
_COMPONENT_FIELDS = {"apiVersion", "kind", "resources", "patches"}
_PATCH_TARGET_FIELDS = {"kind", "name", "namespace", "group", "version"}
_CLUSTER_SCOPED = {
    "Namespace",
    "PersistentVolume",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Expand a kustomization the way `kustomize build` does, for the fields we use.

    No kustomize binary ships with Debian, so the manifests keep to what this
    renders: `resources` (files or directories, recursively), `components`
    (with their own `resources` and `patches`), `patches` in JSON 6902 form
    with a `target`, `namespace`, `labels` with plain `pairs`, and `images`
    (how users point the manifests at their registry), applied in kustomize's
    order. Anything else fails here, loudly, rather than being silently ignored.
    """
    path = directory / "kustomization.yaml"
    spec = _kustomization(path, "Kustomization", _KUSTOMIZE_FIELDS)
    docs = _resources(directory, spec)
    for entry in spec.get("components", []):
        component = (directory / entry).resolve()
        component_spec = _kustomization(
            component / "kustomization.yaml", "Component", _COMPONENT_FIELDS
        )
        docs += _resources(component, component_spec)
        _apply_patches(component, component_spec, docs)
    _apply_patches(directory, spec, docs)
    namespace = spec.get("namespace")
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if namespace and doc["kind"] not in _CLUSTER_SCOPED:
            meta["namespace"] = namespace
        for label in spec.get("labels", []):
            if set(label) != {"pairs"}:
                raise ValueError(f"{path}: labels support only `pairs`, got {sorted(label)}")
            meta.setdefault("labels", {}).update(label["pairs"])
        for image in spec.get("images", []):
            _set_image(doc, image)
    seen: set[tuple[str, str, str]] = set()
    for doc in docs:
        ident = _ident(doc)
        if ident in seen:
            raise ValueError(f"{path}: {ident} is defined twice")
        seen.add(ident)
    return docs


def _kustomization(path: Path, kind: str, fields: set[str]) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    if spec.get("kind", "Kustomization") != kind:
        raise ValueError(f"{path}: a {spec.get('kind')} where a {kind} belongs")
    unknown = set(spec) - fields
    if unknown:
        raise ValueError(
            f"{path}: fields {sorted(unknown)} are not supported by the test's "
            f"renderer; keep to {sorted(fields)} or extend it"
        )
    return spec


def _resources(directory: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            docs += render_kustomization(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return docs


def _apply_patches(directory: Path, spec: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """kustomize's `patches` in their JSON 6902 form: a list of operations and the
    `target` they apply to. A patch that matches nothing fails (kustomize would
    skip it, leaving the manifests silently unpatched)."""
    path = directory / "kustomization.yaml"
    for entry in spec.get("patches", []):
        if set(entry) - {"path", "patch", "target"} or ("path" in entry) == ("patch" in entry):
            raise ValueError(f"{path}: a patch takes `path` or `patch`, and `target`: {entry}")
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        ops = yaml.safe_load(text)
        target = entry.get("target", {})
        if not isinstance(ops, list) or not target or set(target) - _PATCH_TARGET_FIELDS:
            raise ValueError(
                f"{path}: only JSON 6902 patches (a list of operations) with a `target` "
                f"of {sorted(_PATCH_TARGET_FIELDS)} are supported by the test's renderer"
            )
        matched = [d for d in docs if _is_target(d, target)]
        if not matched:
            raise ValueError(f"{path}: the patch's target {target} matches no resource")
        for doc in matched:
            for op in ops:
                _json6902(doc, op)


def _is_target(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
        "namespace": doc["metadata"].get("namespace", ""),
        "group": group,
        "version": version,
    }
    return all(have[key] == value for key, value in target.items())


def _json6902(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation: add, replace or remove (what the manifests use)."""
    if op.get("op") not in ("add", "replace", "remove"):
        raise ValueError(f"JSON 6902 operation {op.get('op')!r} is not supported: {op}")
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    if not keys:
        raise ValueError(f"a patch of the whole document is not supported: {op}")
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        if op["op"] == "add":
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        elif op["op"] == "replace":
            parent[int(last)] = op["value"]
        else:
            del parent[int(last)]
        return
    if op["op"] != "add" and last not in parent:
        raise ValueError(f"{op['op']} of {op['path']}, which does not exist")
    if op["op"] == "remove":
        del parent[last]
    else:
        parent[last] = op["value"]


def _split_image(ref: str) -> tuple[str, str]:
    """`registry:5000/name:tag@sha256:...` -> (`registry:5000/name`, `:tag@sha256:...`)."""
    name, at, digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def _set_image(node: Any, rule: dict[str, str]) -> None:
    """kustomize's `images` transformer: every container, whatever the kind."""
    if isinstance(node, list):
        for item in node:
            _set_image(item, rule)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, suffix = _split_image(container.get("image", ""))
                if name != rule["name"]:
                    continue
                if "digest" in rule:
                    suffix = "@" + rule["digest"]
                elif "newTag" in rule:
                    suffix = ":" + str(rule["newTag"])
                container["image"] = rule.get("newName", name) + suffix
        else:
            _set_image(value, rule)


def _ident(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render_kustomization(K8S / request.param)


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_templates(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod template) of every workload, PyTorchJob replicas included."""
    out = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            out.append((name, doc["spec"]["template"]))
        elif doc["kind"] == "PyTorchJob":
            for replica, spec in doc["spec"]["pytorchReplicaSpecs"].items():
                out.append((f"{name}/{replica}", spec["template"]))
    return out


def test_kubernetes_validate_accepts_every_manifest(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate comes with the dev extra"
    )
    from kubernetes_validate.utils import latest_version

    _, docs = rendered
    assert docs
    for version in K8S_VERSIONS:
        version = latest_version() if version == "latest" else version
        for doc in docs:
            if doc["kind"] == "PyTorchJob":
                continue  # a CRD: no schema here; its pods are validated below
            kv.validate(copy.deepcopy(doc), version, strict=True)
        # Pod templates, including the PyTorchJob's, are validated as Pods.
        for owner, template in _pod_templates(docs):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    **template.get("metadata", {}),
                    "name": owner.lower().replace("/", "-"),
                },
                "spec": template["spec"],
            }
            kv.validate(copy.deepcopy(pod), version, strict=True)


def test_model_loader_pod_is_valid_and_mounts_the_model_claim() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate comes with the dev extra"
    )
    (pod,) = [d for d in yaml.safe_load_all((K8S / "tools" / "model-loader.yaml").read_text()) if d]
    kv.validate(copy.deepcopy(pod), K8S_VERSIONS[0], strict=True)
    base = render_kustomization(K8S / "base")
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim in _by_kind(base, "PersistentVolumeClaim")
    assert pod["metadata"]["namespace"] == _by_kind(base, "Namespace").popitem()[0]


def test_kubernetes_names_agree_across_manifests(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = rendered
    namespaces = {d["metadata"]["namespace"] for d in docs if d["kind"] not in _CLUSTER_SCOPED}
    assert namespaces == {"clsp"}
    assert all(
        d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "clsp-positives" for d in docs
    )

    deployments = _by_kind(docs, "Deployment")
    for svc in _by_kind(docs, "Service").values():
        selector = svc["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        ), f"{svc['metadata']['name']} selects no pods"
    for dep in deployments.values():
        assert (
            dep["spec"]["selector"]["matchLabels"].items()
            <= dep["spec"]["template"]["metadata"]["labels"].items()
        )
    for hpa in _by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for pdb in _by_kind(docs, "PodDisruptionBudget").values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        ), f"{pdb['metadata']['name']} selects no pods"

    secrets = _by_kind(docs, "Secret")
    claims = _by_kind(docs, "PersistentVolumeClaim")
    for owner, template in _pod_templates(docs):
        spec = template["spec"]
        volume_names = {v["name"] for v in spec.get("volumes", [])}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, owner
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volume_names, f"{owner}: mount {mount['name']}"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], owner
            port_names = {p.get("name") for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                for handler in ("httpGet", "tcpSocket"):
                    port = container.get(probe, {}).get(handler, {}).get("port")
                    if isinstance(port, str):
                        assert port in port_names, f"{owner}: {probe} names port {port}"


def _generator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "Deployment")["clsp-generator"]["spec"]["template"]["spec"]


def test_kubernetes_generator_pool(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pod = _generator(docs)
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    token = next(e for e in container["env"] if e["name"] == "CLSP_API_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "clsp-api-token"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models/model")
    assert mount["readOnly"] is True

    argv = container["command"]
    assert argv[:2] == ["clsp", "serve"]
    redis_host = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", _flag_value(argv, "--redis"))
    assert redis_host, "--redis is not a redis:// URL"
    services = _by_kind(docs, "Service")
    assert redis_host.group(1) in services
    redis_pod = _by_kind(docs, "Deployment")[redis_host.group(1)]["spec"]["template"]["spec"]
    redis_args = redis_pod["containers"][0]["args"]
    assert _flag_value(redis_args, "--maxmemory-policy") == "allkeys-lru"
    maxmemory_gb = int(_flag_value(redis_args, "--maxmemory").removesuffix("gb"))
    limit_gi = int(redis_pod["containers"][0]["resources"]["limits"]["memory"].removesuffix("Gi"))
    assert limit_gi > maxmemory_gb, "Redis' memory limit must leave room above --maxmemory"

    headless = services["clsp-generator-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless.get("publishNotReadyAddresses", False) is False
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["clsp-generator"]["spec"]
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]

    # Prometheus finds the tokenless metrics port through the pod's annotations.
    annotations = _by_kind(docs, "Deployment")["clsp-generator"]["spec"]["template"]["metadata"][
        "annotations"
    ]
    metrics_port = int(_flag_value(argv, "--metrics-port"))
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert {"name": "metrics", "containerPort": metrics_port} in container["ports"]


def _uvicorn_graceful_timeout_s() -> int:
    """How long `clsp serve` waits for its requests in flight after SIGTERM."""
    source = (ROOT / "service" / "serve_cli.py").read_text()
    found = re.findall(r"timeout_graceful_shutdown=(\d+)", source)
    assert len(found) == 1, "clsp serve's uvicorn.run no longer sets timeout_graceful_shutdown"
    return int(found[0])


def test_kubernetes_generators_leave_gracefully(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """A generator that is scaled down or evicted first leaves the endpoints while it
    still serves (preStop), then finishes what it has within the grace period; drains
    take one generator at a time without blocking on a pool of one."""
    _, docs = rendered
    pod = _generator(docs)
    (container,) = pod["containers"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 1
    # The grace period counts from the preStop hook: it must also cover uvicorn's wait
    # for the requests in flight, and leave time for the batcher's drain after it.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= int(sleep[1]) + _uvicorn_graceful_timeout_s() + 10, grace

    (pdb,) = _by_kind(docs, "PodDisruptionBudget").values()
    labels = _by_kind(docs, "Deployment")["clsp-generator"]["spec"]["template"]["metadata"][
        "labels"
    ]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]


# --- autoscaling on the queue depth -------------------------------------------------

AUTOSCALING = K8S / "overlays" / "autoscaling"


def _adapter_rules() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    (config_map,) = yaml.safe_load_all((AUTOSCALING / "prometheus-adapter-rules.yaml").read_text())
    return config_map, yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_kubernetes_autoscaling_scales_on_the_queue_depth() -> None:
    """The overlay's HPA reads one Pods metric: the gauge the service exports as the
    sampler's queue, averaged per pod; the rest of the base's HPA stays."""
    from prometheus_client.parser import text_string_to_metric_families

    from clsp_positives.service.metrics import ServiceMetrics

    base = _by_kind(render_kustomization(K8S / "base"), "HorizontalPodAutoscaler")
    docs = render_kustomization(AUTOSCALING)
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["clsp-generator"]["spec"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    exported = {
        f.name: f for f in text_string_to_metric_families(ServiceMetrics().render()[0].decode())
    }
    assert exported[name].type == "gauge"
    assert "waiting for the sampler" in exported[name].documentation
    # Scale out while the queue still fits in the next sampler call (the patch's comment).
    (container,) = _generator(docs)["containers"]
    assert 0 < int(target["averageValue"]) < int(_flag_value(container["command"], "--max-batch"))
    base_hpa = base["clsp-generator"]["spec"]
    for field in ("scaleTargetRef", "minReplicas", "maxReplicas"):
        assert hpa[field] == base_hpa[field]
    assert hpa["behavior"]["scaleDown"] == base_hpa["behavior"]["scaleDown"]
    assert hpa["behavior"]["scaleUp"]["policies"]


def test_kubernetes_adapter_rule_serves_the_hpa_metric() -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate comes with the dev extra"
    )
    from kubernetes_validate.utils import latest_version

    config_map, rules = _adapter_rules()
    for version in K8S_VERSIONS:
        version = latest_version() if version == "latest" else version
        kv.validate(copy.deepcopy(config_map), version, strict=True)
    hpa = _by_kind(render_kustomization(AUTOSCALING), "HorizontalPodAutoscaler")
    name = hpa["clsp-generator"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rule,) = rules
    assert rule["seriesQuery"].startswith(name + "{")
    assert re.fullmatch(rule["name"]["matches"], name) and rule["name"]["as"] == name
    # Series become per-pod values only through the pod's namespace and name labels.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    assert config_map["metadata"]["namespace"] != "clsp", "it belongs to the adapter"


def test_queue_autoscaling_composes_with_a_trainer_overlay(tmp_path: Path) -> None:
    """The `components:` line docs/deployment.md shows turns the job overlay's HPA
    into the queue-depth one, as kustomize renders it."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "job" / "kustomization.yaml"
    spec = yaml.safe_load(overlay.read_text())
    spec["components"] = ["../../components/queue-autoscaling"]
    overlay.write_text(yaml.safe_dump(spec))
    docs = render_kustomization(overlay.parent)
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["clsp-generator"]["spec"]
    autoscaling = render_kustomization(AUTOSCALING)
    assert hpa == _by_kind(autoscaling, "HorizontalPodAutoscaler")["clsp-generator"]["spec"]
    assert "clsp-trainer" in _by_kind(docs, "Job")
    kubectl = _kubectl_with_kustomize_v5()
    if kubectl is None:
        return
    theirs = sorted(_kubectl_kustomize(kubectl, overlay.parent), key=_ident)
    assert sorted(docs, key=_ident) == theirs


def test_kubernetes_pod_monitor_scrapes_the_metrics_port() -> None:
    """kubernetes-validate has no schema for the Prometheus Operator's CRD: its shape here."""
    (monitor,) = [
        d for d in yaml.safe_load_all((AUTOSCALING / "pod-monitor.yaml").read_text()) if d
    ]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    deployment = _by_kind(render_kustomization(AUTOSCALING), "Deployment")["clsp-generator"]
    template = deployment["spec"]["template"]
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = template["spec"]["containers"]
    port = next(p for p in container["ports"] if p["name"] == endpoint["port"])
    assert port["containerPort"] == int(_flag_value(container["command"], "--metrics-port"))
    assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]


def _positives_url_resolves(
    argv: list[str], docs: list[dict[str, Any]], pod: dict[str, Any]
) -> None:
    url = re.fullmatch(r"dns\+http://([\w-]+):(\d+)", _flag_value(argv, "--positives"))
    assert url, "the trainer must discover generators through DNS (dns+http://SERVICE:PORT)"
    service = _by_kind(docs, "Service")[url.group(1)]["spec"]
    assert service["clusterIP"] == "None", "DNS discovery needs the headless Service"
    assert int(url.group(2)) in {p["port"] for p in service["ports"]}
    # The pool client needs one address at start: an init container waits for it.
    (init,) = pod["initContainers"]
    assert f'"{url.group(1)}"' in " ".join(init["command"])
    assert init["image"] == pod["containers"][0]["image"]


def test_kubernetes_trainer_job_runs_torchrun() -> None:
    docs = render_kustomization(K8S / "overlays" / "job")
    job = _by_kind(docs, "Job")["clsp-trainer"]["spec"]["template"]["spec"]
    (container,) = job["containers"]
    argv = container["command"]
    assert argv[0] == "torchrun" and "--standalone" in argv
    nproc = next(a for a in argv if a.startswith("--nproc_per_node=")).split("=")[1]
    assert int(nproc) == container["resources"]["limits"]["nvidia.com/gpu"]
    train = argv[argv.index("-m") + 1 :]
    assert train[:2] == ["clsp_positives.cli", "train"]
    _positives_url_resolves(train, docs, job)
    assert job["restartPolicy"] in ("Never", "OnFailure")


def _pytorchjob(overlay: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The overlay's documents and its PyTorchJob, whose shape is checked here:
    kubernetes-validate has no schema for the Kubeflow CRD."""
    docs = render_kustomization(K8S / "overlays" / overlay)
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert set(job["spec"]) <= {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}
    assert "nprocPerNode" not in job["spec"], "WORLD_SIZE would no longer count pods"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    for name, spec in replicas.items():
        assert set(spec) <= {"replicas", "restartPolicy", "template"}, name
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        argv = _pytorch_container(spec)["command"]
        assert argv[0] == "torchrun"
        for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
            assert any(f"$({var})" in a for a in argv), f"{name}: torchrun ignores {var}"
        assert _nproc(argv) == _pytorch_container(spec)["resources"]["limits"]["nvidia.com/gpu"]
    return docs, job


def _pytorch_container(replica: dict[str, Any]) -> dict[str, Any]:
    """The container the operator injects MASTER_ADDR, WORLD_SIZE, RANK... into: the
    one named `pytorch`, only."""
    (container,) = [c for c in replica["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    return container


def _nproc(argv: list[str]) -> int:
    return int(next(a for a in argv if a.startswith("--nproc_per_node=")).split("=")[1])


def _claim_under(path: str, pod: dict[str, Any], container: dict[str, Any]) -> str:
    """The claim of the volume ``container`` mounts ``path`` from."""
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/"))]
    volumes = {v["name"]: v for v in pod["volumes"]}
    return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]


def test_kubernetes_pytorchjob_structure() -> None:
    docs, job = _pytorchjob("pytorchjob")
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        argv = _pytorch_container(spec)["command"]
        _positives_url_resolves(argv[argv.index("-m") + 1 :], docs, spec["template"]["spec"])


def test_kubernetes_ddpm_pytorchjob_trains_onto_the_model_volume() -> None:
    """``clsp diffusion train`` under torchrun (docs/training.md, "Training the DDPM at
    scale"): its global batch splits evenly over every process of the job, rank 0 writes
    to the claim the generators serve from, and no rank downloads (pods on several nodes
    would race to write the same files)."""
    docs, job = _pytorchjob("ddpm-pytorchjob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    claims = _by_kind(docs, "PersistentVolumeClaim")
    generator = _generator(docs)
    (serving,) = [v for v in generator["volumes"] if "persistentVolumeClaim" in v]
    served_from = serving["persistentVolumeClaim"]["claimName"]
    processes = 0
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        container = _pytorch_container(spec)
        argv = container["command"]
        assert argv[argv.index("-m") + 1 :][:3] == ["clsp_positives.cli", "diffusion", "train"]
        processes += spec["replicas"] * _nproc(argv)
        assert _flag_value(argv, "--device") == "cuda"
        assert "--download" not in argv
        assert _claim_under(_flag_value(argv, "--out"), pod, container) == served_from
        assert _claim_under(_flag_value(argv, "--data-root"), pod, container) in claims
    for spec in replicas.values():
        batch = int(_flag_value(_pytorch_container(spec)["command"], "--batch-size"))
        assert batch % processes == 0, f"--batch-size {batch} over {processes} processes"


def _kubectl_with_kustomize_v5() -> str | None:
    """kubectl, if it embeds kustomize 5 or later (`labels:` needs a recent one)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, timeout=60, check=False
    )
    match = re.search(r"Kustomize Version: v(\d+)", proc.stdout)
    return kubectl if match and int(match.group(1)) >= 5 else None


def _kubectl_kustomize(kubectl: str, folder: Path) -> list[dict[str, Any]]:
    """What real kustomize renders for ``folder`` (its documents, empty ones dropped)."""
    proc = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_renderer_matches_kubectl_kustomize(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Where kubectl exists, the test's renderer must agree with real kustomize."""
    kubectl = _kubectl_with_kustomize_v5()
    if kubectl is None:
        pytest.skip("no kubectl with kustomize >= 5; the Python renderer is checked on its own")
    name, docs = rendered
    theirs = sorted(_kubectl_kustomize(kubectl, K8S / name), key=_ident)
    assert sorted(docs, key=_ident) == theirs


def test_renderer_rejects_what_it_cannot_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas:\n  - name: a\n")
    with pytest.raises(ValueError, match="replicas"):
        render_kustomization(tmp_path)
    # A strategic-merge patch (a partial manifest) is not rendered: JSON 6902 only.
    (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\npatches:\n  - path: p.yaml\n    target: {kind: Service}\n"
    )
    with pytest.raises(ValueError, match="JSON 6902"):
        render_kustomization(tmp_path)


def test_renderer_patches_as_kustomize_does(tmp_path: Path) -> None:
    """JSON 6902 add, replace and remove, on the targets only; an unmatched target fails."""
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {x: '1', y: '2'}\n"
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {x: '1'}\n"
    )
    ops = [
        {"op": "replace", "path": "/data/x", "value": "3"},
        {"op": "remove", "path": "/data/y"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "c"}},
        {"op": "add", "path": "/metadata/annotations/d~1e", "value": "f"},
    ]
    spec = {
        "resources": ["cm.yaml"],
        "patches": [{"patch": yaml.safe_dump(ops), "target": {"kind": "ConfigMap", "name": "a"}}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    docs = _by_kind(render_kustomization(tmp_path), "ConfigMap")
    assert docs["a"]["data"] == {"x": "3"}
    assert docs["a"]["metadata"]["annotations"] == {"a/b": "c", "d/e": "f"}
    assert docs["b"]["data"] == {"x": "1"}
    kubectl = _kubectl_with_kustomize_v5()
    if kubectl is not None:
        assert _by_kind(_kubectl_kustomize(kubectl, tmp_path), "ConfigMap") == docs
    spec["patches"][0]["target"]["name"] = "c"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="matches no resource"):
        render_kustomization(tmp_path)


def test_images_point_the_manifests_at_a_registry(tmp_path: Path) -> None:
    """The `images:` block docs/deployment.md shows renders as kustomize renders it."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "pytorchjob" / "kustomization.yaml"
    spec = yaml.safe_load(overlay.read_text())
    spec["images"] = [
        {
            "name": "clsp-positives-service",
            "newName": "ghcr.io/acme/clsp-positives-service",
            "newTag": "0.2.0",
        },
        {"name": "clsp-positives-trainer", "newName": "ghcr.io/acme/clsp-positives-trainer"},
    ]
    overlay.write_text(yaml.safe_dump(spec))
    docs = render_kustomization(overlay.parent)
    images = {c["image"] for _, t in _pod_templates(docs) for c in t["spec"]["containers"]}
    assert images == {
        "ghcr.io/acme/clsp-positives-service:0.2.0",
        "ghcr.io/acme/clsp-positives-trainer:0.1.0",
        "redis:7",
    }
    assert _split_image("host:5000/a/b:1@sha256:ab") == ("host:5000/a/b", ":1@sha256:ab")
    kubectl = _kubectl_with_kustomize_v5()
    if kubectl is None:
        return
    theirs = sorted(_kubectl_kustomize(kubectl, overlay.parent), key=_ident)
    assert sorted(docs, key=_ident) == theirs


# --- flags agree with the CLI ---------------------------------------------------


def _cli_options(*command: str) -> set[str] | None:
    """The flags of ``clsp COMMAND...`` (a subcommand through its groups), or None."""
    import typer

    from clsp_positives.cli import app

    cmd = typer.main.get_command(app)
    for name in command:
        cmd = cmd.commands.get(name)  # type: ignore[attr-defined]
        if cmd is None:
            return None
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


def _used_flags(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


def test_deploy_files_use_only_existing_serve_and_train_flags(tmp_path: Path) -> None:
    k8s_docs = {name: render_kustomization(K8S / name) for name in KUSTOMIZATIONS}
    serve_argvs = [c["command"][2:] for c in _generator(k8s_docs["base"])["containers"]]
    train_argvs = []
    for name in ("overlays/job", "overlays/pytorchjob"):
        for _, template in _pod_templates(k8s_docs[name]):
            argv = template["spec"]["containers"][0].get("command", [])
            if argv[:1] == ["torchrun"]:
                train_argvs.append(argv[argv.index("train") + 1 :])
    if shutil.which("docker-compose"):
        for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU]):
            services = compose_config(*files, env_file=ENV_EXAMPLE, tmp_path=tmp_path)["services"]
            serve_argvs.append(_argv(services["generator"]["command"])[2:])
            train_argvs.append(_argv(services["trainer"]["command"])[2:])

    serve = _cli_options("serve")
    assert serve is not None, "`clsp serve` is not registered"
    for argv in serve_argvs:
        assert _used_flags(argv) <= serve, f"unknown clsp serve flags: {_used_flags(argv) - serve}"
    train = _cli_options("train")
    if train is None:
        pytest.skip("`clsp train` is not registered yet: its flags are not checked")
    for argv in train_argvs:
        assert _used_flags(argv) <= train, f"unknown clsp train flags: {_used_flags(argv) - train}"
    ddpm = _cli_options("diffusion", "train")
    assert ddpm is not None, "`clsp diffusion train` is not registered"
    for _, template in _pod_templates(k8s_docs["overlays/ddpm-pytorchjob"]):
        argv = template["spec"]["containers"][0].get("command", [])
        if argv[:1] == ["torchrun"]:
            flags = _used_flags(argv[argv.index("diffusion") + 2 :])
            assert flags <= ddpm, f"unknown clsp diffusion train flags: {flags - ddpm}"
