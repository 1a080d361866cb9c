"""docs/cli.md's option tables, rendered from the models that define the options.

The pydantic models own every default and help text (docs/design.md §8); docs/cli.md
shows each command's table between ``<!-- generated: NAME -->`` and
``<!-- end generated: NAME -->`` markers, and a test fails when what is there differs
from what this module renders. Rewrite them with
``python -m clsp_positives.config_docs --write``.

To document another command, add one line to ``REFERENCES`` and run ``--write``: a
command without a block in the page gets a new section at its end, to move and
introduce by hand if need be.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clsp_positives.options import reference_table

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


@dataclass(frozen=True)
class Reference:
    """One command's table: its name, its options' model and, for a command that also
    reads ``CLSP_*`` variables, the function naming a field's variable (a column)."""

    command: str
    model: str  # "module:attribute", imported only when rendering (no torch at import)
    env: str | None = None

    def table(self) -> str:
        model = _load(self.model)
        env = _load(self.env) if self.env else None
        return reference_table(model, list(model.model_fields), env=env)


REFERENCES: tuple[Reference, ...] = (
    Reference(
        "clsp serve",
        "clsp_positives.service.settings:ServiceSettings",
        env="clsp_positives.service.settings:env_var",
    ),
    Reference("clsp train", "clsp_positives.trainer.config:TrainConfig"),
    Reference("clsp generate", "clsp_positives.trainer.positive_tools.generate_cli:GenerateConfig"),
    Reference(
        "clsp calibrate", "clsp_positives.trainer.positive_tools.calibrate_cli:CalibrateConfig"
    ),
    Reference("clsp diffusion train", "clsp_positives.service.ddpm.config:DiffusionTrainConfig"),
)


def _load(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def tables() -> dict[str, str]:
    """Marker name (the command) -> the Markdown table that belongs there."""
    return {ref.command: ref.table() for ref in REFERENCES}


def _block(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end generated: {name} -->)", flags=re.S
    )


def _new_section(name: str, table: str) -> str:
    return (
        f"\n## `{name}`\n\n`{name} --help` lists the same options.\n\n"
        f"<!-- generated: {name} -->\n{table}<!-- end generated: {name} -->\n"
    )


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current table, and a new
    section at the end for each command of ``REFERENCES`` that has none.

    Raises ValueError for a block that is there twice, or whose command is no longer
    in ``REFERENCES`` (its table would go stale).
    """
    wanted = tables()
    found = re.findall(r"<!-- generated: (.+?) -->", text)
    unknown = sorted(set(found) - set(wanted))
    if unknown:
        raise ValueError(f"generated blocks of no command in config_docs.REFERENCES: {unknown}")
    for name, table in wanted.items():
        pattern = _block(name)
        count = len(pattern.findall(text))
        if count == 0:
            text = text.rstrip("\n") + "\n" + _new_section(name, table)
        elif count > 1:
            raise ValueError(f"one '<!-- generated: {name} -->' block, not {count}")
        else:
            text = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/cli.md in place")
    args = parser.parse_args(argv)
    current = CLI_DOC.read_text()
    wanted = render(current)
    if args.write:
        CLI_DOC.write_text(wanted)
        return 0
    if wanted != current:
        print("docs/cli.md's option tables are stale: run with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
