"""The README's configuration tables, rendered from the models that define the options.

``ServiceSettings`` and ``TrainConfig`` own every default and help text
(docs/design.md §8); the README shows them between ``<!-- generated: NAME -->``
and ``<!-- end generated: NAME -->`` markers, and a test fails when what is
there differs from what this module renders. Rewrite them with
``python -m clsp_positives.config_docs --write``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from clsp_positives.options import reference_table

README = Path(__file__).resolve().parents[1] / "README.md"


def tables() -> dict[str, str]:
    """Marker name -> the Markdown table that belongs there."""
    from clsp_positives.service.settings import ServiceSettings, env_var
    from clsp_positives.trainer.config import TrainConfig

    return {
        "clsp serve": reference_table(
            ServiceSettings, list(ServiceSettings.model_fields), env=env_var
        ),
        "clsp train": reference_table(TrainConfig, list(TrainConfig.model_fields)),
    }


def _block(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end generated: {name} -->)", flags=re.S
    )


def render(text: str) -> str:
    """``text`` with every generated block replaced by its current table.

    Raises ValueError when a block's markers are missing (a table would go stale).
    """
    for name, table in tables().items():
        pattern = _block(name)
        if len(pattern.findall(text)) != 1:
            raise ValueError(
                f"the README needs one '<!-- generated: {name} -->' ... "
                f"'<!-- end generated: {name} -->' block"
            )
        text = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(3), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md in place")
    args = parser.parse_args(argv)
    current = README.read_text()
    wanted = render(current)
    if args.write:
        README.write_text(wanted)
        return 0
    if wanted != current:
        print("README.md's configuration tables are stale: run with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
