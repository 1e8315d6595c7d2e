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
    batch_contrast: bool = False  # contrastive mean over the whole batch (reference=True, §3.7)

    def unit(self, layer: str) -> Unit:
        name = self.aliases.get(layer, layer)
        if name not in self.units or name == self.input:
            names = sorted(set(self.units) - {self.input} | set(self.aliases))
            raise ValueError(f"layer {layer!r} is not a PFV layer SRD can seed; layers: {names}")
        return self.units[name]


def upstream_signal(r: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """g_q = R_q z_q / ||z_q||^2, the PFV sharing ratio's upstream signal (section 3).

    r [N,S,*pos], z [N,C,*pos]. Returns (g [N,S,C,*pos], lost [N,S]).
    Numerical guard: where ||z_q|| = 0 (a zero pre-activation) no ratio exists; g_q = 0 there
    and R_q is returned as `lost`, booked to the constant share, never dropped.
    """
    den = (z * z).sum(1).unsqueeze(1)
    ok = den > torch.finfo(den.dtype).tiny
    scale = torch.where(ok, r / torch.where(ok, den, torch.ones_like(den)), 0.0)
    lost = torch.where(ok, 0.0, r).flatten(2).sum(2)
    return scale.unsqueeze(2) * z.unsqueeze(1), lost


def readout_signal(alpha: Tensor, unit: Unit, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The directional first step (docs/method.md §4): a linear readout f_r = <w, v_r> of the
    seeded unit, weighted by coefficients alpha_r, is decomposed over the contributions to z_r.

    With the unit's nonlinearity frozen, <w, v_r> = <u_r, z_r> + k_r, with u = the pull-back of
    w onto z (`Unit.pull_direction`) and k_r the part no contribution to z_r carries (a ViT MLP's
    bias paths; sigma(0) of a nonlinearity that is not zero at zero). So g_r = alpha_r u_r
    shares <u_r, z_r> over the sources exactly, and alpha_r k_r goes to the constant share:
    no division, so the sign of each share is the sign of its effect on the readout.

    alpha [N,S,*pos]; w [N,S,C] or [N,S,C,*pos] on v. Returns (g [N,S,C,*pos], the relevance of
    the seeded positions alpha_r <w, v_r> [N,S,*pos], the constant share [N,S]).
    """
    u = unit.pull_direction(w)
    w = w.reshape(*w.shape, *([1] * (u.dim() - w.dim())))
    data = alpha * (w * unit.v.unsqueeze(1)).sum(2)
    linear = alpha * (u * unit.z.unsqueeze(1)).sum(2)
    return alpha.unsqueeze(2) * u, data, (data - linear).flatten(2).sum(2)


def _contrast(r: Tensor, over_batch: bool = False) -> Tensor:
    """Contrastive rule R <- R - mean(R) over the positions of the seed map (section 3); with
    `over_batch`, over every image's positions together (the reference code's `x - x.mean()`
    on its [N, H, W] map)."""
    mean = r.flatten(2).mean(2)
    if over_batch:
        mean = mean.mean(0, keepdim=True)
    return r - mean.reshape(*mean.shape, *([1] * (r.dim() - 2)))


def share(graph: Graph, block: Block, g: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """One step across `block`: the upstream signal g [N,S,C,*pos] on its target's z (from
    `upstream_signal` or `readout_signal`) -> R(v_p) = sum_q <c(p->q), g_q> of each source unit,
    and the constant share [N,S] of the block's unshared constants (section 3)."""
    constant = g.new_zeros(g.shape[:2])
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
              contrastive: bool = False, keep: tuple[str, ...] = (),
              offset: Tensor | None = None, stream: int | None = None) -> Propagation:
    """Propagate a seed on `unit` down to the input pixels, without autograd unless
    `graph.differentiable` (then the result is differentiable in the recorded images).

    Without `direction`, `seed` [N, S, *pos] is the relevance R(v) of the unit's positions.
    With `direction` ([N,S,C] or [N,S,C,*pos], on the unit's v), `seed` holds coefficients
    alpha_r of the linear readout f_r = <w, v_r> + offset, and what is decomposed is
    sum_r alpha_r f_r: the first step follows w (`readout_signal`), later steps use the PFV
    ratios, and `offset` ([N, S], e.g. a latent's b_f - w_f . b_dec or a logit's bias) times
    sum_r alpha_r goes to the constant share (docs/method.md §§3.3, 4).

    `contrastive` applies R - mean(R) to the seed map: the first relevance map with more than
    one position (the seeded unit for ResNet/ViT mean-pool heads; the last conv map for VGG's
    exact head through 1x1 FC maps; after a directional first step, the map it reaches, since a
    readout's coefficients are not relevance).

    `stream` ([choice], docs/method.md §3.3; a CLS head): the index of the prefix token the
    readout reads. The relevance that reaches that token through its residual stream's skips
    (`IdentityRule(stream=True)`) stays a direction on its PFV, g, instead of becoming a ratio
    share: each block below reads the token as a linear readout, decomposed like the first
    step (g pulled back through the block's MLP, `readout_signal`'s constant bookkeeping), so
    the class keeps choosing which contributions to the token count, down to the embedding.
    """
    if stream is not None and direction is None:
        raise ValueError("stream follows a directional readout: pass a direction too")
    with torch.set_grad_enabled(graph.differentiable):
        return _propagate(graph, unit, seed, direction, contrastive, keep, offset, stream)


def _stream_signal(unit: Unit, w: Tensor, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """The readout <w, v_t> of token `index` of `unit` (w [N,S,C]) decomposed as in
    `readout_signal`: (g [N,S,C,*pos], zero but at the token; its relevance <w, v_t> [N,S];
    the constant share [N,S])."""
    full = w.new_zeros(*w.shape, *unit.z.shape[2:])
    full[..., index] = w
    g = unit.pull_direction(full)
    data = (w * unit.v[..., index].unsqueeze(1)).sum(2)
    return g, data, data - (g[..., index] * unit.z[..., index].unsqueeze(1)).sum(2)


def _propagate(graph: Graph, unit: str, seed: Tensor, direction: Tensor | None, contrastive: bool,
               keep: tuple[str, ...], offset: Tensor | None, stream: int | None) -> Propagation:
    acc: dict[str, Tensor] = {unit: seed}
    carried: dict[str, Tensor] = {}  # unit -> the direction [N,S,C] on the stream token's v
    n, s = seed.shape[:2]
    constant = seed.new_zeros(n, s)
    if offset is not None:
        if direction is None:
            raise ValueError("offset is the constant of a directional readout: pass a direction too")
        constant = constant + offset * seed.flatten(2).sum(2)
    kept: dict[str, Tensor] = {}
    contrast_pending = contrastive
    for block in reversed(graph.blocks):
        r, w = acc.pop(block.target, None), carried.pop(block.target, None)
        if r is None and w is None:
            continue
        target = graph.units[block.target]
        if r is None:
            r = seed.new_zeros(n, s, *target.z.shape[2:])
        if direction is not None and block.target == unit:
            g, r, lost = readout_signal(r, target, direction)
        else:
            if contrast_pending and target.positions > 1:
                r, contrast_pending = _contrast(r, graph.batch_contrast), False
            g, lost = upstream_signal(r, target.z)
            if w is not None:
                g_w, data, fixed = _stream_signal(target, w, stream)
                g, lost = g + g_w, lost + fixed
                r = r.clone()
                r[..., stream] += data
        if block.target in keep:
            kept[block.target] = r
        shares, fixed = share(graph, block, g)
        constant = constant + lost + fixed
        if stream is not None:
            for rule in block.rules:
                if getattr(rule, "stream", False):  # the token's own skip: keep g as its direction
                    src = graph.units[rule.source].v[..., stream]
                    shares[rule.source][..., stream] -= (g[..., stream] * src.unsqueeze(1)).sum(2)
                    prev = carried.get(rule.source)
                    carried[rule.source] = g[..., stream] if prev is None else prev + g[..., stream]
        for name, rel in shares.items():
            acc[name] = acc[name] + rel if name in acc else rel
    pixels = acc.pop(graph.input, None)
    if pixels is None:
        pixels = seed.new_zeros(n, s, *graph.units[graph.input].v.shape[2:])
    w = carried.pop(graph.input, None)
    if w is not None:  # a graph cut below a block (ICAT): the stream token's readout is its relevance
        pixels = pixels.clone()
        pixels[..., stream] += (w * graph.units[graph.input].v[..., stream].unsqueeze(1)).sum(2)
    if acc or carried:
        raise RuntimeError(f"relevance stranded on {sorted({*acc, *carried})}: graph blocks out of order")
    return Propagation(pixels=pixels, constant=constant, layers=kept)
