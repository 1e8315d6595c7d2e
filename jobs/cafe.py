"""`concept-atlas cafe`: CAFE exemplars (latent iERF masks + faithfulness) on Ray, part by part.

Each image part with picks is one task for a stateful actor (`CafeWorker`: model and SAEs
loaded once; one GPU each when the cluster has GPUs). The actor reads the part's shard once,
decodes only the picked images and writes `exemplars/part-NNNNNN.parquet`; `jobs.parts.run_parts`
commits each part as it returns.
"""
from __future__ import annotations

import time
from typing import Any

from jobs.parts import Actors, OnPart, Progress, run_parts
from pipeline.cafe.stage import STAGE, CafeOptions, CafeWorker, plan_cafe, print_summary, summarize
from pipeline.store import AtlasRoot, fs


def run(root: AtlasRoot | str, options: CafeOptions | None = None, *,
        address: str | None = None, progress: bool = True,
        on_part: OnPart | None = None) -> dict[str, Any]:
    """Explain every exemplar pick under `root` into the `exemplars` table; returns the summary.

    `root` holds an extraction, SAEs and `exemplar_picks/` (the scan's). On a 2-CPU machine use
    cpus_per_actor=0.5 per actor.
    """
    t0 = time.time()
    options = options or CafeOptions()
    root = AtlasRoot.of(root)
    plan = plan_cafe(root, options)
    fs.remove_temporaries(root.join("exemplars"))
    print(f"[cafe] {plan.picks} picks in {len(plan.pending) + len(plan.done)} image parts -> "
          f"{root}/exemplars: {len(plan.done)} done, {len(plan.pending)} to do", flush=True)
    failed = run_parts(STAGE, root, plan.context.atlas_id, plan.pending,
                       Actors(CafeWorker, (plan.context,), role="cafe"), options,
                       progress=Progress("exemplar", sum(t.picks.num_rows for t in plan.pending)),
                       show=progress, address=address, on_part=on_part)
    summary = summarize(plan, failed, time.time() - t0)
    print_summary(summary)
    return summary
