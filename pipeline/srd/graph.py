"""The decomposition graph and SRD propagation (docs/method.md §§1-4).

A `Unit` is one PFV layer: its pre-activation `z` and post-activation `v = sigma(z)` (docs/method.md
§1), both channel-first `[N, C, *pos]` (`pos` = `(H, W)` for a CNN map, `(T,)` for ViT tokens).
A `Block` is the affine map between nonlinearities that produces one unit's `z` from earlier
units' `v`; each `Rule` in it is one branch (main path, shortcut, attention, ...) with its own
bias, shared by norm among that branch's contributions (docs/method.md §2).

Relevance tensors are `[N, S, *pos]`: S seeds per image propagate together (section 4,
"batching"). The share of relevance that falls on constants with no pixel source is collected in
`constant` (`[N, S]`) so that, per seed, pixel sum + constant = seed sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor


class Rule(Protocol):
    """One branch of a block: how its contributions c(p->q) to the target are shared back."""

    source: str
    bias: Tensor | None  # the branch's bias, broadcastable to the target [N, C, *pos]

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        """Sum_q <c(p->q) without the bias share, g_q>: g [N,S,C,*pos_t] -> [N,S,*pos_src]."""

    def norm_total(self) -> Tensor:
        """Sum_p ||c0(p->q)|| over this branch's sources p: [N, *pos_t]."""

    def scatter(self, beta: Tensor) -> Tensor:
        """Sum_q ||c0(p->q)|| * beta_q: beta [N,S,*pos_t] -> [N,S,*pos_src]."""


@dataclass
class Unit:
    """One PFV layer. `pull` maps a direction on `v` ([N,S,C] or [N,S,C,*pos]) to the equivalent
    direction on `z` ([N,S,C,*pos]); None means the element-wise frozen gate v/z (section 4)."""

    name: str
    z: Tensor
    v: Tensor
    pull: Callable[[Tensor], Tensor] | None = None
    prefix: int = 0  # leading non-spatial positions (ViT CLS/register tokens)
    grid: tuple[int, ...] = ()  # spatial shape of the non-prefix positions

    def __post_init__(self) -> None:
        if not self.grid:
            self.grid = tuple(self.z.shape[2:])

    @property
    def positions(self) -> int:
        return int(torch.Size(self.z.shape[2:]).numel())

    def pull_direction(self, w: Tensor) -> Tensor:
        if w.dim() == 3:  # one direction per seed, the same at every position
            w = w.reshape(*w.shape, *([1] * (self.z.dim() - 2)))
        if self.pull is not None:
            return self.pull(w)
        # frozen pattern: v = gate * z element-wise with gate = v/z (sigma'(z)-style ratio);
        # [choice] gate = 0 where z == 0 exactly (the channel carries nothing at r).
        nz = self.z != 0
        gate = torch.where(nz, self.v / torch.where(nz, self.z, torch.ones_like(self.z)), 0.0)
        return w * gate.unsqueeze(1)


def identity_pull(w: Tensor) -> Tensor:
    """Direction pull-back of a unit without nonlinearity (v = z)."""
    return w


@dataclass
class Block:
    """The affine map producing unit `target`'s z: z = sum_rules (sum_p c0 + bias) + const."""

    target: str
    rules: list[Rule]
    const: Tensor | None = None  # unshared constant [N or 1, C, *pos] (e.g. CLS + pos-embed)


@dataclass
class Graph:
    """Units, blocks in forward (topological) order, layer-name aliases, and the input unit."""

    units: dict[str, Unit]
    blocks: list[Block]
    aliases: dict[str, str] = field(default_factory=dict)
    logits: Tensor | None = None  # [N, classes] of the recorded forward pass
    input: str = "input"
    differentiable: bool = False  # recorded under autograd: propagate keeps the graph to the images

    def unit(self, layer: str) -> Unit:
        name = self.aliases.get(layer, layer)
        if name not in self.units or name == self.input:
            names = sorted(set(self.units) - {self.input} | set(self.aliases))
            raise ValueError(f"layer {layer!r} is not a PFV layer SRD can seed; layers: {names}")
        return self.units[name]


def upstream_signal(r: Tensor, z: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """g_q = R_q u_q / <u_q, z_q> (section 3; u = z gives the PFV sharing ratio, a latent
    direction u = w_f * gate gives the directional ratio of section 4).

    r [N,S,*pos], z [N,C,*pos], u [N,S,C,*pos] or None. Returns (g [N,S,C,*pos], lost [N,S]).
    Numerical guard: where <u_q, z_q> == 0 (a zero pre-activation, ||z_q|| = 0) no ratio exists;
    g_q = 0 there and R_q is returned as `lost`, booked to the constant share, never dropped.
    """
    if u is None:
        den = (z * z).sum(1).unsqueeze(1)
        num = z.unsqueeze(1)
    else:
        den = (u * z.unsqueeze(1)).sum(2)
        num = u
    ok = den.abs() > torch.finfo(den.dtype).tiny
    scale = torch.where(ok, r / torch.where(ok, den, torch.ones_like(den)), 0.0)
    lost = torch.where(ok, 0.0, r).flatten(2).sum(2)
    return scale.unsqueeze(2) * num, lost


def _contrast(r: Tensor) -> Tensor:
    """Contrastive rule R <- R - mean(R) over the positions of the seed map (section 3)."""
    return r - r.flatten(2).mean(2).reshape(*r.shape[:2], *([1] * (r.dim() - 2)))


def share(graph: Graph, block: Block, r: Tensor, u: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """One step across `block`: R(z_q) [N,S,*pos] of its target -> R(v_p) of each source unit,
    R(v_p) = sum_q mu(p->q) R(z_q), and the constant share [N,S] (section 3)."""
    g, constant = upstream_signal(r, graph.units[block.target].z, u)
    if block.const is not None:
        constant = constant + (block.const.unsqueeze(1) * g).flatten(2).sum(2)
    out: dict[str, Tensor] = {}
    for rule in block.rules:
        rel = rule.contribution_relevance(g, graph.units[rule.source].v)
        if rule.bias is not None:
            bdot = (rule.bias.unsqueeze(1) * g).sum(2)
            tot = rule.norm_total().unsqueeze(1)
            ok = tot > 0
            # a bias with no source of nonzero norm is a constant: its share is reported
            constant = constant + torch.where(ok, 0.0, bdot).flatten(2).sum(2)
            rel = rel + rule.scatter(torch.where(ok, bdot / torch.where(ok, tot, torch.ones_like(tot)), 0.0))
        out[rule.source] = out[rule.source] + rel if rule.source in out else rel
    return out, constant


@dataclass
class Propagation:
    """Result of one backward pass: pixel relevance, constant share, kept hidden maps."""

    pixels: Tensor  # [N, S, H, W]
    constant: Tensor  # [N, S]
    layers: dict[str, Tensor]  # unit name -> [N, S, *pos] relevance (R(z) = R(v))


def propagate(graph: Graph, unit: str, seed: Tensor, direction: Tensor | None = None,
              contrastive: bool = False, keep: tuple[str, ...] = ()) -> Propagation:
    """Propagate seed relevance [N, S, *pos] on `unit` down to the input pixels, without autograd
    unless `graph.differentiable` (then the result is differentiable in the recorded images).

    `direction` ([N,S,C] or [N,S,C,*pos], on the seeded unit's v) replaces the PFV sharing ratio
    by the directional one at the first step only (section 4). `contrastive` applies R - mean(R)
    on the seed map: the first unit reached that has more than one position (the seeded unit
    itself for ResNet/ViT heads; the last conv map for the exact VGG head through 1x1 FC maps).
    """
    with torch.set_grad_enabled(graph.differentiable):
        return _propagate(graph, unit, seed, direction, contrastive, keep)


def _propagate(graph: Graph, unit: str, seed: Tensor, direction: Tensor | None, contrastive: bool,
               keep: tuple[str, ...]) -> Propagation:
    acc: dict[str, Tensor] = {unit: seed}
    n, s = seed.shape[:2]
    constant = seed.new_zeros(n, s)
    kept: dict[str, Tensor] = {}
    contrast_pending = contrastive
    for block in reversed(graph.blocks):
        r = acc.pop(block.target, None)
        if r is None:
            continue
        target = graph.units[block.target]
        if contrast_pending and target.positions > 1:
            r, contrast_pending = _contrast(r), False
        if block.target in keep:
            kept[block.target] = r
        u = target.pull_direction(direction) if (direction is not None and block.target == unit) else None
        shares, lost = share(graph, block, r, u)
        constant = constant + lost
        for name, rel in shares.items():
            acc[name] = acc[name] + rel if name in acc else rel
    pixels = acc.pop(graph.input, None)
    if pixels is None:
        h, w = graph.units[graph.input].v.shape[2:]
        pixels = seed.new_zeros(n, s, h, w)
    if acc:
        raise RuntimeError(f"relevance stranded on {sorted(acc)}: graph blocks out of order")
    return Propagation(pixels=pixels, constant=constant, layers=kept)
