"""`python -m jobs.cafe`: CAFE exemplars (latent iERF masks + faithfulness) on Ray, part by part.

Each image part with picks is one task for a stateful actor (`CafeWorker` in a
`jobs.common.WorkerActor`: model and SAEs loaded once; one GPU each when the cluster has GPUs).
The actor reads the part's shard once, decodes only the picked images and writes
`exemplars/part-NNNNNN.parquet`; the driver commits the manifest record when the actor returns,
so a killed driver loses only the parts in flight and a re-run skips committed parts. Dead
actors are restarted and their calls retried; part names are deterministic, so a retried part
replaces its half-done files and nothing is duplicated.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from tqdm.auto import tqdm

from jobs.common import init_ray, local_device, run_actor_pool, run_in_process
from pipeline.cafe.stage import (
    STAGE,
    CafeOptions,
    CafePlan,
    CafeTask,
    CafeWorker,
    plan_cafe,
)
from pipeline.data.errors import ErrorRecord
from pipeline.store import AtlasRoot, Manifest, PartRecord, fs

OnPart = Callable[[PartRecord], None]
AUC_COLUMNS = tuple(f"{m}_auc_{o}" for o in ("ierf", "act", "random") for m in ("ins", "del"))


def run(root: str, options: CafeOptions | None = None, *, atlas_id: str | None = None,
        actors: int = 1, cpus_per_actor: float = 1.0, gpus_per_actor: float | None = None,
        max_retries: int = 3, address: str | None = None, progress: bool = True,
        on_part: OnPart | None = None, in_process: bool = False) -> dict[str, Any]:
    """Explain every exemplar pick under `root` into the `exemplars` table; returns the summary.

    Args:
        root: an atlas root holding an extraction, SAEs and `exemplar_picks/` (path or URL).
        options: masks, faithfulness and batch sizes (CafeOptions defaults when None).
        atlas_id: defaults to the extraction's.
        actors, cpus_per_actor, gpus_per_actor: the actor pool (GPUs default to 1 per actor
            when the cluster has GPUs, else 0). On a 2-CPU machine use cpus_per_actor=0.5.
        max_retries: restarts of a dead actor and retries of its calls.
        address: Ray cluster address (default `RAY_ADDRESS`, else a local instance).
        on_part: called with each record right after it is committed.
        in_process: run the parts one by one in this process, without Ray (the same rows).
    """
    t0 = time.time()
    options = options or CafeOptions()
    plan = plan_cafe(root, options, atlas_id)
    fs.remove_temporaries(fs.join(root, "exemplars"))
    print(f"[cafe] {plan.picks} picks in {len(plan.pending) + len(plan.done)} image parts -> "
          f"{root}/exemplars: {len(plan.done)} done, {len(plan.pending)} to do", flush=True)
    committer = _Committer(plan, progress, on_part)
    if plan.pending:
        if in_process:
            _run_in_process(plan, committer)
        else:
            init_ray(address)
            _run_on_ray(plan, committer, actors, cpus_per_actor, gpus_per_actor, max_retries)
    committer.bar.close()
    summary = summarize(plan, committer.failed, time.time() - t0)
    print_summary(summary)
    return summary


class _Committer:
    """Commits finished parts, records failed ones, and keeps the progress bar (exemplars)."""

    def __init__(self, plan: CafePlan, progress: bool, on_part: OnPart | None) -> None:
        self.plan, self.on_part = plan, on_part
        self.manifest, self.failed = Manifest(plan.context.root), {}
        self.bar = tqdm(total=sum(t.picks.num_rows for t in plan.pending), unit="exemplar",
                        desc="cafe", disable=not progress or not plan.pending, smoothing=0.1)

    def ok(self, record: PartRecord) -> None:
        self.manifest.commit(record)
        self.bar.update(record.rows)
        if self.on_part is not None:
            self.on_part(record)

    def fail(self, task: CafeTask, reason: str) -> None:
        reason = reason.strip().splitlines()[-1][:2000] if reason.strip() else "unknown failure"
        ctx = self.plan.context
        AtlasRoot(ctx.root).write_errors(STAGE, task.part, ctx.atlas_id,
                     [ErrorRecord(stage=STAGE, shard=task.shard, key="", reason=reason)])
        print(f"[cafe] {task.part} ({task.shard}) failed: {reason}", file=sys.stderr, flush=True)
        self.failed[task.part] = reason


def _run_in_process(plan: CafePlan, committer: _Committer) -> None:
    worker = CafeWorker(plan.context, local_device())
    run_in_process(worker.run, plan.pending, committer.ok, committer.fail)


def _run_on_ray(plan: CafePlan, committer: _Committer, n_actors: int, cpus: float,
                gpus: float | None, max_retries: int) -> None:
    # the context (picks, SAE paths) goes to the object store once, not once per actor
    run_actor_pool(CafeWorker, (ray.put(plan.context),), plan.pending, committer.ok,
                   committer.fail, n_actors=n_actors, cpus=cpus, gpus=gpus,
                   max_retries=max_retries, role="cafe")


def summarize(plan: CafePlan, failed: dict[str, str], seconds: float) -> dict[str, Any]:
    """Totals over every committed part of this config, what this run did, and mean scores."""
    root = plan.context.root
    records = Manifest(root).done(STAGE, plan.config_hash)
    new = [r for r in records.values() if r.part not in plan.done]
    rows_new = sum(r.rows for r in new)
    busy = sum(r.finished - r.started for r in new)
    summary: dict[str, Any] = {
        "root": root, "parts_done": len(records), "parts_skipped": len(plan.done),
        "parts_new": len(new), "parts_failed": failed,
        "exemplars": sum(r.rows for r in records.values()),
        "errors": sum(r.errors for r in records.values()), "seconds": round(seconds, 2),
        "exemplars_per_s": round(rows_new / seconds, 2) if new and seconds > 0 else None,
        "worker_exemplars_per_s": round(rows_new / busy, 2) if busy > 0 else None,
    }
    urls = [fs.join(root, "exemplars", f"{p}.parquet") for p in sorted(records)]
    if urls:
        cols = ["mask_frac", "act_overlap", "ierf_constant", *AUC_COLUMNS, "gt_iou_ierf",
                "gt_iou_act"]
        table = pa.concat_tables(fs.read_parquet(u, columns=cols) for u in urls)
        summary["means"] = {c: _mean(table[c]) for c in cols}
        summary["faithfulness_rows"] = table.num_rows - table["ins_auc_ierf"].null_count
        summary["gt_matched_rows"] = table.num_rows - table["gt_iou_ierf"].null_count
    return summary


def _mean(column: Any) -> float | None:
    value = pc.mean(column).as_py()
    return None if value is None else round(float(value), 4)


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['exemplars_per_s']} exemplars/s" if s["exemplars_per_s"] else ""
    print(f"[cafe] {s['exemplars']} exemplars in {s['parts_done']} parts ({s['parts_new']} new, "
          f"{s['parts_skipped']} skipped, {len(s['parts_failed'])} failed), {s['errors']} errors, "
          f"{s['seconds']:.1f}s{rate}")
    means = s.get("means", {})
    if means:
        print("  means: " + ", ".join(f"{k} {v}" for k, v in means.items() if v is not None))
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.cafe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="CAFE exemplars: latent iERF masks, faithfulness AUCs and ground-truth IoU "
                    "of every exemplar pick (resumable, on Ray).",
        epilog="examples:\n"
               "  python -m jobs.cafe --out demo_out\n"
               "  python -m jobs.cafe --out atlas/ --faithfulness-per-latent 0 --in-process\n"
               "  python -m jobs.cafe --out s3://b/atlas --address auto --actors 8")
    p.add_argument("--out", required=True, help="the atlas root (extraction + SAEs + picks)")
    p.add_argument("--atlas-id", default=None, help="default: the extraction's atlas_id")
    for f in fields(CafeOptions):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--actors", type=int, default=1, help="model actors (default 1)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="(default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS or local)")
    p.add_argument("--in-process", action="store_true", help="no Ray: parts one by one here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.cafe ARGS`; the lead wires it into the `concept-atlas` CLI."""
    a = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = CafeOptions(**{f.name: getattr(a, f.name) for f in fields(CafeOptions)})
    run(a.out, options, atlas_id=a.atlas_id, actors=a.actors, cpus_per_actor=a.cpus_per_actor,
        gpus_per_actor=a.gpus_per_actor, address=a.address, progress=not a.no_progress,
        in_process=a.in_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
