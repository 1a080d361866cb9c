"""The source layout holds: the service and the trainer meet only in proto and the
shared root modules, no module imports itself back through others, and the wheel
ships every module (docs/design.md §3).

The import checks read the source (every ``import`` statement, including those
inside functions and under ``TYPE_CHECKING``) rather than importing it, so that a
lazy import cannot hide a dependency that a later refactor makes eager.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
TOP = "clsp_positives"
SERVICE, TRAINER, PROTO = f"{TOP}.service", f"{TOP}.trainer", f"{TOP}.proto"


def package_dirs() -> dict[str, Path]:
    """Package name -> source folder, as pyproject.toml's setuptools tables map them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    dirs = {}
    for package in setuptools["packages"]:
        # A package without its own entry lies under its nearest mapped parent.
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            parent = ".".join(parts[:cut])
            if parent in mapped:
                dirs[package] = ROOT / mapped[parent] / Path(*parts[cut:])
                break
        else:
            dirs[package] = ROOT / Path(*parts)
    return dirs


def source_modules() -> dict[str, Path]:
    """Every module of the source tree: dotted name -> file."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the absolute name of what it imports
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Every import in ``path`` as absolute names. ``from P import m`` names the module
    ``P.m`` when there is one (importing a sibling through its package does not depend
    on the package's __init__), and ``P`` otherwise."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                yield Import(module, sub if sub in known else source, node.lineno)


def all_imports() -> list[Import]:
    modules = source_modules()
    known = set(modules)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, known)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle in them (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    found.append(sorted(component))
    return found


def test_the_source_tree_is_what_pyproject_packages() -> None:
    modules = source_modules()
    # The three sides and the shared root, each with its subpackages.
    for name in (
        f"{TOP}.cli",
        f"{PROTO}.codec",
        f"{SERVICE}.app",
        f"{SERVICE}.sampling.generator",
        f"{SERVICE}.ddpm.train",
        f"{TRAINER}.train_loop",
        f"{TOP}.client",
    ):
        assert name in modules, sorted(modules)
    on_disk = {
        p.relative_to(ROOT)
        for top in ("proto", "service", "trainer", TOP)
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk == {p.relative_to(ROOT) for p in modules.values()}, (
        "a .py file lies in a folder pyproject.toml does not package"
    )


@pytest.mark.parametrize(
    ("side", "forbidden"),
    [(SERVICE, (TRAINER,)), (TRAINER, (SERVICE,)), (PROTO, (SERVICE, TRAINER))],
    ids=["service", "trainer", "proto"],
)
def test_the_sides_do_not_import_each_other(side: str, forbidden: tuple[str, ...]) -> None:
    """The service image installs no trainer extra and the trainer no service extra
    (docs/design.md §3): a cross import breaks one of them, maybe only at run time."""
    crossing = [
        str(imp)
        for imp in all_imports()
        if in_package(imp.module, side) and any(in_package(imp.target, f) for f in forbidden)
    ]
    assert not crossing, "\n".join(crossing)


def test_the_boundary_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "def lazy():\n    from ..trainer import config\n    import clsp_positives.trainer.methods\n"
    )
    known = {f"{TRAINER}.config"}
    found = {(i.target, i.line) for i in imports_of(f"{SERVICE}.mod", source, known)}
    assert found == {(f"{TRAINER}.config", 2), (f"{TRAINER}.methods", 3)}


def test_no_import_cycles() -> None:
    """A cycle makes the import order matter: whichever module a process imports first
    decides which of the two sees the other half-initialized."""
    known = set(source_modules())
    edges: dict[str, set[str]] = {name: set() for name in known}
    lines: dict[tuple[str, str], int] = {}
    for imp in all_imports():
        if imp.target in known and imp.target != imp.module:
            edges[imp.module].add(imp.target)
            lines.setdefault((imp.module, imp.target), imp.line)
    found = cycles(edges)
    report = [
        " <-> ".join(component)
        + "".join(
            f"\n    {a}:{lines[a, b]} imports {b}"
            for a in component
            for b in sorted(edges[a])
            if b in component
        )
        for component in found
    ]
    assert not found, "import cycles:\n" + "\n".join(report)


def test_the_cycle_finder_finds_a_cycle_through_three_modules() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(edges) == [["a", "b", "c"], ["e"]]
    assert cycles({"pkg": {"pkg.child"}, "pkg.child": set()}) == []


def _copy_sources(dest: Path) -> None:
    """Build from a copy: an in-tree build writes build/ and egg-info beside the code."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for top in {p.relative_to(ROOT).parts[0] for p in package_dirs().values()}:
        shutil.copytree(ROOT / top, dest / top, ignore=ignore)


def build_wheel(tmp_path: Path) -> Path:
    """The project's wheel, built offline from a copy of the sources."""
    src, out = tmp_path / "src", tmp_path / "wheel"
    src.mkdir()
    _copy_sources(src)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (wheel,) = out.glob("clsp_positives-*.whl")
    return wheel


def test_the_wheel_ships_every_module_and_the_openapi_document(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    wanted = {
        "/".join(name.split(".")) + ("/__init__.py" if path.stem == "__init__" else ".py")
        for name, path in source_modules().items()
    }
    missing = sorted(wanted - shipped)
    assert not missing, f"not in {wheel.name}: {missing}"
    assert f"{TOP}/proto/openapi.json" in shipped
