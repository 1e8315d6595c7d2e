"""Planted-shortcut validation of concept routes (docs/routes.md, issue 6).

A demo_resnet trained on data where class i mostly has colour SHORTCUT_COLOURS[i]
(`make-data --shortcut-prob`) should route its class logits through colour latents. Three steps:

    # 1. how much the model relies on the colour: accuracy on shortcut-consistent vs -violating
    python benchmarks/shortcut_routes.py reliance --data TEST_SHARDS --weights W [--weights default]
    # 2. a small atlas of the shortcut model on clean data (configs/demo.yaml, other weights)
    python benchmarks/shortcut_routes.py build --atlas DIR --weights W
    # 3. each test image's route into its predicted class: share of route latents whose top
    #    exemplars are >= 50% that class's shortcut colour vs random latents of the layer;
    #    prediction flips when the route latents are deleted vs as many random active latents
    python benchmarks/shortcut_routes.py routes --atlas DIR --data TEST_SHARDS
    # 4. class routes from the stored edges (after `concept-atlas icat DIR --methods ig`)
    python benchmarks/shortcut_routes.py edges --atlas DIR --data TEST_SHARDS
    # the picture of one test image's route
    python benchmarks/shortcut_routes.py picture --atlas DIR --data TEST_SHARDS --index 3 --out r.png

Exemplar colour: the atlas is built on clean data (shortcut_prob 0), so colour and shape are
independent there and a latent whose top exemplars share a colour tracks that colour. The
colour of an exemplar is the ground-truth object covering most of the exemplar's peak grid cell
(`exemplar_picks` of the scan stage, masks from the shards' metadata mapped to the model input
frame), "background" when no object covers it. This needs only the scan stage (no cafe).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# the repository before benchmarks/ (whose pipeline.py would shadow the package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.atlas.api import Atlas  # noqa: E402
from pipeline.atlas.regions import cell_box  # noqa: E402
from pipeline.atlas.route_render import render_route  # noqa: E402
from pipeline.atlas.routes import ERROR, RouteFinder, routes_from_edges  # noqa: E402
from pipeline.cafe.groundtruth import objects  # noqa: E402
from pipeline.data.concepts import CLASS_NAMES, SHORTCUT_COLOURS  # noqa: E402
from pipeline.data.errors import ErrorLog  # noqa: E402
from pipeline.data.shards import expand_shards, iter_samples  # noqa: E402
from pipeline.icat.segment import LOGITS  # noqa: E402
from pipeline.models import load_model, tap  # noqa: E402
from pipeline.models.demo import WEIGHTS_DIR  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHIPPED = WEIGHTS_DIR / "demo_resnet_shortcut.safetensors"
DOMINANT = 0.5  # a latent is "colour c" when >= this share of its top exemplars are c


# ---- 1. reliance -------------------------------------------------------------------------


def _test_set(data: str) -> list[dict[str, Any]]:
    """Test samples with their class, the class object's colour and whether it is the shortcut."""
    out = []
    for s in iter_samples(expand_shards(data), ErrorLog()):
        objs = s.meta["objects"]
        colour = objs[int(np.argmax([o["area"] for o in objs]))]["colour"]
        out.append({"image": s.image, "label": int(s.cls), "colour": colour, "meta": s.meta,
                    "consistent": colour == SHORTCUT_COLOURS[int(s.cls)]})
    return out


def reliance(data: str, weights: list[str]) -> dict[str, Any]:
    """Accuracy of each model on shortcut-consistent and -violating test images, and how often a
    violating image whose colour is another class's shortcut colour is predicted as that class."""
    samples = _test_set(data)
    out = {}
    for w in weights:
        loaded = load_model("demo_resnet", w)
        with torch.no_grad():
            pred = np.concatenate([loaded.model(loaded.preprocess([s["image"] for s in samples[i:i + 100]]))
                                   .argmax(1).numpy() for i in range(0, len(samples), 100)])
        label = np.array([s["label"] for s in samples])
        cons = np.array([s["consistent"] for s in samples])
        other = np.array([SHORTCUT_COLOURS.index(s["colour"]) if s["colour"] in SHORTCUT_COLOURS
                          and not s["consistent"] else -1 for s in samples])
        lured = other >= 0
        out[w] = {
            "n": len(samples), "accuracy": float((pred == label).mean()),
            "n_consistent": int(cons.sum()), "accuracy_consistent": float((pred == label)[cons].mean()),
            "n_violating": int((~cons).sum()), "accuracy_violating": float((pred == label)[~cons].mean()),
            "n_other_shortcut_colour": int(lured.sum()),
            "predicted_as_colours_class": float((pred[lured] == other[lured]).mean()),
            "accuracy_other_shortcut_colour": float((pred == label)[lured].mean()),
        }
    return {"data": data, "models": out}


# ---- 2. the atlas ------------------------------------------------------------------------


def build(atlas: str, weights: str) -> str:
    """Write ATLAS.yaml (configs/demo.yaml with the shortcut weights, scan, no icat) and build it."""
    from jobs.build import run

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    cfg["atlas_id"], cfg["out"] = "shortcut", atlas
    cfg["model"]["weights"] = str(Path(weights).resolve())
    cfg.pop("icat", None)
    path = Path(atlas).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run(str(path))
    return str(path)


# ---- 3. routes ---------------------------------------------------------------------------


def latent_colours(atlas: Atlas, data_config: dict[str, Any], source: str = "peak"
                   ) -> dict[str, dict[int, Counter]]:
    """{layer: {latent: Counter of its top exemplars' colours}}. source "peak": the object
    covering most of the exemplar's peak cell (scan picks only); "ierf": the object the
    exemplar's iERF mask hits most (`exemplars.gt_colour`, cafe stage)."""
    if source == "ierf":
        out: dict[str, dict[int, Counter]] = {}
        for r in atlas.sql("SELECT layer, latent, coalesce(gt_colour, 'background') AS colour "
                           "FROM exemplars WHERE kind = 'top'").to_pylist():
            out.setdefault(r["layer"], {}).setdefault(r["latent"], Counter())[r["colour"]] += 1
        return out
    picks = atlas.sql("SELECT p.layer, p.latent, p.position, p.image_id, i.shard, i.key "
                      "FROM exemplar_picks p JOIN images i USING (image_id) "
                      "WHERE p.kind = 'top'").to_pylist()
    layers = {r["layer"]: r for r in atlas.sql("SELECT * FROM layers").to_pylist()}
    wanted: dict[str, set[str]] = {}
    for r in picks:
        wanted.setdefault(r["shard"], set()).add(r["key"])
    gt = {}
    for shard, keys in tqdm(wanted.items(), desc="ground truth", unit="shard"):
        for s in iter_samples([shard], ErrorLog(), decode_image=False):
            if s.key in keys:
                gt[(shard, s.key)] = objects(s.meta, data_config)
    _, h, w = data_config["input_size"]
    out = {}
    for r in picks:
        info = layers[r["layer"]]
        x0, y0, x1, y1 = cell_box(r["position"], (h, w), (info["grid_h"], info["grid_w"]),
                                  info["num_special"])
        cover = [o.mask[y0:y1, x0:x1].mean() for o in gt[(r["shard"], r["key"])]]
        colour = "background" if not cover or max(cover) == 0 else \
            gt[(r["shard"], r["key"])][int(np.argmax(cover))].colour
        out.setdefault(r["layer"], {}).setdefault(r["latent"], Counter())[colour] += 1
    return out


def dominated(colours: Counter, colour: str) -> bool:
    n = sum(colours.values())
    return n > 0 and colours[colour] / n >= DOMINANT


def logits_from(finder: RouteFinder, layer: str, pfvs: torch.Tensor) -> torch.Tensor:
    """The logits from `layer`'s PFVs, through the finder's isolated segments."""
    chain = finder.layers[finder.layers.index(layer):] + [LOGITS]
    h = pfvs
    for a, b in zip(chain, chain[1:]):
        h = finder.scorer.segments[(a, b)](h)
    return h


@torch.no_grad()
def deletion(finder: RouteFinder, pfvs: torch.Tensor, layer: str, latents: list[int],
             gen: np.random.Generator, draws: int) -> tuple[tuple[bool, float], list[tuple[bool, float]]]:
    """(prediction changed, drop of the predicted class's logit) when `latents` are zeroed in
    the SAE reconstruction of `layer` (PFVs Tensor[1, P, C]; error term kept), and the same for
    `draws` random sets of as many latents active on the image (route latents excluded)."""
    up = finder.scorer.saes[layer]
    acts = up.encode(pfvs)
    err = pfvs[:, up.positions] - up.sae.decode(acts).to(pfvs.dtype)
    logits = logits_from(finder, layer, pfvs)[0]
    base = int(logits.argmax())

    def delete(zero: list[int]) -> tuple[bool, float]:
        a = acts.clone()
        a[..., zero] = 0
        full = pfvs.clone()
        full[:, up.positions] = up.sae.decode(a).to(pfvs.dtype) + err
        out = logits_from(finder, layer, full)[0]
        return int(out.argmax()) != base, float(logits[base] - out[base])

    active = [f for f in torch.nonzero(acts[0].amax(0) > 0)[:, 0].tolist() if f not in latents]
    rand = [delete(list(gen.choice(active, size=min(len(latents), len(active)), replace=False)))
            for _ in range(draws)] if active else []
    return delete(latents), rand


def route_study(atlas_root: str, data: str, per_class: int, k: int, steps: int, draws: int,
                seed: int, colour_source: str = "peak") -> dict[str, Any]:
    finder = RouteFinder(atlas_root, "ig", steps)
    atlas = Atlas.open(atlas_root)
    colours = latent_colours(atlas, finder.scorer.loaded.data_config, colour_source)
    samples = _test_set(data)
    gen = np.random.default_rng(seed)
    layers = finder.layers
    rows = []
    chosen = [s for c in range(len(CLASS_NAMES)) for kind in (True, False)
              for s in [t for t in samples if t["label"] == c and t["consistent"] == kind][:per_class]]
    for s in tqdm(chosen, desc="routes", unit="img"):
        # the model's own route: into the predicted class, checked against that class's colour
        route = finder(s["image"], target=None, k=k, label=s["label"], hints=False)
        taps = tap(finder.scorer.loaded.model, finder.pixels(s["image"]), layers)
        colour = SHORTCUT_COLOURS[route.target]
        row = {"label": s["label"], "consistent": s["consistent"], "target": route.target,
               "image_colour": s["colour"], "layers": {}}
        for layer in layers:
            lat = route.latents(layer)
            acts = finder.scorer.saes[layer].encode(taps[layer].values)[0].amax(0)
            active = torch.nonzero(acts > 0)[:, 0].tolist()
            known = colours.get(layer, {})
            (flip, drop), rand = deletion(finder, taps[layer].values, layer, lat, gen, draws)
            row["layers"][layer] = {
                "route_latents": lat,
                "error_node": any(n.latent == ERROR for n in route.level(layer)),
                "route_shortcut": [dominated(known.get(f, Counter()), colour) for f in lat],
                "active_shortcut_frac": float(np.mean([dominated(known.get(f, Counter()), colour)
                                                       for f in active])) if active else None,
                "deletion_flip": flip, "logit_drop": drop,
                "random_flips": [r[0] for r in rand], "random_logit_drops": [r[1] for r in rand]}
        rows.append(row)
    return {"rows": rows, "summary": summarise(rows, colours, layers)}


def edge_study(atlas_root: str, data: str, per_class: int, k: int, draws: int, seed: int
               ) -> dict[str, Any]:
    """Class routes from the stored edges (icat stage), scopes class=C and all: the share of
    their latents dominated by the class's shortcut colour vs the layer, and the flip rate when
    a class route's latents are deleted on test images predicted as that class vs as many
    random active latents."""
    finder = RouteFinder(atlas_root, "ig", 1)
    colours = latent_colours(Atlas.open(atlas_root), finder.scorer.loaded.data_config)
    samples = _test_set(data)
    gen = np.random.default_rng(seed)
    model = finder.scorer.loaded.model
    with torch.no_grad():
        preds = [int(model(finder.pixels(s["image"])).argmax()) for s in samples]
    out: dict[str, Any] = {}
    for scope in ("class", "all"):
        for c in range(len(CLASS_NAMES)):
            route = routes_from_edges(atlas_root, c, k=k, scope=scope)
            colour = SHORTCUT_COLOURS[c]
            chosen = [s for s, p in zip(samples, preds) if p == c][:per_class]
            res = {}
            for layer in finder.layers:
                lat = route.latents(layer)
                known = colours.get(layer, {})
                flips, rand = [], []
                for s in chosen:
                    pfvs = tap(model, finder.pixels(s["image"]), [layer])[layer].values
                    (flip, _), r = deletion(finder, pfvs, layer, lat, gen, draws)
                    flips.append(flip)
                    rand += [f for f, _ in r]
                res[layer] = {
                    "route_latents": lat,
                    "route_colours": [known.get(f, Counter()).most_common(1)[0][0]
                                      if known.get(f) else "-" for f in lat],
                    "route_shortcut_frac": _mean(dominated(known.get(f, Counter()), colour) for f in lat),
                    "layer_shortcut_frac": _mean(dominated(v, colour) for v in known.values()),
                    "error_node_in_route": any(n.latent == ERROR for n in route.level(layer)),
                    "images": len(chosen), "deletion_flip_rate": _mean(flips),
                    "random_flip_rate": _mean(rand)}
            out[f"{scope}:{c}"] = res
    return {"classes": out}


def summarise(rows: list[dict[str, Any]], colours: dict[str, dict[int, Counter]],
              layers: list[str]) -> dict[str, Any]:
    """Per layer and subset (all / shortcut-consistent / -violating images / each route target
    class): the share of route latents dominated by the target class's shortcut colour vs all
    latents of the layer with exemplars and vs the latents active on the same images; the
    prediction flip rate and the mean drop of the predicted logit when the route latents are
    deleted vs as many random active latents."""
    out: dict[str, Any] = {}
    for layer in layers:
        known = colours.get(layer, {})
        per_class_random = {c: float(np.mean([dominated(v, SHORTCUT_COLOURS[c]) for v in known.values()]))
                            for c in range(len(CLASS_NAMES))} if known else {}
        out[layer] = {"latents_with_exemplars": len(known),
                      "layer_shortcut_frac_per_class": per_class_random}
        subsets = [("all", lambda r: True), ("consistent", lambda r: r["consistent"]),
                   ("violating", lambda r: not r["consistent"])]
        subsets += [(f"target={c}", lambda r, c=c: r["target"] == c) for c in range(len(CLASS_NAMES))]
        for name, keep in subsets:
            sel = [r for r in rows if keep(r)]
            route_flags = [f for r in sel for f in r["layers"][layer]["route_shortcut"]]
            active = [r["layers"][layer]["active_shortcut_frac"] for r in sel
                      if r["layers"][layer]["active_shortcut_frac"] is not None]
            out[layer][name] = {
                "images": len(sel),
                "route_latents": len(route_flags),
                "route_shortcut_frac": float(np.mean(route_flags)) if route_flags else None,
                "layer_shortcut_frac": _mean(per_class_random[r["target"]] for r in sel)
                if per_class_random else None,
                "active_shortcut_frac": float(np.mean(active)) if active else None,
                "deletion_flip_rate": _mean(r["layers"][layer]["deletion_flip"] for r in sel),
                "random_flip_rate": _mean(f for r in sel for f in r["layers"][layer]["random_flips"]),
                "logit_drop": _mean(r["layers"][layer]["logit_drop"] for r in sel),
                "random_logit_drop": _mean(d for r in sel for d in r["layers"][layer]["random_logit_drops"]),
                "error_node_in_route": _mean(r["layers"][layer]["error_node"] for r in sel),
            }
            if name.startswith("target="):
                out[layer][name]["frequent_latents"] = _frequent(sel, layer, known)
    return out


def _frequent(rows: list[dict[str, Any]], layer: str, known: dict[int, Counter], n: int = 5
              ) -> list[dict[str, Any]]:
    """The `n` latents most often on these routes, with their exemplars' commonest colour."""
    counts = Counter(f for r in rows for f in r["layers"][layer]["route_latents"])
    out = []
    for f, c in counts.most_common(n):
        colours = known.get(f, Counter())
        top = colours.most_common(1)[0] if colours else ("-", 0)
        out.append({"latent": f, "routes": c, "colour": top[0],
                    "colour_frac": top[1] / max(1, sum(colours.values()))})
    return out


def _mean(values) -> float | None:
    v = list(values)
    return float(np.mean(v)) if v else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reliance", help="accuracy on shortcut-consistent vs -violating images")
    r.add_argument("--data", required=True, help="test shards (make-data --shortcut-prob 0.5)")
    r.add_argument("--weights", action="append", default=None,
                   help=f"demo_resnet weights (repeatable; default: {SHIPPED} and 'default')")
    b = sub.add_parser("build", help="build the shortcut model's atlas on clean data")
    b.add_argument("--atlas", required=True)
    b.add_argument("--weights", default=str(SHIPPED))
    s = sub.add_parser("routes", help="route latents' colours and deletion, per class")
    s.add_argument("--atlas", required=True)
    s.add_argument("--data", required=True)
    s.add_argument("--per-class", type=int, default=6, help="consistent and violating images each")
    s.add_argument("--k", type=int, default=3)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--draws", type=int, default=5, help="random deletion sets per image and layer")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default="shortcut_routes.json", help="file name under benchmarks/results")
    s.add_argument("--colour-source", choices=("peak", "ierf"), default="peak",
                   help="exemplar colour: object under the peak cell, or under the iERF mask (cafe)")
    e = sub.add_parser("edges", help="class routes from the stored edges (run `concept-atlas icat` first)")
    e.add_argument("--atlas", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--per-class", type=int, default=20, help="test images predicted as the class")
    e.add_argument("--k", type=int, default=3)
    e.add_argument("--draws", type=int, default=5)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("picture", help="render the route of one test image")
    g.add_argument("--atlas", required=True)
    g.add_argument("--data", required=True)
    g.add_argument("--index", type=int, default=0, help="test image index")
    g.add_argument("--k", type=int, default=3)
    g.add_argument("--out", required=True, help="PNG path")
    g.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(getattr(args, "threads", 1))
    RESULTS.mkdir(exist_ok=True)
    t0 = time.time()
    if args.cmd == "reliance":
        res = reliance(args.data, args.weights or [str(SHIPPED), "default"])
        name = "shortcut_routes_reliance.json"
    elif args.cmd == "build":
        print("config:", build(args.atlas, args.weights))
        return
    elif args.cmd == "picture":
        sample = _test_set(args.data)[args.index]
        route = RouteFinder(args.atlas, "ig", 16)(sample["image"], k=args.k, label=sample["label"])
        render_route(route, args.atlas, args.out)
        print(f"{sample['colour']} {CLASS_NAMES[sample['label']]}: route into "
              f"{CLASS_NAMES[route.target]} -> {args.out}")
        return
    elif args.cmd == "edges":
        res = edge_study(args.atlas, args.data, args.per_class, args.k, args.draws, args.seed)
        res["args"] = {k: v for k, v in vars(args).items() if k != "cmd"}
        name = "shortcut_routes_edges.json"
    else:
        res = route_study(args.atlas, args.data, args.per_class, args.k, args.steps, args.draws,
                          args.seed, args.colour_source)
        res["args"] = {k: v for k, v in vars(args).items() if k != "cmd"}
        name = args.out
    res["seconds"] = round(time.time() - t0, 1)
    write_results(RESULTS / name, res, indent=1)
    print(json.dumps(res.get("summary", res), indent=1))


if __name__ == "__main__":
    main()
