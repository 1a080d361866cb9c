"""``clsp train --config FILE`` and the run's ``DIR/config.yaml``: ``TrainConfig`` as a file.

The reading, the precedence (flag > file > default, docs/design.md §8) and the
writing are ``clsp_positives.config_file``'s, shared with ``clsp generate`` and
``clsp diffusion train``; this module binds them to ``TrainConfig``. The file is
only a way to give options: its path is not a field, so it never reaches a checkpoint.

Importing this module does not import torch or yaml, so ``clsp --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clsp_positives.config_file import (
    RUN_CONFIG_NAME,
    ConfigFileError,
    merged,
    rerun_header,
    write_config_file,
)
from clsp_positives.config_file import config_text as _config_text
from clsp_positives.config_file import read_config_file as _read_config_file
from clsp_positives.trainer.config import TrainConfig

__all__ = [
    "COMMAND",
    "CONFIG_NAME",
    "ConfigFileError",
    "config_text",
    "merged",
    "read_config_file",
    "write_run_config",
]

COMMAND = "clsp train"

CONFIG_NAME = RUN_CONFIG_NAME
"""The resolved configuration of a run, in its ``--out`` directory."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's ``clsp train`` options, keyed by field name; nothing validated but
    the keys (ConfigFileError names the file and the key)."""
    return _read_config_file(path, TrainConfig, command=COMMAND)


def config_text(config: TrainConfig, path: str | Path) -> str:
    """``config`` resolved (``TrainConfig.resolved``), as YAML without the token."""
    return _config_text(config.stored(), header=rerun_header(COMMAND, path))


def write_run_config(config: TrainConfig, out_dir: str | Path) -> Path:
    """Write ``out_dir/config.yaml`` (resolved, without the token) atomically."""
    return write_config_file(Path(out_dir) / CONFIG_NAME, config.stored(), command=COMMAND)
