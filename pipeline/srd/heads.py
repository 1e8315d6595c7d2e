"""Seeds: where a class logit enters the decomposition (docs/method.md §3, heads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Head:
    """Where class `target` ([N] long) enters the decomposition, on unit `unit`.

    `seed(target)` is relevance [N, *pos] on the unit's v, unless the head is a linear readout
    of one position (`readout` set: a CLS-token head, docs/method.md §3.3); then `seed(target)`
    holds its coefficients and `readout(target)` the class direction on v [N, C] and the
    readout's constant [N]. `start` gives all three for `graph.propagate`. `stream`: the index
    of the token read (a prefix token), whose residual stream keeps the class direction below
    the first step (`graph.propagate`).
    """

    unit: str
    seed: Callable[[Tensor], Tensor]
    readout: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None
    stream: int | None = None

    def start(self, target: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(seed [N, *pos], direction [N, C] or None, offset [N] or None) of class `target`."""
        if self.readout is None:
            return self.seed(target), None, None
        direction, offset = self.readout(target)
        return self.seed(target), direction, offset


def resolve_target(logits: Tensor, target: int | Tensor | None) -> Tensor:
    """None -> predicted class; int -> that class for every image; Tensor[N] as given."""
    n = logits.shape[0]
    if target is None:
        return logits.argmax(1)
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=logits.device)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    return target.expand(n) if target.numel() == 1 else target


def pooled_linear_seed(feats: Tensor, fc: nn.Linear, target: Tensor) -> Tensor:
    """Global average pool + linear head: o_p = W h_p / n + b / n, so for class y
    R_p = (w_y . h_p + b_y) / n and sum_p R_p = logit_y (bias split equally over the n positions).

    feats [N, C, *pos] (h_p: the per-position vectors whose mean is the pooled feature) -> [N, *pos].
    """
    w = fc.weight.detach()[target]  # [N, C]
    n_pos = feats[0, 0].numel()
    r = torch.einsum("nc,nc...->n...", w, feats)
    if fc.bias is not None:
        r = r + fc.bias.detach()[target].reshape(-1, *([1] * (r.dim() - 1)))
    return r / n_pos


def pooled_norm_seed(feats: Tensor, norm: nn.Module, fc: nn.Linear, target: Tensor) -> Tensor:
    """Global average pool, a LayerNorm of the pooled vector (or an identity), then linear: the
    ResNet split with h_p the position's share of the normed pooled vector, the norm's scale sigma
    frozen at the pooled vector m: LN(m) = mean_p [gamma (a_p - mean_c a_p) / sigma + beta], so
    R_p = (w_y . h_p + b_y) / n sums to the logit (a ViT's mean-pool `fc_norm`, ConvNeXt's head
    norm; docs/method.md §3.3). feats [N, C, *pos] -> [N, *pos]."""
    if isinstance(norm, nn.LayerNorm):
        a = feats.flatten(2)
        sigma = torch.sqrt(a.mean(2).var(1, unbiased=False) + norm.eps).reshape(-1, 1, 1)
        a = (a - a.mean(1, keepdim=True)) / sigma
        if norm.weight is not None:
            a = a * norm.weight.detach().reshape(1, -1, 1)
        if norm.bias is not None:
            a = a + norm.bias.detach().reshape(1, -1, 1)
        feats = a.view_as(feats)
    elif not isinstance(norm, nn.Identity):
        raise TypeError(f"pooled head norm must be a LayerNorm or an identity, got {type(norm).__name__}")
    return pooled_linear_seed(feats, fc, target)


def token_readout(tokens: Tensor, norms: list[nn.Module], fc: nn.Linear, index: int = 0):
    """A head that reads one token (a ViT's CLS token), logit_y = w_y . N(x) + b_y with N the
    norms in order (LayerNorms, identities), as a linear readout of x = tokens[:, :, index]
    (docs/method.md §3.3, [choice]): with each LayerNorm's scale sigma frozen at the recorded
    token, LN(x) = gamma * (x - mean x) / sigma + beta, so

        logit_y = <u_y, x> + kappa_y,   u_y = centred((gamma / sigma) * w_y),   kappa_y = w_y . beta + b_y

    (norms composed in reverse; identities skipped). tokens [N, D, T]. Returns (coefficients: target -> [N, T], one
    1 at `index`; readout: target -> (u_y [N, D], kappa_y [N])).
    """
    x = tokens[:, :, index]
    ins = []  # the input of each norm at the recorded token: its frozen scale
    for norm in norms:
        ins.append(x)
        x = norm(x)

    def readout(target: Tensor) -> tuple[Tensor, Tensor]:
        w = fc.weight.detach()[target].to(tokens.dtype)  # [N, D]
        kappa = (fc.bias.detach()[target] if fc.bias is not None else w.new_zeros(len(target))).to(w.dtype)
        for norm, a in zip(reversed(norms), reversed(ins)):
            if isinstance(norm, nn.Identity):
                continue
            if norm.bias is not None:
                kappa = kappa + (w * norm.bias.detach().to(w.dtype)).sum(1)
            sigma = torch.sqrt(a.var(1, unbiased=False, keepdim=True) + norm.eps)
            if norm.weight is not None:
                w = w * norm.weight.detach().to(w.dtype)
            w = w / sigma
            w = w - w.mean(1, keepdim=True)
        return w, kappa

    def coefficients(target: Tensor) -> Tensor:
        alpha = tokens.new_zeros(tokens.shape[0], tokens.shape[2])
        alpha[:, index] = 1.0
        return alpha

    return coefficients, readout


def gradcam_seed(acts: Tensor, tail: Callable[[Tensor], Tensor], target: Tensor) -> Tensor:
    """Grad-CAM of class y at a conv map, the reference code's VGG seed (torchray grad_cam):
    ReLU(sum_c alpha_c A_c) with alpha_c the spatial mean of d logit_y / d A_c. acts [N,C,H,W];
    acts on an autograd graph (a differentiable recording) keep alpha on it too."""
    keep_graph = acts.requires_grad
    with torch.enable_grad():
        a = acts if keep_graph else acts.detach().requires_grad_(True)
        logit = tail(a).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(logit, a, create_graph=keep_graph)
    return torch.relu((grad.mean((2, 3), keepdim=True) * acts).sum(1))
