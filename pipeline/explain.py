"""One image's SRD explanation as a picture: input | signed map | overlay (CLI `explain`, demo)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import srd
from pipeline.models import LoadedModel
from pipeline.viz import overlay, side_by_side, signed_heatmap


def shown_input(loaded: LoadedModel, x: torch.Tensor) -> np.ndarray:
    """uint8[N, H, W, 3]: the model's own inputs (after resize and crop), un-normalised, so a
    map lines up with them pixel for pixel."""
    mean = torch.tensor(loaded.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(loaded.data_config["std"]).view(1, 3, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def explain_images(loaded: LoadedModel, images: list[Image.Image], target: int | None = None,
                   contrastive: bool = False) -> list[tuple[Image.Image, dict[str, Any]]]:
    """SRD saliency of each image: (panel input | signed map | overlay, facts) per image.

    The facts are the target class, its logit, the pixel sum of the map and the constant share
    (with the identity rule the last two add up to the logit).
    """
    x = loaded.preprocess([im.convert("RGB") for im in images])
    res = srd.explain(loaded.model, x, target, contrastive)
    shown = shown_input(loaded, x)
    out = []
    for i in range(len(images)):
        relevance = res.pixels[i, 0].detach().numpy()
        heat = signed_heatmap(relevance)
        panel = side_by_side([shown[i], heat, overlay(shown[i], heat)])
        out.append((panel, {"target": int(res.target[i]), "logit": round(float(res.logit[i]), 4),
                            "pixel_sum": round(float(np.sum(relevance)), 4),
                            "constant_share": round(float(res.constant[i, 0]), 4)}))
    return out
