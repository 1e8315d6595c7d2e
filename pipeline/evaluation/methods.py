"""Saliency methods under one signature: `(images [N, 3, H, W], target [N]) -> maps [N, H, W]`.

Every baseline comes from a library kept by its field:
- Captum: Saliency, InputXGradient, IntegratedGradients, GuidedBackprop, SmoothGrad (NoiseTunnel
  over Saliency);
- grad-cam (pytorch-grad-cam, `cams.py`): GradCAM, GradCAM++, XGradCAM, HiResCAM, LayerCAM,
  ScoreCAM, AblationCAM, FullGrad;
- zennit (`lrp.py`): LRP, the EpsilonPlusFlat composite with zennit's canonizer for the model;
- lxt (`lrp.py`): AttnLRP for timm ViTs;
and SRD, our method (plain, and with the contrastive seed rule of docs/method.md §3). A method
that cannot explain a model raises `Unsupported` with the reason (e.g. zennit has no canonizer for
timm's ResNet blocks) instead of returning a wrong map.

Reduction over colour channels **[choice]**: every pixel-space attribution is summed over its
three channels, keeping its sign; Saliency and SmoothGrad are |gradient| summed (Captum's
`abs=True`, Simonyan et al.), so they carry no sign. CAM maps are grad-cam's, scaled to [0, 1].

`input_grad`, `smoothgrad`, `integrated_gradients` and `cams.cam` are plain-torch versions that
can be differentiated again (`create_graph=True`): the manipulation attack needs the gradient of
an explanation with respect to the input, which neither Captum nor grad-cam exposes. Tests check
that they equal the libraries' maps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import srd
from pipeline.evaluation.cams import GRADCAM_CLASSES, cam, cam_layer, gradcam_method
from pipeline.evaluation.explainer import Explainer, Unsupported

CAPTUM_METHODS: tuple[str, ...] = ("Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop",
                                   "SmoothGrad")
LRP_METHODS: tuple[str, ...] = ("LRP", "AttnLRP")
# "-layer": the relevance on the tokens or grid that the CAM layer reads, upsampled as a CAM is
SRD_METHODS: tuple[str, ...] = ("SRD", "SRD-contrastive", "SRD-layer", "SRD-contrastive-layer")
METHODS: tuple[str, ...] = CAPTUM_METHODS + tuple(GRADCAM_CLASSES) + LRP_METHODS + SRD_METHODS
# the library each method comes from (tables and the result file name it)
SOURCES: dict[str, str] = ({m: "captum" for m in CAPTUM_METHODS} | {m: "grad-cam" for m in GRADCAM_CLASSES}
                           | {"LRP": "zennit", "AttnLRP": "lxt"} | {m: "concept-atlas" for m in SRD_METHODS})


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


def differentiable(name: str, model: nn.Module, *, layer: str | None = None, ig_steps: int = 8,
                   sg_samples: int = 4, sg_stdev: float = 0.15) -> Explainer:
    """An explainer whose maps are differentiable in the images, for the manipulation attack:
    the gradient methods and CAMs via create_graph=True (Saliency, InputXGradient, SmoothGrad,
    IntegratedGradients; GradCAM and LayerCAM by cams.cam, grad-cam's maps computed in torch),
    SRD and SRD-contrastive via SRD's differentiable recording and propagation
    (`srd.saliency(..., differentiable=True)`, the same map as make_method's). Every other method
    of METHODS raises Unsupported: modified backward rules (GuidedBackprop, LRP, AttnLRP), or a
    library computation in NumPy or by forward passes only (the other CAMs) with no
    second-order path here."""
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
            raise Unsupported(f"{name}: no differentiable implementation here")
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
    [N, H, W]. layer: the CAM layer (default cams.cam_layer(model)); sg_stdev is SmoothGrad's
    noise in input units (Smilkov et al.: 15% of the input range); ig_batch is Captum's
    internal_batch_size. Raises Unsupported when the method cannot explain this model (LRP,
    AttnLRP, FullGrad: see lrp.py and cams.py) and ValueError for an unknown name."""
    if name in CAPTUM_METHODS:
        return _captum(name, model, ig_steps, ig_batch, sg_samples, sg_stdev)
    if name in GRADCAM_CLASSES:
        return gradcam_method(name, model, layer)
    if name in LRP_METHODS:
        from pipeline.evaluation import lrp

        return lrp.zennit_lrp(model) if name == "LRP" else lrp.attn_lrp(model)
    if name in SRD_METHODS:
        # SRD-contrastive: R <- R - mean(R) on the seed map (the reference's class-discriminative default)
        contrastive = "contrastive" in name
        if name.endswith("-layer"):
            return srd_layer_map(model, layer or srd_layer(model), contrastive)
        return lambda x, t: srd.saliency(model, x, t, contrastive)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


def srd_layer(model: nn.Module) -> str:
    """The layer whose relevance "SRD-layer" shows: the one whose output the CAM layer
    (`cams.cam_layer`) reads, so that SRD and the CAMs are compared on the same tokens or grid.
    A ViT's CAM layer is a LayerNorm inside or after the blocks: its input is the output of the
    block before it (for a class-token head `blocks.{K}.norm1` reads `blocks.{K-1}`)."""
    name = cam_layer(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        last = len(model.blocks) - 1
        return f"blocks.{last - 1}" if name == f"blocks.{last}.norm1" else f"blocks.{last}"
    return name


def srd_layer_map(model: nn.Module, layer: str, contrastive: bool) -> Explainer:
    """(images, target) -> the class's SRD relevance on `layer`'s grid (a ViT's patch tokens),
    upsampled bilinearly to the input as grad-cam upsamples a CAM, signed, [N, H, W]."""
    def run(x: Tensor, t: Tensor) -> Tensor:
        grid = srd.relevance(model, x, t, [layer], contrastive=contrastive)[layer]
        return F.interpolate(grid[:, None], size=x.shape[2:], mode="bilinear",
                             align_corners=False)[:, 0]
    return run


def _captum(name: str, model: nn.Module, ig_steps: int, ig_batch: int, sg_samples: int,
            sg_stdev: float) -> Explainer:
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
    nt = ca.NoiseTunnel(ca.Saliency(model))  # SmoothGrad
    return lambda x, t: _reduce(nt.attribute(x, target=t, nt_type="smoothgrad", nt_samples=sg_samples,
                                             stdevs=sg_stdev, abs=True))
