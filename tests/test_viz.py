"""Pictures a person reads: mask outlines that show on dark and light images, reference crops."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.viz import outline, reference_crop


@pytest.mark.parametrize("grey", [0, 255])
def test_an_outline_shows_on_black_and_on_white_images(grey) -> None:
    image = np.full((128, 128, 3), grey, np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[40:80, 30:90] = True
    out = outline(image, mask)
    ring = np.zeros_like(mask)
    ring[39:81, 29:91] = True
    ring[40:80, 30:90] = False  # one pixel outside the mask: the bright line
    assert (out[ring] == (0, 255, 255)).all()
    edge = mask.copy()
    edge[41:79, 31:89] = False  # one pixel inside: the black line
    assert (out[edge] == 0).all()
    untouched = ~(ring | edge)
    assert (out[untouched] == grey).all()
    # one of the two lines differs from the background whatever its grey
    assert (np.abs(out.astype(int) - grey).sum(-1) > 200).sum() >= ring.sum()


def test_a_reference_crop_is_the_padded_square_around_the_box_inside_the_image() -> None:
    image = np.arange(200 * 300 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8)
    crop = reference_crop(image, (100, 50, 140, 70))  # 40 x 20 box
    assert crop.shape[:2] == (52, 52)  # the longer side, grown 15% each way
    assert reference_crop(image, (280, 180, 300, 200)).shape[:2] == (26, 26)  # at a corner
    assert reference_crop(image, None) is image
    big = reference_crop(image, (0, 0, 300, 200))
    assert big.shape[:2] == (200, 200)  # never larger than the image allows
