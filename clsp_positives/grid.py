"""The anchors-and-candidates PNG: each row an anchor, a grey gap, then its candidates.

``clsp demo`` and ``clsp generate --grid`` draw it, so a person can see at a glance
whether the positives keep their anchor's content (docs/design.md §1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GRID_SCALE = 4
"""Tiles are upscaled (nearest) so that 16x16 digits are visible in a viewer."""
GRID_GAP = 8
"""Pixels of grey between the anchor column and its candidates."""
GRID_SEP = 2
"""Pixels of grey between neighbouring tiles (digits on black would run together)."""
GRID_GAP_VALUE = 128


def grid_size(
    rows: int,
    k: int,
    *,
    tile: int,
    scale: int = GRID_SCALE,
    gap: int = GRID_GAP,
    sep: int = GRID_SEP,
) -> tuple[int, int]:
    """(width, height) in pixels of the anchors-and-candidates PNG."""
    side = tile * scale
    return ((1 + k) * side + gap + (k - 1) * sep, rows * side + (rows - 1) * sep)


def write_grid(anchors: Any, candidates: Any, path: Path) -> tuple[int, int]:
    """Each row: an anchor, a grey gap, then its candidates; uint8 NHWC in, PNG out."""
    from PIL import Image

    image = grid_image(anchors, candidates)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return image.shape[1], image.shape[0]


def grid_image(anchors: Any, candidates: Any) -> Any:
    """The grid as a uint8 array, ``[H, W]`` for one channel or ``[H, W, 3]``: what
    ``write_grid`` saves, and what ``clsp train --tensorboard`` logs."""
    import numpy as np

    rows, k = candidates.shape[:2]
    tile, channels = anchors.shape[1], anchors.shape[3]
    side = tile * GRID_SCALE
    width, height = grid_size(rows, k, tile=tile)
    canvas = np.full((height, width, channels), GRID_GAP_VALUE, np.uint8)

    def put(img: Any, r: int, x: int) -> None:
        big = img.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1)
        y = r * (side + GRID_SEP)
        canvas[y : y + side, x : x + side] = big

    for r in range(rows):
        put(anchors[r], r, 0)
        for j in range(k):
            put(candidates[r, j], r, side + GRID_GAP + j * (side + GRID_SEP))
    return canvas[..., 0] if channels == 1 else canvas


def grid_anchors(labels: Any, rows: int) -> Any:
    """Index of the first training image of each class (up to ``rows``)."""
    import numpy as np

    picks = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    return np.array(picks[:rows], dtype=np.int64)
