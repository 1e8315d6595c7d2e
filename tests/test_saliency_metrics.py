"""Saliency metrics, baselines and the manipulation attack on hand-made cases with known answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import Attack, Unsupported, cam, differentiable, make_method, manipulate, metrics, smooth_copy


class TinyCNN(nn.Module):
    """conv-ReLU-conv-ReLU6 (the CAM layer: `act2`), global average pool, linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU6()
        self.fc = nn.Linear(5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


@pytest.fixture
def tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_map_concentrated_in_mask_hits_and_holds_all_mass() -> None:
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 1:3, 1:3] = True
    inside = torch.zeros(2, 4, 4)
    inside[:, 1, 2], inside[:, 2, 1] = 2.0, 1.0
    inside[:, 0, 0] = -5.0  # negative relevance outside counts for neither metric
    assert metrics.pointing_game(inside, masks).tolist() == [1.0, 1.0]
    assert metrics.mask_mass(inside, masks).tolist() == [1.0, 1.0]
    outside = inside.clone()
    outside[:, 3, 3] = 9.0  # peak outside; positive mass inside 3 of 12
    assert metrics.pointing_game(outside, masks).tolist() == [0.0, 0.0]
    assert torch.allclose(metrics.mask_mass(outside, masks), torch.tensor([0.25, 0.25]))
    assert torch.isnan(metrics.mask_mass(-torch.ones(1, 4, 4), masks[:1])).all()


def test_class_switch_pointing_scores_a_map_only_where_it_follows_the_class() -> None:
    """Two images with a square (class 0) and a disc-like block (class 1): an explainer that maps
    the requested class's object scores 1 on every (image, class) pair; one that ignores the
    target (always class 0's object) scores only on the class-0 pairs; an image with a single
    class is refused."""
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)  # [image, class, H, W]
    masks[0, 0, 1:3, 1:3], masks[0, 1, 5:8, 4:7] = True, True
    masks[1, 0, 4:6, 0:2], masks[1, 1, 0:3, 5:8] = True, True
    images = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 3, 8, 8)  # image i is filled with i
    objects = [[(0, masks[i, 0]), (1, masks[i, 1])] for i in range(2)]

    def follows(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masks[x[:, 0, 0, 0].long(), target].float()

    def ignores(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return masks[x[:, 0, 0, 0].long(), 0].float()

    assert metrics.class_switch_pointing(follows, images, objects, batch=3).tolist() == [1.0] * 4
    assert metrics.class_switch_pointing(ignores, images, objects).tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="fewer than two classes"):
        metrics.class_switch_pointing(follows, images, [objects[0], objects[1][:1]])


def test_gini_of_one_hot_constant_and_two_level_maps() -> None:
    n = 64
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 3, 5] = -2.0  # |map|: the sign does not matter
    assert metrics.gini(one_hot).item() == pytest.approx(1 - 1 / n)
    assert metrics.gini(torch.full((1, 8, 8), 0.3)).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])  # 1 - 2 (0.5 * 1.5 / 4 + 0.5 * 0.5 / 4)
    assert metrics.gini(half).item() == pytest.approx(0.5)


def _additive_model(weights: torch.Tensor) -> nn.Module:
    """logit_0 = sum_p w_p x[0, p] (channel 0 only), logit_1 = 0."""
    h, w = weights.shape
    lin = nn.Linear(3 * h * w, 2, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0, : h * w] = weights.flatten()
    return nn.Sequential(nn.Flatten(), lin)


def _activation_and_grad(model: nn.Module, module: nn.Module, x: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`module`'s output on x (detached) and the gradient of the target logits' sum w.r.t. it:
    the reference quantities of the brute-force CAM loops."""
    acts = []
    handle = module.register_forward_hook(lambda m, a, out: acts.append(out))
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts[0])
    return acts[0].detach(), grad


def _exact_auc(contributions: list[float]) -> float:
    """Trapezoid AUC of the running sum of contributions inserted in the given order."""
    sums = [0.0]
    for c in contributions:
        sums.append(sums[-1] + c)
    return sum((a + b) / 2 for a, b in zip(sums[:-1], sums[1:])) / len(contributions)


def test_insertion_auc_of_perfect_ordering_beats_reversed_by_exact_amount() -> None:
    torch.manual_seed(1)
    weights = torch.randn(4, 4)
    model = _additive_model(weights)
    x, base, target = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.tensor([0])
    c = sorted(weights.flatten().tolist(), reverse=True)
    results = {}
    for name, m in (("perfect", weights[None]), ("reversed", -weights[None])):
        order = metrics.pixel_order(m)
        for mode in ("insertion", "deletion"):
            curve = metrics.insertion_deletion_curve(model, x, order, target, base, mode, steps=16, score="logit")
            results[name, mode] = metrics.auc(curve).item()
    exact_ins = _exact_auc(c)
    exact_rev = _exact_auc(c[::-1])
    assert results["perfect", "insertion"] == pytest.approx(exact_ins, abs=1e-5)
    assert results["reversed", "insertion"] == pytest.approx(exact_rev, abs=1e-5)
    assert results["perfect", "insertion"] - results["reversed", "insertion"] == pytest.approx(
        exact_ins - exact_rev, abs=1e-5)
    assert exact_ins - exact_rev > 1.0
    # deletion removes the same pixels from the full sum: its curve is total - insertion curve
    total = sum(c)
    assert results["perfect", "deletion"] == pytest.approx(total - exact_ins, abs=1e-5)
    assert results["reversed", "deletion"] == pytest.approx(total - exact_rev, abs=1e-5)


def test_pixel_order_ranks_values_and_shuffles_plateaus() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 7, 7], maps[0, 7, 6] = 2.0, 1.0
    order = metrics.pixel_order(maps, seed=3)[0]
    assert order[:2].tolist() == [63, 62]
    assert sorted(order.tolist()) == list(range(64))
    assert order[2:].tolist() != list(range(62))  # the zero plateau is not filled row-major


def test_layercam_and_gradcam_equal_bruteforce_loops(tiny: TinyCNN) -> None:
    torch.manual_seed(2)
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    act, grad = _activation_and_grad(tiny, tiny.act2, x, target)
    n, c, h, w = act.shape
    layer = torch.zeros(n, 1, h, w)
    grad_cam = torch.zeros(n, 1, h, w)
    for i in range(n):
        for yy in range(h):
            for xx in range(w):
                for ch in range(c):
                    layer[i, 0, yy, xx] += max(grad[i, ch, yy, xx].item(), 0.0) * act[i, ch, yy, xx].item()
                    grad_cam[i, 0, yy, xx] += grad[i, ch].mean().item() * act[i, ch, yy, xx].item()
    for kind, brute in (("layercam", layer), ("gradcam", grad_cam)):
        want = F.interpolate(brute.clamp(min=0), size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
        assert torch.allclose(cam(tiny, "act2", x, target, kind), want, atol=1e-5), kind


def test_gradcam_equals_captum_layergradcam(tiny: TinyCNN) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    ref = LayerGradCam(tiny, tiny.act2).attribute(x, target=target, relu_attributions=True)
    ref = LayerAttribution.interpolate(ref, (8, 8), interpolate_mode="bilinear")[:, 0]
    assert torch.allclose(make_method("GradCAM", tiny, layer="act2")(x, target), ref, atol=1e-6)


def test_differentiable_explainers_equal_captum_maps(tiny: TinyCNN) -> None:
    torch.manual_seed(3)
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    for name in ("Saliency", "InputXGradient", "IntegratedGradients", "LayerCAM"):
        captum_map = make_method(name, tiny, layer="act2", ig_steps=6)(x, target)
        own = differentiable(name, tiny, layer="act2", ig_steps=6)(x, target).detach()
        assert torch.allclose(own, captum_map, atol=1e-5), name
    # SmoothGrad without noise is Saliency
    no_noise = differentiable("SmoothGrad", tiny, sg_samples=2, sg_stdev=0.0)(x, target).detach()
    assert torch.allclose(no_noise, make_method("Saliency", tiny)(x, target), atol=1e-6)
    with pytest.raises(Unsupported, match="GuidedBackprop"):
        differentiable("GuidedBackprop", tiny)


def test_lrp_rejection_is_reported_as_unsupported_every_time() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Identity(), nn.Flatten(), nn.Linear(2 * 36, 2)).eval()
    x, target = torch.randn(1, 3, 8, 8), torch.tensor([0])
    for _ in range(2):  # a second rejection must not fail differently (Captum leaves state behind)
        with pytest.raises(Unsupported, match="Identity"):
            make_method("LRP", model)(x, target)
    assert not any(hasattr(m, "rule") for m in model.modules())


def test_stability_is_one_without_noise_and_matches_signal_to_noise() -> None:
    torch.manual_seed(4)
    x, target = torch.randn(2, 3, 64, 64), torch.tensor([0, 0])
    explain = lambda a, t: a[:, 0]  # noqa: E731  (the map is the red channel itself)
    corr, ssim = metrics.stability(explain, x, target, sigma=0.0)
    assert torch.allclose(corr, torch.ones(2)) and torch.allclose(ssim, torch.ones(2))
    sigma = 0.5  # corr(x, x + n) = 1 / sqrt(1 + sigma^2) for unit-variance x
    corr, _ = metrics.stability(explain, x, target, sigma=sigma, draws=2)
    assert torch.allclose(corr, torch.full((2,), 1 / math.sqrt(1 + sigma**2)), atol=0.02)


def test_smooth_copy_has_no_relu_and_stays_close(tiny: TinyCNN) -> None:
    smooth = smooth_copy(tiny, beta=50.0)
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in smooth.modules())
    assert any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in tiny.modules())  # the original is untouched
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(smooth(x), tiny(x), atol=0.05)


def test_manipulation_moves_saliency_toward_target_within_eps(tiny: TinyCNN) -> None:
    torch.manual_seed(5)
    x, target = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 1])
    goal = torch.zeros(2, 8, 8)
    goal[:, :4, :4] = 1.0  # the target explanation: the top-left quadrant
    saliency = make_method("Saliency", tiny)
    attack = Attack(lo=torch.full((3,), -1.0), hi=torch.full((3,), 1.0), pixel_scale=torch.full((3,), 2.0),
                    steps=20, lr=0.03, gamma=1.0, eps=0.1)
    smooth = smooth_copy(tiny, beta=10.0)
    x_adv = manipulate(smooth, differentiable("Saliency", smooth), x, target, goal, attack)
    assert (x_adv - x).abs().max() <= 0.1 * 2.0 + 1e-6  # eps in pixels, 2 normalised units per pixel
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0
    before = metrics.pearson(saliency(x, target), goal)
    after = metrics.pearson(saliency(x_adv, target), goal)
    assert (after > before + 0.1).all(), (before, after)


def test_cam_reads_vit_patch_tokens_row_major_without_prefix() -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(6)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3).eval()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([2, 1])
    act, grad = _activation_and_grad(vit, vit.norm, x, target)
    brute = torch.zeros(2, 1, 4, 4)
    for i in range(2):
        for token in range(1, 17):  # token 0 is CLS; patches follow in row-major order
            yy, xx = divmod(token - 1, 4)
            brute[i, 0, yy, xx] = (grad[i, token].clamp(min=0) * act[i, token]).sum()
    want = F.interpolate(brute.clamp(min=0), size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(cam(vit, "norm", x, target, "layercam"), want.detach(), atol=1e-5)


def test_smooth_copy_of_a_vit_has_a_gradient_of_its_gradient() -> None:
    # the manipulation attack differentiates an explanation; timm's fused attention kernel has
    # no double backward on the CPU, so the copy must run attention unfused
    import timm

    import pipeline.models.demo  # noqa: F401  (registers demo_vit)

    torch.manual_seed(0)
    model = timm.create_model("demo_vit").eval()
    smooth = smooth_copy(model)
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    (g,) = torch.autograd.grad(smooth(x)[0, 0], x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    assert gg.abs().sum() > 0
    # the copy computes the same function as the model (GELU is smooth; nothing replaced)
    torch.testing.assert_close(smooth(x), model(x), rtol=1e-4, atol=1e-5)


def test_manipulation_merge_replaces_per_method_and_refuses_other_weights_or_sizes() -> None:
    from benchmarks.saliency_eval import merge_manipulation  # namespace package at the repo root

    def run(fp, srd, images=4):
        return {"model": "demo_resnet", "set": "synthetic", "weights_fingerprint": fp,
                "manipulation_images": images, "attack_steps": 60, "wall_seconds": 1.0,
                "cpu_seconds": 1.0, "manipulation": {"SRD": {"white_box": srd}}}

    old = {"runs": [dict(run("aa", 0.1), manipulation={"SRD": {"white_box": 0.1, "transfer": 0.2},
                                                       "Saliency": {"white_box": 0.5}})]}
    merged = merge_manipulation(old, [run("aa", 0.9)], {"command": "x"})
    rows = merged["runs"][0]["manipulation"]
    assert rows == {"SRD": {"white_box": 0.9, "transfer": 0.2}, "Saliency": {"white_box": 0.5}}
    assert merged["runs"][0]["manipulation_rerun"][0]["methods"] == ["SRD"]
    with pytest.raises(ValueError, match="other weights"):
        merge_manipulation(merged, [run("bb", 0.3)], {"command": "x"})
    with pytest.raises(ValueError, match="other sizes"):
        merge_manipulation(merged, [run("aa", 0.3, images=8)], {"command": "x"})
    assert rows["SRD"]["white_box"] == 0.9  # refused merges changed nothing
