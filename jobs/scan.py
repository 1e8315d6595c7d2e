"""`scan`: SAE latents over every stored PFV, on Ray, resumable part by part.

Each (SAE, PFV part) is one Ray task (`pipeline.latents.scan.scan_unit`): it encodes the part,
writes the part's `activations` rows and its per-latent sketch under deterministic names, and
returns the manifest record, which the driver commits. A killed task is retried by Ray
(`max_retries`) and rewrites the same files; a killed driver loses only the tasks in flight,
and a re-run skips every committed part. When all parts of an SAE are committed, the driver
runs its reduce (merge of the sketches -> `latent_stats`, `exemplar_picks`): cheap, exact,
and re-run only when a part changed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

from jobs.common import init_ray, local_device, run_in_flight, run_in_process
from pipeline.data.errors import ErrorRecord
from pipeline.latents.plan import ScanPlan, plan_scan, reduce_status, summary_rows
from pipeline.latents.reduce import reduce_sae
from pipeline.latents.scan import FOLDERS, STAGE, ScanOptions, ScanUnit, scan_task, scan_unit
from pipeline.store import AtlasRoot, Manifest, PartRecord, fs

OnPart = Callable[[PartRecord], None]


def run(root: str, options: ScanOptions | None = None, *, address: str | None = None,
        progress: bool = True, in_process: bool = False, sae_ids: Sequence[str] | None = None,
        on_part: OnPart | None = None) -> dict[str, Any]:
    """Scan every committed SAE under `root` over the PFVs of its layer; returns the summary.

    Args:
        root: the build's output root (local path or fsspec URL) holding PFVs and SAEs.
        options: what to keep and how to run (see ScanOptions; defaults when None).
        address: Ray cluster address (default `RAY_ADDRESS`, else a local instance).
        in_process: scan the units one by one in this process, without Ray (debugging, small
            jobs, tests); the outputs are identical.
        sae_ids: scan only these SAEs (default: all).
        on_part: called with each record right after it is committed (tests of crashes).

    Options other than those the outputs under `root` were built with are refused before any
    work. Units that fail are reported in the summary and stay uncommitted for the next run;
    their SAE is not reduced.
    """
    t0 = time.time()
    options = options or ScanOptions()
    root = root if "://" in root else os.path.abspath(root)
    plan = plan_scan(root, options, list(sae_ids) if sae_ids is not None else None)
    for folder in FOLDERS:
        fs.remove_temporaries(fs.join(root, folder))
    print(f"[scan] {len(plan.saes)} SAEs x their layer's PFV parts under {root}: "
          f"{plan.skipped} done, {len(plan.pending)} to do", flush=True)
    failed: dict[str, str] = {}
    if plan.pending:
        committer = _Committer(plan, progress, on_part)
        if in_process:
            _run_in_process(plan, committer)
        else:
            init_ray(address)
            _run_on_ray(plan, committer)
        committer.bar.close()
        failed = committer.failed
    todo, incomplete = reduce_status(plan)
    for sae in todo:
        reduce_sae(plan.root, sae, options)
    summary = summarize(plan, failed, [s.sae_id for s in todo],
                        [s.sae_id for s in incomplete], time.time() - t0)
    print_summary(summary)
    return summary


class _Committer:
    """Commits finished units, records failed ones (summary and `errors` table), keeps the
    progress bar. Each unit's errors part is written either way, so a part that failed once
    and then succeeded leaves no stale error behind."""

    def __init__(self, plan: ScanPlan, progress: bool, on_part: OnPart | None) -> None:
        self.plan, self.manifest, self.on_part, self.failed = plan, Manifest(plan.root), on_part, {}
        self.bar = tqdm(total=len(plan.pending), unit="part", desc="scan",
                        disable=not progress, smoothing=0.1)
        self.pfvs, self.rows = 0, {u.name: u.pfv.rows for u in plan.pending}

    def ok(self, record: PartRecord) -> None:
        AtlasRoot(self.plan.root).write_errors(STAGE, record.part, self.plan.atlas_id, [])
        self.manifest.commit(record)
        self.pfvs += self.rows[record.part]
        self.bar.set_postfix(pfvs=self.pfvs, refresh=False)
        self.bar.update(1)
        if self.on_part is not None:
            self.on_part(record)

    def fail(self, unit: ScanUnit, reason: str) -> None:
        reason = reason.strip().splitlines()[-1][:2000] if reason.strip() else "unknown failure"
        self.failed[unit.name] = reason
        AtlasRoot(self.plan.root).write_errors(STAGE, unit.name, self.plan.atlas_id,
                     [ErrorRecord(stage=STAGE, shard=unit.pfv.values, key="", reason=reason)])
        print(f"[scan] {unit.name} failed: {reason}", file=sys.stderr, flush=True)


def _run_in_process(plan: ScanPlan, done: _Committer) -> None:
    # as many torch threads as a Ray task would get (this process's setting stays changed)
    torch.set_num_threads(max(1, int(plan.options.cpus_per_task)))
    device = local_device()
    run_in_process(lambda unit: scan_unit(unit, plan.options, plan.root, device), plan.pending,
                   done.ok, done.fail)


def _run_on_ray(plan: ScanPlan, done: _Committer) -> None:
    """Submit the units as Ray tasks, a bounded number at a time, committing as they finish."""
    opts = plan.options
    # workers import only pipeline.latents.scan (no model stack): they start in seconds
    task = ray.remote(scan_task).options(num_cpus=opts.cpus_per_task, num_gpus=opts.gpus_per_task,
                                     max_retries=opts.max_retries)
    resources = ray.cluster_resources()
    # a slot is what one task may use; a few tasks in flight per slot keep the workers busy
    # without queueing every part
    slots = int(resources.get("CPU", 1) / opts.cpus_per_task)
    if opts.gpus_per_task > 0:
        slots = min(slots, int(resources.get("GPU", 0) / opts.gpus_per_task))
    options_ref = ray.put(opts)
    run_in_flight(plan.pending, lambda _, unit: task.remote(unit, options_ref, plan.root),
                  done.ok, done.fail, slots=max(1, slots))


def summarize(plan: ScanPlan, failed: dict[str, str], reduced: list[str],
              incomplete: list[str], seconds: float) -> dict[str, Any]:
    """Totals over the committed parts, what this run did, and per-SAE results."""
    records = Manifest(plan.root).records(STAGE)
    units = [u for u in plan.pending if u.name in records and u.name not in failed]
    new = [records[u.name] for u in units]
    pfvs_new = sum(u.pfv.rows for u in units)
    busy = sum(r.finished - r.started for r in new)
    return {
        "root": plan.root, "saes": summary_rows(plan),
        "parts": sum(len(s.units) for s in plan.saes),
        "parts_new": len(new), "parts_skipped": plan.skipped, "parts_failed": failed,
        "images_new": sum(r.rows for r in new), "pfvs_new": pfvs_new,
        "seconds": round(seconds, 2),
        "pfvs_per_s": round(pfvs_new / seconds, 1) if new and seconds > 0 else None,
        "task_pfvs_per_s": round(pfvs_new / busy, 1) if busy > 0 else None,
        "reduced": reduced, "incomplete": incomplete,
    }


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['pfvs_per_s']:.0f} PFVs/s" if s["pfvs_per_s"] else ""
    print(f"[scan] {s['parts_new']} parts scanned ({s['images_new']} images, {s['pfvs_new']} "
          f"PFVs), {s['parts_skipped']} skipped, {len(s['parts_failed'])} failed, "
          f"{len(s['reduced'])} SAEs reduced in {s['seconds']:.1f}s{rate}")
    print(f"{'sae_id':<28} {'layer':<10} {'latents':>7} {'images':>8} {'PFVs':>10} {'dead':>6}")
    for sae_id, r in s["saes"].items():
        cells = [r[k] if r[k] is not None else "-" for k in ("images", "pfvs", "dead")]
        print(f"{sae_id:<28} {r['layer']:<10} {r['n_latents']:>7} {cells[0]:>8} {cells[1]:>10} "
              f"{cells[2]:>6}")
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")
    if s["incomplete"]:
        print(f"  not reduced (parts missing; re-run scan): {', '.join(s['incomplete'])}")


_HELP = {
    "top_per_image": "latents kept per image in `activations`",
    "n_top": "'top' exemplar picks per latent",
    "n_quantile": "'quantile' exemplar picks per latent",
    "sample_size": "per-latent sample of firing images the quantile picks come from",
    "seed": "seed of that sample",
    "batch_pfvs": "PFVs encoded at once (memory ~ batch_pfvs x n_latents x 4 bytes)",
    "max_retries": "Ray retries of a part whose worker died",
    "cpus_per_task": "Ray CPUs per part (and torch threads)",
    "gpus_per_task": "Ray GPUs per part (> 0: encode on CUDA)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scan command's arguments (for `concept-atlas scan` and `python -m jobs.scan`)."""
    defaults = ScanOptions()
    parser.add_argument("--out", required=True, help="build output root (local path or URL)")
    parser.add_argument("--sae", nargs="+", dest="sae_ids", help="only these sae_ids")
    for name, help_ in _HELP.items():
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"{help_} (default {value})")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--in-process", action="store_true", help="no Ray: one part at a time")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.scan --out ROOT [options]`."""
    parser = argparse.ArgumentParser(
        prog="scan", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m jobs.scan --out demo_out\n"
               "  python -m jobs.scan --out demo_out --sae layer4-topk-512-k16 --in-process\n"
               "  python -m jobs.scan --out s3://b/atlas --address auto --gpus-per-task 0.25")
    add_arguments(parser)
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = ScanOptions(**{k: getattr(a, k) for k in _HELP})
    except ValueError as exc:
        parser.error(str(exc))
    summary = run(a.out, options, address=a.address, progress=not a.no_progress,
                  in_process=a.in_process, sae_ids=a.sae_ids)
    return 1 if summary["parts_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
