"""Saliency methods under one signature: `(images [N, 3, H, W], target [N]) -> maps [N, H, W]`.

Baselines are Captum's (Saliency, InputXGradient, IntegratedGradients, GuidedBackprop,
SmoothGrad = NoiseTunnel over Saliency, LRP), plus Grad-CAM and LayerCAM written here (they
must also read ViT token layouts, which Captum's LayerGradCam does not), and SRD, our method
(plain, and with the contrastive seed rule of docs/method.md §3).

Reduction over colour channels **[choice]**: every pixel-space attribution is summed over its
three channels, keeping its sign; Saliency and SmoothGrad are |gradient| summed (Captum's
`abs=True`, Simonyan et al.), so they carry no sign. CAM maps are bilinearly upsampled from
the CAM layer's grid to the input size.

`input_grad`, `smoothgrad`, `integrated_gradients` and `cam` are plain-torch versions that can
be differentiated again (`create_graph=True`): the manipulation attack needs the gradient of an
explanation with respect to the input, which Captum does not expose. Tests check that they
equal Captum's maps.
"""
from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import srd

Explainer = Callable[[Tensor, Tensor], Tensor]

METHODS: tuple[str, ...] = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop",
                            "SmoothGrad", "LRP", "GradCAM", "LayerCAM", "SRD", "SRD-contrastive")
# the module whose output is the last spatial feature map, per timm family **[choice]**: the
# post-activation input of global pooling (ViT: the final norm's tokens)
CAM_LAYERS: dict[str, str] = {"ResNet": "layer4", "EfficientNet": "bn2", "VisionTransformer": "norm"}


class Unsupported(RuntimeError):
    """A method that cannot explain this model; the message says why."""


def cam_layer(model: nn.Module) -> str:
    """Module path of the Grad-CAM / LayerCAM layer of a timm model (see CAM_LAYERS)."""
    family = type(model).__name__
    if family not in CAM_LAYERS:
        raise ValueError(f"no CAM layer known for {family}; known families: {', '.join(CAM_LAYERS)}")
    return CAM_LAYERS[family]


def _logit(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    return model(x).gather(1, target[:, None]).sum()


def input_grad(model: nn.Module, images: Tensor, target: Tensor, create_graph: bool = False) -> Tensor:
    """d logit_target / d input: Tensor[N, 3, H, W] (images need not require grad)."""
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_logit(model, x, target), x, create_graph=create_graph)
    return g


def smoothgrad(model: nn.Module, images: Tensor, target: Tensor, samples: int, stdev: float,
               create_graph: bool = False, seed: int = 0) -> Tensor:
    """SmoothGrad of |gradient| summed over channels: mean over `samples` noisy copies
    (N(0, stdev^2) in input units) -> Tensor[N, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(images.shape[0], *images.shape[2:], device=images.device)
    for _ in range(samples):
        noise = torch.randn(images.shape, generator=gen).to(images) * stdev
        total = total + input_grad(model, images + noise, target, create_graph).abs().sum(1)
    return total / samples


def integrated_gradients(model: nn.Module, images: Tensor, target: Tensor, steps: int,
                         create_graph: bool = False) -> Tensor:
    """IG from the all-zero input (the dataset's mean colour after normalisation) with the
    midpoint rule (Captum's `riemann_middle`), summed over channels -> Tensor[N, H, W]."""
    total = torch.zeros_like(images)
    for k in range(steps):
        total = total + input_grad(model, images * ((k + 0.5) / steps), target, create_graph)
    return (images * total / steps).sum(1)


def _layer_output(model: nn.Module, layer: str, images: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, output of `layer`) of one forward pass."""
    store: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: store.append(out))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return logits, store[0]


def _spatial(model: nn.Module, act: Tensor) -> Tensor:
    """A CNN map [N, C, h, w] as is; ViT tokens [N, T, D] -> patch tokens as [N, D, h, w]."""
    if act.dim() == 4:
        return act
    tokens = act[:, getattr(model, "num_prefix_tokens", 0):]
    h, w = model.patch_embed.grid_size
    return tokens.transpose(1, 2).reshape(act.shape[0], act.shape[2], h, w)


def cam(model: nn.Module, layer: str, images: Tensor, target: Tensor,
        kind: Literal["gradcam", "layercam"], create_graph: bool = False) -> Tensor:
    """Grad-CAM (Selvaraju et al.: ReLU(sum_c mean_hw(grad_c) * A_c)) or LayerCAM (Jiang et al.:
    ReLU(sum_c ReLU(grad_c) * A_c)) of class `target` at `layer`, bilinearly upsampled to the
    input size -> Tensor[N, H, W]."""
    x = images if images.requires_grad else images.detach().requires_grad_(True)
    logits, act = _layer_output(model, layer, x)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act, create_graph=create_graph)
    act, grad = _spatial(model, act), _spatial(model, grad)
    if kind == "gradcam":
        weights = grad.mean((2, 3), keepdim=True)
    elif kind == "layercam":
        weights = grad.clamp(min=0)
    else:
        raise ValueError(f"kind must be 'gradcam' or 'layercam', got {kind!r}")
    m = (weights * act).sum(1, keepdim=True).clamp(min=0)
    return F.interpolate(m, size=images.shape[2:], mode="bilinear", align_corners=False)[:, 0]


def differentiable(name: str, model: nn.Module, *, layer: str | None = None, ig_steps: int = 8,
                   sg_samples: int = 4, sg_stdev: float = 0.15) -> Explainer:
    """An explainer whose maps are differentiable in the images, for the manipulation attack:
    the gradient methods and CAMs via create_graph=True (Saliency, InputXGradient, SmoothGrad,
    IntegratedGradients, GradCAM, LayerCAM), SRD and SRD-contrastive via SRD's differentiable
    recording and propagation (`srd.saliency(..., differentiable=True)`, the same map as
    make_method's). GuidedBackprop and LRP raise Unsupported (modified backward rules with no
    second-order path here)."""
    fns: dict[str, Explainer] = {
        "Saliency": lambda x, t: input_grad(model, x, t, True).abs().sum(1),
        "InputXGradient": lambda x, t: (x * input_grad(model, x, t, True)).sum(1),
        "SmoothGrad": lambda x, t: smoothgrad(model, x, t, sg_samples, sg_stdev, True),
        "IntegratedGradients": lambda x, t: integrated_gradients(model, x, t, ig_steps, True),
        "GradCAM": lambda x, t: cam(model, layer or cam_layer(model), x, t, "gradcam", True),
        "LayerCAM": lambda x, t: cam(model, layer or cam_layer(model), x, t, "layercam", True),
        "SRD": lambda x, t: srd.saliency(model, x, t, False, differentiable=True),
        "SRD-contrastive": lambda x, t: srd.saliency(model, x, t, True, differentiable=True),
    }
    if name not in fns:
        if name in METHODS:
            raise Unsupported(f"{name}: no differentiable implementation (modified backward rules)")
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return fns[name]


def batched(explain: Explainer, size: int) -> Explainer:
    """`explain` run `size` images at a time (bounds the memory of IG / SmoothGrad batches)."""
    def run(x: Tensor, t: Tensor) -> Tensor:
        return torch.cat([explain(x[i:i + size], t[i:i + size]) for i in range(0, len(x), size)])
    return run


def _reduce(attr: Tensor) -> Tensor:
    return attr.sum(1).detach()


def make_method(name: str, model: nn.Module, *, layer: str | None = None, ig_steps: int = 32,
                ig_batch: int = 16, sg_samples: int = 16, sg_stdev: float = 0.15) -> Explainer:
    """The evaluated explainer `name` (one of METHODS) for `model`: (images, target) -> maps
    [N, H, W]. sg_stdev is SmoothGrad's noise in input units (Smilkov et al.: 15% of the input
    range); ig_batch is Captum's internal_batch_size. LRP raises Unsupported when Captum has no
    rule for one of the model's modules."""
    from captum import attr as ca

    if name == "Saliency":
        sal = ca.Saliency(model)
        return lambda x, t: _reduce(sal.attribute(x, target=t, abs=True))
    if name == "InputXGradient":
        ixg = ca.InputXGradient(model)
        return lambda x, t: _reduce(ixg.attribute(x, target=t))
    if name == "IntegratedGradients":
        ig = ca.IntegratedGradients(model)
        return lambda x, t: _reduce(ig.attribute(x, target=t, n_steps=ig_steps, method="riemann_middle",
                                                 internal_batch_size=ig_batch))
    if name == "GuidedBackprop":
        gbp = ca.GuidedBackprop(model)
        return lambda x, t: _reduce(gbp.attribute(x, target=t))
    if name == "SmoothGrad":
        nt = ca.NoiseTunnel(ca.Saliency(model))
        return lambda x, t: _reduce(nt.attribute(x, target=t, nt_type="smoothgrad", nt_samples=sg_samples,
                                                 stdevs=sg_stdev, abs=True))
    if name == "LRP":
        return _lrp(model)
    if name in ("GradCAM", "LayerCAM"):
        path = layer or cam_layer(model)
        kind = "gradcam" if name == "GradCAM" else "layercam"
        return lambda x, t: cam(model, path, x, t, kind).detach()
    if name in ("SRD", "SRD-contrastive"):
        # SRD-contrastive: R <- R - mean(R) on the seed map (the reference's class-discriminative default)
        contrastive = name == "SRD-contrastive"
        return lambda x, t: srd.saliency(model, x, t, contrastive)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def _lrp(model: nn.Module) -> Explainer:
    from captum.attr import LRP

    # Captum attaches `rule` attributes to the modules it visits, and a rejected run leaves them
    # half attached (the next LRP on that model then fails differently): work on a copy
    lrp = LRP(copy.deepcopy(model))

    def run(x: Tensor, t: Tensor) -> Tensor:
        try:
            return _reduce(lrp.attribute(x, target=t))
        except TypeError as e:  # Captum's way of rejecting a module type it has no rule for
            raise Unsupported(" ".join(str(e).split())) from e

    return run
