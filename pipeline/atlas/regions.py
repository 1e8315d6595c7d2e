"""Image regions on a layer's grid: a box in input pixels -> the PFV positions it covers."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def parse_box(text: str) -> tuple[int, int, int, int]:
    """`"x,y,w,h"` (input pixels) -> (x, y, w, h); ValueError naming the bad text."""
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box {text!r}: expected four integers x,y,w,h (pixels of the "
                         f"model input)") from None
    return x, y, w, h


def box_positions(box: Sequence[int] | None, input_hw: tuple[int, int],
                  grid: tuple[int, int], num_special: int = 0) -> np.ndarray:
    """Positions (the layer's [P] layout) of the grid cells a box covers, int64[n] sorted.

    `box` = (x, y, w, h) in pixels of the model input (after resize and crop), None for the
    whole image. Grid cell (i, j) covers input rows [i*H/gh, (i+1)*H/gh) and columns alike; a
    cell belongs to the region when its centre lies inside the box, and a box smaller than a
    cell gets the one cell under the box's centre. ValueError when the box is empty or lies
    outside the input.
    """
    gh, gw = grid
    if box is None:
        return num_special + np.arange(gh * gw, dtype=np.int64)
    h_in, w_in = input_hw
    x, y, w, h = (int(v) for v in box)
    if w <= 0 or h <= 0 or x >= w_in or y >= h_in or x + w <= 0 or y + h <= 0:
        raise ValueError(f"box (x={x}, y={y}, w={w}, h={h}) is empty or outside the model "
                         f"input of {w_in}x{h_in} pixels (width x height)")
    cy = (np.arange(gh) + 0.5) * h_in / gh
    cx = (np.arange(gw) + 0.5) * w_in / gw
    rows = np.flatnonzero((cy >= y) & (cy < y + h))
    cols = np.flatnonzero((cx >= x) & (cx < x + w))
    if len(rows) == 0 or len(cols) == 0:
        rows = np.array([min(gh - 1, int((y + h / 2) * gh / h_in))])
        cols = np.array([min(gw - 1, int((x + w / 2) * gw / w_in))])
    return num_special + (rows[:, None] * gw + cols[None, :]).reshape(-1).astype(np.int64)


def cell_box(position: int, input_hw: tuple[int, int], grid: tuple[int, int],
             num_special: int = 0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) input pixels of the grid cell at `position`; None for a special token."""
    if position < num_special:
        return None
    i, j = divmod(position - num_special, grid[1])
    h_in, w_in = input_hw
    return (round(j * w_in / grid[1]), round(i * h_in / grid[0]),
            round((j + 1) * w_in / grid[1]), round((i + 1) * h_in / grid[0]))


def cells_extent(box: Sequence[int] | None, input_hw: tuple[int, int], grid: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) input pixels of the whole grid cells a box covers (`box_positions`):
    the region a search actually reads on that grid, drawn beside the box the user gave."""
    positions = box_positions(box, input_hw, grid)
    boxes = np.array([cell_box(int(p), input_hw, grid) for p in positions])
    return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()),
            int(boxes[:, 3].max()))
