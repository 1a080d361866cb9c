"""``clsp train --config FILE`` and the run's ``DIR/config.yaml``: a ``TrainConfig`` as a file.

A config file is a YAML (or JSON) mapping of ``TrainConfig`` field names to
values: a recipe in ``recipes/``, or the resolved configuration a run keeps in
its ``--out`` directory. Flags given on the command line win over the file,
the file over the model's defaults (docs/design.md §8). The file is only a
way to give options: its path is not a field, so it never reaches a checkpoint.

Importing this module does not import torch or yaml, so ``clsp --help`` stays instant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clsp_positives.options import field_names
from clsp_positives.trainer.config import TrainConfig

CONFIG_NAME = "config.yaml"
"""The resolved configuration of a run, in its ``--out`` directory."""

_HEADER = (
    "# The resolved configuration of this clsp train run (every default decided,\n"
    "# the token never kept). Repeat the run with:\n"
    "#   clsp train --config {path}\n"
)


class ConfigFileError(ValueError):
    """A config file that cannot be read, is not a mapping, or names no option."""


def _names() -> dict[str, str]:
    """Every name a key may have -> its field (``candidates`` -> ``k``)."""
    return {
        alias: name
        for name, field in TrainConfig.model_fields.items()
        for alias in field_names(field, name)
    }


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's options, keyed by field name; nothing validated but the keys.

    Raises ConfigFileError naming the file (and the key) when it cannot be
    read, does not parse, is not a mapping or has a key that is no option.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigFileError(f"cannot read the config file {path}: {reason}") from None
    data = _parse(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(
            f"the config file {path} must be a mapping of clsp train options "
            f"(name: value), not a {type(data).__name__}"
        )
    names = _names()
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = names.get(key) if isinstance(key, str) else None
        if name is None:
            raise ConfigFileError(
                f"unknown key {key!r} in the config file {path}: not a clsp train option "
                "(keys are the options' names with underscores, e.g. batch_size)"
            )
        if name in options:
            raise ConfigFileError(f"the config file {path} gives {name!r} twice (as {key!r})")
        options[name] = value
    return options


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"the config file {path} is not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError:  # JSON is YAML: a file written without PyYAML still loads
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigFileError(
                f"reading the YAML file {path} needs PyYAML (pip install pyyaml, "
                "or clsp-positives[trainer]); or give the config as .json"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"the config file {path} is not valid YAML: {exc}") from None


def merged(file_options: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The options of a run: the command line's over the file's (docs/design.md §8)."""
    return {**file_options, **given}


def config_text(config: TrainConfig, path: str | Path) -> str:
    """``config`` resolved (``TrainConfig.resolved``), as YAML without the token."""
    data = config.stored()
    header = _HEADER.format(path=path)
    try:
        import yaml
    except ImportError:
        return header + json.dumps(data, indent=2) + "\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_run_config(config: TrainConfig, out_dir: str | Path) -> Path:
    """Write ``out_dir/config.yaml`` atomically (temp file and rename)."""
    path = Path(out_dir) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(config_text(config, path), encoding="utf-8")
    os.replace(tmp, path)
    return path
