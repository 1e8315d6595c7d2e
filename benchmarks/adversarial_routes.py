"""Routes under attack (docs/routes.md, "Routes under attack"; issue 13, item 7).

For each atlas: fresh synthetic images (a generator seed neither the model nor the atlas saw),
those the model classifies correctly attacked with untargeted L-inf PGD in pixel space
(`pipeline.evaluation.adversarial`), and for every flipped image the routes before and after
(`pipeline.atlas.flip_routes`): the share of the new class's route mass through latents that
were inactive on the clean image, per layer, against the chance levels (the share of the
adversarial image's active latents that are new, by count and by activation), the latents the
attack switched on and off, and the same counts for random +-eps noise (the control: how many
latents any change of that size switches on).

    python benchmarks/adversarial_routes.py build work/adv_demo      # the two atlases
    python benchmarks/adversarial_routes.py --atlas work/adv_demo/resnet --atlas work/adv_demo/vit \\
        --n 40 --eps 4/255 --pictures docs/img      # -> benchmarks/results/adversarial_routes.json

`build DIR` writes DIR/resnet.yaml and DIR/vit.yaml, configs/demo.yaml for demo_resnet and
demo_vit (the demo's layers, `jobs.demo.DEFAULT_LAYERS`) up to the scan stage (routes need the
SAEs; cafe, index and icat are left out: cafe ran at ~2 s per exemplar on the shared 2-core VM),
and builds them into DIR/resnet and DIR/vit.
"""
from __future__ import annotations

import argparse
import copy
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

from pipeline.atlas.flip_routes import flip_routes  # noqa: E402
from pipeline.atlas.route_render import render_flip  # noqa: E402
from pipeline.atlas.routes import RouteFinder  # noqa: E402
from pipeline.data.synthetic import render_sample  # noqa: E402
from pipeline.evaluation.adversarial import normalise, pgd_inputs, to_pixels  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def fraction(value: str) -> float:
    """"4/255" or "0.0157" -> float."""
    num, sep, den = value.partition("/")
    return float(num) / float(den) if sep else float(num)


def build(out: Path) -> list[str]:
    """The two demo atlases up to the scan stage (see the module docstring); their roots."""
    from jobs.build import run
    from jobs.demo import DEFAULT_LAYERS

    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    roots = []
    for short, model in (("resnet", "demo_resnet"), ("vit", "demo_vit")):
        cfg = {k: v for k, v in copy.deepcopy(base).items() if k not in ("cafe", "index", "icat")}
        cfg["out"], cfg["model"]["name"] = str(out / short), model
        cfg["extract"]["layers"] = DEFAULT_LAYERS[model]
        for entry, layer in zip(cfg["train_sae"]["sweep"], DEFAULT_LAYERS[model]):
            entry["layer"] = layer
        path = out / f"{short}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run(str(path))
        roots.append(cfg["out"])
    return roots


def run_atlas(root: str, n: int, seed: int, eps: float, steps: int, k: int, ig_steps: int,
              sweep: list[float], pictures: Path | None) -> dict[str, Any]:
    """Attack `n` fresh images on the atlas's model, route every flip; the aggregates and the
    per-image summaries."""
    t0 = time.time()
    finder = RouteFinder(root, "ig", steps=ig_steps)
    loaded = finder.scorer.loaded
    cfg, model = loaded.data_config, loaded.model
    size = cfg["input_size"][1]
    samples = [render_sample(seed, i, size) for i in range(n)]
    x = loaded.preprocess([s[0] for s in samples])
    labels = torch.tensor([s[1]["class"] for s in samples])
    with torch.no_grad():
        clean = model(x).argmax(1)
    keep = torch.nonzero(clean == labels).flatten()
    x, labels = x[keep], labels[keep]
    res = pgd_inputs(model, x, labels, cfg, eps=eps, steps=steps)
    t_attack = time.time() - t0
    # flip rates over eps (the same PGD settings otherwise)
    rates = {f"{e * 255:g}/255": float(pgd_inputs(model, x, labels, cfg, eps=e, steps=steps)
                                       .flipped.float().mean()) for e in sweep}
    # the control: random corners of the same ball
    pixels = to_pixels(x, cfg["mean"], cfg["std"])
    g = torch.Generator().manual_seed(seed)
    noise = (pixels + eps * (2 * torch.randint(0, 2, pixels.shape, generator=g) - 1)).clamp(0, 1)
    noisy = normalise(noise, cfg["mean"], cfg["std"])
    with torch.no_grad():
        noise_flips = float((model(noisy).argmax(1) != labels).float().mean())
    t1 = time.time()
    flips = []
    noise_new: dict[str, list[int]] = {layer: [] for layer in finder.layers}
    for i in range(len(keep)):
        clean_acts, noisy_acts = finder.activations(x[i]), finder.activations(noisy[i])
        for layer in finder.layers:
            noise_new[layer].append(int(((noisy_acts[layer] > 0) & (clean_acts[layer] <= 0)).sum()))
        if not bool(res.flipped[i]):
            continue
        flip = flip_routes(finder, x[i], res.inputs[i], k=k, label=int(labels[i]))
        summary = flip.summary()
        summary["image"] = int(keep[i])
        for layer in finder.layers:  # the whole layer's summed activations, for the gains below
            summary["layers"][layer]["layer_act_clean"] = float(flip.acts_clean[layer].sum())
            summary["layers"][layer]["layer_act_adv"] = float(flip.acts_adv[layer].sum())
        flips.append(summary)
        if pictures is not None and len(flips) == 1:  # the first flipped image, not a chosen one
            shown = [p.permute(1, 2, 0).numpy() for p in (pixels[i], res.pixels[i])]
            out = pictures / f"routes_under_attack_{loaded.name}.png"
            render_flip(flip, *shown, root=root, out=out, eps=eps)
            summary["picture"] = str(out)
    t_routes = time.time() - t1
    per_layer = {}
    for layer in finder.layers:
        rows = [f["layers"][layer] for f in flips]

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in rows])) if rows else float("nan")

        def jaccard(a: str, b: str) -> float:
            return float(np.mean([len(set(r[a]) & set(r[b])) / max(len(set(r[a]) | set(r[b])), 1)
                                  for r in rows])) if rows else float("nan")

        per_layer[layer] = {
            "new_share": mean("new_share"),
            "new_share_median": float(np.median([r["new_share"] for r in rows])) if rows else None,
            "flips_with_new_share": float(np.mean([r["new_share"] > 0 for r in rows])) if rows else None,
            "active_new_frac": mean("active_new_frac"), "act_new_frac": mean("act_new_frac"),
            "new_edge_share": mean("new_edge_share"),
            "route_latents_new": float(np.mean([len(r["route_after_newly_active"]) / max(len(r["route_after"]), 1)
                                                for r in rows])) if rows else None,
            "newly_active": mean("newly_active"), "deactivated": mean("deactivated"),
            "active_clean": mean("active_clean"), "active_adv": mean("active_adv"),
            "newly_active_noise": float(np.mean(noise_new[layer])),
            **gains(rows),
            "jaccard_after_vs_clean_new": jaccard("route_after", "route_clean_new"),
            "jaccard_after_vs_before": jaccard("route_after", "route_before"),
        }
    names = finder.class_names.names if finder.class_names else None
    moves = Counter((f["clean_class"], f["adv_class"]) for f in flips)
    return {
        "atlas": root, "model": loaded.name, "layers": finder.layers, "images": n,
        "correct": len(keep), "flipped": len(flips), "flip_rate": float(res.flipped.float().mean()),
        "flip_rate_noise": noise_flips, "flip_rate_by_eps": rates,
        "max_linf": float((res.pixels - pixels).abs().max()),
        "transitions": {f"{names[a] if names else a}->{names[b] if names else b}": c
                        for (a, b), c in moves.most_common()},
        "per_layer": per_layer, "flips": flips,
        "seconds": {"attack": round(t_attack, 1), "routes": round(t_routes, 1),
                    "per_flip": round(t_routes / max(len(flips), 1), 2)},
    }


def gains(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """How much the attack raised the activations of the new class's route latents, pooled
    over flips (sum on the adversarial images / sum on the clean ones): all of them, those
    already active on the clean image, and the whole layer for comparison."""
    if not rows:
        return {"route_act_gain": None, "route_act_gain_active_before": None, "layer_act_gain": None}
    pairs = [(c, a) for r in rows for c, a in zip(r["route_after_act_clean"], r["route_after_act_adv"])]
    old = [(c, a) for c, a in pairs if c > 0]
    return {"route_act_gain": sum(a for _, a in pairs) / sum(c for c, _ in pairs),
            "route_act_gain_active_before": sum(a for _, a in old) / sum(c for c, _ in old),
            "layer_act_gain": sum(r["layer_act_adv"] for r in rows) / sum(r["layer_act_clean"] for r in rows)}


def table(results: list[dict[str, Any]]) -> str:
    """The markdown table of docs/routes.md."""
    lines = ["| model | layer | flipped | new-class route mass through newly active latents: "
             "mean | flips with any | chance: count | chance: activation | newly active "
             "latents: PGD | noise | route Jaccard after vs clean into the new class | activation "
             "gain of the new route's latents active before | of the layer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for layer, p in r["per_layer"].items():
            lines.append(
                f"| {r['model']} | {layer} | {r['flipped']}/{r['correct']} | "
                f"**{p['new_share']:.3f}** | {p['flips_with_new_share']:.2f} | "
                f"{p['active_new_frac']:.3f} | {p['act_new_frac']:.3f} | {p['newly_active']:.1f} | "
                f"{p['newly_active_noise']:.1f} | {p['jaccard_after_vs_clean_new']:.2f} | "
                f"{p['route_act_gain_active_before']:.2f}x | {p['layer_act_gain']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["build"]:
        if len(sys.argv) != 3:
            sys.exit("usage: adversarial_routes.py build DIR")
        print(build(Path(sys.argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atlas", action="append", required=True, help="a built atlas (repeat)")
    p.add_argument("--n", type=int, default=40, help="fresh images per atlas")
    p.add_argument("--seed", type=int, default=99, help="generator seed of the fresh images")
    p.add_argument("--eps", type=fraction, default=4 / 255, help="PGD radius, pixel units")
    p.add_argument("--steps", type=int, default=20, help="PGD iterations (alpha = eps/4)")
    p.add_argument("--sweep", type=fraction, nargs="*", default=[1 / 255, 2 / 255, 4 / 255, 8 / 255],
                   help="radii for the flip rate alone")
    p.add_argument("-k", type=int, default=3, help="route sources per node")
    p.add_argument("--ig-steps", type=int, default=16, help="ICAT-IG steps of the routes")
    p.add_argument("--out", type=Path, default=RESULTS / "adversarial_routes.json")
    p.add_argument("--pictures", type=Path, default=None,
                   help="folder for one picture per atlas (its first flipped image)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.pictures is not None:
        a.pictures.mkdir(parents=True, exist_ok=True)
    results = [run_atlas(root, a.n, a.seed, a.eps, a.steps, a.k, a.ig_steps, a.sweep, a.pictures)
               for root in a.atlas]
    settings = {"n": a.n, "seed": a.seed, "eps": a.eps, "eps_255": a.eps * 255, "steps": a.steps,
                "alpha": a.eps / 4, "random_start": True, "k": a.k, "method": "ig",
                "ig_steps": a.ig_steps, "attack": "untargeted L-inf PGD on the label, pixel space"}
    write_results(a.out, {"settings": settings, "results": results})
    print(table(results))
    for r in results:
        print(f"{r['model']}: flip rate {r['flip_rate']:.3f} at eps {a.eps * 255:g}/255 "
              f"(noise {r['flip_rate_noise']:.3f}); by eps {r['flip_rate_by_eps']}; "
              f"transitions {r['transitions']}; {r['seconds']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
