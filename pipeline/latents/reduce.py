"""The scan's reduce: an SAE's part sketches merged into latent_stats and exemplar_picks.

When every part of an SAE is committed, its sketches (`scan_parts/sae=SAE_ID/*.npz`) are folded
(exact, in any order; see pipeline.latents.sketch) into

    latent_stats/sae=SAE_ID/part-000000.parquet    LATENT_STATS
    exemplar_picks/sae=SAE_ID/part-000000.parquet  EXEMPLAR_PICKS: "top" and "quantile" picks

and a record of stage `scan-reduce` (part SAE_ID) is committed, keyed by the part records it
read: the reduce re-runs (cheaply, with the same result) only when a part changed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.latents.scan import STAGE, Layout, ScanOptions, ScanUnit, path
from pipeline.latents.sketch import LatentSketch, Picks, rank_within
from pipeline.store import Manifest, PartRecord, config_hash, fs, now, worker_id
from schemas import EXEMPLAR_PICKS, LATENT_STATS

REDUCE_STAGE = "scan-reduce"


@dataclass(frozen=True)
class SAEScan:
    """One SAE of the scan and its units, one per committed PFV part of its layer."""

    sae_id: str
    layer: str
    n_latents: int
    layout: Layout
    units: list[ScanUnit]
    atlas_id: str

    def reduce_hash(self, records: dict[str, PartRecord]) -> str:
        """Identifies the committed part records a reduce read (all units must be in it)."""
        return config_hash({"parts": [(u.name, records[u.name].config_hash,
                                       records[u.name].input_fingerprint) for u in self.units]})


def merge_sketches(urls: list[str], options: ScanOptions) -> LatentSketch:
    """Fold the part sketches at `urls` in order (exact in any order; memory: two sketches)."""
    merged = LatentSketch.load(urls[0])
    for url in urls[1:]:
        merged = merged.merge(LatentSketch.load(url), options.n_top, options.sample_size,
                              options.seed, options.per_source)
    return merged


def quantile_picks(sample: Picks, top: Picks, n_quantile: int) -> tuple[Picks, np.ndarray]:
    """The "quantile" exemplars of every latent and their ranks (0 = strongest).

    [choice] Picks are spread evenly over the activation distribution *below the top picks*:
    a latent's sample (uniform over the images where it fires) loses the images already among
    its top picks (no exemplar, and no iERF, is computed twice), the rest is sorted by
    activation (ties: image_id), and with m images left the picks are the order statistics
    floor((j + 1/2)·m / n_quantile), j = 0..n_quantile-1: the midpoints of n_quantile
    equal-probability strata. With m < n_quantile every remaining image is a pick. A latent
    firing on no more images than its top picks has no quantile pick.
    """
    in_top = _also_in(sample, top)
    rest = sample.take(np.flatnonzero(~in_top))
    order, rank = rank_within(rest.latent, rest.activation, rest.image_id)
    rest = rest.take(order)
    starts = np.flatnonzero(rank == 0)
    sizes = np.diff(np.r_[starts, len(rest)])
    # midpoint order statistics of every latent at once; duplicates only when m < n_quantile,
    # where they cover every rank 0..m-1
    j = np.arange(n_quantile) + 0.5
    chosen = np.unique((starts[:, None] + np.floor(j[None, :] * sizes[:, None] / n_quantile))
                       .astype(np.int64).ravel())
    picked = rest.take(chosen)
    order, ascending = rank_within(picked.latent, picked.activation, picked.image_id)
    per_latent = np.bincount(picked.latent[order]).astype(np.int64)
    ranks = per_latent[picked.latent[order]] - 1 - ascending
    return picked.take(order), ranks


def _also_in(a: Picks, b: Picks) -> np.ndarray:
    """bool [len(a)]: whether each (latent, image) pair of `a` is also in `b`.

    Pairs are unique within each side, so a pair seen twice in the union is in both.
    """
    latent, image = np.r_[a.latent, b.latent], np.r_[a.image_id, b.image_id]
    order = np.lexsort((image, latent))
    same = (latent[order][1:] == latent[order][:-1]) & (image[order][1:] == image[order][:-1])
    twice = np.zeros(len(latent), bool)
    twice[order[1:][same]] = twice[order[:-1][same]] = True
    return twice[:len(a)]


def reduce_sae(root: str, sae: SAEScan, options: ScanOptions) -> PartRecord:
    """Merge the part sketches of `sae`, write latent_stats and exemplar_picks, commit."""
    started = now()
    records = Manifest(root).records(STAGE)
    missing = [u.name for u in sae.units if u.name not in records]
    if missing:
        raise ValueError(f"{sae.sae_id}: parts {missing} are not scanned yet; cannot reduce")
    merged = merge_sketches([path(root, "scan_parts", sae.sae_id, u.pfv.part, ".npz")
                             for u in sae.units], options)
    stats = latent_stats_table(merged, sae)
    order, top_rank = rank_within(merged.top.latent, -merged.top.activation,
                                  merged.top.image_id)
    top = merged.top.take(order)
    quantile, quantile_rank = quantile_picks(merged.sample, top, options.n_quantile)
    picks = pa.concat_tables([
        picks_table(top, top_rank, "top", sae),
        picks_table(quantile, quantile_rank, "quantile", sae)])
    fs.write_parquet(stats, path(root, "latent_stats", sae.sae_id, "part-000000"), LATENT_STATS)
    fs.write_parquet(picks, path(root, "exemplar_picks", sae.sae_id, "part-000000"),
                     EXEMPLAR_PICKS)
    record = PartRecord(
        stage=REDUCE_STAGE, part=sae.sae_id, input=sae.layer,
        input_fingerprint=sae.reduce_hash(records), config_hash=sae.reduce_hash(records),
        rows=sae.n_latents,
        outputs={f"latent_stats/sae={sae.sae_id}": stats.num_rows,
                 f"exemplar_picks/sae={sae.sae_id}": picks.num_rows},
        worker=worker_id(), started=started, finished=now())
    Manifest(root).commit(record)
    return record


def latent_stats_table(sketch: LatentSketch, sae: SAEScan) -> pa.Table:
    """LATENT_STATS rows of every latent of `sae` from its merged sketch."""
    n = len(sketch.count)
    fired = sketch.count > 0
    mean = np.divide(sketch.total, sketch.count, out=np.zeros(n), where=fired)
    return pa.table({
        "atlas_id": [sae.atlas_id] * n, "layer": [sae.layer] * n, "sae_id": [sae.sae_id] * n,
        "latent": np.arange(n, dtype=np.int32),
        "freq": sketch.count / max(1, sketch.n_pfvs),
        "image_freq": sketch.images / max(1, sketch.n_images),
        "mean_act": mean, "max_act": sketch.peak.astype(np.float64), "dead": ~fired,
        "n_pfvs": np.full(n, sketch.n_pfvs, np.int64),
        "n_images": np.full(n, sketch.n_images, np.int64),
    }, schema=LATENT_STATS)


def picks_table(picks: Picks, rank: np.ndarray, kind: str, sae: SAEScan) -> pa.Table:
    """EXEMPLAR_PICKS rows of one kind ("top" or "quantile")."""
    n = len(picks)
    y, x = sae.layout.cells(picks.position)
    return pa.table({
        "atlas_id": [sae.atlas_id] * n, "layer": [sae.layer] * n, "sae_id": [sae.sae_id] * n,
        "latent": picks.latent, "kind": [kind] * n, "rank": rank.astype(np.int32),
        "image_id": picks.image_id, "activation": picks.activation,
        "position": picks.position, "y": y, "x": x, "source_group": picks.group,
    }, schema=EXEMPLAR_PICKS)
