"""The geometric median of a point cloud (Weiszfeld's algorithm), used to initialise b_dec.

The geometric median minimises the sum of Euclidean distances, so a few outlier PFVs (e.g. a
ViT's high-norm register tokens) barely move it, unlike the mean.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(
    points: Tensor, max_iter: int = 100, tol: float = 1e-6, eps: float = 1e-8
) -> Tensor:
    """Weiszfeld iterations from the mean, vectorised over the points.

    Args:
        points: Tensor[N, D], N >= 1.
        max_iter: iteration cap.
        tol: stop when the estimate moves less than `tol` times its norm scale.
        eps: floor on distances, so a point that coincides with the estimate gets a finite
            (large) weight instead of a division by zero.

    Returns:
        Tensor[D] in the dtype of `points` (computed in float64 for stable weights).
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(
            f"geometric_median expects Tensor[N>=1, D], got shape {tuple(points.shape)}"
        )
    x = points.to(torch.float64)
    median = x.mean(dim=0)
    scale = x.norm(dim=1).mean().clamp_min(eps)
    for _ in range(max_iter):
        # weight of each point: inverse distance to the current estimate
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(dim=0) / weights.sum()
        moved = (new - median).norm()
        median = new
        if moved <= tol * scale:
            break
    return median.to(points.dtype)
