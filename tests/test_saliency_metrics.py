"""Saliency metrics, baselines and the manipulation attack on hand-made cases with known answers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.evaluation import Attack, Unsupported, cam, differentiable, make_method, manipulate, metrics, smooth_copy
from pipeline.evaluation.cams import tokens_to_grid


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
    # the map that ignores the class peaks in one cell per image; the one that follows it moves
    # (its objects lie in different 4 px cells), unless the cell spans the whole image
    for explain, cell, expected in ((ignores, 4, [True, True]), (follows, 4, [False, False]),
                                    (follows, 8, [True, True])):
        maps, _, image = metrics.class_switch_maps(explain, images, objects)
        assert metrics.one_peak_cell(maps, image, cell).tolist() == expected, (cell, expected)
    with pytest.raises(ValueError, match="cell=0"):
        metrics.one_peak_cell(maps, image, 0)
    with pytest.raises(ValueError, match="fewer than two classes"):
        metrics.class_switch_pointing(follows, images, [objects[0], objects[1][:1]])


def test_class_switch_benchmark_scores_every_pair_and_records_what_a_library_cannot_run() -> None:
    """benchmarks/class_switch.py on 4 scenes of demo_resnet: one score per (scene, present shape)
    pair, each pair's logit rise equal to the logit with and without that shape's objects, and
    zennit's LRP (no canonizer for timm's ResNet blocks) recorded as unsupported with its reason,
    not a crash that loses the other methods' rows."""
    from benchmarks.class_switch import logit_rise, run_model  # namespace package at the repo root
    from PIL import Image

    from pipeline.evaluation.data import multi_object_set, without_each_shape
    from pipeline.models import load_model

    res = run_model("demo_resnet", 4, ["SRD", "LRP"], batch=4, seed=2026)
    _, objs = multi_object_set(4, 2026)
    assert res["pairs"] == sum(len(per) for per in objs) >= 8
    srd = res["methods"]["SRD"]
    assert 0.0 <= srd["class_switch_pointing"] <= 1.0
    assert srd["class_switch_pointing"] * res["pairs"] == pytest.approx(round(srd["class_switch_pointing"] * res["pairs"]))
    assert "zennit" in res["methods"]["LRP"]["unsupported"]
    assert res["peak_cell_px"] == 8 and 0.0 <= srd["scenes_with_one_peak_cell"] <= 1.0
    # the rise of the first pair, by hand
    lm = load_model("demo_resnet", "demo")
    imgs, _ = multi_object_set(1, 2026)
    gone = without_each_shape(1, 2026)[0][0]
    with torch.no_grad():
        both = lm.model(torch.stack([lm.transform(Image.fromarray(im)) for im in (imgs[0], gone)]))
    cls = objs[0][0][0]
    logits = lm.model(lm.transform(Image.fromarray(imgs[0]))[None]).detach()
    rise = logit_rise(lm, logits, objs[:1], 1, 4, 2026)
    assert float(rise[0]) == pytest.approx(float(both[0, cls] - both[1, cls]), abs=1e-4)


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


def _gradcam_scaling(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """grad-cam's post-processing of a CAM [N, 1, h, w] (ReLU applied by the caller): scale to
    [0, 1], bilinear resize (OpenCV, half-pixel centres), scale to [0, 1] again -> [N, H, W]."""
    def unit(m: torch.Tensor) -> torch.Tensor:
        m = m - m.amin((2, 3), keepdim=True)
        return m / (1e-7 + m.amax((2, 3), keepdim=True))

    return unit(F.interpolate(unit(low), size=size, mode="bilinear", align_corners=False))[:, 0]


def test_gradcam_family_equals_bruteforce_loops(tiny: TinyCNN) -> None:
    torch.manual_seed(2)
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    act, grad = _activation_and_grad(tiny, tiny.act2, x, target)
    n, c, h, w = act.shape
    brute = {k: torch.zeros(n, 1, h, w) for k in ("GradCAM", "LayerCAM", "HiResCAM", "XGradCAM")}
    for i in range(n):
        for ch in range(c):
            xgrad_weight = (grad[i, ch] * act[i, ch]).sum() / (act[i, ch].sum() + 1e-7)
            for yy in range(h):
                for xx in range(w):
                    a, g = act[i, ch, yy, xx].item(), grad[i, ch, yy, xx].item()
                    brute["GradCAM"][i, 0, yy, xx] += grad[i, ch].mean().item() * a
                    brute["LayerCAM"][i, 0, yy, xx] += max(g, 0.0) * a
                    brute["HiResCAM"][i, 0, yy, xx] += g * a
                    brute["XGradCAM"][i, 0, yy, xx] += xgrad_weight.item() * a
    for name, low in brute.items():
        want = _gradcam_scaling(low.clamp(min=0), (8, 8))
        got = make_method(name, tiny, layer="act2")(x, target)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=name)
    # Grad-CAM's map differs from LayerCAM's here: the test can tell the methods apart
    assert (_gradcam_scaling(brute["GradCAM"].clamp(min=0), (8, 8))
            - _gradcam_scaling(brute["LayerCAM"].clamp(min=0), (8, 8))).abs().max() > 0.05


def test_scorecam_equals_bruteforce_masked_forward_passes(tiny: TinyCNN) -> None:
    torch.manual_seed(7)
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    act, _ = _activation_and_grad(tiny, tiny.act2, x, target)
    low = torch.zeros(2, 1, *act.shape[2:])
    for i in range(2):
        scores = []
        for ch in range(act.shape[1]):  # Score-CAM: the class score of the image masked by each channel
            up = F.interpolate(act[i:i + 1, ch:ch + 1], size=(8, 8), mode="bilinear", align_corners=True)
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            with torch.no_grad():
                scores.append(tiny(x[i:i + 1] * mask)[0, target[i]])
        weights = torch.stack(scores).softmax(0)
        low[i, 0] = (weights[:, None, None] * act[i]).sum(0)
    torch.testing.assert_close(make_method("ScoreCAM", tiny, layer="act2")(x, target),
                               _gradcam_scaling(low.clamp(min=0), (8, 8)), atol=1e-5, rtol=0)


def test_gradcam_equals_captum_layergradcam_after_scaling(tiny: TinyCNN) -> None:
    from captum.attr import LayerGradCam

    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 0])
    low = LayerGradCam(tiny, tiny.act2).attribute(x, target=target, relu_attributions=True)
    torch.testing.assert_close(make_method("GradCAM", tiny, layer="act2")(x, target),
                               _gradcam_scaling(low, (8, 8)), atol=1e-5, rtol=0)


def test_differentiable_explainers_equal_library_maps(tiny: TinyCNN) -> None:
    torch.manual_seed(3)
    x, target = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    for name in ("Saliency", "InputXGradient", "IntegratedGradients", "GradCAM", "LayerCAM"):
        library_map = make_method(name, tiny, layer="act2", ig_steps=6)(x, target)
        own = differentiable(name, tiny, layer="act2", ig_steps=6)(x, target).detach()
        torch.testing.assert_close(own, library_map, atol=1e-5, rtol=0, msg=name)
    # SmoothGrad without noise is Saliency
    no_noise = differentiable("SmoothGrad", tiny, sg_samples=2, sg_stdev=0.0)(x, target).detach()
    assert torch.allclose(no_noise, make_method("Saliency", tiny)(x, target), atol=1e-6)
    for name in ("GuidedBackprop", "ScoreCAM", "LRP"):
        with pytest.raises(Unsupported, match=name):
            differentiable(name, tiny)


def _tiny_timm(name: str, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_cams_of_a_vit_depend_on_its_patch_tokens_whatever_its_head_reads(pool: str) -> None:
    """At the final norm a class-token head has no gradient on the patch tokens (every CAM
    blank, pointing game 0); the CAM layer of such a head is the last block's norm1."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                            num_classes=3, global_pool=pool,
                            class_token=pool == "token").eval()
    x = torch.randn(2, 3, 32, 32)
    maps = make_method("GradCAM", vit)(x, torch.tensor([0, 2]))
    assert (maps.flatten(1).amax(1) > 0).all() and (maps.flatten(1).std(1) > 0).all()


def test_fullgrad_runs_where_every_bias_is_collected_and_refuses_otherwise() -> None:
    from timm.models.vision_transformer import VisionTransformer

    resnet = _tiny_timm("resnet10t")
    x = torch.randn(2, 3, 32, 32)
    maps = make_method("FullGrad", resnet)(x, torch.tensor([0, 2]))
    assert maps.shape == (2, 32, 32) and maps.amin((1, 2)).tolist() == [0.0, 0.0]
    torch.testing.assert_close(maps.amax((1, 2)), torch.ones(2), atol=1e-5, rtol=0)
    with pytest.raises(Unsupported, match="BatchNormAct2d"):  # subclasses BatchNorm2d: FullGrad skips it
        make_method("FullGrad", _tiny_timm("efficientnet_lite0"))
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(Unsupported, match="LayerNorm, Linear"):
        make_method("FullGrad", vit)


def test_zennit_lrp_refuses_timm_blocks_it_has_no_canonizer_for() -> None:
    with pytest.raises(Unsupported, match="ResNetCanonizer matches only torchvision"):
        make_method("LRP", _tiny_timm("resnet10t"))
    with pytest.raises(Unsupported, match="no canonizer"):
        make_method("LRP", _tiny_timm("efficientnet_lite0"))


def test_zennit_lrp_of_a_bias_free_sequential_net_conserves_each_class_logit() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        logits = net(x)
    explain = make_method("LRP", net)
    for cls in (0, 2):
        t = torch.full((2,), cls)
        maps = explain(x, t)
        # EpsilonPlusFlat conserves relevance where no bias absorbs any: the map sums to the logit
        torch.testing.assert_close(maps.sum((1, 2)), logits[:, cls], rtol=1e-3, atol=1e-5)
    # and the two classes' maps differ: the target is the one asked for
    assert (explain(x, torch.zeros(2, dtype=torch.long)) - explain(x, torch.full((2,), 2))).abs().max() > 1e-3


@pytest.mark.extras
def test_attnlrp_conserves_the_logit_of_a_bias_free_vit_and_leaves_the_model_alone() -> None:
    pytest.importorskip("lxt", reason="lxt (AttnLRP) is in the `bench` extra: `make test-extras` runs this")
    from timm.models.vision_transformer import VisionTransformer
    from zennit.core import BasicHook

    from pipeline.evaluation.lrp import attn_lrp

    torch.manual_seed(9)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                            class_token=False, global_pool="avg").eval()
    with torch.no_grad():  # no bias, no position embedding: nothing absorbs relevance
        for name, p in vit.named_parameters():
            if name.endswith("bias") or "pos_embed" in name:
                p.zero_()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        before = vit(x)
    logit = before.gather(1, t[:, None])[:, 0]
    hooks = dict(BasicHook.__dict__)
    for explain in (attn_lrp(vit, conv_gamma=0.0, linear_gamma=0.0), make_method("AttnLRP", vit)):
        torch.testing.assert_close(explain(x, t).sum((1, 2)), logit, rtol=1e-3, atol=1e-5)
    # plain input x gradient is not conserving through LayerNorm, GELU and softmax
    ixg = make_method("InputXGradient", vit)(x, t).sum((1, 2))
    assert ((ixg - logit).abs() > 0.05 * logit.abs()).any(), (ixg, logit)
    # the patches lived on a copy and inside the call only
    assert type(vit.blocks[0].attn.q_norm) is nn.Identity and "forward" not in vars(vit.blocks[0].norm1)
    assert dict(BasicHook.__dict__) == hooks
    with torch.no_grad():
        torch.testing.assert_close(vit(x), before)


@pytest.mark.extras
def test_attnlrp_merges_a_conv_stems_norms_and_conserves_the_logit() -> None:
    """demo_vitc's ConvStem: the map equals that of the same model written without BatchNorms
    (their affine maps merged by hand into the convs; some BN scales negative, so the Gamma rule
    tells the two apart unless AttnLRP merges them too); bias-free, the logit is conserved; the
    model keeps its BatchNorms."""
    pytest.importorskip("lxt", reason="lxt (AttnLRP) is in the `bench` extra: `make test-extras` runs this")
    import copy

    import timm
    from timm.layers import BatchNormAct2d

    import pipeline.models.demo  # noqa: F401  (registers demo_vitc)
    from pipeline.evaluation.lrp import attn_lrp

    torch.manual_seed(10)
    vit = timm.create_model("demo_vitc", img_size=64, depth=2).eval()
    with torch.no_grad():
        for m in vit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.3, 3.0)
                m.weight.uniform_(-2.0, 2.0)
                m.bias.normal_()
    plain = copy.deepcopy(vit)
    with torch.no_grad():
        for layer in plain.patch_embed.backbone:
            if isinstance(layer.bn, BatchNormAct2d):
                bn, scale = layer.bn, layer.bn.weight / torch.sqrt(layer.bn.running_var + layer.bn.eps)
                layer.conv.weight.mul_(scale.view(-1, 1, 1, 1))
                layer.conv.bias = nn.Parameter(bn.bias - scale * bn.running_mean)
                layer.bn = bn.act
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([0, 4])
    with torch.no_grad():
        torch.testing.assert_close(plain(x), vit(x))
    torch.testing.assert_close(attn_lrp(vit)(x, t), attn_lrp(plain)(x, t), rtol=1e-4, atol=1e-6)
    assert isinstance(vit.patch_embed.backbone[0].bn, BatchNormAct2d) and vit.patch_embed.backbone[0].conv.bias is None
    with torch.no_grad():  # no bias, no BN shift, no position embedding: nothing absorbs relevance
        for name, p in vit.named_parameters():
            if name.endswith("bias") or "pos_embed" in name:
                p.zero_()
        for m in vit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
        logit = vit(x).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(attn_lrp(vit, conv_gamma=0.0, linear_gamma=0.0)(x, t).sum((1, 2)),
                               logit, rtol=1e-3, atol=1e-5)


def test_attnlrp_refuses_what_it_has_no_rule_for(tiny: TinyCNN) -> None:
    # checked before lxt is imported: runs without the `bench` extra too
    with pytest.raises(Unsupported, match="TinyCNN"):
        make_method("AttnLRP", tiny)
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                            global_pool="map")
    with pytest.raises(Unsupported, match="AttentionPoolLatent"):
        make_method("AttnLRP", vit)


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
    # a class-token head: the CAM layer is the last block's norm1 (at the final norm the patch
    # tokens have no gradient and the map would be blank)
    act, grad = _activation_and_grad(vit, vit.blocks[0].norm1, x, target)
    brute = torch.zeros(2, 1, 4, 4)
    for i in range(2):
        for token in range(1, 17):  # token 0 is CLS; patches follow in row-major order
            yy, xx = divmod(token - 1, 4)
            brute[i, 0, yy, xx] = (grad[i, token].clamp(min=0) * act[i, token]).sum()
    assert (brute.flatten(1).amax(1) > 0).all()
    want = _gradcam_scaling(brute.clamp(min=0), (32, 32))
    torch.testing.assert_close(make_method("LayerCAM", vit)(x, target), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(cam(vit, "blocks.0.norm1", x, target, "layercam").detach(), want,
                               atol=1e-5, rtol=0)
    assert tokens_to_grid(vit, act).shape == (2, 16, 4, 4)


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


def test_block0_contributions_sum_to_the_attention_output_and_find_a_planted_hub() -> None:
    """benchmarks/class_switch_block0.py's hubs come from SRD's recorded block-0 attention rule:
    its contributions c(i->j), summed over sources plus the projection bias, equal the attention
    branch's output and their norms are the rule's pair norms; a token made to dominate every
    value vector is the top hub patch."""
    import timm
    from benchmarks.class_switch_block0 import block0_attention, hub_patches  # namespace package

    import pipeline.models.demo  # noqa: F401  (registers demo_vitc)

    torch.manual_seed(0)
    model = timm.create_model("demo_vitc").eval()
    x = torch.randn(2, 3, 128, 128)
    rule = block0_attention(model, x)
    c = torch.einsum("nhji,dhe,nhie->njid", rule.a, rule.w, rule.u)  # c(i->j) = sum_h A W_O^h u^h_i
    blk = model.blocks[0]
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        expected = blk.ls1(blk.attn(blk.norm1(t)))
    torch.testing.assert_close(c.sum(2) + blk.ls1(blk.attn.proj.bias), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rule.norms(), c.norm(dim=-1), rtol=1e-4, atol=1e-5)
    # plant a hub: patch 9 of image 0 leaves block 0's norm 50 times larger, so its value vector
    # (and its contribution to every token that attends to it) grows; without it, another is top
    p = model.num_prefix_tokens
    assert int(hub_patches(model, x, k=1)[0, 0]) != 9

    def plant(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[0, p + 9] *= 50
        return out

    hook = blk.norm1.register_forward_hook(plant)
    try:
        assert int(hub_patches(model, x, k=1)[0, 0]) == 9
        assert int(hub_patches(model, x, k=1)[1, 0]) != 9  # the other image is untouched
    finally:
        hook.remove()
