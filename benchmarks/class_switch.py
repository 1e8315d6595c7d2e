"""Class-switch pointing game on synthetic scenes with objects of two or more shapes.

    python benchmarks/class_switch.py                       # demo_resnet and demo_vit, 64 scenes
    python benchmarks/class_switch.py --models demo_resnet --scenes 128 --methods SRD GradCAM
    python benchmarks/class_switch.py --models dinov2_shapes --methods SRD-layer --layer blocks.5
    python benchmarks/class_switch.py --models \
        demo_resnet=pipeline/models/weights/demo_resnet_present.safetensors   # the multi-label one

Each scene (dataset seed 2026 by default, unseen by the demo models, which were trained on seeds
1, 7 and 21) is explained once per shape it holds, for that shape's class; a pair scores 1 when
that class's map peaks inside the objects of that shape (`metrics.class_switch_pointing`). A
method whose map does not follow the class can only score on the pairs whose class it happens
to point at.

Also reported per model: how often the model's top class is one of the shapes present; how
often a pair's objects raise its class logit (the scene against the same scene with that
shape's objects left out, `synthetic.render_without`: where they do not, the model does not take
its evidence for the class from them); and per method the score split into the pairs of each
scene's top class and the others (the secondary objects, for which a classifier trained on the
largest object's shape may hold little evidence), and on the pairs whose objects raise their
logit; and the share of scenes in which the maps of every class present peak in one and the
same cell (1/16 of the side; `metrics.one_peak_cell`): a map whose peak does not move when
the class does. Writes benchmarks/results/class_switch.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import write_results  # noqa: E402

import torch  # noqa: E402

from pipeline.evaluation import METHODS, Unsupported, make_method, metrics  # noqa: E402
from pipeline.evaluation.data import multi_object_set, without_each_shape  # noqa: E402
from pipeline.models import demo, load_model, model_fingerprint  # noqa: E402

SYNTHETIC_SEED = 2026
OUT = Path(__file__).resolve().parent / "results" / "class_switch.json"


def scene_set(lm, scenes: int, seed: int) -> tuple[torch.Tensor, list, list, int]:
    """The game's scenes at the model's input: (images [N, 3, H, W], the generator's objects
    (class, mask at 128 px), the same with masks at the input resolution, the one-peak cell side)."""
    from PIL import Image

    imgs, objs = multi_object_set(scenes, seed)
    x = torch.stack([lm.transform(Image.fromarray(im)) for im in imgs])
    size = x.shape[2:]
    # the masks at the model's input resolution (the transform resizes the 128 px scenes)
    objects = [[(c, torch.nn.functional.interpolate(torch.from_numpy(m)[None, None].float(), size=size,
                                                     mode="nearest")[0, 0] > 0.5) for c, m in per]
               for per in objs]
    # a peak that stays in one cell whatever the class: 1/16 of the side (a DINOv2 patch at 224 px)
    return x, objs, objects, max(1, size[-1] // 16)


def run_model(spec: str, scenes: int, methods: list[str], batch: int, layer: str | None = None,
              seed: int = SYNTHETIC_SEED) -> dict:
    lm, shown = _load(spec)
    x, objs, objects, cell = scene_set(lm, scenes, seed)
    with torch.no_grad():
        logits = torch.cat([lm.model(x[i:i + batch]) for i in range(0, len(x), batch)])
    present = [{c for c, _ in per} for per in objects]
    found = [int(logits[i].argmax()) in present[i] for i in range(len(x))]
    top = torch.tensor([c == int(logits[i].argmax()) for i, per in enumerate(objects) for c, _ in per])
    rise = logit_rise(lm, logits, objs, scenes, batch, seed)
    used = rise > 0
    res = {"model": lm.name, "weights": lm.weights, "weights_fingerprint": model_fingerprint(lm.model),
           "scenes": len(x), "pairs": sum(len(p) for p in objects), "peak_cell_px": cell,
           "classes_per_scene": sum(map(len, present)) / len(x),
           "top1_is_a_present_shape": sum(found) / len(x),
           "object_raises_its_logit": {"all": _mean(used), "top_class_pairs": _mean(used[top]),
                                       "other_pairs": _mean(used[~top])},
           "median_logit_rise": {"top_class_pairs": _median(rise[top]), "other_pairs": _median(rise[~top])},
           "methods": {}}
    for method in methods:
        try:
            explain = make_method(method, lm.model, layer=layer)
        except Unsupported as e:  # reported as such (zennit's LRP on timm blocks, FullGrad on a ViT)
            res["methods"][method] = {"unsupported": str(e)}
            print(f"{shown:12s} {method:16s} unsupported: {e}", flush=True)
            continue
        method = method if layer is None else f"{method}@{layer}"
        t0 = time.perf_counter()
        maps, masks, image = metrics.class_switch_maps(explain, x, objects, batch)
        seconds = time.perf_counter() - t0
        hits = metrics.pointing_game(maps, masks)
        stuck = metrics.one_peak_cell(maps, image, cell)
        res["methods"][method] = {"class_switch_pointing": _mean(hits), "top_class_pairs": _mean(hits[top]),
                                  "other_pairs": _mean(hits[~top]), "pairs_whose_object_raises_its_logit":
                                  _mean(hits[used]), "scenes_with_one_peak_cell": _mean(stuck),
                                  "seconds": round(seconds, 1)}
        print(f"{shown:12s} {method:16s} class-switch pointing {_mean(hits):.3f} "
              f"({int(hits.sum())}/{len(hits)} pairs; top class {_mean(hits[top]):.3f}, "
              f"others {_mean(hits[~top]):.3f}; object raises its logit {_mean(hits[used]):.3f}; "
              f"every class peaks in one {cell} px cell in {_mean(stuck):.3f} of the scenes; "
              f"{seconds:.0f} s)", flush=True)
    return res


def figure(spec: str, methods: list[str], path: Path, scenes: int = 4, seed: int = SYNTHETIC_SEED) -> None:
    """One row per scene (the first `scenes` of `seed` that hold two shapes or more): the scene,
    then per method one signed map per class present (red +, blue -, the colour scale clipped at
    the 99th percentile of |map|), its peak starred (white: inside that class's objects, red:
    outside) and titled with the class and the score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from pipeline.data.concepts import CLASS_NAMES

    lm, _ = _load(spec)
    imgs, objs = multi_object_set(scenes, seed)
    width = max(len(per) for per in objs)
    fig, axes = plt.subplots(scenes, 1 + width * len(methods), squeeze=False,
                             figsize=(1.9 * (1 + width * len(methods)), 2.0 * scenes))
    for row, (img, per) in enumerate(zip(imgs, objs)):
        x = lm.transform(Image.fromarray(img))[None].expand(len(per), -1, -1, -1)
        target = torch.tensor([c for c, _ in per])
        axes[row, 0].imshow(img)
        axes[row, 0].set_title("scene", fontsize=8)
        for k, method in enumerate(methods):
            maps = make_method(method, lm.model)(x, target).detach()
            for j, (c, mask) in enumerate(per):
                ax = axes[row, 1 + k * width + j]
                m = torch.nn.functional.interpolate(maps[j][None, None], size=img.shape[:2], mode="bilinear",
                                                    align_corners=False)[0, 0]
                v = float(m.abs().flatten().quantile(0.99)) or 1.0  # a few pixels would wash out the rest
                ax.imshow(m, cmap="bwr", vmin=-v, vmax=v)
                peak = divmod(int(m.argmax()), m.shape[1])
                hit = bool(mask[peak])
                ax.plot(peak[1], peak[0], "*", ms=11, mec="k", mfc="w" if hit else "r")
                ax.contour(mask, levels=[0.5], colors="k", linewidths=0.6)
                ax.set_title(f"{method}: {CLASS_NAMES[c]} {'hit' if hit else 'miss'}", fontsize=7)
            for j in range(len(per), width):
                axes[row, 1 + k * width + j].set_visible(False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _load(spec: str):
    """`MODEL` (its shipped weights) or `MODEL=PATH` -> (LoadedModel, its name in printed lines)."""
    name, _, weights = spec.partition("=")
    return load_model(name, weights or "demo"), f"{name}[{Path(weights).stem}]" if weights else name


def logit_rise(lm, logits: torch.Tensor, objs: list, scenes: int, batch: int, seed: int) -> torch.Tensor:
    """[pairs]: how much higher the pair's class logit is with that class's objects in the scene
    than with them left out (`synthetic.render_without`). Where it is not higher, the model does
    not take its evidence for the class from those objects, and a faithful map has no reason to
    peak there."""
    from PIL import Image

    gone = torch.stack([lm.transform(Image.fromarray(im)) for per in without_each_shape(scenes, seed)
                        for im in per])
    with torch.no_grad():
        without = torch.cat([lm.model(gone[i:i + batch]) for i in range(0, len(gone), batch)])
    image = torch.tensor([i for i, per in enumerate(objs) for _ in per])
    cls = torch.tensor([c for per in objs for c, _ in per])
    return logits[image, cls] - without[torch.arange(len(cls)), cls]


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else float("nan")


def _median(values: torch.Tensor) -> float:
    return float(values.median()) if len(values) else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["demo_resnet", "demo_vit"], metavar="MODEL[=WEIGHTS]",
                   help=f"{', '.join((*demo.DEMO_MODELS, *demo.PROBE_MODELS))}; '=PATH' loads other "
                        "weights of the same architecture (default: the shipped ones)")
    p.add_argument("--scenes", type=int, default=64, help="scenes with two or more shapes")
    p.add_argument("--methods", nargs="*", default=["SRD", "SRD-contrastive", "GradCAM", "LayerCAM",
                                                    "InputXGradient", "Saliency"], choices=METHODS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=SYNTHETIC_SEED,
                   help="dataset seed of the scenes (never one a model was trained on)")
    p.add_argument("--layer", default=None,
                   help="the layer of the CAMs and of SRD-layer (default: each model's CAM layer)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--figure", type=Path, default=None,
                   help="also draw the first model's maps on 4 scenes into this PNG (--figure-methods)")
    p.add_argument("--figure-methods", nargs="+", default=["SRD", "GradCAM"], choices=METHODS)
    args = p.parse_args()
    known = (*demo.DEMO_MODELS, *demo.PROBE_MODELS)
    bad = [m for m in args.models if m.partition("=")[0] not in (known if "=" not in m else demo.TRAINABLE_MODELS)]
    if bad:
        p.error(f"unknown model {bad[0]!r}: valid are {', '.join(known)}, each with an optional =WEIGHTS, "
                f"or any of {', '.join(demo.TRAINABLE_MODELS)} with =WEIGHTS")
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    runs = [run_model(m, args.scenes, args.methods, args.batch, args.layer, args.seed) for m in args.models]
    write_results(args.out, {"command": " ".join(sys.argv), "dataset_seed": args.seed,
                             "torch": torch.__version__, "machine": platform.machine(),
                             "threads": args.threads, "wall_seconds": round(time.perf_counter() - t0),
                             "cpu_seconds": round(time.process_time() - c0), "runs": runs})
    print(f"wrote {args.out}")
    if args.figure:
        figure(args.models[0], args.figure_methods, args.figure, seed=args.seed)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
