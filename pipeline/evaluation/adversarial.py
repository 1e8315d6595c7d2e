"""PGD adversarial examples (Madry et al., ICLR 2018), in pixel space (docs/method.md §8).

    adv = pgd(model, pixels, labels, mean=cfg["mean"], std=cfg["std"], eps=4 / 255)
    adv.pixels                                   # Tensor[N, 3, H, W] in [0, 1]
    adv.flipped                                  # Tensor[N] bool: prediction changed (untargeted)
    model(normalise(adv.pixels, mean, std))      # what the model sees

L-infinity projected gradient descent: from a random start in the eps-ball,

    x_{t+1} = Proj( x_t + alpha * sign(grad_x L(f(normalise(x_t)), y)) ),
    Proj: onto {x : ||x - x_0||_inf <= eps} ∩ [0, 1]^n,

with L the cross-entropy of the label `y` (untargeted: ascended, the image leaves class y) or
minus the cross-entropy of a target class (targeted: the image moves into it).

**[choice]** The attack lives in pixel space: `pixels` are the model's input *before* its
normalisation (after resize and crop, values in [0, 1]), and the normalisation
`(x - mean) / std` is part of the attacked function. So `eps` is in grey levels whatever the
model's mean and std (4/255 = four levels of an 8-bit image per channel), the ball is the same
for every model, and the result is a valid image.
**[choice]** Defaults `steps=20`, `alpha=eps/4`, a uniform random start in the ball (Madry et
al.): 20 steps of eps/4 can cross the ball twice; seeded, so a run is reproducible.
**[choice]** Every image runs all `steps` (no stop at the first flip), as in Madry et al.: the
result is a confident misclassification, not one at the decision boundary.
The model's gradients are the real model's (no smooth copy, unlike the manipulation attack of
`manipulation.py`): a class logit of a ReLU network has a non-zero input gradient almost
everywhere, only a gradient *map* has not.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PGDResult:
    """One PGD run. pixels: the adversarial images Tensor[N, 3, H, W] in [0, 1]; inputs: the
    same normalised, as the model sees them (for routes and maps); clean / adv:
    the model's predicted classes Tensor[N] before and after; flipped: Tensor[N] bool, the attack
    succeeded (untargeted: the prediction left `labels`; targeted: it is the target class);
    eps, alpha, steps, targeted: the settings used."""

    pixels: Tensor
    inputs: Tensor
    clean: Tensor
    adv: Tensor
    flipped: Tensor
    eps: float
    alpha: float
    steps: int
    targeted: bool


def normalise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The model's input from pixels in [0, 1]: `(pixels - mean) / std` per channel."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).reshape(1, -1, 1, 1)
    return (pixels - m) / s


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The inverse of `normalise`: a preprocessed batch back to pixels (clamped to [0, 1],
    which only removes float rounding for images that came from 8-bit files)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def pgd(model: nn.Module, pixels: Tensor, labels: Tensor, *, mean: Sequence[float],
        std: Sequence[float], eps: float = 4 / 255, alpha: float | None = None, steps: int = 20,
        targeted: bool = False, random_start: bool = True, seed: int = 0) -> PGDResult:
    """L-infinity PGD on `model` (see the module docstring).

    pixels: Tensor[N, 3, H, W] in [0, 1] (`to_pixels` of a preprocessed batch). labels:
    Tensor[N] of class indices: the classes to leave (untargeted; give the true labels or the
    clean predictions) or to reach (targeted). mean / std: the model's normalisation (its
    `data_config`). eps: the ball's radius in pixel units (0 < eps <= 1); alpha: the step
    (default eps / 4); steps: iterations. The model is used in eval mode as given; its
    parameters get no gradient.

    Raises ValueError for pixels outside [0, 1] or of the wrong shape, labels of the wrong
    length or out of the model's classes, and eps / alpha / steps out of range.
    """
    if pixels.dim() != 4 or pixels.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"pixels must be Tensor[N, C, H, W] with C = len(mean) = len(std) = "
                         f"{len(mean)}, got shape {tuple(pixels.shape)} and {len(std)} stds")
    if pixels.min() < 0 or pixels.max() > 1:
        raise ValueError(f"pixels must lie in [0, 1] (the model's input before normalisation; "
                         f"see to_pixels), got [{float(pixels.min()):.4g}, {float(pixels.max()):.4g}]")
    if labels.shape != (pixels.shape[0],):
        raise ValueError(f"labels must be Tensor[{pixels.shape[0]}] (one class per image), got "
                         f"shape {tuple(labels.shape)}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps={eps}: expected 0 < eps <= 1 (pixel units; 4/255 = four grey levels)")
    alpha = eps / 4 if alpha is None else alpha
    if not 0 < alpha <= eps:
        raise ValueError(f"alpha={alpha}: expected 0 < alpha <= eps={eps}")
    if int(steps) < 1:
        raise ValueError(f"steps={steps}: expected an int >= 1")
    labels = labels.to(pixels.device).long()
    x0 = pixels.detach()
    lower, upper = (x0 - eps).clamp_min(0.0), (x0 + eps).clamp_max(1.0)

    def logits(x: Tensor) -> Tensor:
        return model(normalise(x, mean, std))

    with torch.no_grad():
        clean_logits = logits(x0)
    n_classes = clean_logits.shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be class indices 0..{n_classes - 1}, got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    x = x0.clone()
    if random_start:
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.rand(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        x = torch.minimum(torch.maximum(x0 + (2 * noise - 1) * eps, lower), upper)
    sign = -1.0 if targeted else 1.0  # targeted descends the target's loss
    for _ in range(int(steps)):
        x.requires_grad_(True)
        loss = F.cross_entropy(logits(x), labels, reduction="sum")  # per-image gradients: images are independent in eval mode
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + sign * alpha * grad.sign(), lower), upper)
    x = x.detach()
    inputs = normalise(x, mean, std)
    with torch.no_grad():
        adv = model(inputs).argmax(1)
    flipped = adv == labels if targeted else adv != labels
    return PGDResult(x, inputs, clean_logits.argmax(1), adv, flipped, float(eps), float(alpha),
                     int(steps), bool(targeted))


def pgd_inputs(model: nn.Module, x: Tensor, labels: Tensor, data_config: dict[str, Any],
               **settings: Any) -> PGDResult:
    """`pgd` on a preprocessed batch `x` (the model's input, normalised with `data_config`'s
    mean and std, as `LoadedModel.preprocess` returns it): the attack still runs on the pixels
    (`to_pixels`), and `result.inputs` is the adversarial batch in `x`'s form. settings: eps,
    alpha, steps, targeted, random_start, seed (see `pgd`)."""
    mean, std = data_config["mean"], data_config["std"]
    return pgd(model, to_pixels(x, mean, std), labels, mean=mean, std=std, **settings)
