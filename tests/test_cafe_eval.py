"""The CAFE evaluation's scoring (pipeline/cafe/evidence.py), the generalised faithfulness
orders, a latent's AttnLRP, the distillation loss and the image-label ViT (docs/cafe_eval.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cafe import evidence, faithfulness
from pipeline.cafe.groundtruth import GTObject


def brute_mass_mask(m: np.ndarray, mass: float) -> np.ndarray:
    """The smallest prefix of pixels, in decreasing value (ties by index), whose positive sum
    reaches `mass` of the map's positive total, by a plain loop."""
    flat = m.ravel()
    pos = np.clip(flat, 0, None)
    order = sorted(range(flat.size), key=lambda j: (-pos[j], j))
    total = 0.0
    for idx in order:  # summed in the same order as below, so mass 1 stops at the last positive
        total += pos[idx]
    out = np.zeros(flat.size, bool)
    if total <= 0:
        return out.reshape(m.shape)
    acc = 0.0
    for idx in order:
        out[idx] = True
        acc += pos[idx]
        if acc >= mass * total:
            break
    return out.reshape(m.shape)


def test_iou_curve_equals_a_brute_force_loop_over_masses() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 12, 10, generator=gen, dtype=torch.float64)
    maps[3] = -maps[3].abs()  # no positive mass: an empty mask, IoU 0
    objects = [np.random.default_rng(i).random((12, 10)) < 0.3 for i in range(5)]
    masses = (0.3, 0.5, 0.75, 0.9, 1.0)
    curve = evidence.iou_curve(maps, objects, masses)
    for i in range(5):
        for k, mass in enumerate(masses):
            mask = brute_mass_mask(maps[i].numpy(), mass)
            union = (mask | objects[i]).sum()
            want = (mask & objects[i]).sum() / union if union else 0.0
            assert curve[i, k] == pytest.approx(want, abs=1e-12)
    assert curve[3].tolist() == [0.0] * 5
    # a map that is exactly its object reaches IoU 1 at mass 1
    exact = torch.from_numpy(objects[0].astype(np.float64))[None]
    assert evidence.iou_curve(exact, objects[:1], (1.0,))[0, 0] == 1.0


def test_the_chosen_mass_is_split_a_s_argmax_whatever_split_b_says() -> None:
    masses = (0.3, 0.5, 0.7, 0.9)
    split_a = np.array([[0.2, 0.6, 0.5, 0.1], [0.4, 0.5, 0.45, 0.2]])  # means .3 .55 .475 .15
    split_b = np.array([[0.1, 0.1, 0.2, 0.9]])  # B alone would choose 0.9
    assert evidence.choose_mass(masses, split_a) == 0.5
    assert evidence.choose_mass(masses, split_b) == 0.9
    # the mean, not one row's maximum; ties go to the smaller mass
    assert evidence.choose_mass(masses, np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.6, 0.6],
                                                  [0.0, 0.6, 0.6, 0.6]])) == 0.5


def test_off_object_mass_counts_positive_relevance_outside_the_object() -> None:
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0], m[0, 0, 1], m[0, 3, 3], m[0, 3, 2] = 2.0, 1.0, 1.0, -5.0
    obj = np.zeros((4, 4), bool)
    obj[0, :2] = True
    assert evidence.off_object_mass(m, [obj])[0] == pytest.approx(0.25)
    assert np.isnan(evidence.off_object_mass(-m.abs(), [obj])[0])


def _obj(mask: np.ndarray, shape: str = "circle", colour: str = "red", texture: str = "solid") -> GTObject:
    return GTObject(shape, colour, texture, mask)


def test_cell_object_reads_the_centre_pixel_of_the_cell() -> None:
    a = np.zeros((128, 128), bool)
    a[0:32, 0:32] = True  # cells (0,0), (0,1), (1,0), (1,1) of an 8 x 8 grid
    b = np.zeros((128, 128), bool)
    b[100:128, 100:128] = True  # holds the centre (120, 120) of cell (7, 7) only
    objs = [_obj(a), _obj(b)]
    assert evidence.cell_object(0, (8, 8), objs) == 0
    assert evidence.cell_object(9, (8, 8), objs) == 0
    assert evidence.cell_object(63, (8, 8), objs) == 1
    assert evidence.cell_object(2, (8, 8), objs) is None
    assert evidence.cell_object(0, (8, 8), []) is None


def test_a_concept_latent_agrees_on_an_attribute_for_three_quarters_of_its_picks() -> None:
    m = np.zeros((2, 2), bool)
    red = [_obj(m, s, "red", t) for s, t in (("circle", "solid"), ("star", "checker"),
                                             ("cross", "dots"), ("square", "solid"))]
    assert evidence.tracks_concept(red)  # colour shared by all four
    mixed = [_obj(m, s, c, "solid" if i < 2 else "dots")
             for i, (s, c) in enumerate((("circle", "red"), ("star", "blue"), ("cross", "green"),
                                         ("square", "red")))]
    assert not evidence.tracks_concept(mixed)  # best shares: red 2/4, solid 2/4
    assert not evidence.tracks_concept(red[:3] + [None])  # one pick off every object
    assert not evidence.tracks_concept(red[:1])  # a single pick names no concept


def test_faithfulness_runs_any_number_of_orders_with_the_known_curves() -> None:
    # readout = sum of the image: deleting patch k removes exactly its own sum
    image = torch.zeros(1, 4, 4)
    image[0, :2, :2], image[0, :2, 2:], image[0, 2:, :2], image[0, 2:, 2:] = 4.0, 3.0, 2.0, 1.0
    orders = {"best": torch.tensor([0, 1, 2, 3]), "worst": torch.tensor([3, 2, 1, 0]),
              "mid": torch.tensor([1, 0, 3, 2]), "random": torch.tensor([2, 3, 0, 1])}
    c = faithfulness.curves(image, orders, lambda x: x.flatten(1).sum(1), patch=2, steps=4, batch=7)
    per_patch = 16.0  # 4 pixels x value 4 (the first patch)
    assert c.deletion["best"].tolist() == [40.0, 40.0 - per_patch, 40.0 - 28, 40.0 - 36, 0.0]
    assert c.insertion["worst"].tolist() == [0.0, 4.0, 12.0, 24.0, 40.0]
    aucs = faithfulness.aucs(c)
    assert set(aucs) == {f"{m}_auc_{o}" for o in orders for m in ("ins", "del")}
    assert aucs["del_auc_best"] < aucs["del_auc_mid"] < aucs["del_auc_worst"]


@pytest.mark.extras
def test_attnlrp_of_a_latent_conserves_its_pre_activation_on_a_bias_free_vit() -> None:
    pytest.importorskip("lxt", reason="lxt (AttnLRP) is in the `bench` extra: `make test-extras` runs this")
    import timm

    from pipeline.cafe.stage import latent_readout
    from pipeline.evaluation.lrp import attn_lrp_of
    from pipeline.sae.config import SAEConfig
    from pipeline.sae.model import SAE

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                            num_classes=3, class_token=True, global_pool="token").eval()
    with torch.no_grad():
        for name, prm in vit.named_parameters():
            if name.endswith("bias") or "pos_embed" in name or "cls_token" in name:
                prm.zero_()
    sae = SAE(SAEConfig(d_in=192, n_latents=16, k=4))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.b_enc.zero_()
    x = torch.randn(2, 3, 32, 32)
    # the latent that fires most surely on both images at token 5
    values = torch.stack([latent_readout(vit, sae, "blocks.1", f, 5)(x) for f in range(16)])
    latent = int(values.min(1).values.argmax())
    value = latent_readout(vit, sae, "blocks.1", latent, 5, grad=True)(x)
    assert value.shape == (2,) and bool((value > 0).all())
    run = attn_lrp_of(vit, conv_gamma=0.0, linear_gamma=0.0)
    maps = run(x, lambda m, images: latent_readout(m, sae, "blocks.1", latent, 5, grad=True)(images))
    assert maps.shape == (2, 32, 32)
    # LRP-0 with the identity rules and no biases conserves the latent's (positive) value
    assert torch.allclose(maps.flatten(1).sum(1), value.detach(), rtol=1e-3, atol=1e-4)
    # and the map is not the class logit's: another latent gets another map
    other = run(x, lambda m, images: latent_readout(m, sae, "blocks.1", (latent + 1) % 16, 5,
                                                    grad=True)(images))
    assert (maps - other).abs().max() > 1e-3


def test_distill_loss_is_zero_at_the_teacher_and_the_scaled_kl_elsewhere() -> None:
    from pipeline.models.train_demo import distill_loss

    t = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    assert float(distill_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)
    s = torch.zeros(2, 3)
    p = torch.softmax(t / 2.0, -1)
    want = 4.0 * float((p * (p.log() - np.log(1 / 3))).sum(1).mean())
    assert float(distill_loss(s, t, 2.0)) == pytest.approx(want, rel=1e-6)


def test_demo_vit_cls_head_reads_the_class_token_only() -> None:
    import timm

    import pipeline.models.demo  # noqa: F401  (registers demo_vit_cls)

    torch.manual_seed(0)
    vit = timm.create_model("demo_vit_cls").eval()
    assert vit.global_pool == "token" and vit.num_prefix_tokens == 1
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        feats = vit.forward_features(x)  # [2, 1 + 64, 96]
        logits = vit.forward_head(feats)
        moved = feats.clone()
        moved[:, 1:] += 5.0 * torch.randn_like(moved[:, 1:])  # every patch token changed
        cls_moved = feats.clone()
        cls_moved[:, 0] += 1.0
        assert feats.shape == (2, 65, 96)
        assert torch.equal(vit.forward_head(moved), logits)
        assert (vit.forward_head(cls_moved) - logits).abs().max() > 1e-3
        assert torch.allclose(vit(x), logits)


def test_srd_decomposes_latents_of_a_headless_vit_and_refuses_its_classes() -> None:
    import timm

    from pipeline import srd

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                            num_classes=0, class_token=True, global_pool="token").eval()
    x = torch.randn(1, 3, 32, 32)
    direction = torch.randn(1, 1, 192)
    maps, const = srd.ierf(vit, x, "blocks.1", torch.tensor([[6]]), direction, return_constant=True)
    with torch.no_grad():
        v = vit.blocks[1](vit.blocks[0](vit._pos_embed(vit.patch_embed(x))))[0, 6]
    # pixels + constant = the data term <w, v> of the seeded token
    assert float(maps.sum() + const.sum()) == pytest.approx(float(v @ direction[0, 0]), rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="no classifier head"):
        srd.saliency(vit, x, torch.tensor([0]))


def test_integrated_gradients_of_a_linear_readout_is_input_times_weight() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 6, 5, generator=gen)
    x = torch.randn(2, 3, 6, 5, generator=gen)
    maps = evidence.gradient_maps(lambda im: (im * w).flatten(1).sum(1), x, steps=4)
    # a linear readout has a constant gradient: IG from 0 is exactly x * w (summed over channels)
    assert torch.allclose(maps, (x * w).sum(1), atol=1e-5)
    assert torch.allclose(maps.flatten(1).sum(1), (x * w).flatten(1).sum(1), atol=1e-4)
