"""Command-line options and reference tables generated from the pydantic models.

Every default, bound and help text of ``clsp serve``, ``clsp train`` and
``clsp generate`` is defined once, on ``ServiceSettings``, ``TrainConfig`` and
``GenerationParams`` (docs/design.md §8). The commands take their options from
those models here, and the README's reference tables are rendered from them, so
adding a field is one edit and no copy can drift.

A generated option defaults to ``None`` (not the model's default) so that the
command can tell "not given" from "given the default value": only options given
on the command line reach the model, and for ``clsp serve`` a ``CLSP_<FIELD>``
variable can then fill what the command line left out.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import typer
from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

DEFAULT_TEXT = "default_text"
"""``Field(json_schema_extra={DEFAULT_TEXT: ...})``: what to show as the default of a
field whose default is ``None`` meaning "decided later" (``--lr``: by the optimizer)."""


def flag(name: str) -> str:
    """``max_batch`` -> ``--max-batch``."""
    return "--" + name.replace("_", "-")


def field_names(field: FieldInfo, name: str) -> list[str]:
    """The field's name, then every other name it validates from (old names kept)."""
    names = [name]
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    names += [c for c in choices if isinstance(c, str) and c not in names]
    return names


def flags(model: type[BaseModel], name: str) -> list[str]:
    """``--k``, ``--candidates``: the flag of a field, then one per old name."""
    return [flag(n) for n in field_names(model.model_fields[name], name)]


def shown_default(field: FieldInfo) -> str:
    """The default as ``--help`` and the README show it."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and DEFAULT_TEXT in extra:
        return str(extra[DEFAULT_TEXT])
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def is_literal_default(field: FieldInfo) -> bool:
    """Whether the shown default is a value one could type (``64``, ``cpu``), not words."""
    extra = field.json_schema_extra
    if field.is_required() or (isinstance(extra, dict) and DEFAULT_TEXT in extra):
        return False
    return not isinstance(field.get_default(call_default_factory=True), (bool, type(None)))


def is_bool(field: FieldInfo) -> bool:
    return field.annotation in (bool, Optional[bool])


def option_parameter(
    model: type[BaseModel], name: str, *, envvar: str | None = None, note: str | None = None
) -> inspect.Parameter:
    """One keyword parameter whose default is a ``typer.Option`` built from the field.

    ``envvar`` lets click read the option from that variable; ``note`` is only
    appended to the help (for variables the command reads itself).
    """
    field = model.model_fields[name]
    names = flags(model, name)
    decls = [f"{n}/--no-{n[2:]}" for n in names] if is_bool(field) else names
    # Parentheses, not typer's "[default: ...]": rich would take brackets for markup.
    default = "required" if field.is_required() else f"default: {shown_default(field)}"
    extra = "; ".join(p for p in (default, note) if p)
    text = f"{(field.description or '').strip()} ({extra})".strip()
    option = typer.Option(None, *decls, help=text, show_default=False, envvar=envvar)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[field.annotation]
    )


def with_model_options(
    model: type[BaseModel],
    names: Iterable[str],
    *,
    envvars: Mapping[str, str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per field in ``names``, after its own options.

    The command receives those given on the command line as one ``given``
    keyword (field name -> value; options left out are absent), so the model,
    not the command, supplies every default.
    """
    chosen = list(names)
    envvars, notes = envvars or {}, notes or {}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name != "given"
        ]
        generated = [
            option_parameter(model, n, envvar=envvars.get(n), note=notes.get(n)) for n in chosen
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in chosen}
            return command(**kwargs, given={n: v for n, v in given.items() if v is not None})

        parameters = own + generated
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def describe_errors(exc: ValidationError, name_of: Callable[[str], str] = flag) -> str:
    """``--max-batch: Input should be greater than or equal to 1 (got 0)``, one per error."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = str(err["loc"][0]) if err["loc"] else ""
        where = name_of(loc) if loc else "options"
        shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        parts.append(f"{where}: {err['msg']}{shown}")
    return "; ".join(parts)


def reference_table(
    model: type[BaseModel], names: Sequence[str], *, env: Callable[[str], str] | None = None
) -> str:
    """A Markdown table of the options (flag, old names, variable, default, help)."""
    header = ["flag", "variable", "default", "what"] if env else ["flag", "default", "what"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in names:
        field = model.model_fields[name]
        first, *old = flags(model, name)
        shown = f"`{first}`" + (f" (also {', '.join(f'`{o}`' for o in old)})" if old else "")
        cells = [shown]
        if env:
            cells.append(f"`{env(name)}`")
        default = shown_default(field)
        cells += [
            f"`{default}`" if is_literal_default(field) else default,
            (field.description or "").replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
