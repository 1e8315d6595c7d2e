"""Benchmark latent iERF masks: seeds batched per image vs one seed at a time, in one run.

    python benchmarks/ierf_masks.py                          # demo_out, 8 images x 8 seeds
    python benchmarks/ierf_masks.py --root demo_out --images 16 --seeds 16 --device cuda

The seeds are realistic exemplars: per image, its `--seeds` strongest latents of the layer's SAE
(argmax position, direction w_f = W_enc[f]). Three ways to get the same masks, timed on the same
images, device and thread count:
  batched      one recorded pattern per `--image-batch` images, every seed of them in one
               `srd.ierf` pass (what the cafe stage does);
  per_image    one recorded pattern per image, its seeds propagated one at a time;
  one_at_a_time  a fresh `srd.ierf` call per seed (records the pattern each time).
Each includes the 50%-mass mask of every map. The maps of all three are compared (max abs
difference), so a speed-up never comes from different numbers.

With `--stage-root ROOT` (an atlas with extraction, SAEs and the scan's exemplar_picks) it
instead times the whole cafe stage in this process (no Ray), once per `--masses` value, each in
a fresh copy of ROOT without its PFVs, and reports per layer: exemplars/s, mask sizes, mean
AUCs, how often the iERF order beats the activation order, and the ground-truth IoU of the
iERF mask vs the thresholded activation map over latents that track a concept: latents whose
top picks all land on an object and share one shape, colour or texture (>= 75% of them).

    python benchmarks/ierf_masks.py --stage-root atlas_copy --masses 0.5 0.8 0.9 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.cafe import CafeOptions, CafeWorker, plan_cafe  # noqa: E402
from pipeline.cafe.ierf import batched_latent_ierfs  # noqa: E402
from pipeline.cafe.masks import mass_masks  # noqa: E402
from pipeline.data.errors import ErrorLog  # noqa: E402
from pipeline.data.shards import iter_samples  # noqa: E402
from pipeline.models import checked_device, make_transform, tap  # noqa: E402
from pipeline.sae import load_sae  # noqa: E402
from pipeline.store import AtlasRoot, Manifest  # noqa: E402
from schemas import EXEMPLARS  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seeds_of(model, sae, layer: str, x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image its s strongest latents at their argmax: positions [N, s], latents [N, s]."""
    values = tap(model, x, [layer])[layer].values  # [N, P, C]
    acts = sae.encode(values.float())  # [N, P, F]
    top, pos = acts.max(1)  # [N, F]
    latents = top.topk(s, dim=1).indices
    return pos.gather(1, latents), latents


def run_layer(model, sae, layer: str, x: torch.Tensor, args, device) -> dict:
    positions, latents = seeds_of(model, sae, layer, x, args.seeds)
    dirs, offs = sae.readout(latents.flatten())
    dirs, offs = dirs.view(*latents.shape, -1), offs.view(latents.shape)  # [N, s, C], [N, s]
    n = len(x)
    masks_total = n * args.seeds
    out: dict = {"masks": masks_total}

    sync(device)
    t = time.perf_counter()
    batched = []
    for lo in range(0, n, args.image_batch):
        xb = x[lo:lo + args.image_batch]
        graph = srd.build(model, xb)[0]
        maps, _ = batched_latent_ierfs(model, graph, xb, layer, list(positions[lo:lo + len(xb)]),
                                       list(dirs[lo:lo + len(xb)]), list(offs[lo:lo + len(xb)]),
                                       args.chunk)
        for m in maps:
            mass_masks(m, 0.5)
        batched += maps
    sync(device)
    out["batched_s"] = time.perf_counter() - t

    t = time.perf_counter()
    per_image = []
    for i in range(n):
        graph = srd.build(model, x[i:i + 1])[0]
        for j in range(args.seeds):
            m = srd.ierf(model, x[i:i + 1], layer, positions[i, j:j + 1], dirs[i, j:j + 1],
                         graph=graph)[0]
            mass_masks(m, 0.5)
            per_image.append(m[0])
    sync(device)
    out["per_image_s"] = time.perf_counter() - t

    t = time.perf_counter()
    single = []
    for i in range(n):
        for j in range(args.seeds):
            m = srd.ierf(model, x[i:i + 1], layer, positions[i, j:j + 1], dirs[i, j:j + 1])[0]
            mass_masks(m, 0.5)
            single.append(m[0])
    sync(device)
    out["one_at_a_time_s"] = time.perf_counter() - t

    ref = torch.cat(batched)
    out["max_abs_diff_per_image"] = float((ref - torch.stack(per_image)).abs().max())
    out["max_abs_diff_one_at_a_time"] = float((ref - torch.stack(single)).abs().max())
    for mode in ("batched", "per_image", "one_at_a_time"):
        out[f"{mode}_masks_per_s"] = round(masks_total / out[f"{mode}_s"], 2)
        out[f"{mode}_s"] = round(out[f"{mode}_s"], 3)
    out["speedup_vs_one_at_a_time"] = round(out["one_at_a_time_s"] / out["batched_s"], 2)
    out["speedup_vs_per_image"] = round(out["per_image_s"] / out["batched_s"], 2)
    return out


def stage_run(root: str, mass: float, args, device: torch.device) -> dict:
    """Time the cafe stage on a copy of `root` (no PFVs, no earlier cafe rows) and analyse it."""
    skip = shutil.ignore_patterns("pfv", "exemplars", "stage=cafe", "cafe.json", "scan_parts",
                                  "activations", "_ray_train")
    with tempfile.TemporaryDirectory(prefix="cafe-bench-") as tmp:
        copy = shutil.copytree(root, Path(tmp) / "atlas", ignore=skip)
        opts = CafeOptions(mask_mass=mass, faithfulness_per_latent=args.faithfulness_per_latent,
                           image_batch=args.image_batch, forward_batch=args.forward_batch)
        t0 = time.perf_counter()
        plan = plan_cafe(str(copy), opts)
        worker = CafeWorker(plan.context, device)
        t1 = time.perf_counter()
        rows = 0
        for task in plan.pending:
            record = worker.run(task)
            Manifest(str(copy)).commit(record)
            rows += record.rows
        sync(device)
        seconds = time.perf_counter() - t1
        table = pq.read_table(Path(copy) / "exemplars", columns=[
            c for c in EXEMPLARS.names if c != "ierf_png"]).to_pandas()
    return {"mask_mass": mass, "exemplars": rows, "setup_s": round(t1 - t0, 2),
            "stage_s": round(seconds, 2), "exemplars_per_s": round(rows / seconds, 2),
            "faithfulness_per_latent": args.faithfulness_per_latent,
            "layers": {layer: analyse(g) for layer, g in table.groupby("layer")}}


def analyse(g) -> dict:
    """Per-layer summary of exemplar rows (a pandas frame of one layer)."""
    out = {"exemplars": len(g), "mask_frac_mean": g.mask_frac.mean(),
           "act_overlap_mean": g.act_overlap.mean(), "ierf_constant_mean": g.ierf_constant.mean()}
    f = g[g.ins_auc_ierf.notna()]
    if len(f):
        out["faithfulness_rows"] = len(f)
        out.update({f"{c}_mean": f[c].mean() for c in g.columns if "_auc_" in c})
        for m, better in (("ins", lambda a, b: a > b), ("del", lambda a, b: a < b)):
            a, b = f[f"{m}_auc_ierf"], f[f"{m}_auc_act"]
            out[f"{m}_ierf_vs_act"] = {"wins": float(better(a, b).mean()),
                                       "ties": float((a - b).abs().lt(1e-6).mean())}
    top = g[g.kind == "top"]
    tracking = []
    for latent, h in top.groupby("latent"):
        if len(h) < 2 or h.gt_shape.isna().any():
            continue
        if any(h[a].value_counts().iloc[0] >= 0.75 * len(h)
               for a in ("gt_shape", "gt_colour", "gt_texture")):
            tracking.append(latent)
    c = top[top.latent.isin(tracking)]
    out["concept_latents"] = {
        "latents": len(tracking), "of": int(g.latent.nunique()), "exemplars": len(c),
        "gt_iou_ierf_mean": c.gt_iou_ierf.mean(), "gt_iou_ierf_median": c.gt_iou_ierf.median(),
        "gt_iou_act_mean": c.gt_iou_act.mean(), "gt_iou_act_median": c.gt_iou_act.median(),
        "ierf_beats_act": float((c.gt_iou_ierf > c.gt_iou_act).mean())}
    # numpy scalars to plain floats, rounded for a readable JSON
    return json.loads(json.dumps(out, default=float), parse_float=lambda v: round(float(v), 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="demo_out", help="an atlas root with extraction + SAEs")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seeds", type=int, default=8, help="seeds (exemplars) per image")
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-tf32", action="store_true",
                   help="CUDA: exact float32 convolutions (cuDNN uses TF32 by default, which "
                        "shifts maps by ~1e-3 between batch shapes)")
    p.add_argument("--stage-root", default=None, help="time the whole stage on (a copy of) "
                   "this atlas root instead; see the module docstring")
    p.add_argument("--masses", type=float, nargs="+", default=[0.5], help="--stage-root: "
                   "mask_mass values, one stage run each")
    p.add_argument("--faithfulness-per-latent", type=int, default=4, help="--stage-root")
    p.add_argument("--forward-batch", type=int, default=128, help="--stage-root")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args()
    try:
        device = checked_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = not args.no_tf32

    if args.stage_root:
        result = {"device": device_name(device), "torch_threads": torch.get_num_threads(),
                  "image_batch": args.image_batch,
                  "runs": [stage_run(args.stage_root, m, args, device) for m in args.masses]}
        return write(result, args.out)
    atlas = AtlasRoot(args.root)
    loaded = atlas.model(device)
    model = loaded.model.eval()
    shard = Manifest(args.root).records("extract")["part-000000"].input
    transform = make_transform(loaded.data_config)
    samples = iter_samples([shard], ErrorLog(), "bench")
    x = torch.stack([transform(s.image) for s, _ in zip(samples, range(args.images))]).to(device)

    result = {"device": device_name(device), "torch_threads": torch.get_num_threads(), "model": loaded.name,
              "cudnn_tf32": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
              "input": list(x.shape[1:]), "images": args.images, "seeds_per_image": args.seeds,
              "image_batch": args.image_batch, "layers": {}}
    for row in atlas.saes():
        sae = load_sae(row["weights"], device)
        srd.build(model, x[:1])  # warm-up (lazy imports, allocator)
        result["layers"][row["layer"]] = dict(sae_id=row["sae_id"], **run_layer(
            model, sae, row["layer"], x, args, device))
    write(result, args.out)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def write(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
