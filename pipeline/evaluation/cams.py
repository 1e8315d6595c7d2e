"""Class activation maps from the `grad-cam` package (pytorch-grad-cam), under the one signature,
for timm CNNs and ViTs, and a differentiable twin of two of them for the manipulation attack.

grad-cam's maps are its own, unchanged: the CAM at the layer's grid, ReLU, scaled per image to
[0, 1] (x - min, then / max), resized to the input with OpenCV's bilinear resize, and scaled to
[0, 1] again (`BaseCAM.forward`). A ViT's tokens are read as a grid by `tokens_to_grid` (grad-cam's
`reshape_transform`), prefix tokens (CLS, registers) dropped.

grad-cam computes in NumPy, so its maps cannot be differentiated in the input; the attack needs
that, and `cam` computes Grad-CAM and LayerCAM the same way in torch (tests check it equals
grad-cam's maps to 1e-5).
"""
from __future__ import annotations

import contextlib
import io
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluation.explainer import Explainer, Unsupported

# method name -> grad-cam class
GRADCAM_CLASSES: dict[str, str] = {
    "GradCAM": "GradCAM", "GradCAM++": "GradCAMPlusPlus", "XGradCAM": "XGradCAM", "HiResCAM": "HiResCAM",
    "LayerCAM": "LayerCAM", "ScoreCAM": "ScoreCAM", "AblationCAM": "AblationCAM", "FullGrad": "FullGrad"}
# the module whose output is the last spatial feature map, per timm family **[choice]**: the
# post-activation input of global pooling (ViT: the final norm's tokens)
CAM_LAYERS: dict[str, str] = {"ResNet": "layer4", "EfficientNet": "bn2", "VisionTransformer": "norm"}
# grad-cam's ScoreCAM holds every channel's masked copy of an image at once ([C, 3, H, W]); one
# image per call bounds that (1280 channels at 224 px: 0.8 GB)
SCORECAM_IMAGES_PER_CALL = 1


def cam_layer(model: nn.Module) -> str:
    """Module path of the CAM layer of a timm model (see CAM_LAYERS; a ViT whose head reads its
    class token: the last block's norm1)."""
    family = type(model).__name__
    if family not in CAM_LAYERS:
        raise ValueError(f"no CAM layer known for {family}; known families: {', '.join(CAM_LAYERS)}")
    if family == "VisionTransformer" and getattr(model, "global_pool", "") in ("token", "map"):
        # a head that reads the class token (or an attention pool) never sees the final norm's
        # patch tokens: their gradient is 0 and every CAM there is blank. The last block's
        # norm1 feeds its attention, through which the class token reads them (grad-cam's own
        # choice for ViTs)
        return f"blocks.{len(model.blocks) - 1}.norm1"
    return CAM_LAYERS[family]


def tokens_to_grid(model: nn.Module, act: Tensor) -> Tensor:
    """A CNN map [N, C, h, w] as is; ViT tokens [N, T, D] -> patch tokens as [N, D, h, w]
    (row-major patches after `model.num_prefix_tokens` prefix tokens)."""
    if act.dim() == 4:
        return act
    tokens = act[:, getattr(model, "num_prefix_tokens", 0):]
    h, w = model.patch_embed.grid_size
    return tokens.transpose(1, 2).reshape(act.shape[0], act.shape[2], h, w)


def _fullgrad_gaps(model: nn.Module) -> list[str]:
    """Modules with a bias that grad-cam's FullGrad would leave out of its sum: it collects bias
    gradients from modules of *exact* type Conv2d or BatchNorm2d only. The classifier's bias is
    not spatial and is left out by FullGrad's definition."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [name for name, m in model.named_modules()
            if getattr(m, "bias", None) is not None and type(m) not in (nn.Conv2d, nn.BatchNorm2d)
            and m is not head]


def gradcam_method(name: str, model: nn.Module, layer: str | None = None) -> Explainer:
    """grad-cam's `name` (a key of GRADCAM_CLASSES) for a timm model at `layer` (default
    cam_layer(model); FullGrad uses every bias instead): (images, target) -> maps [N, H, W] in
    [0, 1]. FullGrad raises Unsupported for a model with biases it would leave out."""
    import pytorch_grad_cam
    from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if name not in GRADCAM_CLASSES:
        raise ValueError(f"unknown grad-cam method {name!r}; known: {', '.join(GRADCAM_CLASSES)}")
    if name == "FullGrad":
        gaps = _fullgrad_gaps(model)
        if gaps:
            kinds = sorted({type(model.get_submodule(g)).__name__ for g in gaps})
            raise Unsupported(f"grad-cam's FullGrad sums bias gradients of exact nn.Conv2d / nn.BatchNorm2d "
                              f"modules only; {len(gaps)} other modules with a bias ({', '.join(kinds)}; first: "
                              f"{gaps[0]}) would be left out, so the map would not be FullGrad's")
    cls = getattr(pytorch_grad_cam, GRADCAM_CLASSES[name])
    target_layers = [] if name == "FullGrad" else [model.get_submodule(layer or cam_layer(model))]
    reshape = partial(tokens_to_grid, model)
    tokens = hasattr(model, "patch_embed")

    def one_call(x: Tensor, t: Tensor) -> Tensor:
        extra = {"ablation_layer": AblationLayerVit() if tokens else AblationLayer()} if name == "AblationCAM" else {}
        # ScoreCAM and AblationCAM print a tqdm bar per image
        with cls(model=model, target_layers=target_layers, reshape_transform=reshape, **extra) as engine, \
                contextlib.redirect_stderr(io.StringIO()):
            maps = engine(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
        return torch.from_numpy(maps).to(x.device)

    if name == "ScoreCAM":
        step = SCORECAM_IMAGES_PER_CALL
        return lambda x, t: torch.cat([one_call(x[i:i + step], t[i:i + step]) for i in range(0, len(x), step)])
    return one_call


def _unit_range(m: Tensor) -> Tensor:
    """grad-cam's `scale_cam_image` on maps [N, 1, h, w]: m - min, then / (1e-7 + max)."""
    m = m - m.amin((2, 3), keepdim=True)
    return m / (1e-7 + m.amax((2, 3), keepdim=True))


def cam(model: nn.Module, layer: str, images: Tensor, target: Tensor,
        kind: Literal["gradcam", "layercam"], create_graph: bool = False) -> Tensor:
    """Differentiable twin of grad-cam's GradCAM (Selvaraju et al.: ReLU(sum_c mean_hw(grad_c) A_c))
    or LayerCAM (Jiang et al.: ReLU(sum_c ReLU(grad_c) A_c)) of class `target` at `layer`, scaled
    and resized as grad-cam does -> Tensor[N, H, W] in [0, 1]; with create_graph=True the maps can
    be differentiated in the images."""
    if kind not in ("gradcam", "layercam"):
        raise ValueError(f"kind must be 'gradcam' or 'layercam', got {kind!r}")
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    store: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: store.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), store[0], create_graph=create_graph)
    act, grad = tokens_to_grid(model, store[0]), tokens_to_grid(model, grad)
    weights = grad.mean((2, 3), keepdim=True) if kind == "gradcam" else grad.clamp(min=0)
    m = _unit_range((weights * act).sum(1, keepdim=True).clamp(min=0))
    # OpenCV's bilinear resize samples at half-pixel centres, as align_corners=False
    m = F.interpolate(m, size=images.shape[2:], mode="bilinear", align_corners=False)
    return _unit_range(m)[:, 0]
