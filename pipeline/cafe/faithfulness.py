"""CAFE faithfulness (docs/method.md §6, step 4): insertion / deletion of input patches.

The input is cut into `patch` x `patch` pixel patches (the last row / column of patches is
smaller when the side is not a multiple). Patches are ranked three ways: by iERF mass, by
activation-map mass, and at random (a seeded baseline). Deletion replaces the patches
cumulatively, in rank order, by the baseline; insertion starts from the baseline image and puts
them back. After each of `steps` equal steps the latent is read at the exemplar's position, and
the curve's area (trapezoid over the fraction of patches, x in [0, 1]) is divided by the
latent's value on the unmodified image: insertion AUC (higher is better) and deletion AUC (lower
is better) in units of the exemplar's own activation.

[choice] The baseline is the preprocessed dataset mean, i.e. 0 after normalisation: a deleted
patch carries no signal of its own, as in the common insertion / deletion protocols.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ORDERS: tuple[str, ...] = ("ierf", "act", "random")
# Reads the latent of one exemplar from a batch of images: Tensor[B, 3, H, W] -> Tensor[B]
Readout = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Curves:
    """Readouts per order: insertion and deletion, each Tensor[steps + 1] from 0 to all patches."""

    insertion: dict[str, Tensor]
    deletion: dict[str, Tensor]
    unmodified: float


def patch_mass(pixel_map: Tensor, patch: int) -> Tensor:
    """Sum of a map over each patch: Tensor[H, W] -> Tensor[ceil(H/patch) * ceil(W/patch)],
    patches in row-major order."""
    h, w = pixel_map.shape
    padded = F.pad(pixel_map[None, None].float(), (0, -w % patch, 0, -h % patch))
    return F.avg_pool2d(padded, patch, divisor_override=1).flatten()


def patch_orders(ierf: Tensor, act_up: Tensor, patch: int,
                 generator: torch.Generator) -> dict[str, Tensor]:
    """Patch indices in the order they are inserted / deleted, per ranking: {order: LongTensor[P]}.

    ierf: Tensor[H, W] signed iERF, ranked by its signed patch sum (evidence against the latent
    comes last); act_up: Tensor[H, W] activation map at input resolution; random: a permutation
    drawn from `generator` (seed it per exemplar for reproducible rows).
    """
    n = patch_mass(ierf, patch).numel()
    return {
        # stable: equal masses (e.g. all-zero activation far from the peak) keep raster order
        "ierf": patch_mass(ierf, patch).argsort(descending=True, stable=True),
        "act": patch_mass(act_up, patch).argsort(descending=True, stable=True),
        "random": torch.randperm(n, generator=generator),
    }


def shown(orders: dict[str, Tensor], steps: int) -> Tensor:
    """Which patches show the image (not the baseline) in each image a faithfulness check of one
    exemplar reads: BoolTensor[2 + 2 O (steps-1), P] for O orders of P patches (the stage's
    three, ORDERS; a benchmark may rank by more maps).

    Row 0 is the unmodified image, row 1 the full baseline, then per order (in `orders`' order)
    the deletion images of steps 1..steps-1 followed by the insertion images of the same steps.
    After inner step i the first round(i * P / steps) patches of an order are switched (step 0
    is none, step `steps` is all of them: those two images are rows 0 and 1, shared by every
    order).
    """
    n = len(next(iter(orders.values())))
    rows = [torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool)]
    counts = torch.round(torch.arange(1, steps) * n / steps).long()
    for order in orders.values():
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        switched = rank[None, :] < counts[:, None]  # [steps-1, P]
        rows += [~switched, switched]  # deletion: switched patches -> baseline; insertion: back
    return torch.cat(rows)


def patch_ids(shape: tuple[int, int], patch: int) -> Tensor:
    """The patch (row-major, as `patch_mass`) of each pixel of an image: LongTensor[H, W]."""
    h, w = shape
    gw = -(-w // patch)
    return (torch.arange(h) // patch)[:, None] * gw + (torch.arange(w) // patch)[None, :]


def composites(image: Tensor, ids: Tensor, shown: Tensor, baseline: float = 0.0) -> Tensor:
    """The images of `shown` BoolTensor[N, P]: each pixel from `image` Tensor[3, H, W] where
    its patch (`ids` LongTensor[H, W], `patch_ids` or a crop of it) is shown, `baseline`
    elsewhere: Tensor[N, 3, H, W]."""
    pixels = shown[:, ids.to(shown.device)][:, None]
    return torch.where(pixels.to(image.device), image, torch.full_like(image, baseline))


def perturbations(image: Tensor, orders: dict[str, Tensor], patch: int, steps: int,
                  baseline: float = 0.0) -> Tensor:
    """Every image a faithfulness check of one exemplar reads, in the rows of `shown`:
    Tensor[2 + 2 O (steps-1), 3, H, W]."""
    return composites(image, patch_ids(tuple(image.shape[1:]), patch), shown(orders, steps),
                      baseline)


def rows_per_exemplar(steps: int) -> int:
    """Images one exemplar's check reads (`perturbations`): 2 + 6 (steps - 1)."""
    if steps < 2:
        raise ValueError(f"faithfulness steps={steps!r}: expected an int >= 2")
    return 2 + 2 * len(ORDERS) * (steps - 1)


def rebatch(blocks: Iterable[Tensor], batch: int) -> Iterator[Tensor]:
    """The rows of a stream of tensors [n_i, ...] in batches of `batch` rows (the last one
    smaller), so that many exemplars' perturbations share each forward pass while only one
    exemplar's images and one batch are held at a time."""
    pending: list[Tensor] = []
    held = 0
    for block in blocks:
        while len(block):
            take = min(batch - held, len(block))
            pending.append(block[:take])
            held += take
            block = block[take:]
            if held == batch:
                yield torch.cat(pending)
                pending, held = [], 0
    if pending:
        yield torch.cat(pending)


def from_readouts(values: Tensor, steps: int,
                  orders: tuple[str, ...] = ORDERS) -> list[Curves]:
    """The curves of exemplars from their readouts Tensor[J, 2 + 2 O (steps - 1)] for the O
    `orders`, each row in the order of `perturbations`."""
    values = values.float().cpu()
    full, empty = values[:, 0], values[:, 1]
    inner = values[:, 2:].view(len(values), len(orders), 2, steps - 1)
    out = []
    for j in range(len(values)):
        ins, dele = {}, {}
        for k, name in enumerate(orders):
            dele[name] = torch.cat([full[j, None], inner[j, k, 0], empty[j, None]])
            ins[name] = torch.cat([empty[j, None], inner[j, k, 1], full[j, None]])
        out.append(Curves(insertion=ins, deletion=dele, unmodified=float(full[j])))
    return out


def curves(image: Tensor, orders: dict[str, Tensor], readout: Readout, patch: int, steps: int,
           batch: int, baseline: float = 0.0) -> Curves:
    """Run the insertion / deletion images of one exemplar through `readout`, `batch` at a time."""
    rows_per_exemplar(steps)
    images = perturbations(image, orders, patch, steps, baseline)
    values = torch.cat([readout(b).float().cpu() for b in rebatch([images], batch)])
    return from_readouts(values[None], steps, tuple(orders))[0]


def auc(curve: Tensor, unmodified: float) -> float | None:
    """Area under a curve of steps + 1 equally spaced readouts over [0, 1], divided by the
    unmodified readout; None when the latent does not fire on the unmodified image."""
    if not unmodified > 0:
        return None
    y = curve.double().numpy()
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)) / unmodified)


def aucs(c: Curves) -> dict[str, float | None]:
    """ins_auc_<order> and del_auc_<order> per order of `c`: for the stage's ORDERS the six AUC
    columns of the exemplars table (ins_auc_ierf, del_auc_ierf, ins_auc_act, ...)."""
    out: dict[str, float | None] = {}
    for name in c.insertion:
        out[f"ins_auc_{name}"] = auc(c.insertion[name], c.unmodified)
        out[f"del_auc_{name}"] = auc(c.deletion[name], c.unmodified)
    return out
