"""Benchmark the cafe *stage* against its batched iERF kernel, per exemplar, in one run.

    python benchmarks/cafe_stage.py --root ATLAS --images 64 --label after \
        --out benchmarks/results/cafe_stage_cpu.json

ATLAS holds an extraction, SAEs and the scan's `exemplar_picks/` (e.g. `concept-atlas build
configs/demo.yaml` with fewer images). Every pick on `--images` picked images (drawn at random,
so each image keeps the picks it has in the whole atlas) is explained twice, on one device and
thread count:

  kernel  what `pipeline/cafe/ierf.py` computes for them and nothing else: the stage's image
          batches (same images, same `image_batch`), one recorded SRD pattern (`srd.build`) per
          batch and one `batched_latent_ierfs` call per layer. Images are decoded before the
          clock starts.
  stage   `CafeWorker.run` on every image part of those picks, in this process (no Ray): shard
          read and decode, preprocessing, the pattern, the iERFs, masks and PNGs, activation
          maps, faithfulness curves, ground truth, the Parquet writes. Profiled with pyinstrument
          (sampling, full stacks): a sample is booked to the outermost function of CATEGORIES
          on its stack (the forwards of the faithfulness check to the faithfulness curves, the
          layer forward of `explain` to the model forward), the rest to per-part overhead.

The result goes under `--label` in `--out` (other labels in the file are kept), so running it
on the old and the new stage code gives `before` and `after` side by side; the ratio
stage/kernel (exemplars/s over exemplars/s) is the number to read. With `--keep DIR` the
stage's exemplars table is copied to DIR, and `--compare DIR` reports the largest difference of
every column against such a copy (an equal-output check across code versions).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from pyinstrument import Profiler  # noqa: E402

from pipeline import srd  # noqa: E402
from pipeline.cafe import CafeOptions, CafeWorker, plan_cafe  # noqa: E402
from pipeline.cafe.ierf import batched_latent_ierfs  # noqa: E402
from pipeline.data.errors import ErrorLog  # noqa: E402
from pipeline.data.shards import iter_samples  # noqa: E402
from pipeline.host import keep_freed_memory  # noqa: E402
from pipeline.store import Manifest, fs  # noqa: E402
from schemas import EXEMPLAR_PICKS  # noqa: E402

# (file suffix, function name) -> category; the outermost match on a stack wins (`breakdown`)
CATEGORIES: dict[tuple[str, str], str] = {
    ("pipeline/data/shards.py", "iter_samples"): "image decode",
    ("pipeline/data/shards.py", "_iter_shard"): "image decode",
    ("torchvision/transforms/transforms.py", "__call__"): "preprocessing",
    ("pipeline/srd/adapters.py", "build"): "SRD pattern (srd.build)",
    ("pipeline/cafe/ierf.py", "batched_latent_ierfs"): "iERF (batched_latent_ierfs)",
    ("pipeline/cafe/stage.py", "_faithfulness"): "faithfulness curves",
    ("pipeline/cafe/faithfulness.py", "curves"): "faithfulness curves",
    ("pipeline/models/taps.py", "tap"): "model forward (layer PFVs)",
    ("pipeline/cafe/stage.py", "_act_maps"): "activation maps (SAE encode)",
    ("pipeline/cafe/masks.py", "mass_masks"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/masks.py", "encode_png"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/masks.py", "bbox"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/masks.py", "iou"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/masks.py", "upsample"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/masks.py", "act_masks"): "masks, PNG, bbox, IoU",
    ("pipeline/cafe/groundtruth.py", "objects"): "ground truth",
    ("pipeline/cafe/groundtruth.py", "match"): "ground truth",
    ("pipeline/store/fs.py", "write_parquet"): "Parquet writes",
    ("pipeline/store/root.py", "write_errors"): "Parquet writes",
    ("pipeline/cafe/stage.py", "_image_keys"): "images table read",
}


def subset(root: str, dest: Path, images: int, seed: int) -> int:
    """Copy `root` to `dest` without PFVs or earlier cafe rows, keeping every pick (of every
    SAE) on `images` picked images drawn at random (`seed`), so the picks per image are those
    of the whole atlas; returns the number of picks kept."""
    skip = shutil.ignore_patterns("pfv", "exemplars", "stage=cafe", "cafe.json", "scan_parts",
                                  "activations", "_ray_train", "_ckpt")
    shutil.copytree(root, dest, ignore=skip)
    paths = sorted((dest / "exemplar_picks").rglob("*.parquet"))
    ids = sorted({i for path in paths for i in pq.read_table(path)["image_id"].to_pylist()})
    rng = np.random.default_rng(seed)
    chosen = pa.array(rng.choice(ids, size=min(images, len(ids)), replace=False), pa.int64())
    kept = 0
    for path in paths:
        picks = pq.read_table(path)
        picks = picks.filter(pc.is_in(picks["image_id"], value_set=chosen.cast(
            picks.schema.field("image_id").type)))
        fs.write_parquet(picks, str(path), EXEMPLAR_PICKS)
        kept += picks.num_rows
    return kept


def kernel(worker: CafeWorker, plan, device: torch.device) -> tuple[Clock, int]:
    """Wall and CPU seconds of the batched iERF kernel alone on the stage's image batches, and
    the number of exemplars."""
    batches = []  # (x, {layer: (positions, directions, offsets) per image})
    for task in plan.pending:
        picks = task.picks.to_pylist()
        keys = dict(zip(*(pq.read_table(fs.join(plan.context.root, "images",
                                                  f"{task.part}.parquet"),
                                         columns=["image_id", "key"]).to_pydict().values())))
        wanted = {keys[p["image_id"]] for p in picks}
        pixels = {s.key: worker.transform(s.image) for s in iter_samples(
            [task.shard], ErrorLog(), "bench", decode_image=wanted) if s.key in wanted}
        by_image = defaultdict(list)
        for p in picks:
            by_image[p["image_id"]].append(p)
        ids = sorted(by_image)
        for lo in range(0, len(ids), worker.opt.image_batch):
            batch = ids[lo:lo + worker.opt.image_batch]
            x = torch.stack([pixels[keys[i]] for i in batch]).to(device)
            seeds = {}
            for layer in sorted({p["layer"] for i in batch for p in by_image[i]}):
                per = [[p for p in by_image[i] if p["layer"] == layer] for i in batch]
                ro = [worker._readouts(ps, x) for ps in per]
                seeds[layer] = ([torch.tensor([p["position"] for p in ps], dtype=torch.long)
                                 for ps in per], [d for d, _ in ro], [o for _, o in ro])
            batches.append((x, seeds))
    n = sum(t.picks.num_rows for t in plan.pending)
    srd.build(worker.model, batches[0][0][:1])  # warm-up (lazy imports, allocator)
    clock = Clock(device)
    with torch.no_grad():
        for x, seeds in batches:
            graph = srd.build(worker.model, x)[0]
            for layer, (pos, dirs, offs) in seeds.items():
                batched_latent_ierfs(worker.model, graph, x, layer, pos, dirs, offs,
                                     worker.opt.seed_chunk)
    return clock.stop(), n


def category(frame) -> str | None:
    path = (frame.file_path or "").replace(os.sep, "/")
    return next((c for (suffix, name), c in CATEGORIES.items()
                 if frame.function == name and path.endswith(suffix)), None)


def breakdown(root, total: float, scale: float) -> dict[str, float]:
    """Seconds per category from pyinstrument's call tree (wall-clock samples of a run that
    took `total` seconds), times `scale` (CPU / wall seconds, to book CPU time on a shared
    machine): a sample goes to the *outermost* function of CATEGORIES on its stack (so the
    forwards inside the faithfulness check are faithfulness, the forwards inside the iERF are
    iERF); the rest is per-part overhead."""
    out: dict[str, float] = defaultdict(float)

    def walk(frame) -> None:
        cat = category(frame)
        if cat is not None:
            out[cat] += frame.time
        else:
            for child in frame.children:
                walk(child)

    walk(root)
    out["per-part overhead"] = total - sum(out.values())
    return {k: round(v * scale, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def stage(plan, worker: CafeWorker, device: torch.device) -> tuple[Clock, dict, str]:
    """Wall and CPU seconds of `CafeWorker.run` over every pending part, its breakdown in CPU
    seconds and pyinstrument's call tree."""
    profiler = Profiler(interval=0.002)
    clock = Clock(device)
    profiler.start()
    for task in plan.pending:
        Manifest(plan.context.root).commit(worker.run(task))
    clock.stop()
    profiler.stop()
    root = profiler.last_session.root_frame()
    tree = profiler.output_text(unicode=False, color=False, show_all=False)
    return clock, breakdown(root, clock.wall, clock.cpu / clock.wall), tree


def compare(table: pa.Table, reference: str) -> dict[str, float | int]:
    """Largest absolute difference per column between `table` and a kept exemplars table (rows
    matched on sae_id, latent, kind, rank); -1 for a non-numeric column that differs."""
    key = ["sae_id", "latent", "kind", "rank"]
    a = table.sort_by([(k, "ascending") for k in key])
    b = pq.read_table(reference).select(a.column_names).sort_by([(k, "ascending") for k in key])
    if a.num_rows != b.num_rows:
        return {"rows": a.num_rows - b.num_rows}
    out: dict[str, float | int] = {}
    for name in a.column_names:
        x, y = a[name].to_pylist(), b[name].to_pylist()
        if pa.types.is_floating(a.schema.field(name).type):
            if [v is None for v in x] != [v is None for v in y]:
                out[name] = -1
                continue
            d = [abs(u - v) for u, v in zip(x, y) if u is not None]
            out[name] = float(max(d, default=0.0))
        elif x != y:
            out[name] = -1 if name != "ierf_png" else sum(u != v for u, v in zip(x, y))
    return out


class Clock:
    """Wall and CPU seconds (this process) from construction to `stop()`. With one torch thread
    the CPU seconds are the work done, whatever else shares the machine; on a GPU read wall."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        sync(device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> Clock:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="atlas with extraction, SAEs, exemplar_picks")
    p.add_argument("--images", type=int, default=64, help="picked images whose picks run")
    p.add_argument("--seed", type=int, default=0, help="draws the --images")
    p.add_argument("--faithfulness-per-latent", type=int, default=1,
                   help="CafeOptions.faithfulness_per_latent (the demo config's 1)")
    p.add_argument("--image-batch", type=int, default=8)
    p.add_argument("--forward-batch", type=int, default=128,
                   help="CafeOptions.forward_batch (perturbed images per forward)")
    p.add_argument("--no-field-crop", action="store_true",
                   help="CafeOptions.field_crop=False (full-image faithfulness forwards)")
    p.add_argument("--no-patch-stem", action="store_true",
                   help="CafeOptions.patch_stem=False (the stem computed on every image)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the kernel and the stage this many times each, alternating, and "
                        "keep the fastest of each (the CPU time of one computation varies by "
                        "up to 50%% between runs on a shared machine)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (a stage worker keeps freed memory: "
                        "pipeline.host.keep_freed_memory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="run", help="key of this run in --out")
    p.add_argument("--out", default=None, help="JSON file (runs under other labels are kept)")
    p.add_argument("--profile", default=None, help="write pyinstrument's call tree here")
    p.add_argument("--keep", default=None, help="copy the stage's exemplars table here")
    p.add_argument("--compare", default=None, help="an exemplars table kept by --keep")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # as a stage worker does (jobs/parts.py), so that the kernel and the stage both run under it
    malloc = "glibc default" if args.default_malloc else (
        "freed memory kept" if keep_freed_memory() else "default (not glibc)")
    device = torch.device(args.device)
    opts = CafeOptions(faithfulness_per_latent=args.faithfulness_per_latent,
                       image_batch=args.image_batch, forward_batch=args.forward_batch,
                       field_crop=not args.no_field_crop, patch_stem=not args.no_patch_stem,
                       in_process=True)
    with tempfile.TemporaryDirectory(prefix="cafe-stage-") as tmp:
        copy = Path(tmp) / "atlas"
        picks = subset(args.root, copy, args.images, args.seed)
        plan = plan_cafe(str(copy), opts)
        worker = CafeWorker(plan.context, device)
        runs = []
        for _ in range(args.repeat):  # alternating, so that both see the same load
            kernel_t, n = kernel(worker, plan, device)
            runs.append((kernel_t, *stage(plan, worker, device)))
        pick = (lambda c: c.cpu) if device.type == "cpu" else (lambda c: c.wall)
        kernel_t = min((r[0] for r in runs), key=pick)
        stage_t, parts, tree = min((r[1:] for r in runs), key=lambda r: pick(r[0]))
        table = pq.read_table(copy / "exemplars")
        assert table.num_rows == n == picks, (table.num_rows, n, picks)
        faithful = table.num_rows - table["ins_auc_ierf"].null_count
        diff = compare(table, args.compare) if args.compare else None
        if args.keep:
            pq.write_table(table, args.keep)
    # the rate compared: CPU seconds on a CPU (the machine is shared), wall seconds on a GPU
    use = "cpu" if device.type == "cpu" else "wall"
    kernel_s, stage_s = getattr(kernel_t, use), getattr(stage_t, use)
    result = {
        "device": platform.processor() or platform.machine(), "torch_threads": args.threads,
        "root": args.root, "exemplars": n,
        "images": len(set(table["image_id"].to_pylist())), "faithfulness_rows": faithful,
        "png_bytes_mean": round(pc.mean(pc.binary_length(table["ierf_png"])).as_py(), 1),
        "options": {"faithfulness_per_latent": opts.faithfulness_per_latent,
                    "steps": opts.steps, "patch": opts.patch, "image_batch": opts.image_batch,
                    "seed_chunk": opts.seed_chunk, "forward_batch": opts.forward_batch,
                    "field_crop": opts.field_crop, "patch_stem": opts.patch_stem},
        "rates_from": f"{use} seconds", "repeat": args.repeat, "malloc": malloc,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "kernel_wall_s": round(kernel_t.wall, 2), "kernel_cpu_s": round(kernel_t.cpu, 2),
        "stage_wall_s": round(stage_t.wall, 2), "stage_cpu_s": round(stage_t.cpu, 2),
        "kernel_exemplars_per_s": round(n / kernel_s, 3),
        "stage_exemplars_per_s": round(n / stage_s, 3),
        "stage_over_kernel": round(kernel_s / stage_s, 3),
        f"stage_breakdown_{use}_s": parts,
    }
    if diff is not None:
        result["max_abs_diff_vs_compare"] = diff
    print(f"{'':32s}{'wall s':>10s}{'CPU s':>10s}{'exemplars/s':>14s}  ({use} seconds)")
    for name, t, s in (("kernel (srd.build + iERFs)", kernel_t, kernel_s),
                       ("stage (CafeWorker.run)", stage_t, stage_s)):
        print(f"{name:32s}{t.wall:10.2f}{t.cpu:10.2f}{n / s:14.3f}")
    print(f"stage / kernel rate: {kernel_s / stage_s:.3f}   ({n} exemplars, {faithful} with "
          f"faithfulness curves, {result['images']} images; malloc: {malloc}, peak RSS "
          f"{result['peak_rss_mb']} MB)")
    for cat, s in parts.items():
        print(f"  {cat:34s}{s:9.2f}s {100 * s / stage_s:6.1f}%")
    if diff is not None:
        print("max |diff| vs --compare:", json.dumps(diff))
    if args.profile:
        Path(args.profile).write_text(tree)
    if args.out:
        path = Path(args.out)
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[args.label] = result
        path.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
