"""``--config FILE``: a command's options as a YAML (or JSON) file, and the resolved
configuration a run writes beside its output.

``clsp train``, ``clsp generate`` and ``clsp diffusion train`` each validate their
options into one pydantic model (``TrainConfig``, ``GenerateConfig``,
``DiffusionTrainConfig``). A config file is a mapping of that model's field names to
values (a field's flag names, with underscores, are accepted as keys too: ``lr_schedule``
for ``schedule``): a recipe in ``recipes/``, or the resolved configuration an earlier run
wrote, which keeps the field names.
One rule for the three commands (docs/design.md §8): a flag given on the command line
wins over the file, the file over the model's default. The file is only a way to give
options: its path is no field, so it never reaches a checkpoint or a bank's metadata.

Importing this module imports neither torch nor yaml (yaml only when a file is read or
written), so ``clsp --help`` stays instant.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from clsp_positives.options import describe_errors, field_names, primary_flag

RUN_CONFIG_NAME = "config.yaml"
"""The resolved configuration of a run, in its output directory (``clsp train --out DIR``,
``clsp diffusion train --out DIR``)."""

CONFIG_HELP = (
    "YAML or JSON file of options (field names as keys, e.g. a recipe in recipes/ or the "
    "configuration an earlier run wrote); flags given here override it."
)
"""The help of every command's ``--config`` option."""

Model = TypeVar("Model", bound=BaseModel)


class OptionsError(ValueError):
    """Options that do not make a valid configuration; the message names the flag, or
    the key and the file, to fix."""


class ConfigFileError(OptionsError):
    """A config file that cannot be read, does not parse, is not a mapping or has a key
    that is no option of its command."""


def key_names(model: type[BaseModel]) -> dict[str, str]:
    """Every name a key may have -> its field (``candidates`` -> ``k``)."""
    return {
        alias: name
        for name, field in model.model_fields.items()
        for alias in field_names(field, name)
    }


def read_config_file(path: str | Path, model: type[BaseModel], *, command: str) -> dict[str, Any]:
    """The file's options, keyed by field name; nothing validated but the keys.

    Raises ConfigFileError naming the file (and the key) when it cannot be read, does
    not parse, is not a mapping, or has a key that is no field of ``model``; an
    unknown key's message lists the keys ``command`` takes.
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
            f"the config file {path} must be a mapping of {command} options "
            f"(name: value), not a {type(data).__name__}"
        )
    names = key_names(model)
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = names.get(key) if isinstance(key, str) else None
        if name is None:
            raise ConfigFileError(_unknown_key(key, path, model, command))
        if name in options:
            raise ConfigFileError(f"the config file {path} gives {name!r} twice (as {key!r})")
        options[name] = value
    return options


def _unknown_key(key: Any, path: Path, model: type[BaseModel], command: str) -> str:
    """The error of a key that is no option: the nearest option, then all of them, so the
    fix is in the message whether the key was mistyped or belongs to another command."""
    allowed = list(model.model_fields)
    near = difflib.get_close_matches(str(key), allowed, n=1) if isinstance(key, str) else []
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return (
        f"unknown key {key!r} in the config file {path}{hint}: not a {command} option. "
        f"Keys are the options' names with underscores: {', '.join(allowed)}"
    )


def _parse(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigFileError(f"the config file {path} is not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError:  # JSON is YAML: a file written without PyYAML still loads
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            raise ConfigFileError(
                f"reading the YAML file {path} needs PyYAML (pip install pyyaml); "
                "or give the config as .json"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"the config file {path} is not valid YAML: {exc}") from None


def merged(file_options: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a run: the command line's over the file's (docs/design.md §8)."""
    return {**file_options, **given}


def resolve_options(
    model: type[Model],
    config_file: str | Path | None,
    given: Mapping[str, Any],
    *,
    command: str,
) -> Model:
    """``model`` from the flags given on the command line over ``config_file``'s options
    over the model's defaults.

    Raises OptionsError (ConfigFileError for the file itself) whose message names what
    to fix: a bad value from the file as ``key (in FILE)``, one from a flag as the flag.
    """
    from_file = {} if config_file is None else read_config_file(config_file, model, command=command)

    def name_of(field: str) -> str:
        if field in from_file and field not in given:
            return f"{field} (in {config_file})"
        return primary_flag(model, field)

    try:
        return model.model_validate(merged(from_file, given))
    except ValidationError as exc:
        raise OptionsError(describe_errors(exc, name_of)) from None


def given_on_command_line(ctx: Any, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that the command line (or an environment variable)
    gave, for a command whose options carry their own defaults: click tells a value
    typed from its default, so a file can fill what was left out."""
    given = {}
    for name in names:
        # By name: typer may carry its own copy of click, whose enum is another class.
        source = getattr(ctx.get_parameter_source(name), "name", None)
        if source in ("COMMANDLINE", "ENVIRONMENT"):
            given[name] = ctx.params[name]
    return given


def rerun_header(command: str, path: str | Path) -> str:
    """The comment a written configuration opens with: what it is, and how to repeat it."""
    return (
        f"# The resolved configuration of this {command} run (every default decided,\n"
        "# the token never kept). Repeat the run with:\n"
        f"#   {command} --config {path}\n"
    )


def config_text(data: Mapping[str, Any], *, header: str = "") -> str:
    """``data`` as YAML after ``header``; as JSON (which is YAML too) without PyYAML."""
    try:
        import yaml
    except ImportError:
        return header + json.dumps(dict(data), indent=2) + "\n"
    return header + yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)


def write_config_file(path: str | Path, data: Mapping[str, Any], *, command: str) -> Path:
    """Write ``data`` to ``path`` with the rerun header, atomically (temp file and
    rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(config_text(data, header=rerun_header(command, path)), encoding="utf-8")
    os.replace(tmp, path)
    return path


def announcement(data: Mapping[str, Any], *, command: str, path: str | Path | None) -> str:
    """What a command prints at its start: the resolved configuration, indented, and
    where it is kept."""
    where = f" (written to {path})" if path is not None else ""
    body = config_text(data).rstrip("\n").replace("\n", "\n  ")
    return f"{command}: resolved configuration{where}:\n  {body}"
