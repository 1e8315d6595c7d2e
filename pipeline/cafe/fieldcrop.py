"""Receptive-field crops for the faithfulness check (docs/method.md §6, Faithfulness, "Cost").

A position of a CNN layer reads only the pixels of its receptive field. The insertion /
deletion images of a check on such a layer can therefore be cropped to a window holding that
field: the latent at the position is the same number (up to float rounding) at a fraction of the
forward's cost. On demo_resnet's layer2 at 128 px (field 51 px, stride 8) the crop is 64 px
square, a quarter of the pixels; on ResNet-50 at 224 px the windows of layer1 and layer2 are 40
and 96 px. A ViT's token mixes every patch: no crop.

The field is measured, not derived from the architecture (timm's CNNs have too many kinds of
blocks to list): the gradient of a central position with respect to random inputs marks the
pixels it reads, and the window is aligned to the layer's stride, so the crop's grid is a
sub-grid of the full one. Whether a crop is exact is then *checked* on other random inputs,
for positions in the corners, on the edges and inside: each must read the same from its window
alone as from the whole image with other noise outside the window. A layer that fails (a
squeeze-excitation block's global pool, input-size-dependent padding, a field pixel the
gradients missed) or whose window is most of the image gets no crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.models import tap

# a crop must agree with the full forward to this, relative to the position's largest value
# (on the CPU the two were bit-identical; a GPU may pick other kernels for other sizes) ...
TOLERANCE = 1e-5
# ... or to this where cuDNN may run the convolutions in TF32 (10-bit mantissas: two kernels of
# one convolution then differ by about 1e-4, and the check's own readouts are no closer)
TOLERANCE_TF32 = 1e-3
# random inputs the field is measured on, and positions an exactness check covers
PROBE_IMAGES = 4
CHECKED_POSITIONS = 24
# below this share of the full image's pixels a crop is not worth a check
MAX_AREA = 0.6


@dataclass(frozen=True)
class FieldCrop:
    """Crop windows of one layer at one input size: `size` (h, w) pixels, whole cells of the
    layer's `stride` (sy, sx); `reach` (top, bottom, left, right): stride cells of the field
    before and after a position's own cell; `grid` (gh, gw): the layer's positions."""

    size: tuple[int, int]
    stride: tuple[int, int]
    reach: tuple[int, int, int, int]
    grid: tuple[int, int]

    def window(self, position: int) -> tuple[int, int, int]:
        """(top, left, position in the crop's grid) of the crop of a grid position."""
        gy, gx = divmod(position, self.grid[1])
        cells_y, cells_x = self.size[0] // self.stride[0], self.size[1] // self.stride[1]
        cy = _start(gy, self.reach[0], cells_y, self.grid[0])
        cx = _start(gx, self.reach[2], cells_x, self.grid[1])
        return cy * self.stride[0], cx * self.stride[1], (gy - cy) * cells_x + (gx - cx)

    def crop(self, images: Tensor, position: int) -> tuple[Tensor, int]:
        """(images Tensor[..., H, W] cut to the window of `position`, the position in it)."""
        top, left, at = self.window(position)
        return images[..., top:top + self.size[0], left:left + self.size[1]], at


def _start(cell: int, before: int, cells: int, total: int) -> int:
    """First cell of a window of `cells` holding cell - before .. inside 0..total - 1."""
    return min(max(cell - before, 0), total - cells)


@torch.no_grad()
def field_crop(model: nn.Module, layer: str, shape: tuple[int, int],
               device: torch.device | str = "cpu", seed: int = 0) -> FieldCrop | None:
    """The crops of `layer` for inputs of `shape` (H, W), or None where no crop is exact or
    worth it: a layer with special tokens or an input not a whole number of its cells, a
    field covering most of the image, a crop that changes a checked position's value."""
    gen = torch.Generator().manual_seed(seed)
    # noise at spreads from half to 4x the preprocessed images': a unit that one spread leaves
    # dead another wakes, so no path of the field is missed for want of a live unit
    spread = torch.logspace(-1, 2, PROBE_IMAGES, base=2.0).view(-1, 1, 1, 1)
    probe = (spread * torch.randn(PROBE_IMAGES, 3, *shape, generator=gen)).to(device)
    with torch.enable_grad():
        x = probe.requires_grad_(True)
        out = tap(model, x, [layer], grad=True)[layer]
        (gh, gw), (h, w) = out.grid, shape
        if bool(out.special.any()) or h % gh or w % gw:
            return None
        out.values[:, (gh // 2) * gw + gw // 2].sum().backward()
    rows, cols = _field(x.grad)
    if rows is None:
        return None
    stride = (h // gh, w // gw)
    # the cells holding the field's first and last pixels, counted from the position's own
    reach = (gh // 2 - rows[0] // stride[0], rows[1] // stride[0] - gh // 2,
             gw // 2 - cols[0] // stride[1], cols[1] // stride[1] - gw // 2)
    cells = (min(reach[0] + reach[1] + 1, gh), min(reach[2] + reach[3] + 1, gw))
    crop = FieldCrop((cells[0] * stride[0], cells[1] * stride[1]), stride, reach, (gh, gw))
    if crop.size[0] * crop.size[1] > MAX_AREA * h * w:
        return None
    return crop if _exact(model, layer, crop, spread[:2], gen, device) else None


def _field(grad: Tensor) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(first, last) row and column of the pixels that a position reads: where the gradient of
    its channels' sum with respect to the probe images, Tensor[N, 3, H, W], is not zero."""
    read = grad.abs().sum((0, 1)) > 0
    if not bool(read.any()):
        return None, None
    ys, xs = read.any(1).nonzero().flatten(), read.any(0).nonzero().flatten()
    return (int(ys[0]), int(ys[-1])), (int(xs[0]), int(xs[-1]))


def _exact(model: nn.Module, layer: str, crop: FieldCrop, spread: Tensor,
           gen: torch.Generator, device: torch.device | str) -> bool:
    """Whether a checked position reads the same from its window alone as from the whole image
    with *other* noise outside the window, on inputs other than the field was measured on: a
    pixel of the field left out, a misaligned grid or padding that differs all show."""
    gh, gw = crop.grid
    h, w = crop.grid[0] * crop.stride[0], crop.grid[1] * crop.stride[1]
    tolerance = tolerance_on(device)
    corners = {0, gw - 1, (gh - 1) * gw, gh * gw - 1, (gh // 2) * gw, (gh // 2) * gw + gw - 1,
               gw // 2, (gh - 1) * gw + gw // 2, (gh // 2) * gw + gw // 2}
    rest = torch.randperm(gh * gw, generator=gen).tolist()
    positions = sorted(corners | set(rest[:max(CHECKED_POSITIONS - len(corners), 0)]))
    inside = (spread * torch.randn(len(spread), 3, h, w, generator=gen)).to(device)
    outside = (spread * torch.randn(len(positions), len(spread), 3, h, w, generator=gen)).to(device)
    for position, noise in zip(positions, outside):
        top, left, at = crop.window(position)
        rows, cols = slice(top, top + crop.size[0]), slice(left, left + crop.size[1])
        image = noise.clone()
        image[..., rows, cols] = inside[..., rows, cols]
        full = tap(model, image, [layer])[layer].values[:, position]
        got = tap(model, inside[..., rows, cols], [layer])[layer].values[:, at]
        scale = max(float(full.abs().max()), 1e-12)
        if not math.isfinite(scale) or float((got - full).abs().max()) > tolerance * scale:
            return False
    return True


def tolerance_on(device: torch.device | str) -> float:
    """How closely a crop must agree with the full forward on `device` (TOLERANCE, or
    TOLERANCE_TF32 on a CUDA device whose cuDNN convolutions may use TF32)."""
    tf32 = torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32
    return TOLERANCE_TF32 if tf32 else TOLERANCE
