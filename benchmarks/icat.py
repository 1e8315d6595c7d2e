"""Benchmark ICAT edge scoring on an atlas: edges/s per layer pair and method, IG cost against
steps, and how the cost grows with downstream latents and images.

    python benchmarks/icat.py ATLAS                       # e.g. a copy of demo_out
    python benchmarks/icat.py ATLAS --images 4 --out benchmarks/results/icat_cpu.json

Read-only on the atlas. Every timing is one call of `ShardScorer.score_pair` on the same
preprocessed images, after one warm-up call, with both wall-clock and process CPU seconds
(CPU seconds are the fairer number on a shared machine). "edges" are the non-zero
(upstream latent or error node, downstream node) scores of the call, before aggregation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.icat.stage import ICATOptions, ShardScorer, plan_icat, sample_images  # noqa: E402
from pipeline.pfv.extract import decode_shard  # noqa: E402


def timed(scorer: ShardScorer, pair: tuple[str, str], pixels: torch.Tensor, labels: Any,
          rows_per_image: int | None) -> dict[str, Any]:
    """One scored call: seconds (wall, CPU), rows, non-zero edges."""
    w0, c0 = time.perf_counter(), time.process_time()
    res = scorer.score_pair(pair, pixels, labels, rows_per_image=rows_per_image)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    edges = sum(int((s.scores[m] != 0).sum()) for m, s in res.scores.items())
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows": int(len(res.image)),
            "edges": edges, "edges_per_cpu_s": round(edges / max(cpu, 1e-9), 1),
            "rows_per_cpu_s": round(len(res.image) / max(cpu, 1e-9), 2)}


def scorer_for(root: str, **options: Any) -> ShardScorer:
    return ShardScorer(plan_icat(root, ICATOptions(images_per_shard=None, **options), record=False))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="atlas root after extract and train-sae")
    p.add_argument("--images", type=int, default=4, help="images per timed call")
    p.add_argument("--rows", type=int, default=16, help="downstream nodes per image per call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    base = scorer_for(a.root)
    task = base.plan.tasks[0]
    decoded = decode_shard(task.shard, base.plan.data_config)
    take = sample_images(len(decoded.keys), max(8, a.images))
    all_pixels = torch.as_tensor(decoded.pixels[take])
    all_labels = decoded.labels[take]
    pixels, labels = all_pixels[:a.images], all_labels[:a.images]
    results: dict[str, Any] = {
        "root": a.root, "model": base.plan.extract.model, "images": a.images,
        "rows_per_image": a.rows, "threads": a.threads, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "saes": {k: v["sae_id"] for k, v in base.plan.saes.items()},
    }

    methods = {"ig@32": dict(methods=("ig",), steps=32), "grad_x_act+grad": dict(methods=("grad_x_act", "grad")),
               "srd": dict(methods=("srd",))}
    per_pair: dict[str, Any] = {}
    for pair in base.plan.pairs:
        for label, opts in methods.items():
            scorer = scorer_for(a.root, **opts)
            timed(scorer, pair, pixels[:1], labels[:1], 2)  # warm-up
            per_pair.setdefault(f"{pair[0]}->{pair[1]}", {})[label] = timed(
                scorer, pair, pixels, labels, a.rows)
            print(f"{pair[0]}->{pair[1]} {label}: {per_pair[f'{pair[0]}->{pair[1]}'][label]}", flush=True)
    results["per_pair"] = per_pair

    pair = base.plan.pairs[0]
    steps_cost = {}
    for steps in (8, 16, 32, 64):
        scorer = scorer_for(a.root, methods=("ig",), steps=steps)
        steps_cost[steps] = timed(scorer, pair, pixels, labels, a.rows)
        print(f"ig steps {steps}: {steps_cost[steps]}", flush=True)
    results["ig_steps"] = {"pair": f"{pair[0]}->{pair[1]}", "by_steps": steps_cost}

    scorer = scorer_for(a.root, methods=("ig",), steps=16)
    by_rows = {}
    for rows in (2, 8, 32, None):
        by_rows[str(rows or "all")] = timed(scorer, pair, pixels, labels, rows)
        print(f"ig@16 rows/image {rows or 'all'}: {by_rows[str(rows or 'all')]}", flush=True)
    by_images = {}
    for n in (1, 2, 4, 8):
        by_images[n] = timed(scorer, pair, all_pixels[:n], all_labels[:n], a.rows)
        print(f"ig@16 images {n}: {by_images[n]}", flush=True)
    results["ig16_scaling"] = {"pair": f"{pair[0]}->{pair[1]}", "by_rows_per_image": by_rows,
                               "by_images": by_images}
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
