"""The ``--config FILE`` machinery the three commands share (clsp_positives/config_file.py):
what counts as given on the command line, a file written and read without PyYAML, and
an import that stays light (docs/design.md §8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from clsp_positives import config_file


class Options(BaseModel):
    size: int = Field(4, ge=1)
    name: str = "a"
    loud: bool = False


def _command(seen: list[dict[str, Any]]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def main(
        ctx: typer.Context,
        size: int = typer.Option(4, "--size", envvar="T_SIZE"),
        name: str = typer.Option("a", "--name"),
        loud: bool = typer.Option(False, "--loud/--quiet"),
    ) -> None:
        seen.append(config_file.given_on_command_line(ctx, ctx.params))

    return app


def test_given_means_typed_or_from_the_environment_not_defaulted() -> None:
    seen: list[dict[str, Any]] = []
    app = _command(seen)
    assert CliRunner().invoke(app, ["--name", "a", "--quiet"]).exit_code == 0
    # Typed with the default's own value still counts: it must win over a file.
    assert seen[-1] == {"name": "a", "loud": False}
    assert CliRunner().invoke(app, [], env={"T_SIZE": "9"}).exit_code == 0
    assert seen[-1] == {"size": 9}


def test_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("size: 7\nname: b\n")
    options = config_file.resolve_options(Options, path, {"name": "c"}, command="t")
    assert options == Options(size=7, name="c", loud=False)
    # A bad value is named where it came from: the file's key, or the flag.
    bad = tmp_path / "bad.yaml"
    bad.write_text("size: 0\n")
    with pytest.raises(config_file.OptionsError, match=r"^size \(in .*bad.yaml\): Input should"):
        config_file.resolve_options(Options, bad, {}, command="t")
    with pytest.raises(config_file.OptionsError, match=r"^--size: Input should be"):
        config_file.resolve_options(Options, path, {"size": 0}, command="t")


def test_a_written_file_reads_back_without_pyyaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON is YAML: a machine without PyYAML writes and reads the same options."""
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    data = {"size": 3, "name": "x: y", "loud": True}
    path = config_file.write_config_file(tmp_path / "config.yaml", data, command="clsp t")
    assert path.read_text().startswith("# The resolved configuration of this clsp t run")
    assert config_file.read_config_file(path, Options, command="clsp t") == data


def test_importing_the_cli_imports_neither_torch_nor_yaml() -> None:
    """``clsp --help`` stays instant: the file readers import yaml only when they read."""
    code = (
        "import sys, clsp_positives.cli; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'yaml')]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
