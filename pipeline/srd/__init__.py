"""SRD: Sharing Ratio Decomposition of unmodified timm vision models (docs/method.md §§1-4).

    maps = srd.saliency(model, images)                      # Tensor[N, H, W], predicted class
    maps, const = srd.saliency(model, images, 3, return_constant=True)
    rel = srd.relevance(model, images, None, ["layer3"])    # {layer: Tensor[N, h, w]}
    erfs = srd.ierf(model, images, "layer3", torch.tensor([0, 5]))          # Tensor[N, 2, H, W]
    erfs = srd.ierf(model, images, "blocks.7", seeds, direction=w, offset=o)  # latent iERFs
    maps = srd.saliency(model, images, differentiable=True)  # on autograd: d maps / d images
    maps = srd.saliency(resnet50, images, reference=True)    # the authors' code's rules

Supported families (one table: `adapters._families`): timm ResNet (BasicBlock / Bottleneck,
projection and ResNet-D avg-pool shortcuts; resnet18, resnet50, demo_resnet), VGG (with and
without BN; exact FC head or the reference's Grad-CAM seed), VisionTransformer (ViT / DeiT,
CLS or mean-pool head, register tokens, layer scale; CLIP's pre-norm and QuickGELU, DINOv2 with
registers; demo_vit), EfficientNet and MobileNetV3 (Lite0, B0, small / large: squeeze-excitation,
SiLU, hard-swish) and ConvNeXt (LayerNorm2d, depthwise 7x7, layer scale). Anything else raises
UnsupportedModuleError naming the module type and path. Where the method leaves a choice (docs/method.md), the code says so at the place it is made:
BN shift with eps (conv.fold_bn), tied max-pool taps (conv.FrozenPool), zero pre-activations
(graph.upstream_signal), directional first steps of linear readouts (graph.readout_signal), the
gate of a latent direction (graph.Unit.pull_direction, transformer.mlp_pull), the seed map of the
contrastive rule (graph.propagate), the CLS head's class readout (heads.token_readout), linear
bottlenecks and squeeze-excitation (families/efficientnet), per-position LayerNorms and linears
(conv.PositionwiseRule, families/convnext), the ViT rules (transformer, families/vit), the VGG
heads (families/vgg).
`reference=True` reproduces the authors' ResNet code where these choices differ from it
(families/resnet).
"""
# the version of the rules whose maps stages store (CAFE masks, ICAT's SRD scores): part of their
# config hash, so an atlas built under other rules is refused rather than mixed. 2: ties split
# equally, CLS-head class readout, sign-safe latent seeds (docs/method.md)
RULES_VERSION = 2
from pipeline.srd.adapters import build
from pipeline.srd.api import SRDResult, explain, ierf, relevance, saliency
from pipeline.srd.errors import UnsupportedModuleError

__all__ = ["RULES_VERSION", "SRDResult", "UnsupportedModuleError", "build", "explain", "ierf", "relevance", "saliency"]
