"""Latent iERFs of exemplars, batched per image (docs/method.md §4, "iERF of an SAE latent").

For one image batch the frozen pattern is recorded once (`srd.build`) and the seeds of every
exemplar on those images travel together through one `srd.ierf` call per layer: the sharing
ratios depend on the image only, so S seeds cost one pass with S in the batch dimension.

Latent readout. The SAE reads a PFV v as pre_f(v) = <w, v> + offset with w = scale * W_enc[f]
and offset = b_enc[f] - W_enc[f] . b_dec (`SAE.readout`). The latent iERF decomposes the data
term <w, v_r> over the pixels along the latent's direction and books the offset (what the latent
has without any input) as constant share, so a map plus its constant is pre_f(v_r), and a pixel
is positive exactly where it raises the latent, also where the latent fires through its bias
(<w, v_r> <= 0 < pre_f). [choice] CAFE reads a map as shares of the latent's pre-activation
(`as_shares`): divided by pre_f(v_r) > 0, a map sums to 1 - ierf_constant.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline import srd
from pipeline.srd.graph import Graph


def as_shares(maps: Tensor, constants: Tensor) -> tuple[Tensor, Tensor]:
    """Latent iERFs in readout units (maps [S, H, W] + constants [S] = pre_f(v_r)) -> shares of
    the pre-activation: both divided by |pre_f(v_r)|. At a pick the latent fires, pre_f > 0, and
    a map then sums to 1 - constant; the absolute value keeps each pixel's sign (its effect on
    the latent) should a recomputed pre-activation not be positive (PFVs stored as float16)."""
    pre = (maps.flatten(1).sum(1) + constants).abs()
    den = torch.where(pre > 0, pre, torch.ones_like(pre))
    return maps / den[:, None, None], constants / den


def batched_latent_ierfs(model: nn.Module, graph: Graph, images: Tensor, layer: str,
                         positions: Sequence[Tensor], directions: Sequence[Tensor],
                         offsets: Sequence[Tensor], chunk: int = 64) -> tuple[list[Tensor], list[Tensor]]:
    """Latent iERFs of a ragged set of seeds over one recorded image batch.

    images: Tensor[N, 3, H, W], the batch `graph` was recorded on (`srd.build(model, images)`).
    positions[i]: LongTensor[S_i] seed positions on `layer` (tap layout) of image i;
    directions[i]: Tensor[S_i, C] and offsets[i]: Tensor[S_i], each seed's latent readout
    (`SAE.readout`). Returns per image (maps Tensor[S_i, H, W], constants Tensor[S_i]) with
    map sum + constant = the latent's pre-activation at its position. Images with fewer seeds
    than the most loaded one are padded with copies of one of their seeds (an image with none
    with a zero direction and offset, whose maps are zero), and the copies dropped.
    """
    n = images.shape[0]
    if not len(positions) == len(directions) == len(offsets) == n:
        raise ValueError(f"{len(positions)} position, {len(directions)} direction and {len(offsets)} "
                         f"offset lists for {n} images: expected one of each per image")
    width = max((len(p) for p in positions), default=0)
    if width == 0:
        return [images.new_zeros(0, *images.shape[2:])] * n, [images.new_zeros(0)] * n
    channels = next(d.shape[1] for d in directions if len(d))
    pos = torch.zeros(n, width, dtype=torch.long)
    dirs = images.new_zeros(n, width, channels)
    offs = images.new_zeros(n, width)
    for i, (p, d, o) in enumerate(zip(positions, directions, offsets)):
        if len(p):
            fill = torch.arange(width).clamp(max=len(p) - 1)
            pos[i] = p.long().cpu()[fill]
            dirs[i], offs[i] = d.to(dirs)[fill.to(dirs.device)], o.to(offs)[fill.to(offs.device)]
    maps, consts = srd.ierf(model, images, layer, pos.to(images.device), dirs, offset=offs,
                            return_constant=True, chunk=chunk, graph=graph)
    sizes = [len(p) for p in positions]
    return [maps[i, :s] for i, s in enumerate(sizes)], [consts[i, :s] for i, s in enumerate(sizes)]
