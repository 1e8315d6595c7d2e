"""`python -m jobs.icat ROOT`: ICAT edges of an atlas, on Ray, resumable shard by shard.

Map: one Ray actor call per extracted shard (`ShardScorer` in a `jobs.common.WorkerActor`:
model, SAEs and segments loaded once per actor) scores a sample of its images for every layer
pair and writes the shard's partial edge sums; the driver commits each part's manifest record
when the call returns, so a killed driver loses only the parts in flight and a re-run skips
committed parts. Reduce: the driver sums the partials in DuckDB (out of core, under
`--reduce-memory`), keeps the top incoming edges per node and writes `edges/part-K.parquet` per
layer pair (pipeline.icat.stage).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from jobs.common import init_ray, local_device, run_actor_pool, run_in_process
from pipeline.icat.aggregate import REDUCE_MEMORY, check_memory_limit
from pipeline.icat.stage import (
    ALL_METHODS,
    MAP_STAGE,
    ICATOptions,
    MapTask,
    ShardScorer,
    plan_icat,
    reduce_edges,
)
from pipeline.store import Manifest, PartRecord, fs

OnPart = Callable[[PartRecord], None]


def run(root: str, options: ICATOptions | None = None, *, address: str | None = None,
        progress: bool = True, in_process: bool = False, actors: int = 1,
        cpus_per_actor: float = 0.5, gpus_per_actor: float | None = None, max_retries: int = 3,
        reduce_memory: str = REDUCE_MEMORY, on_part: OnPart | None = None) -> dict[str, Any]:
    """Compute the ICAT edges of the atlas at `root` (after extract and train-sae).

    Args:
        options: what to compute (ICATOptions; defaults: all four methods, 32 IG steps,
            16 images per shard, top 32 incoming edges per node).
        address: Ray cluster address (default `RAY_ADDRESS`, else a local instance).
        in_process: score the shards one by one in this process, without Ray (same outputs).
        actors, cpus_per_actor, gpus_per_actor: the actor pool (GPUs default to 1 per actor
            when the cluster has GPUs); max_retries: restarts of a dead actor and its calls.
        reduce_memory: DuckDB's memory limit for the reduce (e.g. "4GB"); past it, it spills.
        on_part: called with each map record right after it is committed (tests use it to
            simulate a crash).
    Returns the summary: pairs, parts done / new / failed, edges per pair, timings.
    """
    t0 = time.time()
    options = options or ICATOptions()
    check_memory_limit(reduce_memory)
    plan = plan_icat(root, options)
    fs.remove_temporaries(fs.join(root, "icat_partial"))
    fs.remove_temporaries(fs.join(root, "edges"))
    print(f"[icat] {len(plan.tasks)} shards of {root}: {len(plan.tasks) - len(plan.pending)} done, "
          f"{len(plan.pending)} to do; pairs "
          f"{', '.join(f'{a}->{b}' for a, b in plan.pairs)}; methods {', '.join(options.methods)}",
          flush=True)
    failed: dict[str, str] = {}
    bar = tqdm(total=len(plan.pending), unit="shard", desc="icat", disable=not progress)

    def commit(record: PartRecord) -> None:
        Manifest(root).commit(record)
        bar.update(1)
        if on_part is not None:
            on_part(record)

    def fail(task: MapTask, reason: str) -> None:
        failed[task.part] = reason

    if plan.pending:
        if in_process:
            scorer = ShardScorer(plan, local_device())
            run_in_process(scorer.run, plan.pending, commit, fail)
        else:
            init_ray(address)
            run_actor_pool(ShardScorer, (plan,), plan.pending, commit, fail, n_actors=actors,
                           cpus=cpus_per_actor, gpus=gpus_per_actor, max_retries=max_retries,
                           role="scorer")
    bar.close()
    t_map = time.time() - t0
    edges = reduce_edges(plan, reduce_memory) if not failed else {}
    done = Manifest(root).done(MAP_STAGE, plan.config_hash)
    new = [r for r in done.values() if r.part in {t.part for t in plan.pending}]
    busy = sum(r.finished - r.started for r in new)
    summary = {
        "root": root, "pairs": [f"{a}->{b}" for a, b in plan.pairs],
        "saes": {layer: row["sae_id"] for layer, row in plan.saes.items()},
        "methods": list(options.methods), "steps": options.steps,
        "parts_done": len(done), "parts_new": len(new), "parts_failed": failed,
        "images": sum(r.rows for r in done.values()),
        "edges": {f"{a}->{b}": edges.get(f"part-{k:06d}", 0) for k, (a, b) in enumerate(plan.pairs)},
        "map_seconds": round(t_map, 2), "seconds": round(time.time() - t0, 2),
        "images_per_s": round(sum(r.rows for r in new) / busy, 3) if busy > 0 else None,
    }
    for part, reason in failed.items():
        print(f"[icat] {part} failed: {reason}", file=sys.stderr, flush=True)
    if failed:
        print("[icat] edges not reduced: re-run to retry the failed shards", file=sys.stderr)
    print(f"[icat] {summary['images']} images in {len(done)}/{len(plan.tasks)} shards "
          f"({len(new)} new), edges per pair {summary['edges']}, {summary['seconds']:.1f}s",
          flush=True)
    return summary


def parse_args(argv: Sequence[str]) -> tuple[str, ICATOptions, dict[str, Any]]:
    """(root, options, run kwargs) from the command line."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.icat", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m jobs.icat demo_out --in-process --images-per-shard 4\n"
               "  python -m jobs.icat s3://bucket/atlas --methods ig grad_x_act --steps 16")
    d = ICATOptions()
    p.add_argument("root", help="atlas root after extract and train-sae (path or fsspec URL)")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(ALL_METHODS))
    p.add_argument("--steps", type=int, default=d.steps, help="ICAT-IG quadrature steps")
    p.add_argument("--rule", default=d.rule, choices=["gauss_legendre", "riemann"])
    p.add_argument("--scale-error", action="store_true",
                   help="scale the SAE error with alpha on the IG path (default: held fixed)")
    p.add_argument("--images-per-shard", type=int, default=d.images_per_shard,
                   help="images scored per shard; 0 = all")
    p.add_argument("--top-edges", type=int, default=d.top_edges)
    p.add_argument("--min-weight", type=float, default=d.min_weight)
    p.add_argument("--position", type=int, default=None,
                   help="read downstream latents at this SAE position (default: sum over positions)")
    p.add_argument("--layers", nargs="+", help="layers to connect (default: all with an SAE)")
    p.add_argument("--sae", action="append", default=[], metavar="LAYER=SAE_ID",
                   help="the SAE of a layer (default: lowest held-out FVU)")
    p.add_argument("--no-logits", action="store_true", help="no last layer -> logits pair")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--address", default=None)
    p.add_argument("--reduce-memory", default=REDUCE_MEMORY,
                   help="DuckDB memory limit of the reduce, e.g. 16GB (past it, it spills to disk)")
    p.add_argument("--in-process", action="store_true", help="no Ray; same outputs")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(list(argv))
    saes = dict(s.split("=", 1) for s in a.sae)
    options = ICATOptions(methods=tuple(a.methods), steps=a.steps, rule=a.rule,
                          scale_error=a.scale_error, images_per_shard=a.images_per_shard or None,
                          top_edges=a.top_edges, min_weight=a.min_weight, position=a.position,
                          saes=saes or None,
                          layers=tuple(a.layers) if a.layers else None, logits=not a.no_logits,
                          batch_size=a.batch_size)
    return a.root, options, dict(address=a.address, progress=not a.no_progress,
                                 in_process=a.in_process, actors=a.actors,
                                 cpus_per_actor=a.cpus_per_actor, reduce_memory=a.reduce_memory)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the stage, print the summary as JSON; exit 1 if a shard failed."""
    root, options, kwargs = parse_args(sys.argv[1:] if argv is None else argv)
    summary = run(root, options, **kwargs)
    print(json.dumps(summary, indent=2))
    return 1 if summary["parts_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
