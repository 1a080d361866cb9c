"""The pieces of `make compose-check` that can be checked without a Docker engine.

The check itself (deploy/compose/check.py) builds the images and runs the stack,
minutes of a machine with dockerd (docs/deployment.md, "Checking the stack on
this machine"). Here: its compose files render with Debian's docker-compose into
the stack it expects, every flag it passes exists on the CLI, its env file
names only real knobs, and the Dockerfile's stand-in project carries exactly
the project's requirements (or the images would install other dependencies
than pyproject.toml says).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.system.test_deploy import (
    COMPOSE,
    COMPOSE_CPU,
    ROOT,
    _argv,
    _flag_value,
    _gpu_devices,
    _used_flags,
    compose_config,
)

CHECK_YML = ROOT / "deploy" / "compose" / "check.yml"
CHECK_ENV = ROOT / "deploy" / "compose" / "check.env"


def _load(path: Path) -> ModuleType:
    """A script of deploy/ as a module (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def check() -> ModuleType:
    return _load(ROOT / "deploy" / "compose" / "check.py")


@pytest.fixture
def services(tmp_path: Path) -> dict[str, Any]:
    return compose_config(COMPOSE, COMPOSE_CPU, CHECK_YML, env_file=CHECK_ENV, tmp_path=tmp_path)[
        "services"
    ]


def test_check_files_are_the_ones_the_script_uses(check: ModuleType) -> None:
    assert [ROOT / f for f in check.COMPOSE_FILES] == [COMPOSE, COMPOSE_CPU, CHECK_YML]
    assert check.ENV_FILE == CHECK_ENV


def test_check_stack_is_the_cpu_stack_with_a_model_trained_in_place(
    services: dict[str, Any], check: ModuleType
) -> None:
    assert set(services) == {"redis", "model", "generator", "trainer"}
    for name, service in services.items():
        assert not _gpu_devices(service), f"{name} reserves a GPU"
    knobs = check.read_env_file(CHECK_ENV)
    assert services["redis"]["image"] == knobs["REDIS_IMAGE"] != "redis:7"

    model = services["model"]
    assert model["image"].endswith("-tools:" + knobs["CLSP_IMAGE_TAG"])
    argv = _argv(model["command"])
    assert argv[:3] == ["clsp", "diffusion", "train"]
    out = _flag_value(argv, "--out")
    (written,) = [v for v in model["volumes"] if v.split(":")[1] == out]
    volume = written.split(":")[0]

    gen = services["generator"]
    assert _flag_value(_argv(gen["command"]), "--device") == "cpu"
    (mount,) = [v for v in gen["volumes"] if v["target"] == "/models/model"]
    assert mount == {
        "type": "volume",
        "source": volume,
        "target": "/models/model",
        "read_only": True,
    }, "the generators must read the model the model service wrote"
    assert gen["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert gen["depends_on"]["redis"]["condition"] == "service_healthy"

    train = _argv(services["trainer"]["command"])
    assert _flag_value(train, "--positives") == "dns+http://generator:8000"
    assert _flag_value(train, "--dataset") == "digits"
    assert _flag_value(train, "--epochs") == "1"
    assert float(_flag_value(train, "--clsp-weight")) > 0, "no positives asked for"


def _options(*path: str) -> set[str]:
    import typer

    from clsp_positives.cli import app

    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def test_check_stack_passes_only_existing_flags(services: dict[str, Any]) -> None:
    model = _argv(services["model"]["command"])
    assert _used_flags(model) <= _options("diffusion", "train")
    train = _argv(services["trainer"]["command"])
    assert _used_flags(train) <= _options("train"), _used_flags(train) - _options("train")


def test_check_env_names_only_knobs_the_compose_files_use(check: ModuleType) -> None:
    used: set[str] = set()
    for path in (COMPOSE, COMPOSE_CPU, CHECK_YML, ROOT / "deploy" / "compose" / "accelerators.yml"):
        used |= set(re.findall(r"\$\{([A-Z0-9_]+)", path.read_text()))
    assert set(check.read_env_file(CHECK_ENV)) - used == set()


def test_check_clears_the_callers_knobs(check: ModuleType, monkeypatch) -> None:
    """A CLSP_* or REDIS_* of the caller's shell would win over check.env in compose."""
    monkeypatch.setenv("CLSP_TRAIN_EPOCHS", "100")
    monkeypatch.setenv("REDIS_IMAGE", "redis:7")
    monkeypatch.setenv("MODEL_DIR", "/elsewhere")
    env = check.Stack("t").env
    assert not {"CLSP_TRAIN_EPOCHS", "REDIS_IMAGE", "MODEL_DIR"} & set(env)
    assert env["PATH"]


def test_served_positives_reads_the_counter(check: ModuleType) -> None:
    page = (
        "# HELP clsp_positives_served_total Positives returned to clients.\n"
        "# TYPE clsp_positives_served_total counter\n"
        "clsp_positives_served_total 1536.0\n"
        "clsp_positives_served_created 1.7e9\n"
    )
    assert check.served_positives(page) == 1536.0
    assert check.served_positives("") == 0.0


# --- the Dockerfile's stand-in project ---------------------------------------


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    return sorted(line for line in text.splitlines() if line.startswith("Requires-Dist:"))


@pytest.mark.slow
def test_stub_project_has_the_projects_requirements_and_no_code(tmp_path: Path) -> None:
    stub_project = _load(ROOT / "deploy" / "docker" / "stub_project.py")
    stub = tmp_path / "stub"
    stub.mkdir()
    shutil.copy(ROOT / "pyproject.toml", stub)
    written = stub_project.write_stub(stub)
    assert all(p.stat().st_size == 0 for p in written)

    # The real project from a copy, so that the build writes nothing into the tree.
    real = tmp_path / "real"
    real.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, real)
    for folder in ("clsp_positives", "proto", "service", "trainer"):
        shutil.copytree(ROOT / folder, real / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = {}
    for name, src in (("stub", stub), ("real", real)):
        out = tmp_path / f"{name}-wheel"
        build = ["wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "pip", *build, str(src)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        (wheels[name],) = out.glob("clsp_positives-*.whl")
    assert wheels["stub"].name == wheels["real"].name
    assert _requires(wheels["stub"]) == _requires(wheels["real"])
    with zipfile.ZipFile(wheels["stub"]) as zf:
        modules = [n for n in zf.namelist() if n.endswith(".py")]
    assert modules and all(n.endswith("__init__.py") for n in modules)
