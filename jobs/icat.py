"""`concept-atlas icat`: ICAT edges of an atlas, on Ray, resumable shard by shard.

Map: one actor call per extracted shard (`ShardScorer`: model, SAEs and segments loaded once
per actor) scores a sample of its images for every layer pair and writes the shard's partial
edge sums; `jobs.parts.run_parts` commits each part as it returns. Reduce: the driver sums the
partials in DuckDB (out of core, under `reduce_memory`), keeps the top incoming edges per node
and writes `edges/part-K.parquet` per layer pair (pipeline.icat.stage).
"""
from __future__ import annotations

import time
from typing import Any

from jobs.parts import Actors, OnPart, Progress, run_parts
from pipeline.icat.stage import (
    MAP_STAGE,
    ICATOptions,
    ShardScorer,
    plan_icat,
    print_summary,
    reduce_edges,
    summarize,
)
from pipeline.store import AtlasRoot, fs


def run(root: AtlasRoot | str, options: ICATOptions | None = None, *,
        address: str | None = None, progress: bool = True,
        on_part: OnPart | None = None) -> dict[str, Any]:
    """Compute the ICAT edges of the atlas at `root` (after extract and train-sae).

    Returns the summary: pairs, parts done / new / failed, edges per pair, timings. The edges
    are reduced only when every shard was scored.
    """
    t0 = time.time()
    options = options or ICATOptions()
    root = AtlasRoot.of(root)
    plan = plan_icat(root, options)
    fs.remove_temporaries(root.join("icat_partial"))
    fs.remove_temporaries(root.join("edges"))
    print(f"[icat] {len(plan.tasks)} shards of {root}: {len(plan.tasks) - len(plan.pending)} "
          f"done, {len(plan.pending)} to do; pairs "
          f"{', '.join(f'{a}->{b}' for a, b in plan.pairs)}; methods {', '.join(options.methods)}",
          flush=True)
    failed = run_parts(MAP_STAGE, root, plan.atlas_id, plan.pending,
                       Actors(ShardScorer, (plan,), role="scorer"), options,
                       progress=Progress("shard", len(plan.pending), count=lambda r: 1),
                       show=progress, address=address, on_part=on_part)
    map_seconds = time.time() - t0
    edges = reduce_edges(plan, options.reduce_memory) if not failed else {}
    summary = summarize(plan, failed, edges, map_seconds, time.time() - t0)
    print_summary(summary)
    return summary
