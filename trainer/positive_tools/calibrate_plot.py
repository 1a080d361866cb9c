"""``calibration.png``: class kept against between-candidate diversity, one labelled point
per measured setting, drawn with PIL (the project does not depend on matplotlib).

The trade-off of docs/design.md §1 is easiest to read as a picture: settings up and to the
right are better, the target line separates those the recommendation may pick from the
rest, and the probe's accuracy on real images is the ceiling no positive can pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clsp_positives.curves import ticks
from clsp_positives.trainer.positive_tools.calibrate import Row, Setting

WIDTH, HEIGHT = 720, 520
LEFT, RIGHT, TOP, BOTTOM = 70, 30, 50, 60
GREY, TARGET, CEILING, PICK = (70, 70, 70), (200, 60, 40), (60, 110, 200), (200, 60, 40)
LEADER = (190, 190, 190)


def label_box(
    x: float,
    y: float,
    width: float,
    placed: Sequence[tuple[float, float, float, float]],
    right_edge: float = WIDTH,
) -> tuple[float, float, float, float]:
    """Where a point's label goes: right of the point (left of it near the right edge),
    moved down (then up) a line at a time until it overlaps no label placed before, so
    close settings stay readable."""
    if x + 8 + width > right_edge:
        x -= 16 + width

    def overlaps(a: tuple[float, float, float, float]) -> bool:
        return any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3] for b in placed)

    for shift in (0, 12, -12, 24, -24, 36, -36, 48, -48):
        box = (x + 8, y - 6 + shift, x + 8 + width, y + 6 + shift)
        if not overlaps(box):
            return box
    return (x + 8, y - 6, x + 8 + width, y + 6)


def write_plot(
    rows: Sequence[Row],
    path: Path,
    *,
    min_class_kept: float,
    probe_accuracy: float | None = None,
    recommended: Setting | None = None,
    title: str = "clsp calibrate",
) -> Path:
    """Draw the measured rows into ``path`` (PNG); skipped rows are left out."""
    from PIL import Image, ImageDraw, ImageFont

    points = [r for r in rows if r.status == "measured"]
    font = ImageFont.load_default()
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black", font=font)

    # The x axis spans the points (settings often differ by a few hundredths); the y axis
    # is the whole [0, 1], where the target and the ceiling are.
    xs = [float(r.between_candidates or 0.0) for r in points] or [0.0]
    pad = max((max(xs) - min(xs)) * 0.15, 0.01)
    x_ticks = ticks(max(min(xs) - pad, 0.0), max(xs) + pad)
    x_lo, x_hi = min(x_ticks[0], max(min(xs) - pad, 0.0)), max(x_ticks[-1], max(xs) + pad)
    y_lo, y_hi = 0.0, 1.0
    y_ticks = ticks(y_lo, y_hi)

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * (WIDTH - LEFT - RIGHT)

    def py(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y_lo) / (y_hi - y_lo) * (HEIGHT - TOP - BOTTOM)

    bottom, left = HEIGHT - BOTTOM, LEFT
    draw.line([(left, TOP), (left, bottom), (WIDTH - RIGHT, bottom)], fill="black")
    for t in x_ticks:
        draw.line([(px(t), bottom), (px(t), bottom + 5)], fill="black")
        label = f"{t:g}"
        draw.text((px(t) - draw.textlength(label, font=font) / 2, bottom + 8), label, fill="black")
    for t in y_ticks:
        draw.line([(left - 5, py(t)), (left, py(t))], fill="black")
        label = f"{t:g}"
        draw.text((left - 10 - draw.textlength(label, font=font), py(t) - 6), label, fill="black")
    draw.text(
        (left, bottom + 28),
        "mean |difference| between two candidates of one anchor (pixels in [0, 1])",
        fill="black",
        font=font,
    )
    draw.text((10, TOP - 18), "class kept (probe)", fill="black", font=font)

    def hline(y: float, colour: tuple[int, int, int], label: str) -> None:
        for x0 in range(left, WIDTH - RIGHT, 10):  # dashed
            draw.line([(x0, py(y)), (min(x0 + 5, WIDTH - RIGHT), py(y))], fill=colour)
        w = draw.textlength(label, font=font)
        draw.text((WIDTH - RIGHT - w, py(y) - 13), label, fill=colour, font=font)

    hline(min_class_kept, TARGET, f"target {min_class_kept:g}")
    if probe_accuracy is not None:
        hline(probe_accuracy, CEILING, f"real images {probe_accuracy:.2f}")

    centres = [
        (px(float(r.between_candidates or 0.0)), py(float(r.class_kept or 0.0))) for r in points
    ]
    # Labels keep off every point as well as off each other.
    placed: list[tuple[float, float, float, float]] = [
        (x - 6, y - 6, x + 6, y + 6) for x, y in centres
    ]
    for r, (x, y) in zip(points, centres, strict=True):
        picked = recommended is not None and r.setting == recommended
        radius = 6 if picked else 4
        draw.ellipse(
            [x - radius, y - radius, x + radius, y + radius],
            fill=PICK if picked else "black",
            outline="black",
        )
        label = f"w={r.interpolation_weight:g} s={r.steps}"
        box = label_box(x, y, draw.textlength(label, font=font), placed, WIDTH - 2)
        placed.append(box)
        if abs(box[1] - (y - 6)) > 1:  # moved off its point: a leader line says whose it is
            end_x = box[0] if box[0] > x else box[2]
            draw.line([(x, y), (end_x, (box[1] + box[3]) / 2)], fill=LEADER)
        draw.text(box[:2], label, fill=PICK if picked else GREY, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
