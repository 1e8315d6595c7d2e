"""One image's SRD explanation as a picture: input | signed map | overlay (CLI `explain`, demo)."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from pipeline import srd
from pipeline.models import LoadedModel
from pipeline.models.classes import ClassNames, model_class_names
from pipeline.viz import (
    captioned,
    colour_bar,
    denormalise,
    enlarged,
    overlay,
    side_by_side,
    signed_heatmap,
    smooth_for_display,
)


def explain_images(loaded: LoadedModel, images: list[Image.Image],
                   target: int | str | None = None, contrastive: bool = False,
                   class_names: ClassNames | None = None, smooth: float = 0.0
                   ) -> list[tuple[Image.Image, dict[str, Any]]]:
    """SRD saliency of each image: (panel, facts) per image.

    The panel shows the model's input, the signed map (red for the class, blue against, with
    its colour key) and an overlay, under a caption naming the class. `target` is a class index
    or name (`class_names`, default the model's own: `pipeline.models.classes`); None explains
    the predicted class. The facts are the target class and its name, its logit, the pixel sum
    of the map and the constant share (with the identity rule the last two add up to the
    logit). `smooth` > 0 blurs the shown map with that Gaussian sigma in pixels (display only:
    `viz.smooth_for_display`; the facts come from the raw map).
    """
    names = class_names or model_class_names(loaded.name)
    x = loaded.preprocess(images)  # decoded to RGB by the preprocessing (data.images.to_rgb)
    if isinstance(target, str):
        n_classes = int(loaded.model(x[:1]).shape[-1])
        if names is None and not target.strip().isdigit():
            raise ValueError(f"unknown target class {target!r}: {loaded.name} has no class "
                             "names (give --class-names FILE, or a class index)")
        target = names.index(target, n_classes) if names else int(target)
    res = srd.explain(loaded.model, x, target, contrastive)
    out = []
    for i in range(len(images)):
        # the model's own input (after resize and crop), so the map lines up pixel for pixel
        shown = denormalise(x[i].numpy(), loaded.data_config["mean"], loaded.data_config["std"])
        relevance = res.pixels[i, 0].detach().numpy()
        shown_map = smooth_for_display(relevance, smooth)
        scale = float(np.percentile(np.abs(shown_map), 99.5))
        heat = signed_heatmap(shown_map)
        big = [enlarged(a) for a in (shown, heat, overlay(shown, heat))]
        cls = int(res.target[i])
        name = names.name(cls) if names else None
        facts = {"target": cls, "class_name": name, "logit": round(float(res.logit[i]), 4),
                 "pixel_sum": round(float(np.sum(relevance)), 4),
                 "constant_share": round(float(res.constant[i, 0]), 4)}
        caption = [f"SRD{' (contrastive)' if contrastive else ''} of class {cls}"
                   + (f" ({name})" if name else "") + f", logit {facts['logit']:.3g}",
                   f"map sum {facts['pixel_sum']:.3g} + constant {facts['constant_share']:.3g}; "
                   "red: for the class, blue: against"
                   + (f"; shown blurred (sigma {smooth:g} px)" if smooth > 0 else "")]
        panel = side_by_side([*big, colour_bar(big[0].shape[0], scale)])
        out.append((captioned(panel, caption), facts))
    return out
