"""Anything SRD has no exact rule for raises UnsupportedModuleError naming the module type and its
module path (docs/architecture.md, "Principles": never a silently wrong map)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline import srd


def error_for(model: torch.nn.Module, size: int = 32) -> srd.UnsupportedModuleError:
    with pytest.raises(srd.UnsupportedModuleError) as info:
        srd.saliency(model, torch.randn(1, 3, size, size))
    return info.value


@pytest.mark.parametrize("name, kwargs, module_type, path", [
    ("seresnet18", {}, "SEModule", "layer1.0.se"),
    ("resnet18", {"global_pool": "max"}, "SelectAdaptivePool2d", "global_pool"),
    ("efficientnetv2_rw_t", {}, "EdgeResidual", "blocks.1.0"),
    ("mobilenetv4_conv_small", {}, "UniversalInvertedResidual", "blocks.2.0"),
    ("mobilenetv3_large_100", {"global_pool": "max"}, "SelectAdaptivePool2d", "global_pool"),
    ("tf_efficientnet_lite0", {}, "Conv2dSame", "conv_stem"),
    ("swinv2_cr_tiny_224", {}, "SwinTransformerV2Cr", ""),
    ("convnextv2_atto", {}, "GlobalResponseNormMlp", "stages.0.blocks.0.mlp"),
    ("convnext_atto", {"head_hidden_size": 8}, "Sequential", "head.pre_logits"),
    ("vit_small_r26_s32_224", {"depth": 1}, "ResNetV2", "patch_embed.backbone"),
])
def test_unsupported_module_is_named_with_its_path(name: str, kwargs: dict, module_type: str, path: str) -> None:
    err = error_for(timm.create_model(name, num_classes=3, **kwargs))
    assert (err.module_type, err.path) == (module_type, path)
    assert module_type in str(err) and (path or "<model root>") in str(err)


def test_vit_with_qk_norm_names_the_norm() -> None:
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, qk_norm=True)
    err = error_for(model)
    assert (err.module_type, err.path) == ("LayerNorm", "blocks.0.attn.q_norm")


def test_conv_stem_with_a_projection_names_the_projection() -> None:
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem

    stem = ConvStem(depth=2, channels=(4, 8), stride=(2, 2), kernel_size=3, padding=1)
    model = VisionTransformer(img_size=32, patch_size=1, embed_dim=16, depth=1, num_heads=2,
                              embed_layer=partial(HybridEmbed, backbone=stem))  # proj: a 1x1 conv after the stem
    err = error_for(model)
    assert (err.module_type, err.path) == ("Conv2d", "patch_embed.proj") and "proj=False" in str(err)


def test_unknown_layer_lists_the_layers() -> None:
    model = timm.create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="layer4"):
        srd.ierf(model, torch.randn(1, 3, 32, 32), "layer4.0.bn2", torch.tensor([0]))
