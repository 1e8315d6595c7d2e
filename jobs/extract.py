"""`concept-atlas extract`: PFVs of every shard, on Ray, resumable shard by shard.

Decoding runs as Ray tasks on CPUs (`decode_shard`, one per shard, ahead of the model); the
model runs in stateful actors (`ShardExtractor` in a `jobs.common.WorkerActor`, loaded once per
actor; one GPU each when the cluster has GPUs). Each shard becomes one part; the driver commits
its manifest record when the actor returns, so a killed driver loses only the parts in flight,
and a re-run skips committed parts. An actor that dies is restarted and its calls retried
(`max_restarts`, `max_task_retries`); parts are written under deterministic names, so a retried
part replaces its half-done files and nothing is duplicated.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from tqdm.auto import tqdm

from jobs.common import init_ray, local_device, run_actor_pool, run_in_process
from pipeline.data.errors import ErrorRecord
from pipeline.pfv.extract import (
    STAGE,
    ExtractConfig,
    ExtractPlan,
    PartTask,
    ShardExtractor,
    decode_shard,
    plan_extract,
)
from pipeline.pfv.parts import committed_parts, pfv_stats, read_values
from pipeline.store import AtlasRoot, Manifest, PartRecord, fs

STATS_ROWS = 200_000
OnPart = Callable[[PartRecord], None]


def run(cfg: ExtractConfig, shards: str | Sequence[str], out: str, *, atlas_id: str = "atlas",
        actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float | None = None,
        max_retries: int = 3, address: str | None = None, progress: bool = True,
        stats: bool = True, on_part: OnPart | None = None,
        in_process: bool = False) -> dict[str, Any]:
    """Extract the PFVs of `cfg.layers` from `shards` into `out`; returns the summary.

    Args:
        cfg: model, layers, positions, dtype (see ExtractConfig).
        shards: a shard spec for `expand_shards` (path, brace pattern, directory, URL, list).
        out: output root, a local path or fsspec URL.
        actors: model actors; cpus_per_actor / gpus_per_actor: their resources (GPUs default
            to 1 per actor when the cluster has GPUs, else 0).
        max_retries: restarts of a dead actor and retries of its calls.
        address: Ray cluster address (default `RAY_ADDRESS`, else a local instance).
        stats: add per-layer PFV statistics (from up to STATS_ROWS PFVs) to the summary.
        on_part: called with each record right after it is committed.
        in_process: run the parts one by one in this process, without Ray (debugging, small
            jobs, tests); the outputs are identical.

    Every check (shards exist, model, weights, layers, positions, output config) runs before
    Ray starts; bad samples go to the errors table; parts that fail are reported and left
    uncommitted for the next run.
    """
    t0 = time.time()
    plan = plan_extract(cfg, list(shards) if not isinstance(shards, str) else shards, out,
                        atlas_id)
    fs.remove_temporaries(out)
    print(f"[extract] {len(plan.shards)} shards -> {out}: {len(plan.done)} done, "
          f"{len(plan.pending)} to do; layers {', '.join(cfg.layers)}", flush=True)
    failed: dict[str, str] = {}
    if plan.pending:
        done = _Committer(plan, progress, on_part)
        if in_process:
            _run_in_process(plan, done)
        else:
            init_ray(address)
            _run_on_ray(plan, done, actors, cpus_per_actor, gpus_per_actor, max_retries)
        done.bar.close()
        failed = done.failed
    summary = summarize(plan, failed, time.time() - t0, stats)
    print_summary(summary)
    return summary


class _Committer:
    """Commits finished parts, records failed ones, and keeps the progress bar."""

    def __init__(self, plan: ExtractPlan, progress: bool, on_part: OnPart | None) -> None:
        self.plan, self.on_part = plan, on_part
        self.manifest, self.failed = Manifest(plan.out), {}
        self.images = self.parts = 0
        self.bar = tqdm(total=None, unit="img", desc="extract", disable=not progress,
                        smoothing=0.1)

    def ok(self, record: PartRecord) -> None:
        self.manifest.commit(record)
        self.images, self.parts = self.images + record.rows, self.parts + 1
        self.bar.total = round(self.images / self.parts * len(self.plan.pending))  # ETA
        self.bar.update(record.rows)
        if self.on_part is not None:
            self.on_part(record)

    def fail(self, task: PartTask, reason: str) -> None:
        self.failed[task.part] = _fail(self.plan, task, reason)


def _run_in_process(plan: ExtractPlan, done: _Committer) -> None:
    """Every pending part in this process, one after the other (no Ray)."""
    extractor = ShardExtractor(plan.cfg, plan.out, plan.atlas_id, device=local_device())
    run_in_process(lambda task: extractor.run(task, decode_shard(task.shard, plan.data_config)),
                   plan.pending, done.ok, done.fail)


def _run_on_ray(plan: ExtractPlan, done: _Committer, n_actors: int, cpus: float,
                gpus: float | None, max_retries: int) -> None:
    """Feed the pending parts to model actors, decoding ahead in CPU tasks."""
    decode = ray.remote(decode_shard).options(num_cpus=1, max_retries=max_retries)

    def call(actor: ray.actor.ActorHandle, task: PartTask) -> ray.ObjectRef:
        return actor.run.remote(task, decode.remote(task.shard, plan.data_config))

    run_actor_pool(ShardExtractor, (plan.cfg, plan.out, plan.atlas_id), plan.pending, done.ok,
                   done.fail, n_actors=n_actors, cpus=cpus, gpus=gpus, max_retries=max_retries,
                   role="model", call=call)


def _fail(plan: ExtractPlan, task: PartTask, reason: str) -> str:
    """Record a part that could not be computed in the errors table (it stays uncommitted)."""
    reason = reason.strip().splitlines()[-1][:2000] if reason.strip() else "unknown failure"
    AtlasRoot(plan.out).write_errors(STAGE, task.part, plan.atlas_id,
                 [ErrorRecord(stage=STAGE, shard=task.shard, key="", reason=reason)])
    print(f"[extract] {task.part} ({task.shard}) failed: {reason}", file=sys.stderr, flush=True)
    return reason


def summarize(plan: ExtractPlan, failed: dict[str, str], seconds: float,
              stats: bool) -> dict[str, Any]:
    """Totals over every committed part of this config, plus what this run did."""
    records = Manifest(plan.out).done(STAGE, plan.config_hash)
    new = [r for r in records.values() if r.part not in plan.done]
    images_new = sum(r.rows for r in new)
    busy = sum(r.finished - r.started for r in new)
    summary: dict[str, Any] = {
        "out": plan.out, "model": plan.cfg.model, "shards": len(plan.shards),
        "parts_done": len(records), "parts_skipped": len(plan.done), "parts_new": len(new),
        "parts_failed": failed, "images": sum(r.rows for r in records.values()),
        "errors": sum(r.errors for r in records.values()), "seconds": round(seconds, 2),
        "images_per_s": round(images_new / seconds, 2) if new and seconds > 0 else None,
        "actor_images_per_s": round(images_new / busy, 2) if busy > 0 else None,
        "layers": {},
    }
    for name, spec in plan.specs.items():
        rows = sum(r.outputs.get(f"pfv/layer={name}", 0) for r in records.values())
        layer: dict[str, Any] = {"pfvs": rows, "channels": spec.channels, "grid": list(spec.grid)}
        if stats and rows:
            layer.update(pfv_stats(read_values(committed_parts(plan.out, name), STATS_ROWS)),
                         pfvs=rows)
        summary["layers"][name] = layer
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['images_per_s']} img/s" if s["images_per_s"] else ""
    print(f"[extract] {s['images']} images in {s['parts_done']}/{s['shards']} parts "
          f"({s['parts_new']} new, {s['parts_skipped']} skipped, {len(s['parts_failed'])} failed), "
          f"{s['errors']} bad samples, {s['seconds']:.1f}s{rate}")
    print(f"{'layer':<12} {'grid':>7} {'C':>5} {'PFVs':>10} {'mean|v|':>8} {'zero%':>6} "
          f"{'active':>7} {'dead':>5}")
    for name, st in s["layers"].items():
        grid = f"{st['grid'][0]}x{st['grid'][1]}"
        if "mean_norm" in st:
            print(f"{name:<12} {grid:>7} {st['channels']:>5} {st['pfvs']:>10} "
                  f"{st['mean_norm']:>8.3f} {100 * st['zero_frac']:>6.1f} "
                  f"{st['active_channels_per_pfv']:>7.1f} {st['dead_channels']:>5}")
        else:
            print(f"{name:<12} {grid:>7} {st['channels']:>5} {st['pfvs']:>10}")
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.extract ARGS` is `concept-atlas extract ARGS`."""
    from pipeline.cli import main as cli_main

    return cli_main(["extract", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
