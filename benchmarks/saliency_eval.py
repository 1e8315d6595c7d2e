"""Saliency faithfulness / robustness benchmark: SRD against the field's baselines, each from its
library (Captum; grad-cam's eight CAMs; zennit's LRP; lxt's AttnLRP: pipeline/evaluation/methods.py).

    python benchmarks/saliency_eval.py                       # the default sizes (~15 min, 2-core CPU)
    python benchmarks/saliency_eval.py --synthetic 256 --manip 16 --steps 32 --ig-steps 32
    python benchmarks/saliency_eval.py --skip-real --out saliency_eval_synthetic.json
    python benchmarks/saliency_eval.py --models --real-photos 5 --manip-real 0   # 5 photos, no attack
    python benchmarks/saliency_eval.py --only manipulation --models demo_resnet   # re-measure the attack
                                   # only; its entries replace those of the --out file's runs

Sets (docs/method.md §8): synthetic scenes (not the demo models' training seed) with the mask
of the class object, explained by demo_resnet (and demo_vit when its weights exist), class =
the true label; scikit-image / scikit-learn photos explained by EfficientNet-Lite0 (ImageNet),
class = the predicted one, no masks. Metrics per method, means over images (NaN-free ones):
insertion / deletion AUC of the class *probability* (insertion from a blurred copy, deletion to
the image's mean colour, as RISE), pointing game and positive relevance mass in the mask
(synthetic only), Gini sparseness, stability (correlation and SSIM of the maps of x and
x + N(0, sigma) pixels), targeted manipulation (Dombrowski et al.: white-box on a softplus copy
for every method with a differentiable form here, SRD included, and the x' of the Saliency
attack carried over to every method), seconds per image of one map. All numbers of one run come
from one machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import write_results  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipeline.evaluation import (METHODS, SOURCES, Attack, Unsupported, batched,  # noqa: E402
                                 differentiable, make_method, manipulate, metrics, smooth_copy)
from pipeline.evaluation.data import real_photos, synthetic_set  # noqa: E402
from pipeline.models import demo, load_model  # noqa: E402
from pipeline.models import model_fingerprint  # noqa: E402

SYNTHETIC_SEED = 2026  # the demo models were trained on seed 1: these scenes are unseen
ATTACKABLE = ("Saliency", "InputXGradient", "SmoothGrad", "IntegratedGradients", "GradCAM", "LayerCAM",
              "SRD", "SRD-contrastive")
# white-box attacks of IG and SmoothGrad cost 8 and 4 double backward passes a step: on
# EfficientNet-Lite0 at 224 px they do not fit the default budget of a 2-core CPU
REAL_ATTACKED = ("Saliency", "InputXGradient", "GradCAM", "LayerCAM", "SRD", "SRD-contrastive")
TRANSFER_FROM = "Saliency"
SRD_METHODS = ("SRD", "SRD-contrastive")
ORIGINAL_MODEL_KEY = "white_box_original_model"  # SRD attacked on the model itself, not the smooth copy


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the methods come from (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "timm", "captum", "grad-cam", "zennit", "lxt"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _mean(t: torch.Tensor) -> float | None:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else None


def evaluate(lm, x: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None,
             args: argparse.Namespace, desc: str) -> dict[str, dict]:
    """Every metric but manipulation, per method: {method: {metric: mean, ...}}."""
    input_range = 1.0 / float(torch.tensor(lm.data_config["std"]).mean())
    sigma = args.noise / torch.tensor(lm.data_config["std"])  # pixel sigma in normalised units
    ins_base = metrics.BASELINES[args.insertion_baseline](x)
    del_base = metrics.BASELINES[args.deletion_baseline](x)
    out = {}
    for name in tqdm(args.methods, desc=desc, unit="method"):
        try:
            explain = batched(make_method(name, lm.model, ig_steps=args.ig_steps, sg_samples=args.sg_samples,
                                          sg_stdev=0.15 * input_range), args.batch)
            t0 = time.perf_counter()
            maps = explain(x, target)
            seconds = (time.perf_counter() - t0) / len(x)
        except Unsupported as e:
            out[name] = {"status": f"unsupported: {e}"}
            continue
        order = metrics.pixel_order(maps, seed=args.seed)
        row = {"status": "ok", "seconds_per_image": seconds}
        for mode, base in (("insertion", ins_base), ("deletion", del_base)):
            curve = metrics.insertion_deletion_curve(lm.model, x, order, target, base, mode, args.steps)
            row[f"{mode}_auc"] = _mean(metrics.auc(curve))
        if masks is not None:
            row["pointing"] = _mean(metrics.pointing_game(maps, masks))
            row["mass_in_mask"] = _mean(metrics.mask_mass(maps, masks))
        row["gini"] = _mean(metrics.gini(maps))
        corr, ssim = metrics.stability(explain, x, target, sigma, draws=args.noise_draws, seed=args.seed,
                                       clean=maps)
        row["stability_corr"], row["stability_ssim"] = _mean(corr), _mean(ssim)
        out[name] = row
    return out


def _partners(target: torch.Tensor) -> torch.Tensor:
    """For each image the next one (cyclically) with another class, else simply the next one."""
    n = len(target)
    idx = []
    for i in range(n):
        js = [(i + k) % n for k in range(1, n)]
        idx.append(next((j for j in js if target[j] != target[i]), js[0] if js else i))
    return torch.tensor(idx)


def manipulation(lm, x: torch.Tensor, target: torch.Tensor, args: argparse.Namespace, attacked: list[str],
                 steps: int, desc: str, methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Targeted manipulation per method of `methods`: white-box where differentiable here, and the
    transfer of the Saliency attack's x' to every method (when Saliency is one of `methods`).
    Correlation / MSE of unit maps to the target map before (x) and after (x'), the real model's
    drift of the class probability, top-1 kept."""
    std, mean = torch.tensor(lm.data_config["std"]), torch.tensor(lm.data_config["mean"])
    attack = Attack(lo=-mean / std, hi=(1 - mean) / std, pixel_scale=1 / std, steps=steps,
                    lr=args.attack_lr, gamma=args.attack_gamma, eps=args.attack_eps)
    smooth = smooth_copy(lm.model, args.beta)
    input_range = 1.0 / float(std.mean())
    partner = _partners(target)
    with torch.no_grad():
        p0 = lm.model(x).softmax(1)
    explainers: dict = {}
    for name in methods:
        try:
            explainers[name] = make_method(name, lm.model, ig_steps=args.ig_steps, sg_samples=args.sg_samples,
                                           sg_stdev=0.15 * input_range)
        except Unsupported as e:
            explainers[name] = e

    def judge(explain, x_adv: torch.Tensor, goal: torch.Tensor, before: torch.Tensor) -> dict:
        after = explain(x_adv, target)
        with torch.no_grad():
            p = lm.model(x_adv).softmax(1)
        ub, ua, ug = metrics.unit_maps(before), metrics.unit_maps(after), metrics.unit_maps(goal)
        return {"corr_before": _mean(metrics.pearson(before, goal)),
                "corr_after": _mean(metrics.pearson(after, goal)),
                "mse_before": float(((ub - ug) ** 2).flatten(1).sum(1).mean()),
                "mse_after": float(((ua - ug) ** 2).flatten(1).sum(1).mean()),
                "prob_drift": float((p - p0).gather(1, target[:, None]).abs().mean()),
                "top1_kept": float((p.argmax(1) == p0.argmax(1)).float().mean()),
                "linf_pixels": float(((x_adv - x).abs() * std.reshape(1, -1, 1, 1)).amax().item())}

    out: dict[str, dict] = {}
    adv: dict[str, torch.Tensor] = {}
    for name in tqdm(methods, desc=desc, unit="method"):
        explain = explainers[name]
        try:
            if isinstance(explain, Unsupported):
                raise explain
            before = explain(x, target)
            goal = explain(x[partner], target[partner])
        except Unsupported as e:
            out[name] = {"status": f"unsupported: {e}"}
            continue
        row: dict = {"status": "ok"}
        if name in attacked or name == TRANSFER_FROM:
            t0 = time.perf_counter()
            # SRD's map of the unmodified model is differentiable too (see manipulation.py)
            original = name in SRD_METHODS and args.srd_attacked_model == "original"
            victim = lm.model if original else smooth
            fn = differentiable(name, victim, ig_steps=args.attack_ig_steps, sg_samples=args.attack_sg_samples,
                                sg_stdev=0.15 * input_range)
            adv[name] = manipulate(victim, fn, x, target, goal, attack)
            key = ORIGINAL_MODEL_KEY if original else "white_box"
            row[key] = judge(explain, adv[name], goal, before)
            row[key]["seconds_per_image"] = (time.perf_counter() - t0) / len(x)
        else:  # no twice-differentiable implementation (modified backward rules), or not asked for
            row["white_box"] = None if name not in ATTACKABLE else "not run (--attack-methods)"
        row["_goal"], row["_before"] = goal, before
        out[name] = row
    for name, row in out.items():
        if row["status"] == "ok":
            goal, before = row.pop("_goal"), row.pop("_before")
            if TRANSFER_FROM in adv:
                row["transfer"] = judge(explainers[name], adv[TRANSFER_FROM], goal, before)
    return out


def run_model(model_name: str, x_imgs, target, masks, args, tag: str) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    lm = load_model(model_name, "default")
    x = lm.preprocess(x_imgs)
    with torch.no_grad():
        pred = lm.model(x).argmax(1)
    target = pred if target is None else torch.as_tensor(target)
    res = {"model": model_name, "weights": lm.weights,
           "weights_fingerprint": model_fingerprint(lm.model), "images": len(x),
           "accuracy": float((pred == target).float().mean()) if masks is not None else None}
    if args.only == "all":
        res["methods"] = evaluate(lm, x, target, None if masks is None else torch.as_tensor(masks), args,
                                  f"{tag} metrics")
    synthetic = masks is not None
    k = min(args.manip if synthetic else args.manip_real, len(x))
    if k > 0:
        attacked = args.attack_methods if synthetic else args.real_attack_methods
        steps = args.attack_steps if synthetic else args.real_attack_steps
        res["manipulation_images"], res["attack_steps"] = k, steps
        # --only manipulation: just the attacked methods (merged into the result file per method)
        methods = tuple(args.methods) if args.only == "all" else tuple(m for m in args.methods if m in attacked)
        res["manipulation"] = manipulation(lm, x[:k], target[:k], args, attacked, steps, f"{tag} manipulation",
                                           methods)
    res["wall_seconds"], res["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    return res


def merge_manipulation(old: dict, runs: list[dict], rerun: dict) -> dict:
    """The result `old` with the manipulation entries of `runs` (per method: white-box, and the
    transfer where it was re-measured) in place of those of its runs of the same model and set;
    `rerun` says how they were made. Every other number stays."""
    for run in runs:
        match = [r for r in old["runs"] if (r["model"], r["set"]) == (run["model"], run["set"])]
        if not match:
            have = ", ".join(f"{r['model']} ({r['set']})" for r in old["runs"])
            raise ValueError(f"no run of {run['model']} on {run['set']!r} to merge into; the file has: {have}")
        # the file's runs from before fingerprints were recorded cannot be checked
        prints = (match[0].get("weights_fingerprint"), run["weights_fingerprint"])
        if prints[0] not in (None, prints[1]):
            raise ValueError(f"{run['model']}: the file's numbers are for other weights (fingerprint "
                             f"{prints[0]}, these {prints[1]}); re-run the whole evaluation instead")
        sizes = {k: (match[0].get(k), run[k]) for k in ("manipulation_images", "attack_steps")}
        if any(a not in (None, b) for a, b in sizes.values()):
            raise ValueError(f"{run['model']}: cannot merge into a manipulation of other sizes (file, run): {sizes}")
        rows = match[0].setdefault("manipulation", {})
        for name, row in run["manipulation"].items():
            rows[name] = rows.get(name, {}) | row
        match[0].update({k: run[k] for k in ("manipulation_images", "attack_steps")})
        match[0].setdefault("manipulation_rerun", []).append(
            rerun | {"methods": sorted(run["manipulation"]), "wall_seconds": run["wall_seconds"],
                     "cpu_seconds": run["cpu_seconds"]})
    return old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=32, help="synthetic images (demo models)")
    p.add_argument("--manip", type=int, default=4, help="synthetic images attacked (first of the set)")
    p.add_argument("--manip-real", type=int, default=2, help="real photos attacked")
    p.add_argument("--skip-real", action="store_true", help="no EfficientNet-Lite0 / real photos")
    p.add_argument("--real-photos", type=int, default=None, metavar="N",
                   help="only the first N bundled photos (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="the methods evaluated (default: all, in this order)")
    p.add_argument("--models", nargs="*", default=["demo_resnet", "demo_vit"], choices=demo.DEMO_MODELS,
                   help="demo models run on the synthetic set (each only if its weights exist; none: photos only)")
    p.add_argument("--only", default="all", choices=("all", "manipulation"),
                   help="manipulation: attack only the --attack-methods / --real-attack-methods (the transfer "
                        "only if Saliency is one) and replace their manipulation entries in the matching runs of "
                        "the existing --out file, keeping every other number")
    p.add_argument("--steps", type=int, default=16, help="insertion/deletion points - 1")
    p.add_argument("--insertion-baseline", default="blur", choices=sorted(metrics.BASELINES),
                   help="what insertion starts from (RISE: a blurred copy)")
    p.add_argument("--deletion-baseline", default="mean", choices=sorted(metrics.BASELINES),
                   help="what deleted pixels become (RISE: a constant; here the image's mean colour)")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--sg-samples", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.02, help="stability noise sigma, [0, 1] pixel units")
    p.add_argument("--noise-draws", type=int, default=1)
    p.add_argument("--attack-steps", type=int, default=60, help="Adam steps on the synthetic set")
    p.add_argument("--real-attack-steps", type=int, default=30, help="Adam steps on the real photos")
    p.add_argument("--attack-methods", nargs="+", default=list(ATTACKABLE), choices=ATTACKABLE,
                   help="white-box attacked methods, synthetic set (Saliency always: its x' is the transfer)")
    p.add_argument("--real-attack-methods", nargs="+", default=list(REAL_ATTACKED), choices=ATTACKABLE,
                   help="white-box attacked methods, real photos")
    p.add_argument("--attack-lr", type=float, default=0.01)
    p.add_argument("--attack-gamma", type=float, default=10.0)
    p.add_argument("--attack-eps", type=float, default=8 / 255, help="L-inf radius, [0, 1] pixel units")
    p.add_argument("--attack-ig-steps", type=int, default=8)
    p.add_argument("--attack-sg-samples", type=int, default=4)
    p.add_argument("--beta", type=float, default=10.0, help="softplus beta of the attack's smooth copy")
    p.add_argument("--srd-attacked-model", default="smooth", choices=("smooth", "original"),
                   help="run SRD's white-box attack on the smooth copy (as every method) or on the original "
                        f"model (reported as {ORIGINAL_MODEL_KEY})")
    p.add_argument("--batch", type=int, default=8, help="images per explainer call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "saliency_eval.json")
    p.add_argument("--markdown", type=Path, metavar="JSON",
                   help="print the tables of a result file as markdown and exit")
    args = p.parse_args()
    if args.markdown:
        return print(markdown(json.loads(args.markdown.read_text())))
    if 1 in (args.manip, args.manip_real):
        p.error("--manip / --manip-real need 0 or at least 2 images (each is attacked toward another's map)")
    if args.only == "manipulation" and not args.out.is_file():
        p.error(f"--only manipulation merges into an existing result file; {args.out} does not exist")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start, c_start = time.perf_counter(), time.process_time()
    runs, notes = [], []
    imgs, labels, masks = synthetic_set(args.synthetic, SYNTHETIC_SEED)
    for name in args.models:
        if not demo.weights_path(name).is_file():
            notes.append(f"skipped {name}: no weights at {demo.weights_path(name)}")
            print(notes[-1])
            continue
        runs.append({"set": "synthetic", **run_model(name, imgs, labels, masks, args, name)})
        print_run(runs[-1])
    if not args.skip_real:
        photos, photo_notes = real_photos()
        photos = photos[:args.real_photos]
        notes += photo_notes
        for n in photo_notes:
            print(n)
        run = run_model("efficientnet_lite0", [im for _, im in photos], None, None, args, "efficientnet_lite0")
        runs.append({"set": "real photos: " + ", ".join(n for n, _ in photos), **run})
        print_run(runs[-1])
    command = " ".join(["saliency_eval.py"] + sys.argv[1:])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {args.threads}"
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    if args.only == "manipulation":
        rerun = {"command": command, "settings": vars(args) | {"out": str(args.out)}, "machine": machine,
                 "torch": torch.__version__, "notes": notes}
        result = merge_manipulation(json.loads(args.out.read_text()), runs, rerun)
    else:
        result = {"command": command, "settings": vars(args) | {"out": str(args.out)}, "machine": machine,
                  "torch": torch.__version__, "score": "softmax probability of the target class",
                  "synthetic_seed": SYNTHETIC_SEED, "libraries": library_versions(),
                  "wall_seconds": wall, "cpu_seconds": cpu,
                  "notes": notes, "runs": runs}
    write_results(args.out, result)
    print(f"wrote {args.out} ({wall:.0f} s wall, {cpu:.0f} s CPU)")


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else str(v)


def print_run(run: dict) -> None:
    print(f"\n{run['model']} on {run['set']} ({run['images']} images; {run['wall_seconds']:.0f} s wall, "
          f"{run['cpu_seconds']:.0f} s CPU)")
    cols = ("insertion_auc", "deletion_auc", "pointing", "mass_in_mask", "gini", "stability_corr",
            "stability_ssim", "seconds_per_image")
    print(f"{'method':20s} " + " ".join(f"{c[:12]:>12s}" for c in cols))
    for name, row in run.get("methods", {}).items():
        if row["status"] != "ok":
            print(f"{name:20s} {row['status'][:100]}")
            continue
        print(f"{name:20s} " + " ".join(f"{_fmt(row.get(c)):>12s}" for c in cols))
    if "manipulation" in run:
        print(f"manipulation ({run['manipulation_images']} images): corr to target map before -> after")
        for name, row in run["manipulation"].items():
            if row["status"] != "ok":
                print(f"{name:20s} {row['status'][:100]}")
                continue
            wb, tr = row.get("white_box", "not run"), row.get("transfer")
            wb_txt = (f"white-box {_fmt(wb['corr_before'])} -> {_fmt(wb['corr_after'])} "
                      f"(p drift {_fmt(wb['prob_drift'])})" if isinstance(wb, dict) else f"white-box {wb or 'n/a'}")
            tr_txt = f"transfer {_fmt(tr['corr_before'])} -> {_fmt(tr['corr_after'])}" if tr else "transfer not run"
            print(f"{name:20s} {wb_txt} | {tr_txt}")
            if ORIGINAL_MODEL_KEY in row:
                orig = row[ORIGINAL_MODEL_KEY]
                print(f"{name:20s} white-box on the original model {_fmt(orig['corr_before'])} -> "
                      f"{_fmt(orig['corr_after'])} (p drift {_fmt(orig['prob_drift'])})")


METRIC_COLS = (("insertion_auc", "ins AUC ↑"), ("deletion_auc", "del AUC ↓"), ("pointing", "pointing ↑"),
               ("mass_in_mask", "mass in mask ↑"), ("gini", "Gini ↑"), ("stability_corr", "stab. corr ↑"),
               ("stability_ssim", "stab. SSIM ↑"), ("seconds_per_image", "s / image"))


def _attack_cell(r: dict | str | None) -> str:
    if not isinstance(r, dict):
        return r or "n/a: no twice-differentiable form here"
    return (f"{_fmt(r['corr_before'])} → {_fmt(r['corr_after'])} "
            f"(MSE {r['mse_before']:.2f} → {r['mse_after']:.2f}; "
            f"Δp {r['prob_drift']:.3f}, top-1 kept {r['top1_kept']:.2f})")


def markdown(result: dict) -> str:
    """The result file's tables as markdown (the docs page embeds this output)."""
    lines = []
    for run in result["runs"]:
        has_masks = run["set"] == "synthetic"
        cols = [(k, t) for k, t in METRIC_COLS if has_masks or k not in ("pointing", "mass_in_mask")]
        lines += [f"#### {run['model']} — {run['set']} ({run['images']} images, {run['wall_seconds']:.0f} s wall, "
                  f"{run['cpu_seconds']:.0f} s CPU)", "",
                  "| method | library | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for name, row in run["methods"].items():
            ok = row["status"] == "ok"
            cells = [_fmt(row.get(k)) for k, _ in cols] if ok else [row["status"]] + [""] * (len(cols) - 1)
            lines.append(f"| {name} | {SOURCES.get(name, '')} | " + " | ".join(cells) + " |")
        if "manipulation" in run:
            when = "".join(f"; {', '.join(r['methods'])} re-measured by `{r['command']}` ({r['wall_seconds']:.0f} s "
                           f"wall, {r['cpu_seconds']:.0f} s CPU)" for r in run.get("manipulation_rerun", []))
            lines += ["", f"Targeted manipulation, {run['manipulation_images']} images, {run['attack_steps']} "
                      "Adam steps: Pearson correlation of the method's map with the target map, before (x) → "
                      f"after (x'), on the real model{when}.", "",
                      f"| method | white-box attack of the method | x' of the {TRANSFER_FROM} attack |", "|---|---|---|"]
            for name, row in run["manipulation"].items():
                if row["status"] != "ok":
                    lines.append(f"| {name} | {row['status']} | |")
                    continue
                lines.append(f"| {name} | {_attack_cell(row.get('white_box', 'not run'))} | {_attack_cell(row['transfer'])} |")
                if ORIGINAL_MODEL_KEY in row:
                    lines.append(f"| {name}, attacked on the original model (no softplus copy) | "
                                 f"{_attack_cell(row[ORIGINAL_MODEL_KEY])} | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
