"""Turn a directory that holds only pyproject.toml into an installable stand-in of the project.

Why: the image build installs the extras' dependencies from a wheel of this
stand-in (same name, version and requirements, empty packages) in a layer that
depends on pyproject.toml alone, so a code change rebuilds only the small layer
that installs the project itself (docs/deployment.md, "Images"). Standard
library only: it runs in the bare base before anything is installed.

    python stub_project.py [DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
    from pip._vendor import tomli as tomllib


def source_dir(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools looks for ``package``: the longest ``package-dir`` prefix wins."""
    parts = package.split(".")
    for cut in range(len(parts), -1, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return Path(package_dir[prefix], *parts[cut:])
    return Path(*parts)


def write_stub(root: Path) -> list[Path]:
    """Empty packages (an ``__init__.py`` each) and an empty readme under ``root``."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    setuptools = config.get("tool", {}).get("setuptools", {})
    package_dir = setuptools.get("package-dir", {})
    written = []
    for package in setuptools.get("packages", []):
        init = root / source_dir(package, package_dir) / "__init__.py"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.touch()
        written.append(init)
    readme = config["project"].get("readme")
    if isinstance(readme, str):
        (root / readme).touch()
        written.append(root / readme)
    return written


if __name__ == "__main__":
    for path in write_stub(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(path)
