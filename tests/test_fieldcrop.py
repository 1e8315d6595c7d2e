"""Receptive-field crops of the faithfulness check (pipeline/cafe/fieldcrop.py): a cropped
forward reads every position as the full image's forward does, on a trained CNN and real
(synthetic-scene) images; layers where that cannot hold get no crop."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch

from pipeline.cafe.fieldcrop import FieldCrop, _exact, field_crop
from pipeline.data.synthetic import render_sample
from pipeline.models import load_model, make_transform, tap


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return load_model("demo_resnet", "default")


@pytest.fixture(scope="module")
def scenes(resnet) -> torch.Tensor:
    from PIL import Image

    transform = make_transform(resnet.data_config)
    return torch.stack([transform(Image.fromarray(render_sample(7, i)[0])) for i in range(3)])


def _worst(model: torch.nn.Module, layer: str, crop: FieldCrop, images: torch.Tensor) -> float:
    """Largest |crop readout - full readout| over every position, relative to the layer's max."""
    with torch.no_grad():
        full = tap(model, images, [layer])[layer].values
        worst = 0.0
        for position in range(full.shape[1]):
            window, at = crop.crop(images, position)
            got = tap(model, window, [layer])[layer].values[:, at]
            worst = max(worst, float((got - full[:, position]).abs().max()))
    return worst / float(full.abs().max())


def test_a_crop_reads_every_position_as_the_full_image(resnet, scenes) -> None:
    model = resnet.model.eval()
    crop = field_crop(model, "layer2", (128, 128))
    # demo_resnet's layer2 reads 51 px (7x7 stem, max-pool, four 3x3 convs): 8 cells of 8 px
    assert crop is not None and crop.size == (64, 64) and crop.stride == (8, 8)
    assert _worst(model, "layer2", crop, scenes) < 1e-5
    # every window lies inside the image and holds its position
    for position in range(16 * 16):
        top, left, at = crop.window(position)
        assert 0 <= top <= 64 and 0 <= left <= 64 and top % 8 == 0 == left % 8
        gy, gx = divmod(position, 16)
        assert (top // 8 + at // 8, left // 8 + at % 8) == (gy, gx)
    # the measured field is tight: one cell less on any side and some position reads wrong
    narrow = dataclasses.replace(crop, size=(56, 56), reach=(3, 3, 3, 3))
    assert _worst(model, "layer2", narrow, scenes) > 1e-3
    # and the exactness check that field_crop runs refuses it
    spread = torch.tensor([0.5, 1.0]).view(-1, 1, 1, 1)
    assert _exact(model, "layer2", crop, spread, torch.Generator().manual_seed(1), "cpu")
    assert not _exact(model, "layer2", narrow, spread, torch.Generator().manual_seed(1), "cpu")


def test_no_crop_where_a_position_reads_the_whole_image() -> None:
    torch.manual_seed(0)
    # a squeeze-excitation block pools the whole map; a ViT's token attends to every patch;
    # demo_resnet's layer4 reads more than the 128 px image
    se = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval()
    assert field_crop(se, "blocks.1", (96, 96)) is None
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                            img_size=64).eval()
    assert field_crop(vit, "blocks.1", (64, 64)) is None
    assert field_crop(load_model("demo_resnet", "default").model.eval(), "layer4",
                      (128, 128)) is None
    # without its squeeze-excitation the same network's early block is cropped, exactly
    lite = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=5).eval()
    crop = field_crop(lite, "blocks.1", (96, 96))
    assert crop is not None and crop.size[0] < 96
    images = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype("f4"))
    assert _worst(lite, "blocks.1", crop, images) < 1e-5


def test_the_check_allows_for_tf32_convolutions_on_a_gpu(monkeypatch) -> None:
    from pipeline.cafe.fieldcrop import TOLERANCE, TOLERANCE_TF32, tolerance_on

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert tolerance_on("cuda") == tolerance_on(torch.device("cuda", 0)) == TOLERANCE_TF32
    assert tolerance_on("cpu") == TOLERANCE
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert tolerance_on("cuda") == TOLERANCE < TOLERANCE_TF32
