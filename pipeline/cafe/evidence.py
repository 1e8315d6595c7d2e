"""Evidence maps of SAE latents compared against ground truth (docs/cafe_eval.md).

What CAFE claims is that a latent's iERF shows *its* evidence, also where the activation map of
a non-local latent (a ViT token that mixes distant context) does not. These functions score any
signed pixel map of a latent, whichever method drew it (iERF, activation map, gradients, LRP):

    iou_curve          ground-truth IoU of a map's mass masks over a grid of mask masses
    choose_mass        the mass of highest mean IoU on one split (the caller holds out another)
    cell_object        the object under a pick's grid cell: what the latent fires on
    tracks_concept     whether a latent's top picks land on one shape, colour or texture
    off_object_mass    the share of a map's positive mass outside an object (non-locality)
    gradient_maps      Integrated Gradients of the latent (Captum)

AttnLRP of a latent is `pipeline.evaluation.lrp.attn_lrp_of` with the latent's readout
(`pipeline.cafe.stage.latent_readout`) as the value explained.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.cafe.groundtruth import GTObject
from pipeline.cafe.masks import iou, mass_masks

ATTRIBUTES = ("shape", "colour", "texture")


def iou_curve(maps: Tensor, objects: Sequence[np.ndarray], masses: Sequence[float]) -> np.ndarray:
    """IoU of each map's mass mask with its object, per mass: float64[M, len(masses)].

    maps: Tensor[M, H, W] signed relevance (only the positive part builds a mask, `mass_masks`);
    objects[i]: bool[H, W], the object map i is scored against. [choice] Every method's map is
    scored against the same object (the one under the pick, `cell_object`), so no method picks
    the object that suits it.
    """
    out = np.zeros((len(maps), len(masses)))
    for k, mass in enumerate(masses):
        masks = mass_masks(maps, mass)[0].cpu().numpy()
        out[:, k] = [iou(m, o) for m, o in zip(masks, objects)]
    return out


def choose_mass(masses: Sequence[float], curve: np.ndarray) -> float:
    """The mass of highest mean IoU over the rows of `curve` (float[M, len(masses)], one split
    only: the value is then reported on another); the smallest such mass on ties."""
    return float(masses[int(np.argmax(curve.mean(0)))])


def cell_object(position: int, grid: tuple[int, int], objects: Sequence[GTObject]) -> int | None:
    """Index of the object whose visible mask holds the centre pixel of grid cell `position`
    (row-major over `grid`, prefix tokens excluded), or None over the background. The masks are
    in the model's input frame; the cell centre is where the upsampled activation map peaks."""
    if not objects:
        return None
    h, w = objects[0].mask.shape
    row, col = divmod(position, grid[1])
    y, x = int((row + 0.5) * h / grid[0]), int((col + 0.5) * w / grid[1])
    hits = [i for i, o in enumerate(objects) if o.mask[y, x]]
    # later objects are drawn on top; visible masks do not overlap, so at most one hit
    return hits[-1] if hits else None


def tracks_concept(hits: Sequence[GTObject | None], share: float = 0.75) -> bool:
    """True when every top pick of a latent lands on an object (`hits`, its `cell_object`s) and at
    least `share` of them agree on one shape, colour or texture (at least two picks)."""
    if len(hits) < 2 or any(h is None for h in hits):
        return False
    for attr in ATTRIBUTES:
        values = [getattr(h, attr) for h in hits]
        if max(values.count(v) for v in set(values)) >= share * len(hits):
            return True
    return False


def off_object_mass(maps: Tensor, objects: Sequence[np.ndarray]) -> np.ndarray:
    """The share of each map's positive mass outside its object: float64[M] (nan for a map with
    no positive mass). maps Tensor[M, H, W]; objects[i] bool[H, W]."""
    pos = maps.clamp(min=0).double().cpu().numpy()
    total = pos.reshape(len(pos), -1).sum(1)
    inside = np.array([p[o].sum() for p, o in zip(pos, objects)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - inside / total, np.nan)


def gradient_maps(readout: Callable[[Tensor], Tensor], x: Tensor, steps: int = 32,
                  internal_batch: int = 16) -> Tensor:
    """Integrated Gradients (Captum, Riemann midpoints, baseline 0: the dataset mean after
    normalisation, as the faithfulness check's) of a latent readout (`latent_readout` with
    grad=True): x Tensor[N, 3, H, W] -> Tensor[N, H, W], channels summed with their sign."""
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(readout)
    attr = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=steps, method="riemann_middle",
                        internal_batch_size=internal_batch)
    return attr.sum(1).detach()
