"""Seeds: where a class logit enters the decomposition (docs/method.md §3, heads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Head:
    """The seed of class `target` ([N] long) as relevance [N, *pos] on unit `unit`."""

    unit: str
    seed: Callable[[Tensor], Tensor]


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


def token_seed(logits: Tensor, target: Tensor, tokens: int, index: int = 0) -> Tensor:
    """CLS-token head: R_CLS = logit_y on token `index`, zero elsewhere: [N, tokens]."""
    r = logits.new_zeros(logits.shape[0], tokens)
    r[:, index] = logits.gather(1, target[:, None])[:, 0]
    return r


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
