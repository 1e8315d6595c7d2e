"""`concept-atlas extract`: PFVs of every shard, on Ray, resumable shard by shard.

Decoding runs as Ray tasks on CPUs (`decode_shard`, one per shard, ahead of the model); the
model runs in stateful actors (`ShardExtractor`, loaded once per actor; one GPU each when the
cluster has GPUs). Each shard becomes one part (`jobs.parts.run_parts` commits it as it returns).
"""
from __future__ import annotations

import time
from typing import Any

from jobs.parts import Actors, OnPart, Progress, run_parts
from pipeline.pfv.extract import (
    STAGE,
    ExtractOptions,
    ShardExtractor,
    decode_shard,
    plan_extract,
    print_summary,
    summarize,
)
from pipeline.store import AtlasRoot, fs


def run(root: AtlasRoot | str, options: ExtractOptions, *, address: str | None = None,
        progress: bool = True, stats: bool = True, on_part: OnPart | None = None
        ) -> dict[str, Any]:
    """Extract the PFVs of `options.layers` from `options.shards` into `root`; the summary.

    Every check (shards exist, model, weights, layers, positions, output config) runs before
    Ray starts; bad samples go to the errors table; parts that fail are reported and left
    uncommitted for the next run. `stats`: per-layer PFV statistics in the summary;
    `on_part`: called with each record right after it is committed.
    """
    t0 = time.time()
    root = AtlasRoot.of(root)
    plan = plan_extract(root, options)
    fs.remove_temporaries(root.url)
    print(f"[extract] {len(plan.shards)} shards -> {root}: {len(plan.done)} done, "
          f"{len(plan.pending)} to do; layers {', '.join(options.layers)}", flush=True)
    data_config = plan.data_config
    failed = run_parts(
        STAGE, root, options.atlas_id, plan.pending,
        Actors(ShardExtractor, (options, root.url), role="model",
               prepare=lambda task: (decode_shard, (task.shard, data_config))),
        options, progress=Progress("img", None), show=progress, address=address,
        on_part=on_part)
    summary = summarize(plan, failed, time.time() - t0, stats)
    print_summary(summary)
    return summary
