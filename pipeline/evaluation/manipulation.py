"""Targeted explanation manipulation (Dombrowski et al., NeurIPS 2019).

Find x' near x whose explanation matches the explanation h_t of another image while the model's
output barely moves:

    min_x'  || h(x') - h_t ||^2  +  gamma * || softmax f(x') - softmax f(x) ||^2,
    || x' - x ||_inf <= eps (in [0, 1] pixel units), x' a valid image,

maps compared at unit L2 norm. The gradient of a gradient explanation of a ReLU network with
respect to its input is zero almost everywhere (piecewise-linear), so, as in the paper, the
optimisation runs on a copy of the model whose ReLUs are replaced by softplus(beta)
(**[choice]** beta = 10 fixed, ReLU6 -> softplus(x) - softplus(x - 6)); the result x' is then
judged on the real model. **[choice]** Adam in the normalised input space, projected after
every step onto the eps-ball around x and the valid pixel range.

**[choice]** SRD and SRD-contrastive are attacked by the same protocol, through the same softplus
copy, with SRD's differentiable mode (`srd.saliency(..., differentiable=True)`: the recorded
activations, hence the frozen pattern, the sharing ratios and the pair norms, stay on the
autograd graph; weights are constants). Unlike a gradient map, SRD's map of a ReLU network is
not piecewise constant in x (its ratios <c, z>/||z||^2 and pair norms move with the
activations), so it could also be attacked on the ReLU model itself, with jumps where a ReLU
switches or a max-pool argmax moves; one smooth copy for every method keeps the attacks
comparable. The attack on the ReLU model itself is reported separately
(`benchmarks/saliency_eval.py --srd-attacked-model original`, docs/saliency_eval.md).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.evaluation.explainer import Explainer
from pipeline.evaluation.metrics import unit_maps
from pipeline.srd.families.base import SmoothReLU6  # one class: SRD must accept it as an element-wise nonlinearity


def smooth_copy(model: nn.Module, beta: float = 10.0) -> nn.Module:
    """A deep copy of `model` with every nn.ReLU -> Softplus(beta) and nn.ReLU6 -> SmoothReLU6.
    Functional relu calls inside forward methods cannot be seen; timm's ResNet, EfficientNet and
    ViT use activation modules (ViT's GELU is smooth already). timm attention runs unfused:
    the fused CPU kernel has no double backward, which the attack's gradient of a gradient needs."""
    smooth = copy.deepcopy(model).eval()
    for parent in list(smooth.modules()):
        if hasattr(parent, "fused_attn"):
            parent.fused_attn = False
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, name, SmoothReLU6(beta))
            elif isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta))
    for p in smooth.parameters():
        p.requires_grad_(False)
    return smooth


@dataclass
class Attack:
    """Settings of the manipulation attack. eps in [0, 1] pixel units; lo / hi: the normalised
    values of pixel 0 and 1 per channel (Tensor[3]); pixel_scale: 1 / std per channel."""

    lo: Tensor
    hi: Tensor
    pixel_scale: Tensor
    steps: int = 60
    lr: float = 0.01
    gamma: float = 10.0
    eps: float = 8 / 255


def manipulate(smooth: nn.Module, explain: Explainer, images: Tensor, target: Tensor,
               target_maps: Tensor, attack: Attack) -> Tensor:
    """Run the attack: images [N, 3, H, W] (normalised), target [N] (the class whose explanation
    is shown), target_maps [N, H, W] (h_t, any scale) -> x' [N, 3, H, W]. `explain` must be a
    twice-differentiable explainer of `smooth` (methods.differentiable)."""
    shape = (1, -1, 1, 1)
    lo, hi = attack.lo.reshape(shape).to(images), attack.hi.reshape(shape).to(images)
    radius = (attack.eps * attack.pixel_scale).reshape(shape).to(images)
    lower, upper = torch.maximum(images - radius, lo), torch.minimum(images + radius, hi)
    goal = unit_maps(target_maps.detach())
    with torch.no_grad():
        p0 = smooth(images).softmax(1)
    x = images.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=attack.lr)
    for _ in range(attack.steps):
        opt.zero_grad()
        maps = unit_maps(explain(x, target))
        loss = ((maps - goal) ** 2).flatten(1).sum(1) + attack.gamma * (
            (smooth(x).softmax(1) - p0) ** 2).sum(1)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        x.grad = grad
        opt.step()
        with torch.no_grad():
            x.copy_(torch.minimum(torch.maximum(x, lower), upper))
    return x.detach()
