"""Command-line options and reference tables generated from the pydantic models.

Every default, bound and help text of a command (``clsp serve``, ``clsp train``,
``clsp generate``, ``clsp calibrate``, ``clsp diffusion train``) is defined once, on
the model its options validate into (docs/design.md §8). The commands take their
options from those models here, and the reference tables in docs/cli.md are rendered
from them, so adding a field is one edit and no copy can drift.

A generated option defaults to ``None`` (not the model's default) so that the
command can tell "not given" from "given the default value": only options given
on the command line reach the model, and for ``clsp serve`` a ``CLSP_<FIELD>``
variable can then fill what the command line left out.

Names: one concept has one flag in every command (docs/design.md §8). A field's flag
is its name, or, when its ``validation_alias=AliasChoices(...)`` is given, the first
of those choices; every other choice (the field's own name among them) is an alias:
the same option (its help says "Alias: ..."), and a key a config file may use. So a
flag can be renamed without renaming its field, and checkpoints, ``config.yaml`` files
and recipes keep their keys.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import typer
from pydantic import AliasChoices, BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

DEFAULT_TEXT = "default_text"
"""``Field(json_schema_extra={DEFAULT_TEXT: ...})``: what to show as the default of a
field whose default is ``None`` meaning "decided later" (``--lr``: by the optimizer)."""


def flag(name: str) -> str:
    """``max_batch`` -> ``--max-batch``."""
    return "--" + name.replace("_", "-")


def field_names(field: FieldInfo, name: str) -> list[str]:
    """The name the field goes by (the first of its ``AliasChoices``, else its own), then
    every other name it validates from: its own and its old names, kept as aliases."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    strings = [c for c in choices if isinstance(c, str)]
    names = [strings[0]] if isinstance(alias, AliasChoices) and strings else []
    for other in [name, *strings]:
        if other not in names:
            names.append(other)
    return names


def flags(model: type[BaseModel], name: str) -> list[str]:
    """``--k``, ``--candidates``: the flag of a field, then one per alias."""
    return [flag(n) for n in field_names(model.model_fields[name], name)]


def primary_flag(model: type[BaseModel], key: str) -> str:
    """The flag a message names for ``key``, a field's name or any of its aliases (as a
    validation error's location gives it): the field's own flag, never an alias."""
    for name, field in model.model_fields.items():
        names = field_names(field, name)
        if key in names:
            return flag(names[0])
    return flag(key)


def all_flags(model: type[BaseModel], name: str) -> str:
    """``--interpolation-weight/--weights``: every flag of a field, for a message about a
    value that only the command checks, whichever of the names was typed."""
    return "/".join(flags(model, name))


def shown_default(field: FieldInfo) -> str:
    """The default as ``--help`` and the reference tables show it."""
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
    if len(names) > 1:  # the column lists every name; say which is the option's own
        text += f" Alias{'es' if len(names) > 2 else ''}: {', '.join(names[1:])}."
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


@dataclass(frozen=True)
class MirroredFields:
    """Fields of a ``source`` model declared again on an options model, under new names,
    and the way back: ``clsp train``'s ``--gen-steps`` is ``GenerationParams.steps``.

    The copies keep the source's types, defaults, bounds and descriptions, so a command
    asks for what the source would take and shows the source's defaults; a field added
    to the source reaches every options model that declares the mirror, with no edit.
    Made by ``mirror_fields``.
    """

    source: type[BaseModel]
    names: Mapping[str, str]
    """The options model's field -> the source's field, in the source's order."""
    note: str = ""
    """Appended to every copied description (``asked of the pool``)."""

    def field(self, name: str) -> tuple[Any, FieldInfo]:
        """The annotation and the field the options model declares as ``name``."""
        source = self.source.model_fields[self.names[name]]
        described = source.description or ""
        if self.note:
            described = f"{described.rstrip('.')}; {self.note}."
        return source.annotation, FieldInfo.merge_field_infos(source, description=described)

    def declare(self, namespace: MutableMapping[str, Any]) -> None:
        """Declare every copy in a class body being defined, where the call stands::

            class TrainConfig(BaseModel):
                ...
                GENERATION_OPTIONS.declare(locals())

        A class body's ``locals()`` is the namespace pydantic reads its fields from (an
        annotation and a default per field), so the copies keep their place among the
        hand-written fields: ``--help``, the tables and written configs keep their order.
        """
        annotations = namespace.setdefault("__annotations__", {})
        for name in self.names:
            annotations[name], namespace[name] = self.field(name)

    def values(self, options: BaseModel) -> dict[str, Any]:
        """The source's field -> its value on ``options`` (an options model instance), for
        the copies that were given (a flag, a config file, a value set in code): what to
        build the source from. A copy left at its default stays unset in the source too,
        so whoever resolves the source's unset fields (a pool applying a model's stored
        generation settings, docs/api.md) still can."""
        given = options.model_fields_set
        return {
            source: getattr(options, name) for name, source in self.names.items() if name in given
        }

    def without(self, *sources: str) -> MirroredFields:
        """This mirror less the copies of ``sources`` (source field names): for a command
        that takes those as options of its own kind (``clsp calibrate``'s grids)."""
        names = {n: s for n, s in self.names.items() if s not in sources}
        return MirroredFields(self.source, names, self.note)


def mirror_fields(
    source: type[BaseModel],
    names: Iterable[str],
    *,
    prefix: str = "",
    unprefixed: Collection[str] = (),
    note: str = "",
) -> MirroredFields:
    """Copies of ``source``'s fields ``names`` (in ``source``'s order), each named
    ``prefix + name`` except those in ``unprefixed``, with the way back to ``source``."""
    wanted = set(names)
    unknown = wanted - set(source.model_fields)
    if unknown:
        raise ValueError(f"{source.__name__} has no field {', '.join(sorted(unknown))}")
    mapping = {
        (name if name in unprefixed else prefix + name): name
        for name in source.model_fields
        if name in wanted
    }
    return MirroredFields(source, mapping, note)


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


def data_workers_field() -> Any:
    """``--data-workers`` of ``clsp train`` and ``clsp diffusion train``, defined once: both
    stream a folder through the same loader (``clsp_positives/streamed.py``), and neither
    side may import the other's config (docs/design.md §3). A new field per call, so each
    model owns its copy."""
    return Field(
        0,
        ge=0,
        description="Stream an image folder from disk, decoded and resized in this many "
        "DataLoader worker processes, for folders larger than memory (needs --image-size; "
        "0: load the data set in memory, as the named sets always are; docs/training.md, "
        "Large data sets).",
    )
