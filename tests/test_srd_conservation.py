"""Conservation (docs/method.md §3): with the identity contrastive rule, in float64, the pixel
map plus the constant share sums to the seed, the class logit, for every supported family."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vgg import VGG, cfgs

import pipeline.models.demo  # noqa: F401  (registers demo_resnet, demo_vit)
from pipeline import srd
from test_srd_bruteforce import randomize


def narrow_vgg(name: str, bn: bool) -> VGG:
    """The VGG topology `name` (all its convs and pools, the 7x7 fc6) with 1/16 of the widths."""
    cfg = [v if v == "M" else v // 16 for v in cfgs[name]]
    return VGG(cfg, num_classes=10, mlp_ratio=1 / 128, norm_layer=torch.nn.BatchNorm2d if bn else None)


SMALL_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10}
CASES = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=10), 64),
    "resnet50": (lambda: timm.create_model("resnet50", num_classes=10), 48),
    "vgg11-topology": (lambda: narrow_vgg("vgg11", False), 224),
    "vgg16_bn-topology": (lambda: narrow_vgg("vgg16", True), 224),
    "vit_tiny_patch16": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10), 32),
    "vit_tiny_patch16-meanpool": (lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=48, global_pool="avg", num_classes=10), 48),
    "deit_tiny_patch16": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=48, num_classes=10), 48),
    # CLIP and DINOv2 ViTs with their own layer layouts, small: depth 2, width 64
    "vit_base_patch16_clip_224": (lambda: timm.create_model("vit_base_patch16_clip_224", img_size=32, **SMALL_VIT), 32),
    "vit_base_patch16_clip_quickgelu_224": (lambda: timm.create_model(
        "vit_base_patch16_clip_quickgelu_224", img_size=32, **SMALL_VIT), 32),
    "vit_small_patch14_dinov2": (lambda: timm.create_model("vit_small_patch14_dinov2", img_size=42, **SMALL_VIT), 42),
    "vit_small_patch14_reg4_dinov2": (lambda: timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=42, **SMALL_VIT), 42),
    "efficientnet_lite0": (lambda: timm.create_model("efficientnet_lite0", num_classes=10), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 32),
    "mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10), 32),
    "mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), 32),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", num_classes=10, img_size=64, window_size=4, depths=(2, 2, 2, 2)), 64),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), 64),
    "demo_resnet": (lambda: timm.create_model("demo_resnet"), 64),
    "demo_vit": (lambda: timm.create_model("demo_vit"), 128),
    "demo_vitc": (lambda: timm.create_model("demo_vitc"), 128),
    # MobileCLIP's hybrid: a ConvStem (4x4 then 2x2 convs, GELU) through HybridEmbed, one block here
    "vit_base_mci_224": (lambda: timm.create_model("vit_base_mci_224", img_size=64, depth=1, num_classes=10), 64),
}


def check_conservation(model: torch.nn.Module, size: int) -> None:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = srd.explain(model, images)
    total = res.pixels.sum((1, 2, 3)) + res.constant[:, 0]
    assert torch.allclose(total, res.logit, rtol=1e-4, atol=0), (total, res.logit)
    assert torch.allclose(res.logit, model(images).gather(1, res.target[:, None])[:, 0], rtol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_plus_constant_sum_to_logit(case: str) -> None:
    make, size = CASES[case]
    check_conservation(randomize(make()), size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vit_base_patch16_224",
                                  "convnext_tiny"])
def test_full_size_models_conserve_logit(name: str) -> None:
    check_conservation(randomize(timm.create_model(name, num_classes=10)), 224)
