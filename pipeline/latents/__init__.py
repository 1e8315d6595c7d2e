"""SAE latents over the dataset: the scan stage's math (per-image maxima, mergeable sketches)."""
from pipeline.latents.scan import (
    REDUCE_STAGE,
    STAGE,
    ScanOptions,
    ScanPlan,
    ScanUnit,
    plan_scan,
    reduce_sae,
    reduce_status,
    scan_unit,
)
from pipeline.latents.sketch import LatentSketch, Picks, priority, rank_within

__all__ = ["REDUCE_STAGE", "STAGE", "LatentSketch", "Picks", "ScanOptions", "ScanPlan",
           "ScanUnit", "plan_scan", "priority", "rank_within", "reduce_sae", "reduce_status",
           "scan_unit"]
