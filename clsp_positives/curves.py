"""A run's curves as one PNG of small line charts, drawn with PIL (the project does not
depend on matplotlib), from the run's JSON-lines metrics log.

``clsp train`` and ``clsp diffusion train`` write ``curves.png`` beside their
``metrics.jsonl``: whoever has no TensorBoard at hand still sees at a glance whether the
loss fell, the accuracy rose or the projections collapsed (docs/training.md, "What a
run logs"). Both sides use this module, so it imports neither of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CURVES_NAME = "curves.png"

PANEL_WIDTH, PANEL_HEIGHT = 420, 250
COLUMNS = 2
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 44, 34
TITLE_HEIGHT = 26
COLOURS = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (23, 190, 207),
)
LEGEND_ROW = 12
GRID = (228, 228, 228)
DOTS_UP_TO = 40
"""Series with at most this many points get a dot on each (a one-epoch run is one point)."""


@dataclass(frozen=True)
class Series:
    """One line: its legend name and its (x, y) points."""

    name: str
    points: tuple[tuple[float, float], ...]
    band: tuple[tuple[float, float, float], ...] = ()
    """(x, low, high): a spread drawn as a pale area under the line (over seeds, say)."""


@dataclass(frozen=True)
class Panel:
    """One chart: a title (with the unit) and its lines, over the shared x axis."""

    title: str
    series: tuple[Series, ...]


def ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2, 2.5 or 5 times a power of ten)."""
    span = max(high - low, 1e-9)
    raw = span / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(low / step - 1e-9) * step
    out = []
    value = first
    while value <= high + step * 1e-6:
        out.append(round(value, 10))
        value += step
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log; a line cut short (a run killed while writing
    it) or not an object is skipped, so a crashed run's curves can still be drawn."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything else (bools, text, NaN, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(name: str, records: Iterable[dict[str, Any]], x: str, y: str) -> Series:
    """The (x, y) points of the records that hold both keys as finite numbers."""
    points = []
    for record in records:
        px, py = number(record.get(x)), number(record.get(y))
        if px is not None and py is not None:
            points.append((px, py))
    return Series(name, tuple(points))


def _range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def _label(value: float) -> str:
    return f"{value:.4g}"


def _legend(draw: Any, font: Any, names: Sequence[str], left: int, right: int) -> list:
    """Where each series' legend entry goes: (x, row), a new row when one is full."""
    spots, x, row = [], left, 0
    for name in names:
        width = 30 + int(draw.textlength(name, font=font))
        if x > left and x + width > right:
            x, row = left, row + 1
        spots.append((x, row))
        x += width
    return spots


def _pale(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * 0.75) for c in colour)  # type: ignore[return-value]


def _draw_panel(draw: Any, font: Any, panel: Panel, x0: int, y0: int, x_label: str) -> None:
    drawn = [s for s in panel.series if s.points]
    xs = [p[0] for s in drawn for p in s.points]
    ys = [p[1] for s in drawn for p in s.points]
    ys += [v for s in drawn for _, low, high in s.band for v in (low, high)]
    x_lo, x_hi = _range(xs)
    y_lo, y_hi = _range(ys)
    x_ticks = [t for t in ticks(x_lo, x_hi, 5) if x_lo <= t <= x_hi]
    if all(x.is_integer() for x in xs):  # epochs and steps: no tick between two of them
        x_ticks = [t for t in x_ticks if float(t).is_integer()] or sorted(set(xs))
    y_ticks = [t for t in ticks(y_lo, y_hi, 5) if y_lo <= t <= y_hi]
    left, right = x0 + LEFT, x0 + PANEL_WIDTH - RIGHT
    legend = _legend(draw, font, [s.name for s in drawn], left + 4, right)
    rows = 1 + max((row for _, row in legend), default=0)
    top, bottom = y0 + TOP + LEGEND_ROW * (rows - 1), y0 + PANEL_HEIGHT - BOTTOM

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    draw.text((x0 + 8, y0 + 6), panel.title, fill="black", font=font)
    for t in y_ticks:
        draw.line([(left, py(t)), (right, py(t))], fill=GRID)
        label = _label(t)
        draw.text((left - 6 - draw.textlength(label, font=font), py(t) - 6), label, fill="black")
    for t in x_ticks:
        draw.line([(px(t), bottom), (px(t), bottom + 4)], fill="black")
        label = _label(t)
        draw.text((px(t) - draw.textlength(label, font=font) / 2, bottom + 6), label, fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    width = draw.textlength(x_label, font=font)
    draw.text((right - width, bottom + 18), x_label, fill=(90, 90, 90), font=font)

    # A series keeps its colour by its place in the panel, drawn or not, so panels that
    # list the same series in the same order colour them alike.
    colours = {id(s): COLOURS[i % len(COLOURS)] for i, s in enumerate(panel.series)}
    for line in drawn:
        if len(line.band) > 1:
            outline = [(px(x), py(high)) for x, _, high in line.band]
            outline += [(px(x), py(low)) for x, low, _ in reversed(line.band)]
            draw.polygon(outline, fill=_pale(colours[id(line)]))
    for line, (legend_x, row) in zip(drawn, legend, strict=True):
        colour = colours[id(line)]
        points = [(px(x), py(y)) for x, y in line.points]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        if len(points) <= DOTS_UP_TO:
            for x, y in points:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colour)
        # The legend sits in rows above the plot area, one short line and name per series.
        at = y0 + 30 + LEGEND_ROW * row
        draw.line([(legend_x, at), (legend_x + 14, at)], fill=colour, width=2)
        draw.text((legend_x + 18, at - 6), line.name, fill=colour, font=font)


def write_curves(panels: Sequence[Panel], path: Path, *, title: str, x_label: str) -> Path:
    """Draw the panels that have points (two to a row) into ``path`` (PNG); a run
    without any point yet gets the title and a line that says so."""
    from PIL import Image, ImageDraw, ImageFont

    shown = [p for p in panels if any(s.points for s in p.series)]
    columns = min(COLUMNS, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    img = Image.new("RGB", (columns * PANEL_WIDTH, TITLE_HEIGHT + rows * PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((8, 8), title, fill="black", font=font)
    if not shown:
        draw.text((8, TITLE_HEIGHT + 8), "no metrics logged yet", fill="black", font=font)
    for i, panel in enumerate(shown):
        row, column = divmod(i, columns)
        _draw_panel(
            draw, font, panel, column * PANEL_WIDTH, TITLE_HEIGHT + row * PANEL_HEIGHT, x_label
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
