"""iERF masks and their compact form: mass masks, the 8-bit PNG, bounding boxes, IoU.

Every map here is at the model's input resolution (pixels after preprocessing), the frame the
iERF lives in (docs/method.md §6, step 3).

The PNG encodes a map *and* its mask in one grey channel (`encode_png`): the mask is exactly
`png >= 128` (`mask_from_png`), and the grey level is monotone in the positive relevance, so
the PNG is also a heat map and a lower or higher mass fraction can be approximated from it.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# mask pixels take the grey levels [MASK_LEVEL, 255], the rest [0, MASK_LEVEL - 1]
MASK_LEVEL = 128


def mass_masks(maps: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """The smallest pixel set of each map holding `fraction` of its positive relevance.

    maps: Tensor[M, H, W] signed relevance. Returns (masks BoolTensor[M, H, W], thresholds
    Tensor[M], the smallest relevance inside each mask; 0 for an empty mask). Pixels are taken
    in decreasing relevance (a stable sort, so ties go to the lower row-major index), which is
    the minimal-cardinality set; a map with no positive relevance gets an empty mask.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"mask fraction={fraction!r}: expected a float in (0, 1]")
    m, h, w = maps.shape
    vals, idx = maps.reshape(m, h * w).clamp(min=0).sort(dim=1, descending=True, stable=True)
    cum = vals.cumsum(1)
    total = cum[:, -1:]
    # pixels needed: 1 + how many prefixes still fall short of the target mass
    count = (cum < fraction * total).sum(1) + 1
    count = torch.where(total[:, 0] > 0, count, torch.zeros_like(count))
    keep = torch.arange(h * w, device=maps.device)[None] < count[:, None]
    masks = torch.zeros_like(keep).scatter_(1, idx, keep).reshape(m, h, w)
    last = vals.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    return masks, torch.where(count > 0, last, torch.zeros_like(last))


def encode_png(relevance: np.ndarray, mask: np.ndarray, threshold: float) -> bytes:
    """8-bit grey PNG of one iERF [H, W] with its mass mask [H, W] (from `mass_masks`).

    [choice] (CAFE mask encoding) grey levels, monotone in the positive relevance r+:
      outside the mask  floor(127 * r+ / threshold), clipped to [0, 127] (0 where r <= 0);
      inside the mask   128 + floor(127 * (r - threshold) / (max - threshold)) ([128, 255]),
                        255 everywhere inside when max == threshold.
    So `mask == png >= 128` exactly (ties at the threshold left outside by the stable sort get
    127), and the image doubles as a heat map of where the evidence is.
    """
    pos = np.clip(relevance.astype(np.float64), 0, None)
    grey = np.zeros(pos.shape, np.uint8)
    if mask.any():
        top = float(pos[mask].max())
        span = top - threshold
        inner = 255.0 if span <= 0 else MASK_LEVEL + np.floor(127 * (pos - threshold) / span)
        outer = np.floor(127 * pos / threshold) if threshold > 0 else 0.0
        grey = np.where(mask, np.clip(inner, MASK_LEVEL, 255),
                        np.clip(outer, 0, MASK_LEVEL - 1)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """The grey levels uint8[H, W] of an `encode_png` image."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "L":
            raise ValueError(f"iERF PNG has mode {im.mode!r}; expected 8-bit grey 'L'")
        return np.asarray(im).copy()


def mask_from_png(data: bytes) -> np.ndarray:
    """The iERF mass mask bool[H, W] stored in an `encode_png` image."""
    return decode_png(data) >= MASK_LEVEL


def bbox(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] of a mask (x1, y1 exclusive: the box is mask[y0:y1, x0:x1], the
    convention of the synthetic data's object boxes); None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape; 0 when both are empty."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def upsample(act_maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Latent activation maps on the layer grid Tensor[M, h, w] -> Tensor[M, H, W] at input
    resolution. [choice] bilinear, align_corners=False (as CAM-style maps are shown): a grid
    cell's value sits at its centre, so a peak's region is not snapped to cell borders."""
    return F.interpolate(act_maps[:, None].float(), size=size, mode="bilinear",
                         align_corners=False)[:, 0]


def act_masks(act_up: Tensor, threshold: float) -> Tensor:
    """[choice] The thresholded activation map: pixels where the upsampled map reaches
    `threshold` times its maximum (0.5 by default, CafeOptions.act_threshold); empty where the
    latent does not fire. act_up: Tensor[M, H, W] -> BoolTensor[M, H, W]."""
    top = act_up.flatten(1).amax(1).reshape(-1, 1, 1)
    return (act_up >= threshold * top) & (top > 0)
