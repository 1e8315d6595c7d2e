"""Named layer taps: pointwise feature vectors (PFVs) of any layer of a CNN or ViT, one layout.

A layer is a module path of `model.named_modules()`; its output is read as PFVs:
- a map Tensor[N, C, h, w] (CNN layers, a ViT's patch projection) -> P = h*w positions, row-major;
- a token sequence Tensor[N, T, C] (ViT layers) -> P = T tokens in order, prefix tokens
  (CLS, registers) first, then the h*w patch tokens row-major.

timm's feature stages (`model.feature_info`: `layer3`, `features.29`, `blocks.7`...) are read
with `model.forward_intermediates(stop_early=True)`, which skips the rest of the network;
any other layer with a forward hook on a full forward. Both give the module's output values.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pipeline.models.preprocess import model_input_size

Kind = Literal["cnn", "vit"]


@dataclass(frozen=True)
class LayerSpec:
    """A tappable layer: its PFV layout at the model's default input size.

    `kind`: 'cnn' for a [N, C, h, w] map, 'vit' for a [N, T, C] token sequence.
    `grid`: (h, w) of the spatial positions; `num_special`: prefix tokens before them.
    """

    name: str
    kind: Kind
    channels: int
    grid: tuple[int, int]
    is_feature_stage: bool
    num_special: int = 0


@dataclass(frozen=True)
class PFVs:
    """PFVs of one layer for a batch of N images.

    `values`: Tensor[N, P, C]; `special`: BoolTensor[P], True for prefix tokens (CLS,
    registers), which come first; the other h*w positions are the `grid` (h, w) row-major.
    """

    values: Tensor
    grid: tuple[int, int]
    special: Tensor
    kind: Kind

    def spatial(self) -> Tensor:
        """The non-special positions as a map Tensor[N, C, h, w]."""
        n, _, c = self.values.shape
        return self.values[:, ~self.special].reshape(n, *self.grid, c).permute(0, 3, 1, 2)


def feature_stages(model: nn.Module) -> list[str]:
    """Module paths of timm's feature stages (`model.feature_info`), shallow to deep."""
    info = getattr(model, "feature_info", None)
    return [f["module"] for f in info] if isinstance(info, list) else []


def list_layers(model: nn.Module, input_size: tuple[int, int] | None = None) -> list[LayerSpec]:
    """Every layer whose output is a PFV layout, feature stages first, then module order.

    Shapes come from one forward of a blank image at `input_size` (H, W), by default the
    size the model expects. Modules that run more than once per forward are left out
    (their output is ambiguous), as are modules whose output is not a map or token sequence.
    """
    h, w = input_size or model_input_size(model)
    param = next(model.parameters())
    images = torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype)
    shapes: dict[str, list[torch.Size | None]] = {}
    modules = {n: m for n, m in model.named_modules() if n}
    handles = [m.register_forward_hook(_shape_hook(shapes, n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()

    stages = feature_stages(model)
    specs = []
    for name in stages + [n for n in modules if n not in stages]:
        if len(shapes.get(name, ())) != 1 or shapes[name][0] is None:
            continue
        try:
            kind, grid, num_special = _layout(model, shapes[name][0], (h, w), name)
        except ValueError:
            continue
        channels = shapes[name][0][1 if kind == "cnn" else 2]
        specs.append(LayerSpec(name, kind, channels, grid, name in stages, num_special))
    return specs


def tap(model: nn.Module, images: Tensor, layers: Sequence[str], *,
        grad: bool = False) -> dict[str, PFVs]:
    """PFVs of `layers` for `images` Tensor[N, 3, H, W] (already preprocessed).

    Returns {layer: PFVs} with values Tensor[N, P, C] (contiguous copies). Runs under `torch.no_grad()` unless
    `grad=True` (then values keep their graph, e.g. for gradients w.r.t. `images`).
    Raises ValueError for an unknown layer, a module that does not run or runs twice in the
    forward, or an output that is not a map or token sequence.
    """
    layers = list(dict.fromkeys(layers))
    if not layers:
        return {}
    modules = _resolve(model, layers)
    stages = feature_stages(model)
    with torch.set_grad_enabled(grad):
        if all(name in stages for name in layers) and hasattr(model, "forward_intermediates"):
            raw = _forward_stages(model, images, layers, stages)
        else:
            raw = _forward_hooked(model, images, modules)
    return {name: _to_pfvs(model, raw[name], tuple(images.shape[-2:]), name) for name in layers}


def _resolve(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for name in layers:
        if name == "" or name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            raise ValueError(
                f"unknown layer {name!r} for {_model_name(model)}; feature stages: "
                f"{', '.join(feature_stages(model)) or 'none'}; any module path of "
                f"model.named_modules() also works{hint}")
    return {name: modules[name] for name in layers}


def _forward_stages(model: nn.Module, images: Tensor, layers: list[str],
                    stages: list[str]) -> dict[str, Tensor]:
    # forward_intermediates returns the requested stages in network order
    order = sorted(layers, key=stages.index)
    if _is_vit(model):
        outs = model.forward_intermediates(
            images, indices=[stages.index(n) for n in order], output_fmt="NLC",
            return_prefix_tokens=True, stop_early=True, intermediates_only=True)
        # (patch tokens, prefix tokens) pairs when the model has prefix tokens: put them back in front
        outs = [torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out for out in outs]
    else:
        # channels-last runs the convs and max-pools of CPU CNNs ~1.5x faster (demo_resnet,
        # batch 128: 0.84 s vs 1.32 s); values agree with NCHW to float rounding
        outs = model.forward_intermediates(
            images.contiguous(memory_format=torch.channels_last),
            indices=[stages.index(n) for n in order], output_fmt="NCHW",
            stop_early=True, intermediates_only=True)
    return dict(zip(order, outs))


def _forward_hooked(model: nn.Module, images: Tensor,
                    modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    captured: dict[str, list[Tensor]] = {name: [] for name in modules}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise ValueError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
            # clone: a later in-place op (ReLU(inplace=True), `x += shortcut`) would overwrite it
            captured[name].append(output.clone())
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    for name, outs in captured.items():
        if len(outs) != 1:
            raise ValueError(f"layer {name!r} ran {len(outs)} times in the forward of "
                             f"{_model_name(model)}; tap a module that runs exactly once")
    return {name: outs[0] for name, outs in captured.items()}


def _to_pfvs(model: nn.Module, out: Tensor, input_hw: tuple[int, int], name: str) -> PFVs:
    kind, grid, num_special = _layout(model, out.shape, input_hw, name)
    if kind == "cnn":
        values = out.flatten(2).transpose(1, 2).contiguous()  # [N, C, h, w] -> [N, h*w, C]
    else:
        values = out.contiguous()
    special = torch.zeros(values.shape[1], dtype=torch.bool, device=out.device)
    special[:num_special] = True
    return PFVs(values=values, grid=grid, special=special, kind=kind)


def _layout(model: nn.Module, shape: torch.Size, input_hw: tuple[int, int],
            name: str) -> tuple[Kind, tuple[int, int], int]:
    """(kind, grid, num_special) of a layer output of `shape`; ValueError if not a PFV layout."""
    vit_grid = _vit_grid(model, input_hw) if _is_vit(model) else None
    if len(shape) == 4:  # a CNN map, in a ViT too (the patch conv; a convolutional stem's layers)
        return "cnn", (int(shape[2]), int(shape[3])), 0
    if len(shape) == 3 and vit_grid is not None:
        n_patches = vit_grid[0] * vit_grid[1]
        for num_special in (model.num_prefix_tokens, 0):  # 0: before the prefix tokens are added
            if shape[1] == num_special + n_patches:
                return "vit", vit_grid, num_special
    expected = ("a [N, C, h, w] map" if vit_grid is None else
                f"a [N, C, h, w] map or [N, T, C] tokens on the {vit_grid[0]}x{vit_grid[1]} patch grid")
    raise ValueError(f"layer {name!r} of {_model_name(model)} outputs shape {tuple(shape)}, "
                     f"not PFVs: expected {expected}")


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def _vit_grid(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = model.patch_embed.dynamic_feat_size(input_hw)
    return int(h), int(w)


def _shape_hook(shapes: dict[str, list[torch.Size | None]], name: str):
    def record(module: nn.Module, args: tuple, output: object) -> None:
        shapes.setdefault(name, []).append(output.shape if isinstance(output, Tensor) else None)
    return record


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
