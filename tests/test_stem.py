"""Patch stems of the faithfulness check (pipeline/cafe/stem.py): the stem's output on patch
composites, gathered from 16 sums per image, equals the model's own on a trained CNN and real
(synthetic-scene) images, at any crop offset; each timm CNN family has one, a ViT none; a stem
that is not exact is refused."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from pipeline.cafe import faithfulness
from pipeline.cafe.stem import _exact, _per_position, compose, patch_stem, substituted
from pipeline.data.synthetic import render_sample
from pipeline.models import load_model, make_transform, tap


@pytest.fixture(scope="module")
def resnet():
    return load_model("demo_resnet", "default")


@pytest.fixture(scope="module")
def scenes(resnet) -> torch.Tensor:
    from PIL import Image

    transform = make_transform(resnet.data_config)
    return torch.stack([transform(Image.fromarray(render_sample(7, i)[0])) for i in range(2)])


def _orders(patches: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(patches, generator=gen) for name in faithfulness.ORDERS}


@torch.no_grad()
def test_the_gathered_stem_equals_the_models_on_every_check_image(resnet, scenes) -> None:
    model = resnet.model.eval()
    stem = patch_stem(model, "layer4", (128, 128), 8)
    assert stem is not None and stem.first == "conv1" and stem.pointwise == ("bn1", "act1")
    ids = faithfulness.patch_ids((128, 128), 8)
    for i, image in enumerate(scenes):
        shown = faithfulness.shown(_orders(256, i), 16)  # the 92 images of one check
        images = faithfulness.composites(image, ids, shown)
        want = model.act1(model.bn1(model.conv1(images)))
        window = stem.window((128, 128), 0, 0, (128, 128))
        got = compose([(stem.table(model, image, window), window, shown)])
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        # and the layer the check reads, through the rest of the model
        plain = tap(model, images, ["layer4"])["layer4"].values
        with substituted(model, stem, got):
            gathered = tap(model, torch.zeros_like(images), ["layer4"])["layer4"].values
        assert float((gathered - plain).abs().max()) < 1e-5 * float(plain.abs().max())
    # the model is itself again after the block
    assert "forward" not in vars(model.conv1) and "forward" not in vars(model.bn1)


@torch.no_grad()
def test_crop_windows_at_any_offset_and_two_images_in_one_batch(resnet, scenes) -> None:
    """Windows that start inside a patch (offsets 4 and 12 px) and at a patch corner, and two
    images' composites gathered into one batch, each from its own table."""
    model = resnet.model.eval()
    stem = patch_stem(model, "layer2", (64, 64), 8)
    assert stem is not None
    ids = faithfulness.patch_ids((128, 128), 8)
    segments, plain = [], []
    for (top, left), image, seed in zip([(4, 12), (64, 0)], scenes, (3, 4)):
        shown = faithfulness.shown(_orders(256, seed), 16)[::7]
        window = stem.window((128, 128), top, left, (64, 64))
        cut = image[:, top:top + 64, left:left + 64]
        segments.append((stem.table(model, cut, window), window, shown))
        plain.append(faithfulness.composites(cut, ids[top:top + 64, left:left + 64], shown))
    plain = torch.cat(plain)
    want = tap(model, plain, ["layer2"])["layer2"].values
    with substituted(model, stem, compose(segments)):
        got = tap(model, torch.zeros_like(plain), ["layer2"])["layer2"].values
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
    # a window's index is measured: shifted by one patch column, the gathered stem is wrong
    window = stem.window((128, 128), 4, 12, (64, 64))
    wrong = dataclasses.replace(window, index=window.index.roll(1, 1))
    shown = segments[0][2]
    bad = compose([(segments[0][0], wrong, shown)])
    right = compose([segments[0]])
    assert float((bad - right).abs().max()) > 1e-2 * float(right.abs().max())


@pytest.mark.parametrize("name, first, pointwise", [
    ("efficientnet_lite0", "conv_stem", ("bn1",)),        # BatchNormAct2d (BN + ReLU6)
    ("efficientnet_b0", "conv_stem", ("bn1",)),           # SiLU; squeeze-excitation later
    ("tf_efficientnet_lite1", "conv_stem", ("bn1",)),     # TF 'same' padding (Conv2dSame)
    ("convnext_atto", "stem.0", ("stem.1",)),             # 4x4 patchify conv, LayerNorm2d
    ("vgg11", "features.0", ("features.1",)),             # no norm, ReLU
    ("mobilenetv3_small_100", "conv_stem", ("bn1",)),     # hard-swish
])
def test_each_cnn_family_has_an_exact_stem(name, first, pointwise) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4).eval()
    stem = patch_stem(model, _second_stage(model), (64, 64), 8)
    assert stem is not None and (stem.first, stem.pointwise) == (first, pointwise)


def test_a_vit_and_too_small_a_patch_get_no_stem(resnet) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=4).eval()
    assert patch_stem(vit, "blocks.1", (64, 64), 8) is None  # 16 px windows, patches of 8
    # demo_resnet's 7 x 7 stem reads up to three patches of 4 px per axis
    assert patch_stem(resnet.model.eval(), "layer2", (64, 64), 4) is None
    assert patch_stem(resnet.model.eval(), "layer2", (64, 64), 6) is not None


class Excite(nn.Module):
    """Squeeze-excitation: each position scaled by a function of the whole map's mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


@torch.no_grad()
def test_only_per_position_modules_join_the_stem_and_the_check_refuses_a_wrong_one(
        resnet) -> None:
    model = resnet.model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 16, 16, generator=gen)
    assert _per_position(model.bn1, x, gen) and _per_position(nn.GELU(), x, gen)
    assert not _per_position(model.maxpool, x, gen)
    assert not _per_position(Excite(), x, gen)
    # a CNN whose stem convolution is followed by squeeze-excitation, then a norm
    torch.manual_seed(0)
    cnn = nn.Sequential()
    cnn.add_module("conv", nn.Conv2d(3, 8, 3, padding=1))
    cnn.add_module("excite", Excite())
    cnn.add_module("norm", nn.BatchNorm2d(8))
    cnn.add_module("body", nn.Conv2d(8, 8, 3, padding=1))
    cnn.norm.running_mean.normal_()
    cnn = cnn.eval()
    found = patch_stem(cnn, "body", (32, 32), 8)
    assert found is not None and (found.first, found.pointwise) == ("conv", ())
    # claimed as per-position, the excitation would be applied to the 16 sums, not the image:
    # the exactness check catches it
    wrong = dataclasses.replace(found, pointwise=("excite",), windows={})
    assert not _exact(cnn, "body", wrong, (32, 32), gen, "cpu")
    assert _exact(cnn, "body", dataclasses.replace(found, windows={}), (32, 32), gen, "cpu")


def _second_stage(model: nn.Module) -> str:
    from pipeline.models.taps import feature_stages

    return feature_stages(model)[1]
