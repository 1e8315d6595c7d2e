"""Patch stems for the faithfulness check (docs/method.md §6, Faithfulness, "Cost").

Every image a check reads is a patch composite: each patch of `patch` x `patch` pixels shows
either the exemplar's image or the baseline 0 (`faithfulness.composites`). A CNN's first
convolution is linear, so its output on a composite is the bias plus the convolutions of the
shown patches. Split the patches into four classes by the parity of their row and column: a
window of at most patch + 1 pixels per axis touches at most two patches per axis, one of each
parity, so at any output position each class contributes the part of at most *one* patch, shown
or not. With the four class convolutions C_k of the image computed once, an output position of a
composite is the bias plus the C_k whose patch is shown there: one of 2^4 sums. The modules that
follow the convolution and act on each position alone (BatchNorm in eval mode, activations) are
run once on those 16 sums, and each composite's output after them is gathered row by row from
the 16 results: a copy per position instead of a convolution, a norm and an activation of 92
images. demo_resnet's stem (7 x 7 convolution to 64 channels, BatchNorm, ReLU) was 40% of a
check's forward on a CPU.

As the crops (`fieldcrop.py`), a stem is found by measurement and then *checked*: the modules
that run before all others are recorded on a probe forward, each following one is kept only
while a change of its input at some positions leaves its output at the others unchanged, and a
layer whose readout from the gathered stem differs from the plain forward's on random composites
(beyond `fieldcrop.tolerance_on`) gets no stem. A ViT's patch embedding reads windows wider than
two CAFE patches (14 or 16 pixels against 8): no stem.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.cafe import faithfulness
from pipeline.cafe.fieldcrop import tolerance_on
from pipeline.models import tap

# parity classes of patches (row even/odd x column even/odd) and their 2^4 shown/hidden sums
CLASSES = 4
SUMS = 2 ** CLASSES
# random composites per patch-grid offset of the exactness check
CHECKED_COMPOSITES = 8
# modules that only hold others: their calls are looked through for the ones they make
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class PatchStem:
    """The first convolution of a model (`first`, module path) and the per-position modules run
    right after it (`pointwise`, in order), computed for patch composites of `patch` pixels from
    16 sums; `probe` is a one-channel copy of the convolution with unit weights, which finds the
    patch each output position reads (`window`, kept per window in `windows`)."""

    first: str
    pointwise: tuple[str, ...]
    patch: int
    probe: nn.Module = field(repr=False, compare=False)
    windows: dict[tuple[int, ...], Window] = field(default_factory=dict, repr=False,
                                                   compare=False)

    def window(self, shape: tuple[int, int], top: int, left: int,
               size: tuple[int, int]) -> Window:
        """Where the pixels of a window of `size` at (`top`, `left`) of an image of `shape`
        sit in the patch grid (`faithfulness.patch_ids`), and which patch of each class every
        output position of the stem reads."""
        key = (*shape, top, left, *size)
        if key not in self.windows:
            grid = faithfulness.patch_ids(shape, self.patch)
            # one past the image's last patch: where a position reads no patch of a class
            # (`compose` gathers a never-shown flag for it)
            none = int(grid.max()) + 1
            ids = grid[top:top + size[0], left:left + size[1]].to(self.probe.weight.device)
            width = -(-shape[1] // self.patch)
            klass = (ids // width % 2) * 2 + ids % width % 2
            index = torch.stack([self._reads(ids, klass == k, none) for k in range(CLASSES)])
            masks = torch.stack([klass == k for k in range(CLASSES)])[:, None]
            self.windows[key] = Window(masks, index.flatten(1), tuple(index.shape[1:]), none)
        return self.windows[key]

    def _reads(self, ids: Tensor, in_class: Tensor, none: int) -> Tensor:
        """The patch of one class each output position's window touches (`none` where it
        touches none): LongTensor[h', w'], from the window's pixel count and id sum."""
        on = in_class.to(torch.float64)[None, None]
        count = self.probe(on)[0, 0]
        total = self.probe(on * (ids + 1).to(torch.float64))[0, 0]
        return torch.where(count > 0, torch.round(total / count.clamp(min=1)) - 1,
                           torch.full_like(count, none)).long()

    def table(self, model: nn.Module, image: Tensor, window: Window) -> Tensor:
        """The stem's output for each of the 16 ways its four patch classes can show, of
        `image` Tensor[3, h, w] in `window`: Tensor[16 h' w', C], rows sum-major then
        position (the bias plus the class convolutions whose bit is set, then the per-position
        modules)."""
        classes = torch.cat([torch.zeros_like(image[None]), image * window.masks.to(image)])
        conv = model.get_submodule(self.first)
        out = conv(classes.contiguous(memory_format=torch.channels_last))
        empty, shares = out[:1].permute(0, 2, 3, 1), (out[1:] - out[:1]).permute(0, 2, 3, 1)
        bits = torch.tensor([[(s >> k) & 1 for k in range(CLASSES)] for s in range(SUMS)],
                            dtype=out.dtype, device=out.device)
        sums = torch.addmm(empty.reshape(1, -1), bits, shares.reshape(CLASSES, -1))
        sums = sums.view(SUMS, *shares.shape[1:]).permute(0, 3, 1, 2)  # channels-last maps
        for name in self.pointwise:
            sums = model.get_submodule(name)(sums)
        return sums.permute(0, 2, 3, 1).reshape(-1, sums.shape[1])


@dataclass(frozen=True)
class Window:
    """A window of composites (`PatchStem.window`): `masks` BoolTensor[4, 1, h, w], the pixels
    of each patch class; `index` LongTensor[4, h' w'], the patch of each class that each stem
    output position reads (`none`, one past the image's last patch, where it reads none);
    `grid` (h', w'), the stem's output grid."""

    masks: Tensor
    index: Tensor
    grid: tuple[int, int]
    none: int


def compose(segments: list[tuple[Tensor, Window, Tensor]]) -> Tensor:
    """The stem's output for composites, gathered from tables: per segment (`PatchStem.table`,
    its `Window`, `shown` BoolTensor[n, P] of the image's P patches), in order:
    Tensor[sum n, C, h', w'] (channels-last, as the model's own convolutions give it)."""
    table, window, _ = segments[0]
    positions = window.index.shape[1]
    out = table.new_empty(sum(len(s) for _, _, s in segments) * positions, table.shape[1])
    at = 0
    for table, window, shown in segments:
        if shown.shape[1] != window.none:
            raise ValueError(f"shown has {shown.shape[1]} patches; the window is of an image "
                             f"of {window.none}")
        # patch-major, so that each gather copies whole rows of the n images
        flags = torch.cat([shown.t(), shown.new_zeros(1, len(shown))]).to(torch.uint8)
        flags = flags.to(window.index.device)
        sums = flags.index_select(0, window.index[0])
        for k in range(1, CLASSES):
            sums |= flags.index_select(0, window.index[k]) << k
        offsets = torch.arange(positions, device=sums.device)[:, None]
        rows = (sums.long() * positions + offsets).t().reshape(-1)
        torch.index_select(table, 0, rows, out=out[at:at + len(rows)])
        at += len(rows)
    return out.view(-1, *window.grid, table.shape[1]).permute(0, 3, 1, 2)


@contextmanager
def substituted(model: nn.Module, stem: PatchStem, output: Tensor) -> Iterator[None]:
    """Within the block the stem's first convolution returns `output` whatever its input, and
    its per-position modules pass their input through (their work is in `output`)."""
    model.get_submodule(stem.first).forward = lambda *args, **kwargs: output
    for name in stem.pointwise:
        model.get_submodule(name).forward = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        for name in (stem.first, *stem.pointwise):
            del model.get_submodule(name).forward


@torch.no_grad()
def patch_stem(model: nn.Module, layer: str, shape: tuple[int, int], patch: int,
               device: torch.device | str = "cpu", seed: int = 0) -> PatchStem | None:
    """The patch stem of `model` for checks of `layer` on inputs of `shape` (H, W), or None where
    there is none or it is not exact: a first module that is not a convolution of the image, a
    window wider than patch + 1 pixels, a readout that differs from the plain forward's."""
    gen = torch.Generator().manual_seed(seed)
    probe_images = torch.randn(2, 3, *shape, generator=gen).to(device)
    calls = _first_calls(model, probe_images, layer)
    if not calls:
        return None
    name, conv, args, _ = calls[0]
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and len(args) == 1
            and args[0].shape == probe_images.shape and torch.equal(args[0], probe_images)
            and conv.padding_mode == "zeros"):
        return None
    windows = [(k - 1) * d + 1 for k, d in zip(conv.kernel_size, conv.dilation)]
    if max(windows) > patch + 1:
        return None
    pointwise = []
    for (*_, out), (next_name, module, next_args, _) in zip(calls, calls[1:]):
        if not (len(next_args) == 1 and next_args[0] is out and _per_position(module, out, gen)):
            break
        pointwise.append(next_name)
    stem = PatchStem(name, tuple(pointwise), patch, _unit_probe(conv))
    return stem if _exact(model, layer, stem, shape, gen, device) else None


def _first_calls(model: nn.Module, images: Tensor, layer: str
                 ) -> list[tuple[str, nn.Module, tuple[Tensor, ...], Tensor]]:
    """The modules called by the model itself (not from inside another module, containers
    looked through) in the order of a forward to `layer`: (name, module, inputs, output)."""
    calls: list[tuple[str, nn.Module, tuple[Tensor, ...], Tensor]] = []
    inside: list[str] = []

    def before(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not inside and not isinstance(module, CONTAINERS):
                calls.append((name, module, args, torch.empty(0)))
            if not isinstance(module, CONTAINERS):
                inside.append(name)
        return hook

    def after(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(module, CONTAINERS):
                return
            inside.pop()
            if not inside and calls and calls[-1][0] == name and isinstance(output, Tensor):
                calls[-1] = (*calls[-1][:3], output)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
    try:
        tap(model, images, [layer])
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _per_position(module: nn.Module, x: Tensor, gen: torch.Generator) -> bool:
    """Whether `module` maps each position of a map Tensor[N, C, h, w] on its own: new values at
    half of the positions of one image, and a whole other image, leave the rest unchanged."""
    if x.dim() != 4:
        return False
    kept = torch.rand(x.shape[-2:], generator=gen) < 0.5
    other = x.clone()
    noise = torch.randn(other.shape, generator=gen).to(x)
    other[:, :, ~kept.to(x.device)] = noise[:, :, ~kept.to(x.device)]
    other[1:] = noise[1:]
    a, b = module(x.clone()), module(other)
    return (isinstance(a, Tensor) and a.shape == x.shape
            and torch.equal(a[:1, :, kept.to(x.device)], b[:1, :, kept.to(x.device)]))


def _unit_probe(conv: nn.Conv2d) -> nn.Module:
    """A copy of `conv` from one channel to one, unit weights and no bias, in float64: the same
    windows (stride, padding, dilation, a timm 'same' padding) summing what they read, exactly
    for integer inputs."""
    probe = copy.deepcopy(conv)
    probe.weight = nn.Parameter(torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64,
                                           device=conv.weight.device), requires_grad=False)
    probe.bias = None
    probe.in_channels = probe.out_channels = 1
    return probe


def _exact(model: nn.Module, layer: str, stem: PatchStem, shape: tuple[int, int],
           gen: torch.Generator, device: torch.device | str) -> bool:
    """Whether the layer reads the same from the gathered stem as from the plain forward, on
    random composites of a random image, with the patch grid at two offsets (a crop's window
    may start inside a patch)."""
    tolerance = tolerance_on(device)
    image = (2.0 * torch.randn(3, *shape, generator=gen)).to(device)
    for offset in (0, stem.patch // 2):
        full = (shape[0] + offset, shape[1] + offset)
        ids = faithfulness.patch_ids(full, stem.patch)
        shown = torch.rand(CHECKED_COMPOSITES, int(ids.max()) + 1, generator=gen) < 0.5
        shown[0], shown[1] = True, False
        plain = faithfulness.composites(image, ids[offset:, offset:].to(device), shown)
        want = tap(model, plain, [layer])[layer].values
        window = stem.window(full, offset, offset, shape)
        with substituted(model, stem, compose([(stem.table(model, image, window), window,
                                                shown)])):
            got = tap(model, torch.zeros_like(plain), [layer])[layer].values
        scale = max(float(want.abs().max()), 1e-12)
        if not math.isfinite(scale) or float((got - want).abs().max()) > tolerance * scale:
            return False
    return True
