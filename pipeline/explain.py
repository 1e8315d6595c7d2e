"""One image's SRD explanation as a picture: input | signed map | overlay (CLI `explain`, demo)."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipeline import srd
from pipeline.models import LoadedModel
from pipeline.viz import denormalise, overlay, side_by_side, signed_heatmap


def explain_images(loaded: LoadedModel, images: list[Image.Image], target: int | None = None,
                   contrastive: bool = False) -> list[tuple[Image.Image, dict[str, Any]]]:
    """SRD saliency of each image: (panel input | signed map | overlay, facts) per image.

    The facts are the target class, its logit, the pixel sum of the map and the constant share
    (with the identity rule the last two add up to the logit).
    """
    x = loaded.preprocess(images)  # decoded to RGB by the preprocessing (data.images.to_rgb)
    res = srd.explain(loaded.model, x, target, contrastive)
    out = []
    for i in range(len(images)):
        # the model's own input (after resize and crop), so the map lines up pixel for pixel
        shown = denormalise(x[i].numpy(), loaded.data_config["mean"], loaded.data_config["std"])
        relevance = res.pixels[i, 0].detach().numpy()
        heat = signed_heatmap(relevance)
        panel = side_by_side([shown, heat, overlay(shown, heat)])
        out.append((panel, {"target": int(res.target[i]), "logit": round(float(res.logit[i]), 4),
                            "pixel_sum": round(float(np.sum(relevance)), 4),
                            "constant_share": round(float(res.constant[i, 0]), 4)}))
    return out
