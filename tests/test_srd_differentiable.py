"""SRD's opt-in differentiable mode (`differentiable=True`): the map is a differentiable function
of the input images, equal to the default map, and the default path builds no autograd graph.
Gradients are checked against central finite differences in float64 on tiny models made smooth
as the manipulation attack makes them (ReLU -> Softplus, ReLU6 -> SmoothReLU6; ViT: GELU) or
smooth as built (ConvNeXt, EfficientNet-B0 with its sigmoid SE gates, Swin)."""
from __future__ import annotations

import pytest
import torch
from timm.models.convnext import ConvNeXt
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer

from pipeline import srd
from pipeline.evaluation import Attack, differentiable, manipulate, metrics, smooth_copy
from pipeline.srd.families.base import SmoothReLU6
from test_srd_bruteforce import perturb, randomize, tiny_b0, tiny_lite, tiny_swin


def smooth_models() -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (float64 smooth model, image side)."""
    resnet = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 6, 8, 8), stem_width=4, num_classes=3)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=2, num_heads=2, num_classes=3,
                            reg_tokens=1, init_values=0.7)
    return {"resnet-softplus": (smooth_copy(randomize(resnet, 1), beta=3.0), 16),
            "vit-gelu": (perturb(smooth_copy(randomize(vit)), 0.3, 4), 16),
            "lite-smoothrelu6": (smooth_copy(randomize(tiny_lite(), 5), beta=3.0), 16),
            # smooth as built: GELU / SiLU, sigmoid SE gates, LayerNorms, softmax
            "convnext-gelu": (randomize(ConvNeXt(depths=(1, 1, 1, 1), dims=(4, 6, 6, 8), num_classes=3), 6), 32),
            "b0-silu-se": (randomize(tiny_b0(), 7), 16),
            "swin-gelu": (perturb(randomize(tiny_swin()), 0.3, 11), 32)}


MODELS = smooth_models()


def images(side: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_smooth_copies_keep_no_kinked_activation() -> None:
    kinds = {name: {type(m) for m in model.modules()} for name, (model, _) in MODELS.items()}
    assert torch.nn.Softplus in kinds["resnet-softplus"] and torch.nn.ReLU not in kinds["resnet-softplus"]
    assert SmoothReLU6 in kinds["lite-smoothrelu6"] and torch.nn.ReLU6 not in kinds["lite-smoothrelu6"]
    assert torch.nn.GELU in kinds["vit-gelu"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_differentiable_map_equals_default_and_default_builds_no_graph(name: str) -> None:
    model, side = MODELS[name]
    x = images(side).requires_grad_(True)  # the smooth copy's weights do not require grad
    for contrastive in (False, True):
        plain = srd.saliency(model, x, contrastive=contrastive)
        diff = srd.saliency(model, x, contrastive=contrastive, differentiable=True)
        assert not plain.requires_grad and plain.grad_fn is None
        assert diff.requires_grad
        assert torch.equal(diff.detach(), plain), (diff.detach() - plain).abs().max()
    # conservation holds on the smooth copy, in both modes: pixel sum + constant = logit
    res = srd.explain(model, x, differentiable=True)
    total = res.pixels.sum((1, 2, 3)) + res.constant[:, 0]
    assert torch.allclose(total, res.logit, rtol=1e-9, atol=0), (total, res.logit)
    assert torch.allclose(res.logit, model(x).gather(1, res.target[:, None])[:, 0], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("contrastive", [False, True])
def test_gradient_of_srd_map_matches_finite_differences(name: str, contrastive: bool) -> None:
    """<map(x), w> for random w, as a function of 8 random input entries: autograd vs central
    differences (gradcheck). The target class is fixed, so the function is smooth (the predicted
    class could switch discontinuously)."""
    model, side = MODELS[name]
    gen = torch.Generator().manual_seed(1)
    x0 = images(side, n=2, seed=1)
    w = torch.randn(2, side, side, generator=gen, dtype=torch.float64)
    idx = torch.randperm(x0.numel(), generator=gen)[:8]
    target = torch.tensor([0, 2])

    def fn(entries: torch.Tensor) -> torch.Tensor:
        x = x0.flatten().index_put((idx,), entries).view_as(x0)
        return (srd.saliency(model, x, target, contrastive, differentiable=True) * w).sum()

    entries = x0.flatten()[idx].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (entries,), eps=1e-6, atol=1e-7, rtol=1e-5)
    (g,) = torch.autograd.grad(fn(entries), entries)
    assert g.abs().max() > 100 * 1e-7  # not vacuous: well above gradcheck's atol


def test_white_box_attack_moves_srd_toward_target_map() -> None:
    """methods.differentiable("SRD") is make_method's map with a gradient, and the manipulation
    attack driven by it pulls SRD's map toward a target map within the eps-ball."""
    model, side = MODELS["resnet-softplus"]
    x, target = images(side, seed=3), torch.tensor([1, 0])
    goal = torch.zeros(2, side, side, dtype=torch.float64)
    goal[:, : side // 2, : side // 2] = 1.0  # the target explanation: the top-left quadrant
    attack = Attack(lo=torch.full((3,), -3.0), hi=torch.full((3,), 3.0), pixel_scale=torch.full((3,), 6.0),
                    steps=15, lr=0.05, gamma=1.0, eps=0.05)
    for name, contrastive in (("SRD", False), ("SRD-contrastive", True)):
        explain = differentiable(name, model)
        assert torch.equal(explain(x, target), srd.saliency(model, x, target, contrastive))
        x_adv = manipulate(model, explain, x, target, goal, attack)
        assert (x_adv - x).abs().max() <= 0.05 * 6.0 + 1e-6  # the radius is float32
        before = metrics.pearson(srd.saliency(model, x, target, contrastive), goal)
        after = metrics.pearson(srd.saliency(model, x_adv, target, contrastive), goal)
        assert (after > before + 0.1).all(), (name, before, after)
