"""Pictures of signed relevance maps: a diverging heat map, an overlay, panels side by side.

Plain numpy + Pillow (no matplotlib): red is positive relevance, blue negative, white zero.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def signed_heatmap(relevance: np.ndarray, clip_percentile: float = 99.5) -> np.ndarray:
    """Relevance float[H, W] -> uint8[H, W, 3], symmetric around zero.

    The scale is the `clip_percentile` of |relevance| so one extreme pixel cannot wash out the map.
    """
    r = np.asarray(relevance, dtype=np.float64)
    scale = np.percentile(np.abs(r), clip_percentile)
    t = np.clip(r / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(r)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def smooth_for_display(relevance: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of a map float[H, W] with `sigma` pixels (mirrored edges), for display.

    Relevance redistributed through a stride-2 convolution whose kernel is not a multiple of 2
    lands on alternate pixels from one or two windows, a period-2 lattice that repeats at
    every stride-2 layer (docs/method.md §3.8). A blur of sigma >= 1 px removes it from the
    picture; it keeps the map's sum (mirrored edges lose no mass) but not its pixel values,
    so it is never applied to stored maps, masks or metrics.
    """
    import torch

    if sigma <= 0:
        return relevance
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    # edges mirrored with the edge pixel repeated: every pixel's weights then sum to 1
    x = torch.as_tensor(np.pad(np.asarray(relevance, np.float64), radius, mode="symmetric"))
    x = torch.nn.functional.conv2d(x[None, None], kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[0, 0].numpy().astype(np.asarray(relevance).dtype)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a heat map uint8[H, W, 3] over a grey version of image uint8[H, W, 3]."""
    grey = np.asarray(image, dtype=np.float64).mean(-1, keepdims=True).repeat(3, -1)
    return ((1 - alpha) * grey + alpha * heat).round().astype(np.uint8)


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> Image.Image:
    """Equal-height uint8 panels [H, W, 3] -> one RGB image, `gap` white pixels apart."""
    h = panels[0].shape[0]
    if any(p.shape[0] != h for p in panels):
        raise ValueError(f"panels must share a height, got {[p.shape[0] for p in panels]}")
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = np.full((h, width, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        canvas[:, x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return Image.fromarray(canvas)


def colour_bar(height: int, scale: float, width: int = 14) -> np.ndarray:
    """The key of `signed_heatmap` with clip value `scale`: uint8[height, width + text, 3],
    +scale (red) at the top, 0 (white) in the middle, -scale (blue) at the bottom."""
    from PIL import ImageDraw

    ramp = signed_heatmap(np.linspace(1, -1, height)[:, None].repeat(width, 1), 100)
    label = Image.new("RGB", (44, height), (255, 255, 255))
    draw = ImageDraw.Draw(label)
    for text, y in ((f"+{scale:.2g}", 0), ("0", height // 2 - 5), (f"-{scale:.2g}", height - 11)):
        draw.text((2, max(0, y)), text, fill=(0, 0, 0))
    return np.concatenate([ramp, np.asarray(label)], axis=1)


def captioned(image: Image.Image, lines: Sequence[str], line_height: int = 14) -> Image.Image:
    """`image` under a white band holding `lines` of text."""
    from PIL import ImageDraw

    band = line_height * len(lines) + 4
    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image, (0, band))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_height), line, fill=(0, 0, 0))
    return out


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 255)
            ) -> np.ndarray:
    """A copy of image uint8[H, W, 3] with the boundary of mask bool[H, W] drawn two-toned: a
    bright `colour` line just outside the mask and a black one just inside, so the outline
    stays visible on dark and on light images alike. Line width: 1 pixel per 128 of the
    shorter side (at least 1)."""
    import torch

    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    width = max(1, min(mask.shape) // 128)
    m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
    grown = torch.nn.functional.max_pool2d(m, 2 * width + 1, 1, width)[0, 0].numpy() > 0
    shrunk = -torch.nn.functional.max_pool2d(-m, 2 * width + 1, 1, width)[0, 0].numpy() > 0
    out = np.array(image, copy=True)
    out[grown & ~np.asarray(mask, bool)] = colour
    out[np.asarray(mask, bool) & ~shrunk] = 0
    return out


def reference_crop(image: np.ndarray, box: Sequence[int] | None, pad: float = 0.15
                   ) -> np.ndarray:
    """The region `box` (x0, y0, x1, y1) of image uint8[H, W, 3], grown by `pad` of its size on
    each side and made square where the image allows: the close-up shown beside a whole
    exemplar (as CRP's reference crops); the whole image when `box` is None."""
    if box is None:
        return image
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1 + 2 * pad)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(1.0, min(side, w, h) / 2)
    left = int(round(min(max(cx - half, 0), w - 2 * half)))
    top = int(round(min(max(cy - half, 0), h - 2 * half)))
    size = max(1, int(round(2 * half)))
    return image[top:top + size, left:left + size]


def enlarged(image: np.ndarray, at_least: int = 256) -> np.ndarray:
    """image uint8[H, W, 3] scaled up by a whole factor (nearest) until its shorter side is at
    least `at_least` pixels: a 128-pixel input is read at 256."""
    factor = max(1, -(-at_least // min(image.shape[:2])))
    return np.asarray(image).repeat(factor, 0).repeat(factor, 1) if factor > 1 else image


def denormalise(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A model input float[3, H, W] (normalised with `mean`/`std`) -> the image uint8[H, W, 3]."""
    m = np.asarray(mean, np.float64).reshape(3, 1, 1)
    s = np.asarray(std, np.float64).reshape(3, 1, 1)
    rgb = np.clip(np.asarray(x, np.float64) * s + m, 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8).transpose(1, 2, 0)


def highlight(image: np.ndarray, weight: np.ndarray, full: int = 128,
              floor: float = 0.35) -> np.ndarray:
    """Dim image uint8[H, W, 3] where weight uint8[H, W] is low, keeping its colours.

    Pixels with weight >= `full` keep their brightness, weight 0 falls to `floor` of it, in
    between linearly: an iERF PNG (mask = grey >= 128) shows its mask bright and the rest of
    its positive relevance as a glow. Tinting would hide a mask on an object of the tint's
    colour, and colour is one of the concepts.
    """
    if weight.shape != image.shape[:2]:
        raise ValueError(f"weight {weight.shape} does not match image {image.shape[:2]}")
    w = np.clip(np.asarray(weight, np.float64) / full, 0.0, 1.0)[..., None]
    return (np.asarray(image, np.float64) * (floor + (1 - floor) * w)).round().astype(np.uint8)


def draw_box(image: np.ndarray, box: Sequence[int], colour: tuple[int, int, int] = (255, 220, 0),
             width: int | None = None) -> np.ndarray:
    """A copy of image uint8[H, W, 3] with the outline of box (x0, y0, x1, y1), end exclusive.

    `width` defaults to 1 pixel per 100 of the image's shorter side (at least 1), so that the
    outline survives the downscaling of a contact-sheet tile."""
    out = np.array(image, copy=True)
    h, w = out.shape[:2]
    width = max(1, min(h, w) // 100) if width is None else width
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(box[2])), min(h, int(box[3]))
    if x1 <= x0 or y1 <= y0:
        return out
    c = np.asarray(colour, np.uint8)
    out[y0:min(y1, y0 + width), x0:x1] = c
    out[max(y0, y1 - width):y1, x0:x1] = c
    out[y0:y1, x0:min(x1, x0 + width)] = c
    out[y0:y1, max(x0, x1 - width):x1] = c
    return out


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None,
                  tile: int = 96, gap: int = 4, label_height: int = 14,
                  title: str | None = None) -> Image.Image:
    """A grid of uint8 [H, W, 3] tiles, one list per row, each row under its text label.

    Tiles are resized to `tile` x `tile` pixels: enlarged with nearest neighbours (masks stay
    crisp), reduced with Lanczos (thin outlines and boxes blend in rather than drop out). A
    title may have several lines.
    """
    from PIL import ImageDraw

    columns = max((len(r) for r in rows), default=1) or 1
    band = label_height if labels else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = title.splitlines() if title else []
    text = max((measure.textlength(t) for t in [*(labels or []), *title_lines]), default=0)
    width = max(columns * tile + (columns + 1) * gap, int(text) + 2 * gap)
    top = label_height * len(title_lines) + gap if title else 0
    height = top + len(rows) * (tile + band + gap) + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        for i, line in enumerate(title_lines):
            draw.text((gap, gap + i * label_height), line, fill=(0, 0, 0))
    y = gap + top
    for i, row in enumerate(rows):
        if labels:
            draw.text((gap, y), labels[i], fill=(0, 0, 0))
        for j, t in enumerate(row):
            im = Image.fromarray(np.asarray(t, np.uint8))
            im = im.resize((tile, tile), Image.NEAREST if min(im.size) <= tile else Image.LANCZOS)
            sheet.paste(im, (gap + j * (tile + gap), y + band))
        y += tile + band + gap
    return sheet
