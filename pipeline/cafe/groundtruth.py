"""Ground truth of the synthetic concept data: which object an iERF mask lands on, and how well.

A synthetic sample's JSON lists every object with its shape, colour, texture and *visible* mask
(after occlusion; `pipeline.data.synthetic`, RLE row-major). Masks are in the decoded image's
frame; the model sees the preprocessed frame, so they go through the same resize and centre
crop as the image (nearest neighbour, a mask stays binary).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.cafe.masks import iou
from pipeline.data.synthetic import rle_decode


@dataclass(frozen=True)
class GTObject:
    """One object of a sample, its visible mask in the model's input frame bool[H, W]."""

    shape: str
    colour: str
    texture: str
    mask: np.ndarray


def to_input_frame(mask: np.ndarray, data_config: dict[str, Any]) -> np.ndarray:
    """Map a mask of the decoded image into the model's input frame, as timm's eval transform
    maps the image: resize (shorter side to floor(size / crop_pct), or both sides for
    crop_mode 'squash'), then centre crop to `input_size`. bool[h, w] -> bool[H, W]."""
    _, th, tw = data_config["input_size"]
    if mask.shape == (th, tw):
        return mask
    mode = data_config.get("crop_mode", "center") or "center"
    crop_pct = data_config.get("crop_pct") or 1.0
    h, w = mask.shape
    if mode == "squash":
        size = (math.floor(tw / crop_pct), math.floor(th / crop_pct))
    elif mode == "center":
        short = math.floor(min(th, tw) / crop_pct)
        # torchvision's Resize(int): the longer side is truncated, not rounded
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        raise ValueError(f"crop_mode={mode!r}: ground-truth masks support 'center' and 'squash'")
    im = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)
    top, left = int(round((size[1] - th) / 2.0)), int(round((size[0] - tw) / 2.0))
    return np.asarray(im.crop((left, top, left + tw, top + th))) > 127


def objects(meta: dict[str, Any] | None, data_config: dict[str, Any]) -> list[GTObject]:
    """The objects of a sample's metadata ([] for data without synthetic ground truth)."""
    if not meta or not isinstance(meta.get("objects"), list):
        return []
    return [GTObject(o["shape"], o["colour"], o["texture"],
                     to_input_frame(rle_decode(o["mask"]), data_config))
            for o in meta["objects"]]


def match(ierf_mask: np.ndarray, act_mask: np.ndarray, objs: list[GTObject]) -> dict[str, Any]:
    """The gt_* columns of one exemplar: the object whose visible mask has the largest IoU with
    the iERF mask (the first listed on ties), that IoU, and the IoU of the thresholded
    activation map with the same object. All null when there is no object, or when the mask
    touches none (the evidence lies in the background: no concept to name)."""
    none = {"gt_shape": None, "gt_colour": None, "gt_texture": None, "gt_iou_ierf": None,
            "gt_iou_act": None}
    if not objs:
        return none
    scores = [iou(ierf_mask, o.mask) for o in objs]
    best = int(np.argmax(scores))
    if scores[best] <= 0:
        return none
    o = objs[best]
    return {"gt_shape": o.shape, "gt_colour": o.colour, "gt_texture": o.texture,
            "gt_iou_ierf": scores[best], "gt_iou_act": iou(act_mask, o.mask)}
