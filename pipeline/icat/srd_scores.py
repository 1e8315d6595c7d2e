"""The SRD-style ICAT variant: sharing ratios across the layer pair (docs/method.md §7).

Construction (no gradients, one recorded forward):
1. Seed the downstream node on lb's unit of the SRD graph (pipeline.srd): for a latent g, its
   pre-activation read at every position where it is active, `g(x) = sum_r [a_g(r) > 0] pre_g(v_r)`
   (the selection frozen), as a linear readout: coefficients `[a_g(r) > 0]` along g's
   `SAE.readout`, whose data term the first step decomposes along g's direction and whose
   offset (`b_g - W_enc[g] . b_dec` per active position) is constant share (the latent iERF
   rule of docs/method.md §4); for a class logit, the exact head seed (`R_p = (w_y . v_p + b_y) / n`
   for a pooled head, the class readout of the CLS token for a CLS head, §3.3).
2. Propagate with the SRD rules through the blocks strictly between la and lb only (the
   graph is cut at la's unit, which plays the input), giving R(v_p) on la's positions; by
   conservation `sum_p R(v_p)` = the seed total (up to the reported constant share).
3. Share R(v_p) among the terms of la's SAE decomposition `v_p = sum_f c_fp + e_p` with
   `c_fp = a_fp W_dec[:, f] / scale` and `e_p = err_p + b_dec / scale`, by the same sharing
   ratio as SRD itself: `mu(f, p) = <c_fp, v_p> / ||v_p||^2`; the error node takes e_p's share
   plus the relevance of positions the SAE does not read (ViT prefix tokens) and the constant
   share of step 2, so `sum_f srd_f + error = g(x)` exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.icat.attribution import Decomposed, LayerSAE
from pipeline.srd import build
from pipeline.srd.graph import Graph, propagate


def _cut(graph: Graph, src_unit: str, dst_unit: str) -> Graph:
    """The sub-graph of the blocks after `src_unit` up to `dst_unit`, with `src_unit` as input."""
    targets = [b.target for b in graph.blocks]
    lo = targets.index(src_unit) + 1 if src_unit in targets else 0
    hi = targets.index(dst_unit) + 1 if dst_unit in targets else lo
    return Graph(graph.units, graph.blocks[lo:hi], graph.aliases, graph.logits, input=src_unit)


@torch.no_grad()
def srd_scores(model: nn.Module, images: Tensor, dec: Decomposed, down: LayerSAE | None,
               down_acts: Tensor | None, image: Tensor, node: Tensor,
               chunk: int = 64) -> Tensor:
    """SRD-variant scores Tensor[Q, F + 1] (last column the error node) of rows (image, node).

    images: Tensor[N, 3, H, W] of the batch `dec` decomposes; down: lb's SAE (None: logits);
    down_acts: Tensor[N, P_b, F_b] lb's SAE activations on the recorded input (latents only).
    """
    graph, head = build(model, images)
    src = graph.unit(dec.up.layer)
    dst_name = head.unit if down is None else graph.unit(down.layer).name
    sub = _cut(graph, src.name, dst_name)
    n, positions = images.shape[0], src.positions
    out = dec.acts.new_zeros(len(image), dec.acts.shape[-1] + 1)
    for lo in range(0, len(image), chunk):
        rows, nodes = image[lo:lo + chunk], node[lo:lo + chunk]
        q = len(rows)
        # one seed per row, placed on its own image (zero on the others): [N, Q, *pos]
        dst_unit = graph.units[dst_name]
        seed = dst_unit.z.new_zeros(n, q, dst_unit.positions)
        cols = torch.arange(q, device=seed.device)
        direction = offset = None
        if down is None:
            if head.readout is not None:  # a CLS head: one class readout per row
                direction = seed.new_zeros(n, q, dst_unit.z.shape[1])
                offset = seed.new_zeros(n, q)
            for c in nodes.unique():  # the head seeds one class for every image at a time
                sel = (nodes == c).nonzero()[:, 0]
                r, d, o = head.start(torch.full((n,), int(c), device=seed.device))
                seed[rows[sel], cols[sel]] = r.reshape(n, -1)[rows[sel]].to(seed.dtype)
                if d is not None:
                    direction[rows[sel], cols[sel]] = d[rows[sel]].to(seed.dtype)
                    offset[rows[sel], cols[sel]] = o[rows[sel]].to(seed.dtype)
        else:
            active = (down_acts[rows, :, nodes] > 0).to(seed.dtype)  # [Q, P_b], frozen selection
            seed[rows[:, None], cols[:, None], down.positions[None, :]] = active
            w, b = down.sae.readout(nodes)  # pre_g(v) = <w, v> + b
            direction = seed.new_zeros(n, q, w.shape[-1])
            offset = seed.new_zeros(n, q)
            direction[rows, cols], offset[rows, cols] = w.to(seed.dtype), b.to(seed.dtype)
        # a CLS head keeps its class direction down the CLS token's stream, as in class maps
        stream = head.stream if down is None and head.readout is not None else None
        res = propagate(sub, dst_name, seed.reshape(n, q, *dst_unit.z.shape[2:]), direction,
                        offset=offset, stream=stream)
        rel = res.pixels.reshape(n, q, positions)[rows, cols]  # [Q, P]
        constant = res.constant[rows, cols]
        out[lo:lo + q] = _share(dec, rows, rel, constant)
    return out


def _share(dec: Decomposed, rows: Tensor, rel: Tensor, constant: Tensor) -> Tensor:
    """Split R(v_p) [Q, P] among la's SAE terms: -> [Q, F + 1] (error last)."""
    sae = dec.up.sae
    v = dec.pfvs[rows][:, dec.up.positions].to(sae.W_dec.dtype)  # [Q, P_s, C]
    norm2 = (v * v).sum(-1)
    ok = norm2 > torch.finfo(norm2.dtype).tiny
    ratio_r = torch.where(ok, rel[:, dec.up.positions] / torch.where(ok, norm2, 1.0), 0.0)
    # <c_fp, v_p> = a_fp <W_dec[:, f], v_p> / scale
    proj = (v @ sae.W_dec) / sae.scale  # [Q, P_s, F]
    latents = (dec.acts[rows] * proj * ratio_r[..., None]).sum(1)
    error = rel.sum(1) + constant - latents.sum(1)
    return torch.cat([latents, error[:, None]], 1)
