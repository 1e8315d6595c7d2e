"""Pair isolation: run only the sub-network F_ab between two tapped layers (docs/method.md §7).

A `Segment` maps layer `src`'s output, in PFV layout Tensor[N, P, C] (pipeline.models.taps), to
layer `dst`'s output in PFV layout, or to the class logits Tensor[N, K] when `dst == "logits"`.

For the families with a sequential feature trunk the segment is built from the model's own
modules ("spine"): timm ResNet (stem modules, then every residual block), EfficientNet (stem,
every block of every stage, head conv), VGG (`features.*`), VisionTransformer (`blocks.*`,
`norm`). A stage container (`layer3`, `blocks.2`, `blocks`) names the output of its last child.
Only the modules strictly after `src` up to `dst` run; logits add `model.forward_head`.

Anything else (another family, or a layer that is not on the spine, such as `layer2.0.conv1` or
a ViT `patch_embed`) falls back to `HookSegment`: the whole model runs on the images, a forward
hook on `src` substitutes the given activation, and a hook on `dst` stops the forward there.
The prefix up to `src` then runs too (wasted compute, identical values), so the fallback needs
the images and costs a full forward per call.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.models import LayerSpec, list_layers, model_input_size

LOGITS = "logits"


def _spine_paths(model: nn.Module) -> tuple[list[str], dict[str, str]] | None:
    """(module paths of the trunk in forward order, {container path: its last child}) or None."""
    if isinstance(model, ResNet):
        prefix, stages, suffix = ["conv1", "bn1", "act1", "maxpool"], ["layer1", "layer2", "layer3", "layer4"], []
    elif isinstance(model, EfficientNet):
        prefix = ["conv_stem", "bn1"]
        stages = [f"blocks.{i}" for i in range(len(model.blocks))]
        suffix = ["conv_head", "bn2"]
    elif isinstance(model, VGG):
        prefix, stages, suffix = [], [], [f"features.{i}" for i in range(len(model.features))]
    elif isinstance(model, VisionTransformer):
        if not isinstance(model.blocks, nn.Sequential):
            return None
        prefix, stages, suffix = [], [], [f"blocks.{i}" for i in range(len(model.blocks))] + ["norm"]
    else:
        return None
    modules = dict(model.named_modules())
    paths, aliases = list(prefix), {}
    for stage in stages:
        children = [f"{stage}.{name}" for name, _ in modules[stage].named_children()]
        paths.extend(children)
        aliases[stage] = children[-1]
    paths.extend(suffix)
    if isinstance(model, VisionTransformer):
        aliases["blocks"] = f"blocks.{len(model.blocks) - 1}"
    return paths, aliases


class Segment:
    """F_ab of `model` from layer `src` to layer `dst` (or "logits"), on PFV layouts.

    Call with `x` Tensor[N, P, C] (src's PFVs, prefix tokens first for a ViT) and, for the
    hook fallback only, the preprocessed `images` Tensor[N, 3, H, W] they came from.
    Returns Tensor[N, P', C'] (dst's PFVs) or Tensor[N, K] logits. Differentiable in `x`.
    `isolated` is False for the fallback (the model's prefix runs too). `specs`: the layers'
    layouts at the input size the segment will see (default: the model's own input size).
    """

    def __init__(self, model: nn.Module, src: str, dst: str, specs: dict[str, LayerSpec] | None = None) -> None:
        self.model, self.src, self.dst = model, src, dst
        specs = specs if specs is not None else {s.name: s for s in list_layers(model)}
        for name in (src,) + (() if dst == LOGITS else (dst,)):
            if name not in specs:
                raise ValueError(f"layer {name!r} is not a PFV layer of {type(model).__name__}; "
                                 f"layers: {', '.join(list(specs)[:12])}, ...")
        self.src_spec = specs[src]
        self.dst_spec = None if dst == LOGITS else specs[dst]
        spine = _spine_paths(model)
        self.steps: list[nn.Module] | None = None
        if spine is not None:
            paths, aliases = spine
            a, b = aliases.get(src, src), aliases.get(dst, dst) if dst != LOGITS else None
            if a in paths and (b is None or b in paths):
                i, j = paths.index(a), (len(paths) - 1 if b is None else paths.index(b))
                if b is not None and j <= i:
                    raise ValueError(f"layer {dst!r} does not come after {src!r} in "
                                     f"{type(model).__name__}: a segment runs forward only")
                modules = dict(model.named_modules())
                self.steps = [modules[p] for p in paths[i + 1:j + 1]]
        self.isolated = self.steps is not None
        self._fallback = None if self.isolated else HookSegment(model, src, dst, specs)

    def __call__(self, x: Tensor, images: Tensor | None = None) -> Tensor:
        if self._fallback is not None:
            if images is None:
                raise ValueError(f"segment {self.src} -> {self.dst} of {type(self.model).__name__} "
                                 "runs by hook fallback and needs the images")
            return self._fallback(x, images)
        h = to_module_layout(x, self.src_spec)
        for step in self.steps:
            h = step(h)
        if self.dst_spec is None:
            return self.model.forward_head(h)
        return to_pfv_layout(h, self.dst_spec)


class HookSegment:
    """The fallback F_ab: full forward with `src`'s output replaced and a stop after `dst`."""

    def __init__(self, model: nn.Module, src: str, dst: str, specs: dict[str, LayerSpec]) -> None:
        modules = dict(model.named_modules())
        self.model = model
        self.src_module = modules[src]
        self.dst_module = None if dst == LOGITS else modules[dst]
        self.src_spec, self.dst_spec = specs[src], (None if dst == LOGITS else specs[dst])

    def __call__(self, x: Tensor, images: Tensor) -> Tensor:
        replacement = to_module_layout(x, self.src_spec)
        handles = [self.src_module.register_forward_hook(lambda m, i, o: replacement)]
        if self.dst_module is not None:
            handles.append(self.dst_module.register_forward_hook(_stop))
        try:
            return self.model(images)
        except _Stop as stop:
            return to_pfv_layout(stop.output, self.dst_spec)
        finally:
            for handle in handles:
                handle.remove()


class _Stop(Exception):
    def __init__(self, output: Tensor) -> None:
        super().__init__("segment reached its last layer")
        self.output = output


def _stop(module: nn.Module, inputs: object, output: Tensor) -> None:
    raise _Stop(output)


def to_module_layout(x: Tensor, spec: LayerSpec) -> Tensor:
    """PFVs Tensor[N, P, C] -> the module's own output layout ([N, C, h, w] map or [N, T, C])."""
    if spec.kind == "cnn":
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *spec.grid)
    return x


def to_pfv_layout(out: Tensor, spec: LayerSpec) -> Tensor:
    """A module output ([N, C, h, w] or [N, T, C]) -> PFVs Tensor[N, P, C]."""
    return out.flatten(2).transpose(1, 2) if spec.kind == "cnn" else out


def layer_order(model: nn.Module, layers: list[str]) -> list[str]:
    """`layers` sorted in forward order (first output first), by one hooked forward."""
    modules = dict(model.named_modules())
    order: list[str] = []
    handles = [modules[n].register_forward_hook(_record_order(order, n)) for n in layers]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, 3, *model_input_size(model), dtype=p.dtype, device=p.device))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(layers, key=lambda n: order.index(n) if n in order else len(order))


def _record_order(order: list[str], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if name not in order:
            order.append(name)
    return hook
