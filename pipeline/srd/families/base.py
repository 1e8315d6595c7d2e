"""What every SRD family adapter (`pipeline.srd.families.*`) builds with: the module claims,
the element-wise nonlinearities and eval-mode no-ops SRD accepts, the linear and input units,
and the graph a family lays out. Which family handles which timm model class is the dispatch
table of `pipeline.srd.adapters`, which imports the families; they import only this module.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import activations as timm_act
from torch import Tensor, nn

from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit, identity_pull


class SmoothReLU6(nn.Module):
    """softplus(x) - softplus(x - 6): a smooth ReLU6 (both kinks rounded by the same beta), the
    ReLU6 of the manipulation attack's smooth model copy (pipeline.evaluation.manipulation)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, self.beta) - F.softplus(x - 6.0, self.beta)


# Element-wise nonlinearities: any sigma works with the frozen ratio gate v/z and R(z) = R(v)
# (docs/method.md §3); Softplus and SmoothReLU6 are the attack's smooth ReLU / ReLU6; timm's own
# modules (its GELU, CLIP's QuickGELU x * sigmoid(1.702 x), hard-swish, ...) are element-wise too.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Tanh,
    nn.Sigmoid, nn.Softplus, SmoothReLU6, timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish,
    timm_act.HardSwish, timm_act.HardSigmoid, timm_act.HardMish, timm_act.Mish, timm_act.Sigmoid, timm_act.Tanh)
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


# per stage of a hierarchical model: (stage path, has a downsample, its block paths)
Stages = list[tuple[str, bool, list[str]]]


def claim_stages(model: nn.Module, validate: Callable[[Claims, Any], Stages],
                 ) -> tuple[Claims, Stages, list[str], list[str]]:
    """Claims of a hierarchical model (ConvNeXt, Swin) after `validate` and `finish`: the
    claims, the stages, every block path and every downsample path, in model order."""
    c = Claims(model)
    stages = validate(c, model)
    c.finish()
    blocks = [b for _, _, paths in stages for b in paths]
    downs = [f"{p}.downsample" for p, down, _ in stages if down]
    return c, stages, blocks, downs


def linear_unit(name: str, z: Tensor) -> Unit:
    """A PFV layer without nonlinearity after it (residual stream, linear bottleneck): v = z."""
    return Unit(name, z, z, pull=identity_pull)


def input_unit(images: Tensor) -> Unit:
    return Unit("input", images, images, pull=identity_pull)


def graph_of(units: list[Unit], blocks: list[Block], aliases: dict[str, str], logits: Tensor,
             differentiable: bool = False) -> Graph:
    return Graph({u.name: u for u in units}, blocks, aliases, logits, differentiable=differentiable)
