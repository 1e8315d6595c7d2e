"""Concept routes: structure, weights equal to the ICAT library's, error nodes, JSON, the image.

Runs on the tiny atlas of tests/test_icat.py (demo_resnet with seeded random weights, SAEs
trained in process; `straight` adds the icat stage's edges).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import copy_of

from pipeline.atlas.api import Atlas
from pipeline.atlas.regions import cell_box
from pipeline.atlas.route_render import (
    CAPTION,
    H_GAP,
    MARGIN,
    V_GAP,
    canvas_size,
    exemplar_thumbnails,
    node_size,
    node_title,
    render_route,
)
from pipeline.atlas.routes import (
    ERROR,
    Route,
    RouteFinder,
    node_id,
    routes,
    routes_from_edges,
    top_sources,
)
from pipeline.atlas.sheets import exemplar_tile
from pipeline.cafe.masks import decode_png, encode_png
from pipeline.data.concepts import CLASS_NAMES
from pipeline.data.synthetic import render_sample
from pipeline.icat.segment import LOGITS
from pipeline.icat.stage import ICATOptions, ShardScorer, plan_icat
from pipeline.store import AtlasRoot, fs
from schemas import EDGES, EXEMPLARS

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return render_sample(5, 3, 64)[0]


@pytest.fixture(scope="module")
def route(atlas, image) -> Route:
    return routes(atlas, image, k=2, steps=STEPS)


def test_top_sources_keeps_k_positive_latents_and_the_error_node_only_when_it_ranks() -> None:
    w = np.array([0.5, -2.0, 0.1, 0.3, 0.0, 0.4])  # 5 latents, error node last
    # the error node ranks 2nd: it joins, and the k latents are still kept
    assert top_sources(w, 2) == [(0, 0.5), (ERROR, 0.4), (3, 0.3)]
    assert top_sources(np.array([0.5, 0.3, 0.2, 0.1]), 2) == [(0, 0.5), (1, 0.3)]  # 0.1 < 0.3
    assert top_sources(np.array([0.5, -0.3, 0.2, 0.35]), 2) == [(0, 0.5), (ERROR, 0.35), (2, 0.2)]
    # fewer positive latents than k: a positive error node joins; negative ones never do
    assert top_sources(np.array([-1.0, 0.2, 0.0, 0.05]), 3) == [(1, 0.2), (ERROR, 0.05)]
    assert top_sources(np.array([-1.0, -0.2, -0.5]), 3) == []


def test_route_has_one_level_per_tapped_layer_and_k_sources_per_node(route) -> None:
    assert route.layers == [LOGITS, "layer4", "layer2"]
    assert route.nodes[0].layer == LOGITS and route.nodes[0].latent == route.target == route.predicted
    for upper, lower in zip(route.layers, route.layers[1:]):
        sources: dict[str, list] = {}
        for e in route.edges:
            if e.dst.split(":")[0] == upper:
                assert e.src.split(":")[0] == lower
                sources.setdefault(e.dst, []).append(e.src)
        # every non-error node of the upper level is expanded, with at most k latents each
        assert set(sources) == {n.id for n in route.level(upper) if n.latent != ERROR}
        for srcs in sources.values():
            assert 1 <= sum(not s.endswith(":err") for s in srcs) <= route.k
        assert {n.id for n in route.level(lower)} == {s for v in sources.values() for s in v}
    # error nodes are leaves
    assert not any(e.dst.endswith(":err") for e in route.edges)
    assert all(e.weight > 0 for e in route.edges)


def test_route_weights_and_choices_equal_the_icat_library_on_the_image(
        atlas, image, route) -> None:
    plan = plan_icat(atlas, ICATOptions(methods=("ig",), steps=STEPS), record=False)
    scorer = ShardScorer(plan)
    x = scorer.loaded.preprocess(image)
    got = {(e.src, e.dst): e.weight for e in route.edges}
    checked = 0
    for pair in [("layer4", LOGITS), ("layer2", "layer4")]:
        res = scorer.score_pair(pair, x, np.array([-1]))
        w = res.scores["ig"].scores["ig"].double().numpy()
        for q, g in enumerate(res.node.tolist()):
            dst = node_id(pair[1], g)
            if dst not in {n.id for n in route.nodes} or dst.endswith(":err"):
                continue
            # brute force: every scored source, sorted, against the route's picks
            row = w[q]
            latents = sorted(((row[f], f) for f in range(len(row) - 1) if row[f] > 0), reverse=True)[:route.k]
            want = {node_id(pair[0], f): s for s, f in latents}
            if row[-1] > 0 and (len(latents) < route.k or row[-1] >= latents[-1][0]):
                want[node_id(pair[0], ERROR)] = row[-1]
            have = {s: v for (s, d), v in got.items() if d == dst}
            assert have.keys() == want.keys()
            for s in want:
                np.testing.assert_allclose(have[s], want[s], rtol=1e-5, atol=1e-7)
                checked += 1
    assert checked == len(route.edges)


def test_route_activations_are_the_latents_max_over_positions(atlas, image, route) -> None:
    from pipeline.models import tap

    plan = plan_icat(atlas, ICATOptions(methods=("ig",), steps=STEPS), record=False)
    scorer = ShardScorer(plan)
    x = scorer.loaded.preprocess(image)
    taps = tap(scorer.loaded.model, x, ["layer2", "layer4"])
    for layer in ("layer2", "layer4"):
        acts = scorer.saes[layer].encode(taps[layer].values)[0].amax(0)
        for n in route.level(layer):
            if n.latent != ERROR:
                assert n.activation == pytest.approx(float(acts[n.latent]), rel=1e-6)
    logits = scorer.loaded.model(x)[0]
    assert route.nodes[0].activation == pytest.approx(float(logits.max()), rel=1e-5)


def test_depth_target_and_the_true_label(atlas, image) -> None:
    short = routes(atlas, image, target="true", label=2, k=1, steps=STEPS, depth=1)
    assert short.layers == [LOGITS, "layer4"] and short.target == 2 and short.label == 2
    assert {n.layer for n in short.nodes} <= {LOGITS, "layer4"}
    assert routes(atlas, image, target="triangle", k=1, steps=STEPS, depth=1).target == 2


def test_a_model_without_a_class_head_has_no_class_route(atlas, image, monkeypatch) -> None:
    finder = RouteFinder(atlas, "ig", STEPS)
    # as timm builds a headless backbone (the loaded model may be shared: undone after)
    monkeypatch.setattr(finder.scorer.loaded.model, "num_classes", 0)
    with pytest.raises(ValueError, match="has no class head"):
        finder(image, k=1)


def test_json_round_trip(route) -> None:
    text = route.to_json()
    back = Route.from_json(text)
    assert back == route
    assert back.to_json() == text
    # JSON written before routes carried class names reads as a route without them
    old = json.loads(text)
    del old["class_names"]
    assert Route.from_json(json.dumps(old)) == dataclasses.replace(route, class_names=None)


def test_render_draws_every_node_on_a_canvas_of_the_layout_size(atlas, route, tmp_path) -> None:
    out = tmp_path / "route.png"
    im = render_route(route, atlas, out, thumbs=3)
    w, h = node_size(3)
    widest = max(len(route.level(layer)) for layer in route.layers)
    assert im.size == canvas_size(route, 3) == (
        2 * MARGIN + widest * w + (widest - 1) * H_GAP, 2 * MARGIN + 3 * h + 2 * V_GAP + CAPTION)
    assert out.stat().st_size > 1000
    pixels = np.asarray(im)
    assert (pixels < 128).any(axis=-1).mean() > 0.005  # lines, boxes and text were drawn
    assert exemplar_thumbnails(atlas, route) is None  # no cafe stage in this atlas


def test_render_shows_exemplar_thumbnails_with_their_ierf_masks(atlas, route, tmp_path) -> None:
    """An exemplars table written by hand (one exemplar per route latent: image 0, position 0,
    an iERF mask on the left half) gives each latent node one thumbnail tinted on that half."""
    root = copy_of(atlas, tmp_path / "with_exemplars")
    image = Atlas.open(root).images([0])[0]
    h, w = image.shape[:2]
    mask = np.zeros((h, w), bool)
    mask[:, : w // 2] = True
    png = encode_png(mask.astype(np.float64), mask, 1.0)
    rows = [dict(atlas_id="t", layer=n.layer, sae_id=route.saes[n.layer], latent=n.latent,
                 kind="top", rank=0, image_id=0, activation=1.0, position=0, y=0, x=0,
                 source_group=0, ierf_png=png, bbox=[0, 0, w // 2, h], mask_frac=0.5, act_overlap=0.0,
                 ierf_constant=0.0)
            for n in route.nodes if n.layer != LOGITS and n.latent != ERROR]
    fs.write_parquet(pa.Table.from_pylist(rows, schema=EXEMPLARS),
                     fs.join(root, "exemplars", "part-000000.parquet"), EXEMPLARS)
    tiles = exemplar_thumbnails(root, route, 3)
    assert set(tiles) == {r["layer"] + ":" + str(r["latent"]) for r in rows}
    for node, t in tiles.items():  # the atlas's own exemplar picture, peak cell of its layer
        layer = Atlas.open(root).layer_info(node.split(":")[0])
        cell = cell_box(0, (h, w), (layer["grid_h"], layer["grid_w"]), layer["num_special"])
        want = exemplar_tile(image, decode_png(png), cell)
        assert len(t) == 1 and np.array_equal(t[0], want)
    # the mask shows: the masked half is changed from the image much less, or much more,
    # than the other half (row 0 / column 0 hold the peak cell's outline: skipped)
    change = np.abs(want.astype(int) - image)[8:, 8:].mean(axis=(0, 2))
    assert abs(change[: w // 2 - 8].mean() - change[w // 2:].mean()) > 10
    with_tiles = np.asarray(render_route(route, root, thumbs=3))
    without = np.asarray(render_route(route, None, thumbs=3))
    assert with_tiles.shape == without.shape and (with_tiles != without).any()


def test_route_from_stored_edges_uses_the_stored_weights(straight) -> None:
    root, _ = straight
    edges = pq.read_table(fs.join(root, "edges")).to_pylist()
    cls = next(r["dst_latent"] for r in edges
               if r["dst_layer"] == LOGITS and r["scope"] == f"class={r['dst_latent']}")
    route = routes_from_edges(root, cls, k=2, method="ig")
    assert route.layers == [LOGITS, "layer4", "layer2"] and route.source == f"edges:class={cls}"
    stored = {(node_id(r["src_layer"], r["src_latent"]), node_id(r["dst_layer"], r["dst_latent"])):
              r["weight"] for r in edges if r["method"] == "ig" and r["scope"] == f"class={cls}"}
    assert route.edges and all(stored[(e.src, e.dst)] == e.weight for e in route.edges)
    # the class's k sources are the k largest positive stored latent edges into its logit
    logit = node_id(LOGITS, cls)
    best = sorted((w for (s, d), w in stored.items() if d == logit and not s.endswith(":err")),
                  reverse=True)[:2]
    got = sorted((e.weight for e in route.edges if e.dst == logit and not e.src.endswith(":err")),
                 reverse=True)
    assert got == [b for b in best if b > 0]
    with pytest.raises(ValueError, match="classes with edges"):
        routes_from_edges(root, 99)
    with pytest.raises(ValueError, match="stored methods"):
        routes_from_edges(root, cls, method="lrp")


def test_an_error_node_that_ranks_joins_the_route_as_a_leaf(tmp_path) -> None:
    root = str(tmp_path)
    # (src_layer, src_latent, dst_layer, dst_latent, weight); -1 = error node
    rows = [("layer4", 5, LOGITS, 0, 3.0), ("layer4", 6, LOGITS, 0, 1.0),
            ("layer4", -1, LOGITS, 0, 4.0),  # the error node outranks latent 5: it joins
            ("layer2", 1, "layer4", 5, 0.5), ("layer2", 2, "layer4", 5, 0.7),
            ("layer2", -1, "layer4", 5, -1.0),
            ("layer2", 3, "layer4", -1, 9.0)]  # into the error node: never followed
    table = pa.Table.from_pylist(
        [dict(atlas_id="t", src_layer=a, src_latent=b, dst_layer=c, dst_latent=d, method="ig",
              scope="all", weight=w, n_images=1) for a, b, c, d, w in rows], schema=EDGES)
    fs.write_parquet(table, fs.join(root, "edges", "part-000000.parquet"), EDGES)
    fs.write_json({"config": {"saes": {"layer2": ["s2", "h"], "layer4": ["s4", "h"]}}},
                  fs.join(root, "stages", "icat.json"))
    route = routes_from_edges(root, 0, k=1, scope="all")
    assert [(n.layer, n.latent) for n in route.nodes] == [
        (LOGITS, 0), ("layer4", ERROR), ("layer4", 5), ("layer2", 2)]
    assert [(e.src, e.dst, e.weight) for e in route.edges] == [
        ("layer4:err", "logits:0", 4.0), ("layer4:5", "logits:0", 3.0),
        ("layer2:2", "layer4:5", 0.7)]
    assert route.saes == {"layer4": "s4", "layer2": "s2"}


def test_errors_name_the_bad_value(atlas, extracted, image) -> None:
    with pytest.raises(ValueError, match=r"unknown target class 7: the model has 5 classes"):
        routes(atlas, image, target=7, steps=STEPS)
    with pytest.raises(ValueError, match="unknown target class 'hexagon'"):
        routes(atlas, image, target="hexagon", steps=STEPS)
    with pytest.raises(ValueError, match="needs the image's label"):
        routes(atlas, image, target="true", steps=STEPS)
    with pytest.raises(ValueError, match="method='srd'"):
        routes(atlas, image, method="srd")
    with pytest.raises(ValueError, match="depth=3"):
        routes(atlas, image, depth=3, steps=STEPS)
    with pytest.raises(ValueError, match="no trained SAEs"):
        routes(extracted, image, steps=STEPS)
    with pytest.raises(FileNotFoundError, match="no edges table"):
        routes_from_edges(atlas, 0)


# ---- class names: the atlas's own, not the synthetic data's -------------------------------


@pytest.fixture
def unnamed(atlas, tmp_path_factory, monkeypatch) -> str:
    """A copy of the tiny atlas whose shards have no dataset.json beside them, of a model whose
    config names no class: `AtlasRoot.class_names` is None."""
    import pipeline.models.classes

    monkeypatch.setattr(pipeline.models.classes, "model_class_names", lambda name: None)
    base = tmp_path_factory.mktemp("unnamed")
    root = copy_of(atlas, base / "atlas")
    shards = base / "shards"
    shards.mkdir()
    for path in glob.glob(fs.join(root, "manifest", "stage=extract", "*.json")):
        record = fs.read_json(path)
        record["input"] = shutil.copy(record["input"], shards)
        fs.write_json(record, path)
    return root


def test_a_synthetic_atlas_names_the_class_node_with_its_shapes(
        atlas, straight, image, route) -> None:
    assert AtlasRoot(atlas).class_names().names == list(CLASS_NAMES)
    assert route.class_names == list(CLASS_NAMES)
    t = route.target
    assert node_title(route.nodes[0], route.class_names) == f"logits:{t} ({CLASS_NAMES[t]})"
    assert node_title(route.nodes[1], route.class_names) == route.nodes[1].id  # latents: the id
    root, _ = straight
    cls = next(r["dst_latent"] for r in pq.read_table(fs.join(root, "edges")).to_pylist()
               if r["dst_layer"] == LOGITS)
    assert routes_from_edges(root, cls, k=1, scope="all").class_names == list(CLASS_NAMES)
    # an unknown name: the error names the atlas's classes
    with pytest.raises(ValueError, match="or a name, e.g. " + ", ".join(map(repr, CLASS_NAMES))):
        routes(atlas, image, target="hexagon", k=1, steps=STEPS, depth=1)


def test_an_atlas_without_class_names_labels_the_class_node_class_n(
        unnamed, image, route) -> None:
    assert AtlasRoot(unnamed).class_names() is None
    got = routes(unnamed, image, k=2, steps=STEPS)
    assert got.class_names is None
    # the same route otherwise: the names change no edge
    assert got == dataclasses.replace(route, class_names=None)
    t = got.target
    assert node_title(got.nodes[0], got.class_names) == f"logits:{t} (class {t})"
    assert CLASS_NAMES[t] not in node_title(got.nodes[0], got.class_names)
    # the picture draws that title: it differs from the synthetic route's only by the name
    without = np.asarray(render_route(got, None, thumbs=0))
    named = np.asarray(render_route(route, None, thumbs=0))
    assert without.shape == named.shape and (without != named).any()
    assert (np.asarray(render_route(dataclasses.replace(route, class_names=None), None, thumbs=0))
            == without).all()
    # a class name is a target only where the atlas has names
    with pytest.raises(ValueError, match=r"unknown target class 'triangle'.*no class names"):
        routes(unnamed, image, target="triangle", k=1, steps=STEPS, depth=1)
    assert routes(unnamed, image, target=2, k=1, steps=STEPS, depth=1).target == 2
