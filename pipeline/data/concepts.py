"""The concept vocabulary of the synthetic dataset, and the class as a function of it.

Every later stage validates against these ground-truth concepts (CAFE mask IoU, planted
shortcut routes), so the vocabulary lives in one place.
"""
from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
TEXTURES: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "gradient")

# The class of an image is the shape of its largest object (by visible pixel area).
CLASS_NAMES: tuple[str, ...] = SHAPES
NUM_CLASSES: int = len(CLASS_NAMES)

# Planted shortcut: class i co-occurs with colour SHORTCUT_COLOURS[i] with a chosen probability.
SHORTCUT_COLOURS: tuple[str, ...] = tuple(list(COLOURS)[: len(SHAPES)])
