"""Architecture adapters (canonizers): one table of supported timm families, one entry point.

An adapter reads an unmodified timm model, records one forward pass and lays it out as SRD
units and affine blocks (pipeline.srd.graph). Every module must be claimed by the adapter or be
a no-op in eval mode; anything else raises UnsupportedModuleError naming its type and path.
Layer names are module paths (`layer3`, `layer3.1`, `features.29`, `blocks.7`); a layer is the
output of that module, i.e. the post-activation PFVs v of the unit it ends.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import ResNet
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit, identity_pull
from pipeline.srd.heads import Head

class SmoothReLU6(nn.Module):
    """softplus(x) - softplus(x - 6): a smooth ReLU6 (both kinks rounded by the same beta), the
    ReLU6 of the manipulation attack's smooth model copy (pipeline.evaluation.manipulation)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, self.beta) - F.softplus(x - 6.0, self.beta)


# Element-wise nonlinearities: any sigma works with the frozen ratio gate v/z and R(z) = R(v)
# (METHOD.md section 3); Softplus and SmoothReLU6 are the attack's smooth ReLU / ReLU6.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Softplus, SmoothReLU6)
NO_OPS: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, DropPath)  # identities in eval mode


class Claims:
    """Which modules an adapter decomposes; `finish` rejects any other one by type and path."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.claimed: set[str] = set()

    def get(self, path: str, *types: type[nn.Module], optional: bool = False) -> nn.Module | None:
        mod = self.modules.get(path)
        if mod is None or (optional and isinstance(mod, nn.Identity)):
            if optional:
                if mod is not None:
                    self.claimed.add(path)
                return None
            raise UnsupportedModuleError(nn.Module, path, "expected module missing")
        if types and type(mod) not in types:
            want = ", ".join(t.__name__ for t in types)
            raise UnsupportedModuleError(mod, path, f"expected {want}")
        self.claimed.add(path)
        return mod

    def finish(self) -> None:
        # shallowest first, so the error names the outermost module SRD does not understand
        for path, mod in sorted(self.modules.items(), key=lambda kv: kv[0].count(".")):
            if path and not self._ok(path):
                raise UnsupportedModuleError(mod, path)

    def _ok(self, path: str) -> bool:
        """Claimed, a no-op, or a plain container of such modules."""
        mod = self.modules[path]
        if path in self.claimed or isinstance(mod, NO_OPS):
            return True
        kids = [f"{path}.{n}" for n, _ in mod.named_children()]
        return bool(kids) and all(self._ok(k) for k in kids)


def linear_unit(name: str, z: Tensor) -> Unit:
    """A PFV layer without nonlinearity after it (residual stream, linear bottleneck): v = z."""
    return Unit(name, z, z, pull=identity_pull)


def input_unit(images: Tensor) -> Unit:
    return Unit("input", images, images, pull=identity_pull)


Builder = Callable[[nn.Module, Tensor, str, bool], tuple[Graph, Head]]


def _families() -> dict[type[nn.Module], Builder]:
    from pipeline.srd.families import efficientnet, resnet, vgg, vit

    return {ResNet: resnet.build, VGG: vgg.build, VisionTransformer: vit.build,
            EfficientNet: efficientnet.build}


def build(model: nn.Module, images: Tensor, head: str = "exact",
          differentiable: bool = False) -> tuple[Graph, Head]:
    """Record `model(images)` and lay it out for SRD. `head`: "exact" (decompose the classifier
    head exactly) or "gradcam" (VGG only: the reference code's Grad-CAM seed at the last conv).
    `differentiable`: record and lay out under autograd, so that the graph (and every map
    propagated on it) is a differentiable function of `images`; parameters enter as constants.
    Off by default: no autograd graph, no memory kept for one."""
    families = _families()
    builder = families.get(type(model))
    if builder is None:
        names = ", ".join(sorted(t.__name__ for t in families))
        raise UnsupportedModuleError(model, "", f"no SRD adapter; supported families: {names}")
    if head not in ("exact", "gradcam"):
        raise ValueError(f"head must be 'exact' or 'gradcam', got {head!r}")
    with torch.set_grad_enabled(differentiable):
        return builder(model, images, head, differentiable)


def graph_of(units: list[Unit], blocks: list[Block], aliases: dict[str, str], logits: Tensor,
             differentiable: bool = False) -> Graph:
    return Graph({u.name: u for u in units}, blocks, aliases, logits, differentiable=differentiable)
