"""docs/cli.md's option tables are what ``clsp_positives.config_docs`` renders from the
models that define the options, and list every flag each command has (docs/design.md §8)."""

from __future__ import annotations

import pytest

from clsp_positives import config_docs
from clsp_positives.config_docs import CLI_DOC, REFERENCES, Reference, render

COMMANDS = [ref.command for ref in REFERENCES]


def test_the_tables_are_the_models_own() -> None:
    """Run ``python -m clsp_positives.config_docs --write`` after changing a field."""
    text = CLI_DOC.read_text()
    assert render(text) == text, (
        "docs/cli.md's option tables are stale: "
        ".venv/bin/python -m clsp_positives.config_docs --write"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_the_reference_lists_every_flag(command: str) -> None:
    """Every flag the command line really has (aliases included) is in docs/cli.md."""
    import typer

    from clsp_positives.cli import app

    cli = typer.main.get_command(app)
    for word in command.split()[1:]:  # "clsp diffusion train": diffusion, then train
        cli = cli.commands[word]  # type: ignore[attr-defined]
    text = CLI_DOC.read_text()
    options = [p for p in cli.params if p.param_type_name == "option" and p.name != "help"]
    assert len(options) > 15
    missing = [o for p in options for o in p.opts if f"`{o}`" not in text]
    assert not missing, f"docs/cli.md's reference lacks these {command} flags: {missing}"


def test_a_new_command_gets_a_section_and_a_dropped_one_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Adding a command is one line of REFERENCES; a block left behind is an error."""
    serve = REFERENCES[0]
    monkeypatch.setattr(config_docs, "REFERENCES", (serve,))
    added = render("# Commands\n")
    assert added.startswith("# Commands\n\n## `clsp serve`\n")
    assert "| `--max-batch` | `CLSP_MAX_BATCH` | `64` |" in added
    assert render(added) == added  # rendered once, then stable

    other = Reference("clsp other", serve.model)
    monkeypatch.setattr(config_docs, "REFERENCES", (other,))
    with pytest.raises(ValueError, match="clsp serve"):
        render(added)
    with pytest.raises(ValueError, match="not 2"):
        render(added.replace("clsp serve", "clsp other") * 2)
