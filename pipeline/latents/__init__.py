"""SAE latents over the dataset: the scan stage (per-image maxima, mergeable sketches, reduce).

Modules: `sketch` (mergeable per-latent summaries), `scan` (one SAE over one PFV part: what a
worker runs), `reduce` (an SAE's sketches -> latent_stats, exemplar_picks), `plan` (units and
commit status; driver side, imported on demand because it loads the model stack).
"""
from pipeline.latents.scan import STAGE, ScanOptions, ScanUnit, scan_unit
from pipeline.latents.sketch import LatentSketch, Picks, priority, rank_within

__all__ = ["STAGE", "LatentSketch", "Picks", "ScanOptions", "ScanUnit", "priority",
           "rank_within", "scan_unit"]
