"""The service's log lines: JSON lines a log pipeline can parse field by field, and one
format for every logger, uvicorn's included (settings ``CLSP_LOG_JSON``/``CLSP_LOG_LEVEL``,
docs/design.md §8)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator

import pytest

from clsp_positives.service.logs import JsonFormatter, configure_logging

UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


def record(msg: str = "ready in %.1f s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("clsp.service.app", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_object_on_one_line() -> None:
    line = JsonFormatter().format(record("two\nlines %s", "x"))
    assert "\n" not in line
    out = json.loads(line)
    assert out == {
        "ts": out["ts"],
        "level": "warning",
        "logger": "clsp.service.app",
        "msg": "two\nlines x",
    }


def test_the_timestamp_is_utc_with_milliseconds() -> None:
    rec = record()
    rec.created = 1_700_000_000.25
    rec.msecs = 250.0
    assert json.loads(JsonFormatter().format(rec))["ts"] == "2023-11-14T22:13:20.250Z"


def test_extra_fields_become_keys_and_never_override_the_standard_ones() -> None:
    rec = record(anchors=32, fingerprint="ab12", level="spoofed", _private=1)
    out = json.loads(JsonFormatter().format(rec))
    assert out["anchors"] == 32 and out["fingerprint"] == "ab12"
    assert out["level"] == "warning"
    assert "_private" not in out
    # LogRecord's own attributes (pathname, lineno, thread, ...) stay out of the line.
    assert not {"pathname", "lineno", "thread", "args", "created"} & set(out)


def test_an_extra_that_json_cannot_encode_is_written_as_text() -> None:
    out = json.loads(JsonFormatter().format(record(shape=(2, 3), path=object)))
    assert out["shape"] == [2, 3] and out["path"] == str(object)


def test_an_exception_is_in_the_line() -> None:
    try:
        raise ValueError("bad anchor")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        rec.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "failed"
    assert "Traceback" in out["exc"] and "ValueError: bad anchor" in out["exc"]


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    """configure_logging rewires global state: put it back for the other tests."""
    root = logging.getLogger()
    saved_root = (root.handlers[:], root.level)
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate) for n in UVICORN}
    yield
    root.handlers[:], root.level = saved_root[0], saved_root[1]
    for name, (handlers, propagate) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def test_json_lines_go_to_stderr_for_every_logger(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("uvicorn.error").addHandler(logging.NullHandler())
    configure_logging(json_lines=True, level="info")
    logging.getLogger("clsp.service.batcher").info("batch", extra={"items": 4})
    logging.getLogger("uvicorn.error").info("Started server process")
    logging.getLogger("clsp.service.batcher").debug("below the level")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [json.loads(line) for line in captured.err.splitlines()]
    assert [(r["logger"], r["msg"]) for r in lines] == [
        ("clsp.service.batcher", "batch"),
        ("uvicorn.error", "Started server process"),
    ]
    assert lines[0]["items"] == 4
    for name in UVICORN:
        assert logging.getLogger(name).handlers == [] and logging.getLogger(name).propagate


def test_plain_lines_and_no_duplicate_handlers_when_configured_twice(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="warning")
    configure_logging(level="warning")
    assert len(logging.getLogger().handlers) == 1
    logging.getLogger("clsp.service.cache").warning("redis down")
    logging.getLogger("clsp.service.cache").info("quiet")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" WARNING clsp.service.cache: redis down")
    time.strptime(lines[0][:19], "%Y-%m-%d %H:%M:%S")
