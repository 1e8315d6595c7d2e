"""Architecture adapters (canonizers): one table of supported timm families, one entry point.

An adapter reads an unmodified timm model, records one forward pass and lays it out as SRD
units and affine blocks (pipeline.srd.graph). Every module must be claimed by the adapter or be
a no-op in eval mode; anything else raises UnsupportedModuleError naming its type and path.
Layer names are module paths (`layer3`, `layer3.1`, `features.29`, `blocks.7`); a layer is the
output of that module, i.e. the post-activation PFVs v of the unit it ends.

This module is the dispatch only: which family builder (`pipeline.srd.families.*`) handles
which timm model class. What the families build with (Claims, ACTIVATIONS, units, graph_of,
SmoothReLU6) is `pipeline.srd.families.base`.
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.families.base import graph_of
from pipeline.srd.graph import Graph
from pipeline.srd.heads import Head

__all__ = ["Builder", "build", "graph_of"]

Builder = Callable[[nn.Module, Tensor, str, bool], tuple[Graph, Head]]


def _families() -> dict[type[nn.Module], Builder]:
    from pipeline.srd.families import convnext, efficientnet, resnet, swin, vgg, vit

    return {ResNet: resnet.build, VGG: vgg.build, VisionTransformer: vit.build,
            EfficientNet: efficientnet.build, MobileNetV3: efficientnet.build, ConvNeXt: convnext.build,
            SwinTransformer: swin.build}


def build(model: nn.Module, images: Tensor, head: str = "exact",
          differentiable: bool = False, reference: bool = False) -> tuple[Graph, Head]:
    """Record `model(images)` and lay it out for SRD. `head`: "exact" (decompose the classifier
    head exactly) or "gradcam" (VGG only: the reference code's Grad-CAM seed at the last conv).
    `differentiable`: record and lay out under autograd, so that the graph (and every map
    propagated on it) is a differentiable function of `images`; parameters enter as constants.
    Off by default: no autograd graph, no memory kept for one. `reference`: reproduce the
    authors' ResNet code instead of the project's rules where they differ (docs/method.md §3.7;
    timm ResNets with Bottleneck blocks only)."""
    if reference:
        from pipeline.srd.families import resnet

        if not isinstance(model, ResNet):
            raise ValueError(f"reference=True reproduces the authors' ResNet code; {type(model).__name__} "
                             "has no reference implementation (valid: timm ResNet with Bottleneck blocks)")
        with torch.set_grad_enabled(differentiable):
            return resnet.build(model, images, head, differentiable, reference=True)
    families = _families()
    builder = families.get(type(model))
    if builder is None:
        names = ", ".join(sorted(t.__name__ for t in families))
        raise UnsupportedModuleError(model, "", f"no SRD adapter; supported families: {names}")
    if head not in ("exact", "gradcam"):
        raise ValueError(f"head must be 'exact' or 'gradcam', got {head!r}")
    with torch.set_grad_enabled(differentiable):
        return builder(model, images, head, differentiable)
