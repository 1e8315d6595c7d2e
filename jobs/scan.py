"""`concept-atlas scan`: SAE latents over every stored PFV, on Ray, resumable part by part.

Each (SAE, PFV part) is one Ray task (`pipeline.latents.scan.scan_task`): it encodes the part,
writes the part's `activations` rows and its per-latent sketch under deterministic names and
returns the manifest record, which `jobs.parts.run_parts` commits. When all parts of an SAE are
committed, the driver runs its reduce (merge of the sketches -> `latent_stats`,
`exemplar_picks`): cheap, exact, and re-run only when a part changed.
"""
from __future__ import annotations

import time
from typing import Any

from jobs.parts import OnPart, Progress, Tasks, run_parts
from pipeline.latents.plan import plan_scan, print_summary, reduce_status, summarize
from pipeline.latents.reduce import reduce_sae
from pipeline.latents.scan import FOLDERS, STAGE, ScanOptions, scan_task
from pipeline.store import AtlasRoot, fs


def run(root: AtlasRoot | str, options: ScanOptions | None = None, *,
        address: str | None = None, progress: bool = True,
        on_part: OnPart | None = None) -> dict[str, Any]:
    """Scan every committed SAE under `root` (or only `options.saes`) over the PFVs of its layer.

    Options other than those the outputs under `root` were built with are refused before any
    work. Units that fail are reported in the summary and stay uncommitted for the next run;
    their SAE is not reduced. Returns the summary.
    """
    t0 = time.time()
    options = options or ScanOptions()
    root = AtlasRoot.of(root)
    plan = plan_scan(root, options)
    for folder in FOLDERS:
        fs.remove_temporaries(root.join(folder))
    print(f"[scan] {len(plan.saes)} SAEs x their layer's PFV parts under {root}: "
          f"{plan.skipped} done, {len(plan.pending)} to do", flush=True)
    rows = {u.name: u.pfv.rows for u in plan.pending}
    failed = run_parts(STAGE, root, plan.atlas_id, plan.pending,
                       Tasks(scan_task, (options, root.url)), options,
                       progress=Progress("part", len(plan.pending), count=lambda r: 1,
                                         extra=("pfvs", lambda r: rows[r.part])),
                       show=progress, address=address, on_part=on_part)
    todo, incomplete = reduce_status(plan)
    for sae in todo:
        reduce_sae(plan.root, sae, options)
    summary = summarize(plan, failed, [s.sae_id for s in todo], [s.sae_id for s in incomplete],
                        time.time() - t0)
    print_summary(summary)
    return summary
