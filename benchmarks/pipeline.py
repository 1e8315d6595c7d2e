"""Benchmark of the Ray stages: extraction overhead, SAE training speed, scaling, demo SAEs.

    python benchmarks/pipeline.py                                  # full sizes
    python benchmarks/pipeline.py --sizes 250 500 1000 --bench-images 500   # a small CPU

1. Extraction: images/s of the Ray job in steady state (after the first part, so actor start-up
   is excluded; decoding, forward, position sampling, writes and commits included) against the
   bare model forward (`model(x)`) on the same preprocessed batches, same threads, same run.
   Overhead = 1 - pipeline / bare (target <= 25%).
2. SAE training: PFVs/s of the Ray Train job (Ray Data reads, seeded shuffle, checkpoints
   reported to Ray Train) against a minimal single-process loop of the same `train_step` over
   an in-memory tensor (target >= 0.8x).
3. Scaling: wall time of extraction jobs of growing size. Start-up (actors, model loading)
   is a constant offset, so growth is linear when the steady-state rate and the marginal rate
   (extra images / extra seconds between sizes) stay flat.
4. The demo SAEs: FVU, L0, dead fraction of `concept-atlas build configs/demo.yaml`.

Prints a table and writes JSON to benchmarks/results/.
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
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import extract as extract_job  # noqa: E402
from jobs import train_sae as train_job  # noqa: E402
from jobs.cluster import init_ray  # noqa: E402
from pipeline.data.synthetic import write_shards  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.models.demo import weights_path  # noqa: E402
from pipeline.pfv.extract import ExtractOptions, decode_shard  # noqa: E402
from pipeline.pfv.parts import committed_parts, read_values  # noqa: E402
from pipeline.sae.stage import TrainOptions, make_runs, split_holdout  # noqa: E402
from pipeline.sae import SAE, make_optimizer, read_sae_info, train_step  # noqa: E402
from pipeline.store import Manifest  # noqa: E402

SHARD_SIZE = 250


def steady_rate(out: str) -> float:
    """Images/s between the first and the last committed part (excludes start-up)."""
    records = sorted(Manifest(out).records("extract").values(), key=lambda r: r.finished)
    if len(records) < 2:
        return float("nan")
    return sum(r.rows for r in records[1:]) / (records[-1].finished - records[0].finished)


def bare_forward_rate(cfg: ExtractOptions, shards: list[str]) -> float:
    """Images/s of `model(x)` alone on the job's preprocessed batches."""
    loaded = load_model(cfg.model, cfg.weights)
    pixels = np.concatenate([decode_shard(s, loaded.data_config).pixels for s in shards])
    batches = [torch.from_numpy(pixels[i:i + cfg.batch_size])
               for i in range(0, len(pixels), cfg.batch_size)]
    with torch.no_grad():
        loaded.model(batches[0])  # warm-up, as the job's first part is excluded
        t = time.perf_counter()
        for x in batches:
            loaded.model(x)
    return len(pixels) / (time.perf_counter() - t)


def bench_extraction(cfg: ExtractOptions, shards: list[str], work: Path) -> dict:
    out = str(work / "extract-bench")
    shutil.rmtree(out, ignore_errors=True)  # a fresh job: a resumed one would measure nothing
    t = time.perf_counter()
    summary = extract_job.run(out, replace(cfg, shards=tuple(shards)), progress=False,
                              stats=False)
    wall = time.perf_counter() - t
    pipeline = steady_rate(out)
    bare = bare_forward_rate(cfg, shards)
    return {"images": summary["images"], "wall_s": round(wall, 2),
            "pipeline_img_s": round(pipeline, 1), "bare_forward_img_s": round(bare, 1),
            "overhead": round(1 - pipeline / bare, 3), "out": out}


def bench_scaling(cfg: ExtractOptions, shards: list[str], sizes: list[int], work: Path) -> list:
    rows = []
    for n in sizes:
        out = str(work / f"scale-{n}")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        summary = extract_job.run(out, replace(cfg, shards=tuple(shards[:n // SHARD_SIZE])),
                                  progress=False, stats=False)
        rows.append({"images": summary["images"], "wall_s": round(time.perf_counter() - t, 2),
                     "steady_img_s": round(steady_rate(out), 1)})
        shutil.rmtree(out)
    for prev, row in zip([None, *rows], rows):
        row["time_ratio"] = round(row["wall_s"] / rows[0]["wall_s"], 2)
        row["size_ratio"] = round(row["images"] / rows[0]["images"], 2)
        # the start-up (actor, model load) is a constant: growth shows in the increments
        row["marginal_img_s"] = (round((row["images"] - prev["images"])
                                       / (row["wall_s"] - prev["wall_s"]), 1) if prev else None)
    return rows


def bench_sae(root: str, layer: str, steps: int, work: Path) -> dict:
    sweep = [{"layer": layer, "sae": {"n_latents": 512, "k": 16, "batch_size": 1024,
                                      "lr": 1e-3, "dead_tokens": 100_000}}]
    # the demo's checkpoint cadence: its cost is part of the job's rate
    options = TrainOptions(sweep=tuple(sweep), steps=steps, checkpoint_every=250,
                           fidelity_images=64)
    rows = train_job.run(root, options)
    ray_rate = read_sae_info(rows[0]["weights"])["metrics"]["train"]["tokens_per_s"]

    run = make_runs(sweep, {layer: rows[0]["d_in"]}, options)[0]
    train, _ = split_holdout(committed_parts(root, layer), options.holdout_parts)
    data = torch.from_numpy(read_values(train))
    sae = SAE(run.cfg)
    optimizer = make_optimizer(sae, run.cfg)
    sae.initialize_from_sample(data[:run.cfg.batch_size])
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=gen)
    b = run.cfg.batch_size
    t = time.perf_counter()
    for step in range(steps):
        start = (step * b) % (len(data) - b)
        train_step(sae, optimizer, data[order[start:start + b]])
    bare_rate = steps * b / (time.perf_counter() - t)
    return {"layer": layer, "steps": steps, "batch_size": b,
            "ray_train_pfv_s": round(ray_rate, 1), "minimal_loop_pfv_s": round(bare_rate, 1),
            "ratio": round(ray_rate / bare_rate, 3)}


def demo_saes(demo_out: str | None) -> list:
    if not demo_out:
        return []
    if not (Path(demo_out) / "saes").is_dir():
        from jobs.build import run

        run(str(REPO / "configs" / "demo.yaml"), out=demo_out)
    from pipeline.store import AtlasRoot

    return [{k: r[k] for k in ("sae_id", "n_latents", "k", "fvu", "l0", "dead_frac",
                               "dense_frac", "logit_agreement", "logit_kl", "model_accuracy")}
            for r in AtlasRoot(demo_out).saes()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000],
                   help=f"scaling sizes (multiples of {SHARD_SIZE})")
    p.add_argument("--bench-images", type=int, default=1000, help="images of the overhead run")
    p.add_argument("--model", default="demo_resnet")
    p.add_argument("--layers", nargs="+", default=["layer2", "layer4"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sae-steps", type=int, default=750)
    p.add_argument("--parts", nargs="+", default=["extraction", "sae", "scaling", "demo"],
                   choices=["extraction", "sae", "scaling", "demo"], help="what to measure")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the actors use 1)")
    p.add_argument("--demo-out", default="demo_out",
                   help="read (or build) the demo here; '' skips the demo SAEs")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-pipeline-"))
    n_data = max(max(a.sizes), a.bench_images)
    data = work / "data"
    if not (data / "dataset.json").exists():
        write_shards(data, n=n_data, seed=0, shard_size=SHARD_SIZE, progress=False)
    shards = sorted(str(s) for s in data.glob("shard-*.tar"))
    weights = "default" if a.model != "demo_resnet" or weights_path(a.model).is_file() else None
    cfg = ExtractOptions(model=a.model, weights=weights, layers=tuple(a.layers),
                         batch_size=a.batch_size, atlas_id="bench")
    init_ray()

    t0 = time.time()
    extraction = sae = None
    if {"extraction", "sae"} & set(a.parts):
        extraction = bench_extraction(cfg, shards[:a.bench_images // SHARD_SIZE], work)
        out = extraction.pop("out")
        sae = bench_sae(out, a.layers[-1], a.sae_steps, work) if "sae" in a.parts else None
    scaling = bench_scaling(cfg, shards, a.sizes, work) if "scaling" in a.parts else []
    demo = demo_saes(a.demo_out) if "demo" in a.parts else []

    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch_threads": a.threads, "load_avg": os.getloadavg()},
        "model": a.model, "weights": weights, "layers": a.layers,
        "extraction": extraction, "sae_training": sae, "scaling": scaling, "demo_saes": demo,
        "seconds": round(time.time() - t0, 1),
    }
    print_table(result)
    Path(a.results).mkdir(parents=True, exist_ok=True)
    path = Path(a.results) / f"pipeline-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return 0


def print_table(r: dict) -> None:
    e, s = r["extraction"], r["sae_training"]
    print(f"\nmachine: {r['machine']}")
    if e:
        print(f"\n{'extraction (' + r['model'] + ', ' + '+'.join(r['layers']) + ')':<44} "
              f"{'value':>12}")
        print(f"{'  pipeline, steady state (img/s)':<44} {e['pipeline_img_s']:>12}")
        print(f"{'  bare model forward, same batches (img/s)':<44} {e['bare_forward_img_s']:>12}")
        print(f"{'  overhead (target <= 0.25)':<44} {e['overhead']:>12}")
        print(f"{'  job wall time incl. start-up (s)':<44} {e['wall_s']:>12}")
    if s:
        print(f"\n{'SAE training (' + s['layer'] + ', 1 worker)':<44} {'value':>12}")
        print(f"{'  Ray Train job (PFV/s)':<44} {s['ray_train_pfv_s']:>12}")
        print(f"{'  minimal single-process loop (PFV/s)':<44} {s['minimal_loop_pfv_s']:>12}")
        print(f"{'  ratio (target >= 0.8)':<44} {s['ratio']:>12}")
    if r["scaling"]:
        print(f"\n{'scaling: images':<16} {'wall s':>8} {'time ratio':>11} {'size ratio':>11} "
              f"{'steady img/s':>13} {'marginal img/s':>15}")
    for row in r["scaling"]:
        print(f"{row['images']:<16} {row['wall_s']:>8} {row['time_ratio']:>11} "
              f"{row['size_ratio']:>11} {row['steady_img_s']:>13} {str(row['marginal_img_s']):>15}")
    if r["demo_saes"]:
        print(f"\n{'demo SAE':<24} {'FVU':>7} {'L0':>6} {'dead%':>6} {'top1agr':>8} {'KL':>8}")
        for d in r["demo_saes"]:
            print(f"{d['sae_id']:<24} {d['fvu']:>7.4f} {d['l0']:>6.1f} "
                  f"{100 * d['dead_frac']:>6.2f} {d['logit_agreement']:>8.3f} {d['logit_kl']:>8.4f}")


if __name__ == "__main__":
    sys.exit(main())
