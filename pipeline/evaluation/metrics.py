"""Saliency metrics (docs/method.md §8): localisation, sparseness, fidelity, stability.

Every function takes batched maps `Tensor[N, H, W]` (one signed map per image, already reduced
over colour channels) and returns one value per image, so a caller can average, split by class
or bootstrap as it likes.
"""
from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import Tensor, nn

Score = Literal["prob", "logit"]


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """1.0 where the map's maximum lies inside the mask, else 0.0: maps [N, H, W], masks bool
    [N, H, W] -> Tensor[N]. **[choice]** no tolerance radius (Zhang et al. use 15 px at 224 px;
    the synthetic objects fill 9-25% of a 128 px image, so a strict hit is already lenient).
    Ties go to the first maximum in row-major order."""
    _check_same(maps, masks)
    top = maps.flatten(1).argmax(1)
    return masks.flatten(1).gather(1, top[:, None])[:, 0].float()


def class_switch_maps(explain: Callable[[Tensor, Tensor], Tensor], images: Tensor,
                      objects: list[list[tuple[int, Tensor]]], batch: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """The maps of a class-switch game: each image explained once per class of the objects it
    holds (the same image, only the target switched).

    explain: (images [B, 3, H, W], target [B]) -> maps [B, H, W]; images [N, 3, H, W];
    objects[i]: image i's (class, mask bool [H, W]) pairs, at least two classes per image (a
    class's mask is the union of its objects). Returns (maps [P, H, W], masks bool [P, H, W],
    image [P]) over the pairs, image by image in the order given."""
    if len(objects) != images.shape[0]:
        raise ValueError(f"{len(objects)} object lists for {images.shape[0]} images: expected one per image")
    few = [i for i, objs in enumerate(objects) if len({c for c, _ in objs}) < 2]
    if few:
        raise ValueError(f"images {few[:5]} hold fewer than two classes: a class switch needs two or more")
    index = torch.tensor([i for i, objs in enumerate(objects) for _ in objs])
    target = torch.tensor([c for objs in objects for c, _ in objs], device=images.device)
    masks = torch.stack([m for objs in objects for _, m in objs]).to(images.device)
    maps = torch.cat([explain(images[index[lo:lo + batch]], target[lo:lo + batch])
                      for lo in range(0, len(index), batch)])
    return maps, masks, index


def class_switch_pointing(explain: Callable[[Tensor, Tensor], Tensor], images: Tensor,
                          objects: list[list[tuple[int, Tensor]]], batch: int = 16) -> Tensor:
    """Class-switch pointing game: a pair (image, class) scores 1.0 when that class's map peaks
    inside that class's object, so a map that ignores the class cannot score on every pair.
    Arguments as `class_switch_maps`; returns Tensor[P] over its pairs. Peaks as `pointing_game`
    (no tolerance, first maximum)."""
    maps, masks, _ = class_switch_maps(explain, images, objects, batch)
    return pointing_game(maps, masks)


def one_peak_cell(maps: Tensor, image: Tensor, cell: int) -> Tensor:
    """Per image of a class-switch game, whether the maps of all its classes peak in one and the
    same `cell` x `cell` square of the grid laid from the top-left corner (a map whose peak does
    not move with the class; the pointing score alone cannot tell it from one that moves to the
    wrong object). maps [P, H, W], image [P] (from `class_switch_maps`) -> bool Tensor[N] over the
    images in order of first appearance."""
    if cell < 1:
        raise ValueError(f"cell={cell}: expected a side of at least 1 pixel")
    if maps.shape[0] != image.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps for {image.shape[0]} image indices: expected one per map")
    top = maps.flatten(1).argmax(1)
    width = maps.shape[2]
    cells = (top // width // cell) * ((width + cell - 1) // cell) + top % width // cell
    image = image.to(cells.device)
    return torch.tensor([cells[image == i].unique().numel() == 1 for i in image.unique_consecutive()])


def mask_mass(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass inside the mask (attribution localisation, Kohlbrenner et al. 2020): the
    share of the map's *positive* relevance that falls inside the mask, maps [N, H, W], masks
    bool [N, H, W] -> Tensor[N] in [0, 1]; NaN for a map with no positive value."""
    _check_same(maps, masks)
    pos = maps.clamp(min=0).flatten(1)
    total = pos.sum(1)
    inside = (pos * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(pos.dtype).tiny),
                       torch.full_like(total, float("nan")))


def gini(maps: Tensor) -> Tensor:
    """Sparseness: Gini index of |map| (Chalasani et al. 2020), maps [N, H, W] -> Tensor[N] in
    [0, 1 - 1/n]: 0 for a constant map, 1 - 1/n for a one-hot map of n pixels; NaN for an
    all-zero map. G = 1 - 2 sum_i (a_(i) / ||a||_1) (n - i + 1/2) / n with a ascending."""
    a = maps.abs().flatten(1).double().sort(1).values
    n = a.shape[1]
    total = a.sum(1)
    weights = (n - torch.arange(1, n + 1, dtype=a.dtype, device=a.device) + 0.5) / n
    g = 1 - 2 * (a * weights).sum(1) / total.clamp(min=torch.finfo(a.dtype).tiny)
    return torch.where(total > 0, g, torch.full_like(g, float("nan"))).to(maps.dtype)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two batches of maps [N, H, W] -> Tensor[N]; NaN where a map is
    constant (its correlation is undefined, e.g. an all-zero Grad-CAM)."""
    _check_same(a, b)
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(1) / den.clamp(min=torch.finfo(a.dtype).tiny)
    return torch.where(den > 0, r, torch.full_like(r, float("nan"))).float()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of two batches of maps [N, H, W] -> Tensor[N] (scikit-image, 7x7 windows).
    **[choice]** each map is divided by its own max |value| first (saliency maps have arbitrary
    scale) and the data range is then that of signed unit maps, 2; NaN for an all-zero map."""
    _check_same(a, b)
    out = []
    for x, y in zip(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()):
        sx, sy = np.abs(x).max(), np.abs(y).max()
        out.append(float("nan") if sx == 0 or sy == 0 else
                   structural_similarity(x / sx, y / sy, data_range=2.0))
    return torch.tensor(out, dtype=torch.float32)


def unit_maps(maps: Tensor) -> Tensor:
    """Maps [N, H, W] scaled to unit L2 norm (all-zero maps stay zero): the scale-free form the
    manipulation attack compares (Dombrowski et al. normalise maps likewise)."""
    norm = maps.flatten(1).norm(dim=1).clamp(min=torch.finfo(maps.dtype).tiny)
    return maps / norm.reshape(-1, 1, 1)


def blur_baseline(images: Tensor, sigma_frac: float = 0.05) -> Tensor:
    """Gaussian blur of images [N, 3, H, W] with sigma = sigma_frac * H (RISE: sigma 5 at 224)."""
    from torchvision.transforms.functional import gaussian_blur

    sigma = max(sigma_frac * images.shape[-2], 0.5)
    kernel = 2 * int(round(3 * sigma)) + 1
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def mean_baseline(images: Tensor) -> Tensor:
    """Each image's own per-channel mean colour, images [N, 3, H, W] -> same shape."""
    return images.mean((2, 3), keepdim=True).expand_as(images).clone()


BASELINES: dict[str, Callable[[Tensor], Tensor]] = {"blur": blur_baseline, "mean": mean_baseline}


def pixel_order(maps: Tensor, seed: int = 0) -> Tensor:
    """Pixel indices [N, H*W] from the most to the least relevant (signed, descending).
    **[choice]** ties (the zero plateau of a ReLU'd CAM) are broken by a seeded random
    permutation, not by pixel index, so a plateau is not filled top-left first."""
    n, hw = maps.shape[0], maps[0].numel()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(hw, generator=gen) for _ in range(n)]).to(maps.device)
    shuffled = maps.flatten(1).gather(1, perm)
    idx = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return perm.gather(1, idx)


@torch.no_grad()
def insertion_deletion_curve(model: nn.Module, images: Tensor, order: Tensor, target: Tensor,
                             baseline: Tensor, mode: Literal["insertion", "deletion"],
                             steps: int = 32, score: Score = "prob", batch: int = 64) -> Tensor:
    """Score of class `target` along an insertion or deletion path: images [N, 3, H, W], order
    [N, H*W] (pixel indices, most relevant first), baseline [N, 3, H, W] -> Tensor[N, steps + 1]
    at fractions k / steps of the pixels. Deletion replaces the first pixels of `order` by the
    baseline's, insertion starts from the baseline and puts them back. All colour channels of a
    pixel move together. score: softmax probability ("prob") or the raw logit ("logit")."""
    if mode not in ("insertion", "deletion"):
        raise ValueError(f"mode must be 'insertion' or 'deletion', got {mode!r}")
    if score not in ("prob", "logit"):
        raise ValueError(f"score must be 'prob' or 'logit', got {score!r}")
    n, c, h, w = images.shape
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long().to(order.device)
    # moved[i, k, p]: pixel p of image i is past the k-th cut of the ordering
    moved = (rank[:, None, :] < counts[None, :, None]).reshape(n, steps + 1, 1, h, w)
    start, end = (baseline, images) if mode == "insertion" else (images, baseline)
    out = torch.empty(n, steps + 1, device=images.device)
    for i in range(n):
        path = torch.where(moved[i], end[i], start[i])  # [steps + 1, 3, H, W]
        for lo in range(0, steps + 1, batch):
            logits = model(path[lo:lo + batch])
            vals = logits.softmax(1) if score == "prob" else logits
            out[i, lo:lo + batch] = vals[:, target[i]]
    return out


def auc(curve: Tensor) -> Tensor:
    """Area under curves [N, K + 1] sampled at K + 1 even fractions of [0, 1] (trapezoid)."""
    k = curve.shape[1] - 1
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / (2 * k)


def _check_same(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"expected two [N, H, W] batches of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def stability(explain: Callable[[Tensor, Tensor], Tensor], images: Tensor, target: Tensor,
              sigma: Tensor | float, draws: int = 2, seed: int = 0,
              clean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stability under small input noise: mean over `draws` of the Pearson correlation and the
    SSIM between the map of x and the map of x + N(0, sigma^2), the class held at `target`.
    explain: (images [N, 3, H, W], target [N]) -> maps [N, H, W]; sigma: a float or a
    per-channel Tensor[3] in the units of `images`; clean: the maps of x when already computed.
    Returns (corr [N], ssim [N])."""
    clean = explain(images, target) if clean is None else clean
    sigma_t = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    corrs, ssims = [], []
    for _ in range(draws):
        noise = torch.randn(images.shape, generator=gen).to(images) * sigma_t
        noisy = explain(images + noise, target)
        corrs.append(pearson(clean, noisy))
        ssims.append(ssim(clean, noisy))
    return torch.stack(corrs).nanmean(0), torch.stack(ssims).nanmean(0)
