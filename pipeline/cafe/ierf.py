"""Latent iERFs of exemplars, batched per image (docs/method.md §4, "iERF of an SAE latent").

For one image batch the frozen pattern is recorded once (`srd.build`) and the seeds of every
exemplar on those images travel together through one `srd.ierf` call per layer: the sharing
ratios depend on the image only, so S seeds cost one pass with S in the batch dimension.

Latent direction. The SAE reads a PFV v as pre_f = scale * w_f . v - w_f . b_dec + b_f
(`pipeline.sae.model`: inputs are multiplied by the stored scale, b_dec is subtracted, w_f is
row f of W_enc). Only scale * w_f . v depends on the PFV, and scale > 0, so the latent's
direction on v is w_f = W_enc[f] up to a positive factor, which the directional sharing ratio
is invariant to. [choice] The seed is one-hot with value 1 at the exemplar's position, so a map
sums to 1 - ierf_constant: pixel relevance as a share of the latent's evidence.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline import srd
from pipeline.srd.graph import Graph


def latent_directions(w_enc: Tensor, latents: Tensor) -> Tensor:
    """Directions w_f on the tapped PFVs of the given latents: Tensor[S, d_in]."""
    return w_enc.detach()[latents.to(w_enc.device).long()]


def batched_latent_ierfs(model: nn.Module, graph: Graph, images: Tensor, layer: str,
                         positions: Sequence[Tensor], directions: Sequence[Tensor],
                         chunk: int = 64) -> tuple[list[Tensor], list[Tensor]]:
    """Latent iERFs of a ragged set of seeds over one recorded image batch.

    images: Tensor[N, 3, H, W], the batch `graph` was recorded on (`srd.build(model, images)`).
    positions[i]: LongTensor[S_i] seed positions on `layer` (tap layout) of image i;
    directions[i]: Tensor[S_i, C].
    Returns per image (maps Tensor[S_i, H, W], constants Tensor[S_i]). Images with fewer seeds
    than the most loaded one are padded with copies of one of their seeds (an image with none
    with a zero direction, whose relevance is all booked as constant), and the copies dropped.
    """
    n = images.shape[0]
    if len(positions) != n or len(directions) != n:
        raise ValueError(f"{len(positions)} position and {len(directions)} direction lists for "
                         f"{n} images: expected one of each per image")
    width = max((len(p) for p in positions), default=0)
    if width == 0:
        return [images.new_zeros(0, *images.shape[2:])] * n, [images.new_zeros(0)] * n
    channels = next(d.shape[1] for d in directions if len(d))
    pos = torch.zeros(n, width, dtype=torch.long)
    dirs = images.new_zeros(n, width, channels)
    for i, (p, d) in enumerate(zip(positions, directions)):
        if len(p):
            fill = torch.arange(width).clamp(max=len(p) - 1)
            pos[i], dirs[i] = p.long().cpu()[fill], d.to(dirs)[fill.to(dirs.device)]
    maps, consts = srd.ierf(model, images, layer, pos.to(images.device), dirs,
                            return_constant=True, chunk=chunk, graph=graph)
    sizes = [len(p) for p in positions]
    return [maps[i, :s] for i, s in enumerate(sizes)], [consts[i, :s] for i, s in enumerate(sizes)]
