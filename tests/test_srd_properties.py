"""SRD properties: sharing ratios sum to one, iERF mass, linearity, batch invariance,
determinism, float32 vs float64, numerical guard, contrastive rule, hidden-layer relevance."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.convnext import ConvNeXt
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer

import pipeline.models.demo  # noqa: F401  (registers demo_resnet)
from pipeline import srd
from pipeline.srd.conv import FrozenPool, fold_bn
from pipeline.srd.graph import share, upstream_signal
from test_srd_bruteforce import perturb, randomize, tiny_b0, tiny_lite, tiny_mobilenetv3, tiny_swin


def tiny_models() -> dict[str, tuple[torch.nn.Module, int]]:
    return {
        "resnet-basic": (randomize(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 6, 8, 8),
                                          stem_width=4, num_classes=3), 1), 32),
        "resnet-bottleneck-d": (randomize(ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(2, 2, 3, 3),
                                                 stem_width=4, num_classes=3, avg_down=True), 2), 26),
        "vgg-bn": (randomize(VGG([4, "M", 6, "M"], num_classes=3, norm_layer=torch.nn.BatchNorm2d,
                                 mlp_ratio=1 / 512), 3), 32),
        "vit-reg-ls": (perturb(randomize(VisionTransformer(img_size=24, patch_size=8, embed_dim=8, depth=2,
                                                           num_heads=2, num_classes=3, reg_tokens=1,
                                                           init_values=0.7)), 0.3, 4), 24),
        "effnet-lite": (randomize(tiny_lite(), 5), 16),
        "vit-clip": (perturb(randomize(timm.create_model(
            "vit_base_patch16_clip_quickgelu_224", img_size=24, patch_size=8, embed_dim=8, depth=2, num_heads=2,
            num_classes=3)), 0.3, 9), 24),
        "vit-dinov2-reg": (perturb(randomize(timm.create_model(
            "vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=8, depth=2, num_heads=2, num_classes=3)),
            0.3, 10), 28),
        "effnet-b0-se": (randomize(tiny_b0(), 7), 32),
        "mobilenetv3": (randomize(tiny_mobilenetv3(), 8), 32),
        "swin": (perturb(randomize(tiny_swin()), 0.3, 11), 32),
        "convnext": (randomize(ConvNeXt(depths=(1, 1, 1, 1), dims=(4, 6, 6, 8), num_classes=3), 6), 32),
    }


MODELS = tiny_models()


def images_for(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sharing_ratios_into_every_target_sum_to_one(name: str) -> None:
    """For every block and every target q: sum_p mu(p->q) (+ its constant share) = 1 for the PFV
    ratio, and a directional step along u shares exactly <u_q, z_q> (one seed per target
    position, batched)."""
    model, size = MODELS[name]
    graph, _ = srd.build(model, images_for(size))
    for block in graph.blocks:
        z = graph.units[block.target].z
        n, c, p = z.shape[0], z.shape[1], z[0, 0].numel()
        onehot = torch.eye(p, dtype=z.dtype).expand(n, p, p).reshape(n, p, *z.shape[2:])
        u = torch.randn(n, p, c, *z.shape[2:], generator=torch.Generator().manual_seed(1), dtype=z.dtype)
        g, lost = upstream_signal(onehot, z)
        for signal, want in ((g, torch.ones(n, p, dtype=z.dtype) - lost),
                             (onehot.unsqueeze(2) * u, (onehot.unsqueeze(2) * u * z.unsqueeze(1)).flatten(2).sum(2))):
            shares, constant = share(graph, block, signal)
            total = sum(r.flatten(2).sum(2) for r in shares.values()) + constant
            assert torch.allclose(total, want, atol=1e-9), block.target


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ierf_of_one_hot_seed_sums_to_one_less_constant(name: str) -> None:
    model, size = MODELS[name]
    images = images_for(size)
    graph, _ = srd.build(model, images)
    for layer in [u for u in graph.units if u != "input"]:
        positions = graph.units[layer].positions
        seeds = torch.unique(torch.linspace(0, positions - 1, 6).long())
        maps, const = srd.ierf(model, images, layer, seeds, return_constant=True)
        assert maps.shape == (2, len(seeds), size, size)
        total = maps.sum((2, 3)) + const
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9), layer


def test_ierf_is_linear_in_the_seed_map() -> None:
    """A class map is sum_r R_r iERF_r (docs/method.md §4): seed maps vs one-hot seeds."""
    model, size = MODELS["resnet-basic"]
    images = images_for(size)
    onehot = srd.ierf(model, images, "layer2", torch.arange(16))
    weights = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mixed = srd.ierf(model, images, "layer2", weights)
    assert torch.allclose(mixed, torch.einsum("nsr,nrhw->nshw", weights, onehot), atol=1e-12)


def test_relevance_at_a_hidden_layer_reseeds_to_the_saliency_map() -> None:
    """R at layer2 sums to the logit, and propagating it as an iERF seed map gives the saliency."""
    model, size = MODELS["resnet-basic"]
    images = images_for(size)
    rel = srd.relevance(model, images, None, ["layer2", "layer4.0"])
    sal, _ = srd.saliency(model, images, return_constant=True)
    logits = model(images).max(1).values
    assert rel["layer2"].shape == (2, 4, 4) and rel["layer4.0"].shape == (2, 1, 1)
    assert torch.allclose(rel["layer2"].sum((1, 2)), logits, rtol=1e-10)
    again = srd.ierf(model, images, "layer2", rel["layer2"].reshape(2, 1, 16))[:, 0]
    assert torch.allclose(again, sal, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_equals_one_image_at_a_time_and_is_deterministic(name: str) -> None:
    model, size = MODELS[name]
    images = images_for(size, n=3)
    maps = srd.saliency(model, images, target=1)
    assert torch.equal(maps, srd.saliency(model, images, target=1))
    single = torch.cat([srd.saliency(model, images[i:i + 1], target=1) for i in range(3)])
    assert torch.allclose(maps, single, rtol=1e-10, atol=1e-14)


def test_float32_matches_float64() -> None:
    model = timm.create_model("demo_resnet")
    images = images_for(32).float()
    m32 = srd.saliency(randomize(model).float(), images)
    m64 = srd.saliency(model.double(), images.double())
    assert m32.dtype == torch.float32
    assert (m32.double() - m64).abs().max() < 1e-4 * m64.abs().max()


def test_contrastive_rule_centres_the_seed_map() -> None:
    """R <- R - mean(R) on the seed map: the maps then sum to zero (the logit is subtracted).
    A CLS head's first step is a readout along the class direction: the contrast centres the ratio
    map it reaches (blocks.0 here), the CLS token's stream part, a direction, untouched; so the
    contrastive map at blocks.0 is the plain one shifted by one value at every position, and the
    pixels + constant lose that shift times the number of positions."""
    for name in ("resnet-basic", "vgg-bn"):
        model, size = MODELS[name]
        maps, const = srd.saliency(model, images_for(size), contrastive=True, return_constant=True)
        assert torch.allclose(maps.sum((1, 2)) + const, torch.zeros_like(const), atol=1e-10)
    model, size = MODELS["vit-reg-ls"]
    images = images_for(size)
    plain = srd.explain(model, images, layers=("blocks.0",))
    res = srd.explain(model, images, contrastive=True, layers=("blocks.0",))
    shift = plain.layers["blocks.0"][:, 0] - res.layers["blocks.0"][:, 0]  # [N, T]
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-10)
    assert shift[:, 0].abs().min() > 1e-6
    removed = shift[:, 0] * shift.shape[1]
    assert torch.allclose(res.pixels.sum((1, 2, 3)) + res.constant[:, 0], plain.logit - removed, atol=1e-10)
    assert not torch.allclose(res.pixels, plain.pixels)


def test_vgg_gradcam_seed_is_relu_of_gradient_weighted_last_conv() -> None:
    model, size = MODELS["vgg-bn"]
    images = images_for(size)
    graph, head = srd.build(model, images, "gradcam")
    assert head.unit == "features.6"  # the last conv's ReLU, before the last max-pool
    acts = graph.units["features.6"].v.clone().requires_grad_(True)
    logit = model.forward_head(model.features[7](acts)).gather(1, torch.tensor([[1], [1]])).sum()
    (grad,) = torch.autograd.grad(logit, acts)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * acts).sum(1))
    assert torch.allclose(head.seed(torch.tensor([1, 1])), expected, atol=1e-12)
    maps, const = srd.saliency(model, images, target=1, head="gradcam", return_constant=True)
    assert torch.allclose(maps.sum((1, 2)) + const, expected.sum((1, 2)), rtol=1e-10)


def test_zero_pre_activation_books_its_relevance_as_constant() -> None:
    """||z_q|| = 0 has no sharing ratio: g_q = 0 and R_q goes to the constant share."""
    z = torch.tensor([[[0.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)  # [N=1, C=2, P=2], q=0 is zero
    r = torch.tensor([[[3.0, 5.0]]], dtype=torch.float64)
    g, lost = upstream_signal(r, z)
    assert torch.equal(g[0, 0, :, 0], torch.zeros(2, dtype=torch.float64))
    assert float(lost) == 3.0
    assert torch.allclose((g[0, 0, :, 1] * z[0, :, 1]).sum(), torch.tensor(5.0, dtype=torch.float64))


def test_tied_max_pool_window_is_split_equally() -> None:
    """[choice] A maximum held by t taps gives each tap 1/t of the channel (docs/method.md §3.5),
    not all of it to the first tap in scan order; the reference mode duplicates it to every tied
    tap that some window recorded as its winner (their un-pooled map)."""
    x = torch.tensor([0.0, 3.0, 1.0, 3.0, 0.0], dtype=torch.float64).view(1, 1, 1, 5)
    pool = torch.nn.MaxPool2d((1, 3), (1, 2), (0, 1))  # windows: cols {-1,0,1}, {1,2,3}, {3,4,5}
    middle = lambda fp: fp.m[0, 0, :, 1].tolist()  # noqa: E731  taps of the window over cols 1..3
    assert middle(FrozenPool(pool, x, "pool")) == [0.5, 0.0, 0.5]
    assert middle(FrozenPool(pool, x, "pool", ties="reference")) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="ties must be one of"):
        FrozenPool(pool, x, "pool", ties="first")


def test_reference_bn_shift_omits_eps() -> None:
    conv, bn = torch.nn.Conv2d(2, 3, 1).double(), torch.nn.BatchNorm2d(3, eps=0.1).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([0.2, 1.0, 3.0]))
    for shift_eps, eps in ((True, 0.1), (False, 0.0)):
        w, b = fold_bn(conv, bn, shift_eps)
        scale = bn.weight / torch.sqrt(bn.running_var + 0.1)
        shift = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + eps) + scale * conv.bias
        assert torch.allclose(w, conv.weight * scale.view(-1, 1, 1, 1)) and torch.allclose(b, shift)


@pytest.mark.gpu
@pytest.mark.parametrize("name, layer", [("resnet-bottleneck-d", "layer2"), ("vit-reg-ls", "blocks.1"),
                                         ("effnet-lite", "blocks.1"), ("effnet-b0-se", "blocks.1.1.se"),
                                         ("mobilenetv3", "blocks.2"), ("convnext", "stages.1"),
                                         ("vit-clip", "blocks.0"), ("swin", "layers.0")])
def test_cuda_matches_cpu(name: str, layer: str) -> None:
    """Device-agnostic: the same maps and constant shares on CUDA as on CPU (float64)."""
    model, size = MODELS[name]
    images = images_for(size)
    cpu = srd.ierf(model, images, layer, torch.tensor([0, 1]), return_constant=True)
    cpu_sal = srd.saliency(model, images)
    try:
        gpu = srd.ierf(model.cuda(), images.cuda(), layer, torch.tensor([0, 1]), return_constant=True)
        gpu_sal = srd.saliency(model, images.cuda())
    finally:
        model.cpu()
    for a, b in zip(cpu + (cpu_sal,), gpu + (gpu_sal,)):
        assert torch.allclose(a, b.cpu(), rtol=1e-9, atol=1e-12)
