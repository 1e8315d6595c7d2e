"""Public SRD API: class saliency, hidden-layer relevance, iERFs (docs/method.md §§3-4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.srd.adapters import build
from pipeline.srd.graph import Graph, Unit, propagate
from pipeline.srd.heads import Head, resolve_target


@dataclass
class SRDResult:
    """Relevance of S seeds per image. `pixels` + `constant` sums to the seed total per seed:
    `constant` is the share that fell on constants with no pixel source (ViT CLS / register /
    position embeddings, biases of all-zero branches, zero pre-activations); never dropped."""

    pixels: Tensor  # [N, S, H, W]
    constant: Tensor  # [N, S]
    layers: dict[str, Tensor]  # layer -> [N, S, P] relevance in tap layout (prefix tokens first)
    target: Tensor | None = None  # [N] class seeded (class maps only)
    logit: Tensor | None = None  # [N] its logit: the seed total with the identity contrastive rule


def explain(model: nn.Module, images: Tensor, target: int | Tensor | None = None,
            contrastive: bool = False, head: str = "exact", layers: tuple[str, ...] = (), *,
            differentiable: bool = False, reference: bool = False) -> SRDResult:
    """SRD of the class logit (S = 1): images [N, 3, H, W] -> SRDResult with pixels [N, 1, H, W].

    head: "exact" decomposes the classifier head exactly (GAP + linear, CLS token, mean-pool,
    VGG FC layers); "gradcam" (VGG only) seeds Grad-CAM at the last conv as the reference does.
    differentiable: every tensor of the result is a differentiable function of `images` (the
    recorded activations, hence the frozen pattern and the sharing ratios, stay on the autograd
    graph; weights are constants). Off by default: no graph is built. Where the model has
    ReLU-type kinks the map is only piecewise smooth (the attack's smooth copy replaces them).
    reference: reproduce the authors' ResNet code where the project differs on purpose (tied
    max-pool taps duplicated, BN shifts without eps, the contrastive mean over the batch, their
    layer names; docs/method.md §3.7); Bottleneck ResNets only.
    """
    graph, seed_head = build(model, images, head, differentiable, reference)
    return _explain(graph, seed_head, target, contrastive, tuple(layers))


def _explain(graph: Graph, seed_head: Head, target: int | Tensor | None, contrastive: bool,
             layers: tuple[str, ...]) -> SRDResult:
    y = resolve_target(graph.logits, target)
    units = {name: graph.unit(name).name for name in layers}
    seed, direction, offset = seed_head.start(y)
    res = propagate(graph, seed_head.unit, seed.unsqueeze(1),
                    None if direction is None else direction.unsqueeze(1), contrastive,
                    tuple(units.values()), None if offset is None else offset.unsqueeze(1),
                    stream=seed_head.stream)
    missing = [name for name, unit in units.items() if unit not in res.layers]
    if missing:
        raise ValueError(f"layers {missing} lie above the seed of the head: they get no relevance")
    kept = {name: res.layers[unit].flatten(2) for name, unit in units.items()}
    return SRDResult(res.pixels, res.constant, kept, y, graph.logits.gather(1, y[:, None])[:, 0])


def saliency(model: nn.Module, images: Tensor, target: int | Tensor | None = None,
             contrastive: bool = False, *, head: str = "exact", return_constant: bool = False,
             differentiable: bool = False, reference: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """SRD saliency map of class `target` (None: the predicted class): images [N, 3, H, W] ->
    Tensor[N, H, W]. contrastive: R <- R - mean(R) on the seed map. With return_constant, also
    the constant share Tensor[N] (pixel sum + constant = logit when contrastive is False).
    differentiable: the map as a differentiable function of `images`; reference: the authors'
    ResNet code's behaviour (see `explain`)."""
    res = explain(model, images, target, contrastive, head, differentiable=differentiable,
                  reference=reference)
    maps = res.pixels[:, 0]
    return (maps, res.constant[:, 0]) if return_constant else maps


def relevance(model: nn.Module, images: Tensor, target: int | Tensor | None,
              layers: list[str] | tuple[str, ...], *, contrastive: bool = False,
              head: str = "exact", reference: bool = False) -> dict[str, Tensor]:
    """Hidden-layer relevance R(z) = R(v) of the class logit: {layer: Tensor[N, h, w]} on each
    layer's spatial grid (for ViT layers the patch tokens; the prefix tokens' relevance is in
    `explain(...).layers` in tap layout). With `reference`, layers may be named as the authors'
    code names them (`layer4.1` is the input of that block; see `explain`)."""
    graph, seed_head = build(model, images, head, reference=reference)
    res = _explain(graph, seed_head, target, contrastive, tuple(layers))
    out = {}
    for name, r in res.layers.items():
        unit = graph.unit(name)
        out[name] = r[:, 0, unit.prefix:].reshape(r.shape[0], *unit.grid)
    return out


def ierf(model: nn.Module, images: Tensor, layer: str, seeds: Tensor,
         direction: Tensor | None = None, *, offset: Tensor | None = None,
         return_constant: bool = False, chunk: int = 64, graph: Graph | None = None,
         reference: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Instance-specific effective receptive fields (docs/method.md §4): images [N, 3, H, W] ->
    Tensor[N, S, H, W], one signed map per seed; map + constant share (returned as Tensor[N, S]
    with return_constant) is the seed total, or with `direction` the seeded readout.

    `layer` is a module path; the seed sits on that module's output, the post-activation PFVs v,
    and relevance passes to the pre-activation z of the same unit (R(z) = R(v)): for a ReLU/BN
    layer z is the activation's input; for a residual-stream layer (ViT `blocks.i`, EfficientNet
    blocks) z is the sum the block's attention/skip decomposition targets (see families/).
    seeds: LongTensor[S] or [N, S] of positions in tap layout (row-major h*w for CNNs, token
    index for ViTs, prefix tokens first) for one-hot seeds, or float Tensor[N, S, P] seed maps.
    direction: Tensor[S, C] or [N, S, C], a linear readout f_r = <w, v_r> + offset per seed (an
    SAE latent: w = scale * W_enc[f], offset = b_enc[f] - W_enc[f] . b_dec, so f_r is its
    pre-activation). The seeds are then its coefficients: a one-hot seed decomposes f_r, a seed
    map sum_r alpha_r f_r. The first step shares the data term <w, v_r> over the contributions
    to z_r by <u, c(p->r)> (u: w pulled back onto z; no division, so a pixel's sign is the sign
    of its effect on the readout), ordinary PFV ratios below; the offset (Tensor[S] or [N, S])
    and the part of <w, v_r> no contribution carries are constant share (latent iERF).
    Seeds are propagated `chunk` at a time (the frozen pattern is recorded once); pass
    `graph=srd.build(model, images)[0]` to reuse one recording across calls. `reference`: the
    authors' ResNet rules and layer names (see `explain`), for a graph built here (a given
    `graph` was built with or without them: `srd.build(..., reference=True)`).
    """
    if graph is not None and reference:
        raise ValueError("reference=True with a given graph: build that graph with srd.build(..., reference=True)")
    graph = graph if graph is not None else build(model, images, reference=reference)[0]
    unit = graph.unit(layer)
    seed = _seed_maps(unit, seeds, images.shape[0])
    if direction is not None:
        direction = direction.to(images.dtype).expand(seed.shape[0], *direction.shape[-2:])
    if offset is not None:
        offset = offset.to(images.dtype).expand(seed.shape[0], offset.shape[-1])
    maps, consts = [], []
    for lo in range(0, seed.shape[1], chunk):
        d = None if direction is None else direction[:, lo:lo + chunk]
        o = None if offset is None else offset[:, lo:lo + chunk]
        res = propagate(graph, unit.name, seed[:, lo:lo + chunk], d, offset=o)
        maps.append(res.pixels)
        consts.append(res.constant)
    maps_t, const_t = torch.cat(maps, 1), torch.cat(consts, 1)
    return (maps_t, const_t) if return_constant else maps_t


def _seed_maps(unit: Unit, seeds: Tensor, n: int) -> Tensor:
    """One-hot seeds from positions, or reshaped seed maps: -> [N, S, *pos] on `unit`."""
    pos = unit.z.shape[2:]
    if seeds.dtype.is_floating_point:
        return seeds.to(unit.z.dtype).reshape(n, seeds.shape[-2], *pos)
    idx = seeds.to(unit.z.device).long()
    idx = idx.expand(n, idx.shape[-1]) if idx.dim() == 1 else idx
    if (idx < 0).any() or (idx >= unit.positions).any():
        raise ValueError(f"seed positions must lie in [0, {unit.positions}) on layer {unit.name!r}")
    onehot = unit.z.new_zeros(n, idx.shape[1], unit.positions)
    onehot.scatter_(2, idx.unsqueeze(2), 1.0)
    return onehot.reshape(n, idx.shape[1], *pos)
