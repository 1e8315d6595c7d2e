"""Model loading, preprocessing and PFV taps (pipeline.models), on CPU with small inputs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
from PIL import Image
from torch import nn

from pipeline.models import (LoadedModel, PFVs, data_config, demo, feature_stages, list_layers,
                             load_model, tap, to_batch)


@dataclass(frozen=True)
class Family:
    """One model to test and what its tap at `layer` must look like at `side` x `side` input."""

    name: str
    layer: str
    channels: int
    grid: tuple[int, int]
    num_special: int = 0
    side: int = 64
    batch: int = 2
    kwargs: dict[str, Any] = field(default_factory=dict)


FAMILIES = {f.name + ("_reg4" if "reg_tokens" in f.kwargs else ""): f for f in [
    Family("resnet18", "layer3", 256, (4, 4)),
    Family("resnet50", "layer3", 1024, (4, 4)),
    # mlp_ratio: a 256- instead of 4096-wide pre-logits head (7x7 conv + fc); the conv
    # features the taps read are unchanged, and random init of 120M head weights costs seconds
    Family("vgg11", "features.14", 512, (8, 8), kwargs=dict(mlp_ratio=1 / 16)),
    Family("vgg11_bn", "features.20", 512, (8, 8), kwargs=dict(mlp_ratio=1 / 16)),
    Family("vgg16", "features.29", 512, (4, 4), kwargs=dict(mlp_ratio=1 / 16)),
    Family("vgg16_bn", "features.42", 512, (4, 4), kwargs=dict(mlp_ratio=1 / 16)),
    Family("efficientnet_lite0", "blocks.4", 112, (4, 4)),
    Family("demo_resnet", "layer3", 64, (4, 4)),
    Family("vit_tiny_patch16_224", "blocks.7", 192, (4, 4), 1, kwargs=dict(img_size=64)),
    Family("vit_small_patch16_224", "blocks.5", 384, (4, 4), 1, kwargs=dict(img_size=64)),
    Family("vit_small_patch16_224", "blocks.5", 384, (4, 4), 5,
           kwargs=dict(img_size=64, reg_tokens=4, class_token=True)),
    Family("deit_tiny_patch16_224", "blocks.11", 192, (4, 4), 1, kwargs=dict(img_size=64)),
    # at its native 224 px: the heaviest model here, one image, one forward (shape test only)
    Family("vit_base_patch16_224", "blocks.7", 768, (14, 14), 1, side=224, batch=1),
    Family("demo_vit", "blocks.3", 96, (8, 8), 0, side=128),
]}
LIGHT_FAMILIES = [k for k in FAMILIES if k != "vit_base_patch16_224"]


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest) -> tuple[Family, LoadedModel, torch.Tensor]:
    fam = FAMILIES[request.param]
    torch.manual_seed(0)
    loaded = load_model(fam.name, None, **fam.kwargs)
    images = torch.randn(fam.batch, 3, fam.side, fam.side)
    return fam, loaded, images


@pytest.fixture(scope="module")
def demo_resnet() -> nn.Module:
    torch.manual_seed(0)
    return load_model("demo_resnet").model


@pytest.fixture(scope="module")
def lite0_imagenet() -> LoadedModel:
    return load_model("efficientnet_lite0", "default")


def _hooked_outputs(model: nn.Module, images: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Reference: module outputs captured by plain forward hooks on a full forward."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, a, o, n=n: out.__setitem__(n, o.detach().clone())) for n in names]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    return out


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# --- taps, every family ----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_tap_gives_n_by_positions_by_channels_with_grid_and_prefix_flags(family):
    fam, loaded, images = family
    pfv = tap(loaded.model, images, [fam.layer])[fam.layer]
    h, w = fam.grid
    assert isinstance(pfv, PFVs)
    assert pfv.values.shape == (fam.batch, fam.num_special + h * w, fam.channels)
    assert pfv.grid == fam.grid
    assert pfv.kind == ("vit" if "vit" in fam.name or "deit" in fam.name else "cnn")
    assert pfv.special.dtype == torch.bool
    assert pfv.special.tolist() == [True] * fam.num_special + [False] * (h * w)
    assert pfv.spatial().shape == (fam.batch, fam.channels, h, w)
    assert not pfv.values.requires_grad


@pytest.mark.parametrize("family", LIGHT_FAMILIES, indirect=True)
def test_feature_stage_taps_equal_a_hooked_forward(family):
    fam, loaded, images = family
    stages = feature_stages(loaded.model)
    assert fam.layer in stages
    got = tap(loaded.model, images, stages)
    ref = _hooked_outputs(loaded.model, images, stages)
    for name in stages:
        expected = ref[name]
        if expected.ndim == 4:
            # CNN map: spatial() gives it back; tap runs CNNs channels-last (faster on CPU),
            # which reorders float sums, so equal to rounding, and exactly on channels-last input
            torch.testing.assert_close(got[name].spatial(), expected, rtol=1e-4, atol=1e-4)
            cl = tap(loaded.model, images.contiguous(memory_format=torch.channels_last), [name])
            cl_ref = _hooked_outputs(loaded.model, images.contiguous(
                memory_format=torch.channels_last), [name])
            torch.testing.assert_close(cl[name].spatial(), cl_ref[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(got[name].values, expected, rtol=0, atol=0)
    assert _no_hooks_left(loaded.model)


@pytest.mark.parametrize("family", LIGHT_FAMILIES, indirect=True)
def test_list_layers_lists_feature_stages_first_with_tap_shapes(family):
    fam, loaded, _ = family
    specs = list_layers(loaded.model, input_size=(fam.side, fam.side))
    stages = feature_stages(loaded.model)
    assert [s.name for s in specs[:len(stages)]] == stages
    assert all(s.is_feature_stage for s in specs[:len(stages)])
    assert not any(s.is_feature_stage for s in specs[len(stages):])
    spec = next(s for s in specs if s.name == fam.layer)
    assert (spec.channels, spec.grid, spec.num_special) == (fam.channels, fam.grid, fam.num_special)
    assert _no_hooks_left(loaded.model)


# --- taps, behaviour -------------------------------------------------------------------------

def test_tap_of_a_module_followed_by_inplace_relu_keeps_its_own_output(demo_resnet):
    x = torch.randn(2, 3, 64, 64)
    pfv = tap(demo_resnet, x, ["bn1"])["bn1"]  # the stem's ReLU(inplace=True) runs right after
    with torch.no_grad():
        expected = demo_resnet.bn1(demo_resnet.conv1(x))
    assert (pfv.values < 0).any()
    torch.testing.assert_close(pfv.spatial(), expected)


def test_mixed_stage_and_module_taps_agree_with_stage_only_taps(demo_resnet):
    x = torch.randn(2, 3, 64, 64)
    stage_only = tap(demo_resnet, x, ["layer2"])["layer2"]
    mixed = tap(demo_resnet, x, ["layer2", "layer3.0.conv1"])
    torch.testing.assert_close(mixed["layer2"].values, stage_only.values, rtol=0, atol=0)
    assert mixed["layer3.0.conv1"].values.shape == (2, 16, 64)


def test_vit_spatial_is_the_patch_tokens_row_major():
    loaded = load_model("vit_tiny_patch16_224", img_size=32, depth=2)
    pfv = tap(loaded.model, torch.randn(1, 3, 32, 32), ["blocks.1"])["blocks.1"]
    tokens = pfv.values[0, 1:]  # after the CLS token
    assert torch.equal(pfv.spatial()[0, :, 1, 0], tokens[2])  # row 1, column 0 of a 2x2 grid


def test_vit_patch_embedding_tap_has_no_prefix_tokens():
    loaded = load_model("vit_tiny_patch16_224", img_size=32, depth=1)
    pfvs = tap(loaded.model, torch.randn(1, 3, 32, 32), ["patch_embed", "patch_embed.proj"])
    assert pfvs["patch_embed"].values.shape == (1, 4, 192)
    assert not pfvs["patch_embed"].special.any()
    torch.testing.assert_close(pfvs["patch_embed.proj"].values, pfvs["patch_embed"].values)


def test_tap_keeps_no_graph_unless_grad_is_asked(demo_resnet):
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    assert not tap(demo_resnet, x, ["layer2"])["layer2"].values.requires_grad
    values = tap(demo_resnet, x, ["layer2", "layer1.0.act1"], grad=True)["layer2"].values
    values.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_hooks_are_removed_when_the_forward_raises(demo_resnet):
    bad = torch.randn(1, 4, 64, 64)  # 4 channels: the stem conv raises
    with pytest.raises(RuntimeError):
        tap(demo_resnet, bad, ["layer1.0.conv1"])
    assert _no_hooks_left(demo_resnet)


def test_unknown_layer_error_names_it_lists_stages_and_close_matches(demo_resnet):
    with pytest.raises(ValueError) as e:
        tap(demo_resnet, torch.randn(1, 3, 64, 64), ["layr3"])
    msg = str(e.value)
    assert "'layr3'" in msg and "act1, layer1, layer2, layer3, layer4" in msg
    assert "named_modules()" in msg and "close matches: layer3" in msg


def test_layer_without_pfv_layout_is_an_error(demo_resnet):
    with pytest.raises(ValueError, match=r"'fc'.*not PFVs"):
        tap(demo_resnet, torch.randn(1, 3, 64, 64), ["fc"])


def test_a_conv_stems_maps_are_cnn_layers_that_srd_seeds():
    # demo_vitc's ConvStem: 64x64, 32x32, 16x16 maps before the 8x8 tokens; the tap and SRD agree
    # on the layer's PFVs (a one-hot iERF seed on a position: map + constant = 1)
    from pipeline import srd

    model = timm.create_model("demo_vitc").eval()
    specs = {spec.name: spec for spec in list_layers(model)}
    assert [(specs[f"patch_embed.backbone.{i}"].kind, specs[f"patch_embed.backbone.{i}"].grid) for i in range(3)] \
        == [("cnn", (64, 64)), ("cnn", (32, 32)), ("cnn", (16, 16))]
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    pfvs = tap(model, x, ["patch_embed.backbone.1"])["patch_embed.backbone.1"].values
    graph, _ = srd.build(model, x)
    torch.testing.assert_close(pfvs[0].T, graph.units["patch_embed.backbone.1"].v[0].flatten(1))
    maps, const = srd.ierf(model, x, "patch_embed.backbone.1", torch.tensor([5, 700]), return_constant=True)
    torch.testing.assert_close(maps.sum((2, 3)) + const, torch.ones(1, 2))


def test_module_that_runs_twice_is_an_error():
    class SharedAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.act = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv2(self.act(self.conv1(x))))

    with pytest.raises(ValueError, match="'act' ran 2 times"):
        tap(SharedAct(), torch.randn(1, 3, 8, 8), ["act"])


# --- loading and preprocessing ---------------------------------------------------------------

def test_load_model_is_eval_mode_with_transform_for_its_input_size():
    loaded = load_model("vit_tiny_patch16_224", img_size=64, depth=1)
    assert not loaded.model.training
    assert loaded.data_config["input_size"] == (3, 64, 64)
    coffee = skimage.data.coffee()
    batch = loaded.preprocess(coffee)
    assert batch.shape == (1, 3, 64, 64)
    torch.testing.assert_close(loaded.preprocess([Image.fromarray(coffee)]), batch)
    assert loaded.preprocess(np.stack([coffee, coffee])).shape == (2, 3, 64, 64)


def test_to_batch_rejects_non_uint8_arrays():
    with pytest.raises(ValueError, match="uint8"):
        to_batch(np.zeros((8, 8, 3), np.float32), lambda im: torch.zeros(3))


def test_data_config_follows_the_demo_pretrained_cfg(demo_resnet):
    cfg = data_config(demo_resnet)
    assert cfg["input_size"] == (3, 128, 128)
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"]) == ((0.5,) * 3, (0.25,) * 3, 1.0)


def test_efficientnet_lite0_imagenet_ranks_espresso_and_a_cat_first(lite0_imagenet):
    assert lite0_imagenet.weights.startswith("imagenet")
    cfg = lite0_imagenet.data_config
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert (cfg["crop_pct"], cfg["interpolation"]) == (1.0, "bicubic")
    x = lite0_imagenet.preprocess([skimage.data.coffee(), skimage.data.chelsea()])
    with torch.no_grad():
        top = lite0_imagenet.model(x).argmax(-1).tolist()
    assert top[0] == 967  # espresso
    assert top[1] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_unknown_model_error_names_it_with_close_matches():
    with pytest.raises(ValueError) as e:
        load_model("resnt50")
    msg = str(e.value)
    assert "'resnt50'" in msg and "resnet50" in msg and "timm.list_models" in msg
    with pytest.raises(ValueError, match="close matches: demo_vit"):
        load_model("demo_vti")


def test_missing_demo_weights_error_says_where_and_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_model("demo_vit", "demo")
    msg = str(e.value)
    assert f"demo weights not found at {tmp_path / 'demo_vit.safetensors'}" in msg
    assert "concept-atlas train-demo-model" in msg


def test_demo_weights_load_from_the_weights_dir_by_default(tmp_path, monkeypatch, demo_resnet):
    monkeypatch.setattr(demo, "WEIGHTS_DIR", tmp_path)
    safetensors.torch.save_model(demo_resnet, str(tmp_path / "demo_resnet.safetensors"))
    loaded = load_model("demo_resnet", "default")
    assert loaded.weights == f"demo: {tmp_path / 'demo_resnet.safetensors'}"
    _assert_same_state(loaded.model, demo_resnet)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_loads_with_its_own_head(tmp_path, suffix):
    torch.manual_seed(1)
    source = load_model("demo_resnet", num_classes=3).model
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_model(source, str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = load_model("demo_resnet", path, num_classes=3)
    assert not loaded.model.training
    _assert_same_state(loaded.model, source)


LOADED_PICKLES: list[str] = []


def _record_unpickling() -> str:
    LOADED_PICKLES.append("ran")
    return "payload"


class _Payload:
    def __reduce__(self) -> tuple:
        return _record_unpickling, ()


def test_pickled_weights_load_with_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": _Payload()}, path)
    with pytest.raises(Exception, match="weights_only"):
        load_model("demo_resnet", path)
    assert LOADED_PICKLES == []


@pytest.mark.parametrize("weights, error, fragment", [
    ("missing.safetensors", FileNotFoundError, "weights file not found: missing.safetensors"),
    ("imagnet", ValueError, "'imagnet' is neither one of None, 'default', 'hub', 'demo', 'imagenet'"),
    ("demo", ValueError, "weights='demo' exist only for demo_resnet, demo_vit"),
    ("imagenet", ValueError, "weights='imagenet' is the offline efficientnet_lite0 checkpoint"),
])
def test_bad_weight_source_errors_name_it(weights, error, fragment):
    with pytest.raises(error) as e:
        load_model("resnet18", weights)
    assert fragment in str(e.value)


def test_demo_models_are_not_looked_up_on_the_hub():
    with pytest.raises(ValueError, match="'demo_vit' is not on the hub; its weights are weights='demo'"):
        load_model("demo_vit", "hub")


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name, floor", [("demo_resnet", 0.96), ("demo_vit", 0.92)])
def test_shipped_demo_weights_classify_unseen_synthetic_images(name, floor):
    # the cards report 98.7% / 95.4% on 2,000 fresh images; 200 here, so a margin for noise
    from pipeline.data.synthetic import render_sample

    samples = [render_sample(777, i, 128) for i in range(200)]
    loaded = load_model(name, "demo")
    x = loaded.preprocess([Image.fromarray(img) for img, _ in samples])
    with torch.no_grad():
        predicted = loaded.model(x).argmax(-1)
    labels = torch.tensor([meta["class"] for _, meta in samples])
    assert (predicted == labels).float().mean() >= floor


def test_shipped_multi_label_demo_resnet_names_every_shape_of_unseen_scenes():
    # its card: 69.6% of 2,000 fresh scenes with exactly the right set of shapes, 92.8% of the
    # per-shape decisions right; the single-label demo_resnet gets 34% / 80% by the same test
    from pipeline.data.synthetic import render_sample
    from pipeline.models.train_demo import present_labels

    path = demo.WEIGHTS_DIR / "demo_resnet_present.safetensors"
    card = json.loads((demo.WEIGHTS_DIR / "demo_resnet_present.json").read_text())
    assert card["recipe"]["labels"] == "present" and card["init_card"]["recipe"]["labels"] == "present"
    samples = [render_sample(777, i, 128) for i in range(200)]
    labels = torch.from_numpy(np.stack([present_labels(meta) for _, meta in samples])) > 0.5
    rates = {}
    for weights in (str(path), "demo"):
        loaded = load_model("demo_resnet", weights)
        with torch.no_grad():
            present = loaded.model(loaded.preprocess([Image.fromarray(img) for img, _ in samples])) > 0
        rates[weights] = (float((present == labels).all(1).float().mean()), float((present == labels).float().mean()))
    assert rates[str(path)][0] >= 0.6 and rates[str(path)][1] >= 0.9, rates
    assert rates["demo"][0] < 0.45 and rates["demo"][1] < 0.85, rates


def test_shipped_demo_vitc_is_a_cls_head_vit_on_a_conv_stem_that_names_every_shape() -> None:
    # its card: 82.3% of 2,000 fresh scenes with exactly the right set of shapes, 95.9% of the
    # per-shape decisions; trained from scratch on image-level labels only (no masks, no teacher)
    from timm.layers import HybridEmbed

    from pipeline.data.synthetic import render_sample
    from pipeline.models.train_demo import present_labels

    card = json.loads((demo.WEIGHTS_DIR / "demo_vitc.json").read_text())
    recipe = card["recipe"]
    assert (recipe["labels"], recipe["token_loss"], recipe["distill"], recipe["init"]) == ("present", 0.0, 0.0, None)
    loaded = load_model("demo_vitc", "demo")
    assert loaded.model.global_pool == "token" and isinstance(loaded.model.patch_embed, HybridEmbed)
    samples = [render_sample(777, i, 128) for i in range(200)]
    labels = torch.from_numpy(np.stack([present_labels(meta) for _, meta in samples])) > 0.5
    with torch.no_grad():
        present = loaded.model(loaded.preprocess([Image.fromarray(img) for img, _ in samples])) > 0
    assert float((present == labels).all(1).float().mean()) >= 0.72
    assert float((present == labels).float().mean()) >= 0.93


def test_devices_are_checked_with_errors_that_name_them(monkeypatch) -> None:
    from pipeline.models import checked_device

    assert checked_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu': .*expected 'cpu', 'cuda' or 'cuda:N'"):
        checked_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda': no CUDA GPU is visible"):
        load_model("demo_resnet", "demo", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert checked_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA GPU\\(s\\), cuda:0..cuda:1"):
        checked_device("cuda:2")
