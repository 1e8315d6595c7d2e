"""Routes under attack: PGD in pixel space (the exact optimum on a linear model, the ball and the
pixel range, flips on the tiny atlas's model) and the flip numbers of `flip_routes` against a
brute force from the routes' raw edges and activations computed apart.

The tiny atlas is tests/conftest.py's (demo_resnet with seeded random weights, SAEs trained in
process).
"""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch
from torch import nn

from pipeline.atlas.flip_routes import FlipRoutes, flip_routes
from pipeline.atlas.routes import RouteFinder
from pipeline.data.synthetic import render_sample
from pipeline.evaluation.adversarial import normalise, pgd, to_pixels
from pipeline.icat.segment import LOGITS
from pipeline.models import tap

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 4
EPS = 8 / 255
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def test_pgd_on_a_linear_model_reaches_the_exact_l_inf_optimum() -> None:
    """Two classes, logits W x on the normalised input: the best L-inf move of the margin
    m = (w_0 - w_1) . normalise(x) within eps is eps * ||(w_0 - w_1) / std||_1, at the corner
    x0 - eps * sign((w_0 - w_1) / std) (pixels away from 0 and 1). One step of alpha = eps from
    x0 is that corner: the image flips exactly when m < eps * ||d||_1."""
    torch.manual_seed(0)
    w = torch.randn(2, 3 * 4 * 4, dtype=torch.float64)
    d = ((w[0] - w[1]).reshape(3, 4, 4) / torch.tensor(STD, dtype=torch.float64)[:, None, None])
    x0 = 0.3 + 0.4 * torch.rand(8, 3, 4, 4, dtype=torch.float64)
    model = Linear(w)
    margin = (normalise(x0, MEAN, STD).flatten(1) @ (w[0] - w[1])).detach()
    reach = EPS * float(d.abs().sum())
    # shift each image along d so that its margin is reach * (0.5, 0.9, 1.1, 2, ...): half flip
    want = reach * torch.tensor([0.5, 0.9, 0.99, 1.01, 1.1, 2.0, 0.2, 3.0], dtype=torch.float64)
    x0 = x0 + ((want - margin) / (d * d).sum())[:, None, None, None] * d
    assert x0.min() > 0.1 and x0.max() < 0.9  # the pixel range does not bind
    res = pgd(model, x0, torch.zeros(8, dtype=torch.long), mean=MEAN, std=STD, eps=EPS,
              alpha=EPS, steps=1, random_start=False)
    corner = x0 - EPS * d.sign()
    torch.testing.assert_close(res.pixels, corner, rtol=0, atol=1e-12)
    assert res.flipped.tolist() == (want < reach).tolist()
    assert (res.clean == 0).all()
    # more steps with a random start cannot do better than the corner, nor worse here
    many = pgd(model, x0, torch.zeros(8, dtype=torch.long), mean=MEAN, std=STD, eps=EPS, steps=20)
    assert many.flipped.tolist() == (want < reach).tolist()
    # targeted into class 1 is the same move
    tgt = pgd(model, x0, torch.ones(8, dtype=torch.long), mean=MEAN, std=STD, eps=EPS,
              alpha=EPS, steps=1, targeted=True, random_start=False)
    torch.testing.assert_close(tgt.pixels, corner, rtol=0, atol=1e-12)
    assert tgt.flipped.tolist() == (want < reach).tolist()


def test_pgd_bad_values_are_named() -> None:
    model = Linear(torch.zeros(2, 48))
    x = torch.full((1, 3, 4, 4), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
        pgd(model, x + 1, y, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="eps=0"):
        pgd(model, x, y, mean=MEAN, std=STD, eps=0)
    with pytest.raises(ValueError, match="alpha=0.5"):
        pgd(model, x, y, mean=MEAN, std=STD, eps=0.1, alpha=0.5)
    with pytest.raises(ValueError, match="class indices 0..1"):
        pgd(model, x, torch.tensor([2]), mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="labels must be Tensor"):
        pgd(model, x, torch.zeros(2, dtype=torch.long), mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def finder(atlas) -> RouteFinder:
    return RouteFinder(atlas, "ig", steps=STEPS)


@pytest.fixture(scope="module")
def attacked(finder):
    """Six fresh images (a seed the tiny atlas never saw) and their PGD versions."""
    loaded = finder.scorer.loaded
    cfg = loaded.data_config
    size = cfg["input_size"][1]  # no resize: the pixels stay 8-bit
    x = loaded.preprocess([render_sample(77, i, size)[0] for i in range(6)])
    pixels = to_pixels(x, cfg["mean"], cfg["std"])
    with torch.no_grad():
        clean = loaded.model(x).argmax(1)
    return pixels, pgd(loaded.model, pixels, clean, mean=cfg["mean"], std=cfg["std"], eps=EPS,
                       steps=10)


def test_pgd_flips_the_tiny_model_within_the_ball_and_the_pixel_range(finder, attacked) -> None:
    pixels, res = attacked
    cfg = finder.scorer.loaded.data_config
    # the preprocessed images were 8-bit pixels: to_pixels gives them back
    assert torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)
    assert res.flipped.all(), res
    assert (res.pixels - pixels).abs().max() <= EPS + 1e-6
    assert res.pixels.min() >= 0 and res.pixels.max() <= 1
    with torch.no_grad():
        adv = finder.scorer.loaded.model(normalise(res.pixels, cfg["mean"], cfg["std"])).argmax(1)
    assert adv.tolist() == res.adv.tolist() and (adv != res.clean).all()
    # not any move in the ball flips: random corners of the same ball flip fewer images
    g = torch.Generator().manual_seed(1)
    corner = (pixels + EPS * (2 * torch.randint(0, 2, pixels.shape, generator=g) - 1)).clamp(0, 1)
    with torch.no_grad():
        noisy = finder.scorer.loaded.model(normalise(corner, cfg["mean"], cfg["std"])).argmax(1)
    assert int((noisy != res.clean).sum()) < int(res.flipped.sum())


@pytest.fixture(scope="module")
def strong(finder, attacked):
    """The same images attacked at eps 32/255: on a model with random weights, 8/255 flips the
    class but switches on no latent that a k=2 route picks, so every share would be 0."""
    pixels, res = attacked
    cfg = finder.scorer.loaded.data_config
    return pixels, pgd(finder.scorer.loaded.model, pixels, res.clean, mean=cfg["mean"],
                       std=cfg["std"], eps=32 / 255, steps=10)


@pytest.fixture(scope="module")
def flips(finder, strong) -> list[FlipRoutes]:
    pixels, res = strong
    cfg = finder.scorer.loaded.data_config
    clean, adv = normalise(pixels, cfg["mean"], cfg["std"]), normalise(res.pixels, cfg["mean"], cfg["std"])
    return [flip_routes(finder, clean[i], adv[i], k=2, hints=False) for i in range(3)]


def test_flip_routes_targets_are_the_classes_before_and_after(strong, flips) -> None:
    _, res = strong
    for i, f in enumerate(flips):
        assert f.flipped and f.before.target == int(res.clean[i]) and f.after.target == int(res.adv[i])
        assert f.clean_new.target == f.after.target and f.clean_new.predicted == f.before.target
        assert f.after.predicted == f.after.target


def test_flip_numbers_equal_a_brute_force_from_the_routes_raw_edges(finder, strong, flips) -> None:
    """From the routes' JSON edges and the SAE codes of both images tapped apart: the share of
    the new class's route mass through latents inactive before, per layer; the newly active
    latents; the share on edges the clean image's route into the same class lacks."""
    pixels, res = strong
    loaded = finder.scorer.loaded
    cfg = loaded.data_config
    some_new = 0
    for i, f in enumerate(flips):
        codes = {}
        for name, p in (("clean", pixels[i:i + 1]), ("adv", res.pixels[i:i + 1])):
            taps = tap(loaded.model, normalise(p, cfg["mean"], cfg["std"]), finder.layers)
            codes[name] = {layer: finder.scorer.saes[layer].encode(taps[layer].values)[0]
                           .amax(0).detach().numpy() for layer in finder.layers}
        after = json.loads(f.after.to_json())["edges"]
        old = {(e["src"], e["dst"]) for e in json.loads(f.clean_new.to_json())["edges"]}
        summary = f.summary()
        for layer in ("layer4", "layer2"):
            mine = [e for e in after if e["src"].split(":")[0] == layer]
            total = sum(e["weight"] for e in mine)
            new = sum(e["weight"] for e in mine if not e["src"].endswith(":err")
                      and codes["clean"][layer][int(e["src"].split(":")[1])] == 0)
            fresh = sum(e["weight"] for e in mine if (e["src"], e["dst"]) not in old)
            got = summary["layers"][layer]
            assert got["new_share"] == pytest.approx(new / total, abs=1e-12)
            assert got["new_edge_share"] == pytest.approx(fresh / total, abs=1e-12)
            assert 0 <= got["new_share"] <= got["new_edge_share"] <= 1  # a new latent's edges are new
            want_new = [j for j in range(len(codes["adv"][layer]))
                        if codes["adv"][layer][j] > 0 and codes["clean"][layer][j] == 0]
            assert f.newly_active()[layer] == want_new and got["newly_active"] == len(want_new)
            assert got["active_new_frac"] == pytest.approx(
                len(want_new) / max((codes["adv"][layer] > 0).sum(), 1))
            some_new += new > 0
            assert got["route_after_act_clean"] == pytest.approx(
                [float(codes["clean"][layer][j]) for j in got["route_after"]], rel=1e-6)
            assert got["route_after_act_adv"] == pytest.approx(
                [float(codes["adv"][layer][j]) for j in got["route_after"]], rel=1e-6)
        assert summary["flip_edges"] == sorted(
            ([e["src"], e["dst"], e["weight"]] for e in after if not e["src"].endswith(":err")
             and codes["clean"][e["src"].split(":")[0]][int(e["src"].split(":")[1])] == 0),
            key=lambda e: -e[2])
    assert some_new, "no flip used a newly active latent: the shares above were all 0"


def test_routes_of_the_same_image_share_nothing_new(finder, attacked) -> None:
    """An 'attack' that changes nothing: no latent is new, no edge is new, no flip."""
    pixels, _ = attacked
    cfg = finder.scorer.loaded.data_config
    x = normalise(pixels[:1], cfg["mean"], cfg["std"])[0]
    f = flip_routes(finder, x, x, k=2, hints=False)
    assert not f.flipped
    assert f.new_share() == {"layer4": 0.0, "layer2": 0.0}
    assert f.new_edge_share() == {"layer4": 0.0, "layer2": 0.0}
    assert f.newly_active() == {"layer4": [], "layer2": []} and f.flip_edges() == []
    assert f.after.layers[0] == LOGITS and f.after == f.clean_new


def test_cli_routes_under_attack_equals_the_library(atlas, finder, tmp_path, capsys) -> None:
    from PIL import Image

    from jobs.cli import main
    from pipeline.atlas.routes import Route
    from pipeline.evaluation.adversarial import pgd_inputs

    png, js, out = tmp_path / "img.png", tmp_path / "flip.json", tmp_path / "flip.png"
    Image.fromarray(render_sample(77, 0, 128)[0]).save(png)
    assert main(["routes", atlas, "--image", str(png), "-k", "2", "--steps", str(STEPS),
                 "--attack", "pgd", "--eps", "32/255", "--attack-steps", "10",
                 "--json", str(js), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(js.read_text())
    loaded = finder.scorer.loaded
    x = finder.pixels(str(png))
    with torch.no_grad():
        clean = loaded.model(x).argmax(1)
    res = pgd_inputs(loaded.model, x, clean, loaded.data_config, eps=32 / 255, steps=10)
    want = flip_routes(finder, x[0], res.inputs[0], k=2)
    assert got["summary"] == json.loads(json.dumps(want.summary()))
    assert Route.from_json(json.dumps(got["after"])) == want.after
    assert f"class {want.before.target} -> {want.after.target}" in printed
    with Image.open(out) as im:  # the images' row above the two routes
        assert im.height > 2 * 200 and im.width > 3 * 160
    assert main(["routes", atlas, "--image", str(png), "--attack", "pgd", "--target", "hexagon"]) == 2
    assert "hexagon" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["routes", atlas, "--image", str(png), "--attack", "pgd", "--eps", "4/0"])


def test_the_after_route_draws_the_newly_active_latents_in_orange(flips) -> None:
    from pipeline.atlas.route_render import HIGHLIGHT, render_flip, render_route
    from pipeline.atlas.routes import node_id

    f = next(f for f in flips if f.flip_edges())
    new = {node_id(layer, j) for layer, lat in f.newly_active().items() for j in lat}
    on_route = {n.id for n in f.after.nodes} & new
    assert on_route
    orange = lambda im: int((np.asarray(im) == HIGHLIGHT).all(-1).sum())  # noqa: E731
    assert orange(render_route(f.after, None, thumbs=0)) == 0
    assert orange(render_route(f.after, None, thumbs=0, highlight=new)) > 100 * len(on_route)
    h, w = 32, 32
    clean, adv = np.zeros((h, w, 3), np.uint8), np.full((h, w, 3), 4, np.uint8)
    both = render_flip(f, clean, adv, None, thumbs=0)
    assert orange(both) == orange(render_route(f.after, None, thumbs=0, highlight=new))
    with pytest.raises(ValueError, match="two \\[H, W, 3\\] images of one size"):
        render_flip(f, clean, adv[:-1], None, thumbs=0)
