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
