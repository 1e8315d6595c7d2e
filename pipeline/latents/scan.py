"""The scan stage, Ray-free: SAE latents over every stored PFV (METHOD.md sections 5 and 6).

One unit of work is (SAE, PFV part): the part's PFVs are encoded by the SAE in batches of
whole images, and for each image every latent's maximum over the image's positions (and the
argmax position) is taken. From these per-image maxima the unit writes

    activations/sae=SAE_ID/part-NNNNNN.parquet   ACTIVATIONS: per image its `top_per_image`
                                                 strongest latents (ties: smaller latent)
    scan_parts/sae=SAE_ID/part-NNNNNN.npz        the part's LatentSketch (pipeline.latents.sketch)

and returns its manifest record (stage `scan`, part `SAE_ID__part-NNNNNN`); the caller commits
it after both files are in place. When every part of an SAE is committed, the reduce folds the
part sketches (exact, order-free) into

    latent_stats/sae=SAE_ID/part-000000.parquet    LATENT_STATS
    exemplar_picks/sae=SAE_ID/part-000000.parquet  EXEMPLAR_PICKS: "top" and "quantile" picks

and commits a record of stage `scan-reduce` (part SAE_ID) keyed by the part records it read,
so it re-runs (cheaply, with the same result) only when a part changed.

Units: activations are the SAE's, in its normalised input space (`SAE.encode` multiplies raw
PFVs by the stored `scale`, so layers with very different PFV norms give comparable numbers).
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.latents.sketch import LatentSketch, Picks, rank_within
from pipeline.pfv.parts import PFVPart, committed_parts, read_layers
from pipeline.pfv.sae_runs import extract_config, read_saes
from pipeline.sae import SAE, load_sae
from pipeline.store import (
    Manifest,
    PartRecord,
    check_stage_config,
    config_hash,
    fingerprint,
    fs,
    now,
    worker_id,
)
from schemas import ACTIVATIONS, EXEMPLAR_PICKS, LATENT_STATS

STAGE = "scan"
REDUCE_STAGE = "scan-reduce"
# the folders this stage writes (all under the output root, one sub-folder per SAE)
FOLDERS = ("activations", "scan_parts", "latent_stats", "exemplar_picks")
_INT16_MAX = int(np.iinfo(np.int16).max)


@dataclass(frozen=True)
class ScanOptions:
    """What the scan keeps, and how it runs.

    Outcome (hashed into the stage config; another value in the same output is refused):
    top_per_image: latents kept per image in `activations`; n_top: "top" exemplars per latent;
    n_quantile: "quantile" exemplars per latent; sample_size: size of the per-latent uniform
    sample of firing images the quantile picks come from (bottom-k sketch); seed: of that
    sample's hash.
    Runtime (outputs do not depend on them): batch_pfvs: PFVs encoded at once (memory is about
    batch_pfvs x n_latents x 4 bytes; whole images per batch); cpus_per_task / gpus_per_task:
    Ray resources of one unit (torch uses int(cpus_per_task) threads, at least 1);
    max_retries: Ray retries of a unit whose worker died.
    """

    top_per_image: int = 32
    n_top: int = 32
    n_quantile: int = 8
    sample_size: int = 256
    seed: int = 0
    batch_pfvs: int = 16384
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        for name in ("top_per_image", "n_top", "n_quantile", "sample_size", "batch_pfvs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scan.{name}={value!r}: expected an int >= 1")
        if self.top_per_image > _INT16_MAX:
            raise ValueError(f"scan.top_per_image={self.top_per_image}: at most {_INT16_MAX} "
                             "(activations.rank is int16)")
        if self.sample_size < self.n_quantile:
            raise ValueError(f"scan.sample_size={self.sample_size} < scan.n_quantile="
                             f"{self.n_quantile}: the sample must hold every quantile pick")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"scan.seed={self.seed!r}: expected an int >= 0")
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0 or self.max_retries < 0:
            raise ValueError(f"scan: cpus_per_task={self.cpus_per_task} must be > 0, "
                             f"gpus_per_task={self.gpus_per_task} and max_retries="
                             f"{self.max_retries} >= 0")

    def identity(self) -> dict[str, Any]:
        """The settings the outputs depend on (what the config hash covers)."""
        return {k: getattr(self, k)
                for k in ("top_per_image", "n_top", "n_quantile", "sample_size", "seed")}


@dataclass(frozen=True)
class Layout:
    """How a layer's [P] positions map to grid cells (from the `layers` table)."""

    grid_w: int
    num_special: int
    positions_per_image: int

    def cells(self, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) int32 of positions; -1 for special tokens (CLS, registers)."""
        grid = position.astype(np.int64) - self.num_special
        special = grid < 0
        y, x = np.divmod(np.where(special, 0, grid), self.grid_w)
        return (np.where(special, -1, y).astype(np.int32),
                np.where(special, -1, x).astype(np.int32))


@dataclass(frozen=True)
class ScanUnit:
    """One (SAE, PFV part) to scan; `name` is its manifest part."""

    sae_id: str
    layer: str
    weights: str
    pfv: PFVPart
    layout: Layout
    config_hash: str
    atlas_id: str

    @property
    def name(self) -> str:
        return f"{self.sae_id}__{self.pfv.part}"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.pfv.values)


@dataclass(frozen=True)
class SAEScan:
    """One SAE of the scan and its units, one per committed PFV part of its layer."""

    sae_id: str
    layer: str
    n_latents: int
    layout: Layout
    units: list[ScanUnit]

    def reduce_hash(self, records: dict[str, PartRecord]) -> str:
        """Identifies the committed part records a reduce read (all units must be in it)."""
        return config_hash({"parts": [(u.name, records[u.name].config_hash,
                                       records[u.name].input_fingerprint) for u in self.units]})


@dataclass(frozen=True)
class ScanPlan:
    """Every SAE and unit of a scan under `root`; `pending` are the units to (re)compute."""

    root: str
    atlas_id: str
    options: ScanOptions
    saes: list[SAEScan]
    pending: list[ScanUnit]
    skipped: int


def path(root: str, folder: str, sae_id: str, part: str, suffix: str = ".parquet") -> str:
    """`root/folder/sae=SAE_ID/part + suffix`: where the scan writes its outputs."""
    return fs.join(root, folder, f"sae={sae_id}", part + suffix)


def plan_scan(root: str, options: ScanOptions, sae_ids: list[str] | None = None) -> ScanPlan:
    """Check the extraction and the SAEs under `root` and list the units; no output but the
    stage config (`stages/scan.json`), which refuses other options before any work.

    `sae_ids` restricts the scan to those SAEs (default: every committed SAE).
    """
    _, ident, extract_hash = extract_config(root)
    layers = read_layers(root)
    saes = read_saes(root)
    if not saes:
        raise ValueError(f"no trained SAEs under {root} (the saes table is empty); "
                         "run train-sae first")
    if sae_ids is not None:
        known = {s["sae_id"] for s in saes}
        unknown = sorted(set(sae_ids) - known)
        if unknown:
            raise ValueError(f"unknown SAEs {unknown}; trained SAEs: {sorted(known)}")
        saes = [s for s in saes if s["sae_id"] in set(sae_ids)]
    check_stage_config(root, STAGE, {"options": options.identity(), "extract": extract_hash})
    done = Manifest(root).records(STAGE)
    plans, pending, skipped = [], [], 0
    for row in saes:
        weights = fs.join(root, "sae_weights", row["sae_id"])
        digest = config_hash({"options": options.identity(), "extract": extract_hash,
                              "sae": fingerprint(weights + ".safetensors")})
        lay = layers[row["layer"]]
        layout = Layout(lay["grid_w"], lay["num_special"], lay["positions_per_image"])
        units = [ScanUnit(row["sae_id"], row["layer"], weights, p, layout, digest,
                          ident["atlas_id"]) for p in committed_parts(root, row["layer"])]
        for unit in units:
            if is_current(unit, done.get(unit.name)):
                skipped += 1
            else:
                pending.append(unit)
        plans.append(SAEScan(row["sae_id"], row["layer"], row["n_latents"], layout, units))
    return ScanPlan(root, ident["atlas_id"], options, plans, pending, skipped)


# ---- one unit ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _sae(weights: str, device: str) -> SAE:
    """The SAE saved at `weights` (no suffix), cached: a worker scans many parts of one SAE."""
    local = fs.local_path(weights + ".safetensors")
    if local is not None:
        return load_sae(local[: -len(".safetensors")], device)
    with tempfile.TemporaryDirectory(prefix="sae-") as tmp:
        for suffix in (".safetensors", ".json"):
            fsys, remote = fs.filesystem(weights + suffix)
            fsys.get(remote, str(Path(tmp) / f"sae{suffix}"))
        return load_sae(Path(tmp) / "sae", device)


@torch.inference_mode()
def image_maxima(sae: SAE, values: np.ndarray, image_ids: np.ndarray, positions: np.ndarray,
                 batch_pfvs: int) -> tuple[Picks, np.ndarray, np.ndarray]:
    """Encode PFVs image by image and reduce each image to its latents' maxima.

    Args:
        values: [n·P, C] PFVs of n images, P consecutive rows per image.
        image_ids: int64 [n]; positions: int32 [n, P], the position of each row.
    Returns:
        (picks, count, total): one pick per (image, firing latent) with the latent's max over
        the image and the first position reaching it; per latent int64 [L] PFVs > 0 and
        float64 [L] sum of activations.
    """
    n, p = positions.shape
    device = sae.W_enc.device
    count = torch.zeros(sae.cfg.n_latents, dtype=torch.int64, device=device)
    total = torch.zeros(sae.cfg.n_latents, dtype=torch.float64, device=device)
    picks = [Picks.empty()]
    step = max(1, batch_pfvs // p)
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = torch.from_numpy(np.asarray(values[start * p:stop * p], np.float32)).to(device)
        flat = sae.encode(x).float()
        # int32 / float32 within a batch (several times faster than int64 / float64 sums over
        # the dense [rows, L] activations), int64 / float64 across batches
        count += flat.gt(0).sum(dim=0, dtype=torch.int32)
        total += flat.sum(dim=0).double()
        peak, arg = flat.reshape(stop - start, p, -1).max(dim=1)  # first position at the max
        img, lat = (peak > 0).nonzero(as_tuple=True)
        img, lat = img.cpu().numpy(), lat.cpu().numpy()
        picks.append(Picks(lat.astype(np.int32), image_ids[start + img],
                           peak[img, lat].cpu().numpy().astype(np.float32),
                           positions[start + img, arg[img, lat].cpu().numpy()]))
    merged = functools.reduce(Picks.concat, picks)
    return merged, count.cpu().numpy(), total.cpu().numpy()


def scan_unit(unit: ScanUnit, options: ScanOptions, root: str,
              device: str | torch.device = "cpu") -> PartRecord:
    """Scan one (SAE, PFV part): write its activations and sketch; return its record."""
    started = now()
    sae = _sae(unit.weights, str(device))
    ids = fs.read_parquet(unit.pfv.ids)
    image_col = ids.column("image_id").to_numpy()
    p = unit.layout.positions_per_image
    if len(image_col) % p or (len(image_col) and np.any(
            image_col.reshape(-1, p) != image_col.reshape(-1, p)[:, :1])):
        raise ValueError(f"{unit.pfv.ids}: expected {p} consecutive rows per image "
                         f"(positions_per_image of layer {unit.layer}), got {len(image_col)} "
                         "rows in another arrangement")
    image_ids = image_col[::p].astype(np.int64)
    positions = ids.column("position").to_numpy().astype(np.int32).reshape(-1, p)
    values = fs.read_npy(unit.pfv.values)
    picks, count, total = image_maxima(sae, values, image_ids, positions, options.batch_pfvs)
    peak = np.zeros(sae.cfg.n_latents, np.float32)
    np.maximum.at(peak, picks.latent, picks.activation)
    sketch = LatentSketch(
        n_pfvs=len(image_col), n_images=len(image_ids), count=count,
        images=np.bincount(picks.latent, minlength=sae.cfg.n_latents).astype(np.int64),
        total=total, peak=peak, top=picks.top(options.n_top),
        sample=picks.sample(options.sample_size, options.seed))
    activations = activations_table(picks, options.top_per_image, unit)
    fs.write_parquet(activations, path(root, "activations", unit.sae_id, unit.pfv.part),
                     ACTIVATIONS)
    sketch.save(path(root, "scan_parts", unit.sae_id, unit.pfv.part, ".npz"))
    return PartRecord(
        stage=STAGE, part=unit.name, input=unit.pfv.values, input_fingerprint=unit.fingerprint,
        config_hash=unit.config_hash, rows=len(image_ids),
        outputs={f"activations/sae={unit.sae_id}": activations.num_rows,
                 f"scan_parts/sae={unit.sae_id}": 1},
        worker=worker_id(), started=started, finished=now())


def activations_table(picks: Picks, top_per_image: int, unit: ScanUnit) -> pa.Table:
    """ACTIVATIONS rows: per image its `top_per_image` strongest latents, rank 0 first.

    Order within an image: activation descending, then latent ascending (a total order, so the
    rows are the same whatever the batching).
    """
    order, rank = rank_within(picks.image_id, -picks.activation, picks.latent)
    keep = rank < top_per_image
    rows, rank = picks.take(order[keep]), rank[keep]
    y, x = unit.layout.cells(rows.position)
    n = len(rows)
    return pa.table({
        "atlas_id": [unit.atlas_id] * n, "image_id": rows.image_id, "layer": [unit.layer] * n,
        "sae_id": [unit.sae_id] * n, "latent": rows.latent, "max_act": rows.activation,
        "position": rows.position, "y": y, "x": x, "rank": rank.astype(np.int16),
    }, schema=ACTIVATIONS)


# ---- the reduce -------------------------------------------------------------------------


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


def merge_sketches(urls: list[str], options: ScanOptions) -> LatentSketch:
    """Fold the part sketches at `urls` in order (exact in any order; memory: two sketches)."""
    merged = LatentSketch.load(urls[0])
    for url in urls[1:]:
        merged = merged.merge(LatentSketch.load(url), options.n_top, options.sample_size,
                              options.seed)
    return merged


def reduce_sae(plan: ScanPlan, sae: SAEScan) -> PartRecord:
    """Merge the part sketches of `sae`, write latent_stats and exemplar_picks, commit."""
    started = now()
    records = Manifest(plan.root).records(STAGE)
    missing = [u.name for u in sae.units if u.name not in records]
    if missing:
        raise ValueError(f"{sae.sae_id}: parts {missing} are not scanned yet; cannot reduce")
    options, root = plan.options, plan.root
    merged = merge_sketches([path(root, "scan_parts", sae.sae_id, u.pfv.part, ".npz")
                             for u in sae.units], options)
    stats = latent_stats_table(merged, plan.atlas_id, sae)
    order, top_rank = rank_within(merged.top.latent, -merged.top.activation,
                                  merged.top.image_id)
    top = merged.top.take(order)
    quantile, quantile_rank = quantile_picks(merged.sample, top, options.n_quantile)
    picks = pa.concat_tables([
        picks_table(top, top_rank, "top", plan.atlas_id, sae),
        picks_table(quantile, quantile_rank, "quantile", plan.atlas_id, sae)])
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


def latent_stats_table(sketch: LatentSketch, atlas_id: str, sae: SAEScan) -> pa.Table:
    """LATENT_STATS rows of every latent of `sae` from its merged sketch."""
    n = len(sketch.count)
    fired = sketch.count > 0
    mean = np.divide(sketch.total, sketch.count, out=np.zeros(n), where=fired)
    return pa.table({
        "atlas_id": [atlas_id] * n, "layer": [sae.layer] * n, "sae_id": [sae.sae_id] * n,
        "latent": np.arange(n, dtype=np.int32),
        "freq": sketch.count / max(1, sketch.n_pfvs),
        "image_freq": sketch.images / max(1, sketch.n_images),
        "mean_act": mean, "max_act": sketch.peak.astype(np.float64), "dead": ~fired,
        "n_pfvs": np.full(n, sketch.n_pfvs, np.int64),
        "n_images": np.full(n, sketch.n_images, np.int64),
    }, schema=LATENT_STATS)


def picks_table(picks: Picks, rank: np.ndarray, kind: str, atlas_id: str,
                sae: SAEScan) -> pa.Table:
    """EXEMPLAR_PICKS rows of one kind ("top" or "quantile")."""
    n = len(picks)
    y, x = sae.layout.cells(picks.position)
    return pa.table({
        "atlas_id": [atlas_id] * n, "layer": [sae.layer] * n, "sae_id": [sae.sae_id] * n,
        "latent": picks.latent, "kind": [kind] * n, "rank": rank.astype(np.int32),
        "image_id": picks.image_id, "activation": picks.activation,
        "position": picks.position, "y": y, "x": x,
    }, schema=EXEMPLAR_PICKS)


def is_current(unit: ScanUnit, record: PartRecord | None) -> bool:
    """Whether `record` is a commit of `unit` under its current config and input."""
    return (record is not None and record.config_hash == unit.config_hash
            and record.input_fingerprint == unit.fingerprint)


def reduce_status(plan: ScanPlan) -> tuple[list[SAEScan], list[SAEScan]]:
    """From the manifest now: (SAEs whose reduce must run, SAEs with parts still unscanned)."""
    manifest = Manifest(plan.root)
    records, reduced = manifest.records(STAGE), manifest.records(REDUCE_STAGE)
    todo, incomplete = [], []
    for sae in plan.saes:
        if not all(is_current(u, records.get(u.name)) for u in sae.units):
            incomplete.append(sae)
        elif (sae.sae_id not in reduced
              or reduced[sae.sae_id].config_hash != sae.reduce_hash(records)):
            todo.append(sae)
    return todo, incomplete


def summary_rows(plan: ScanPlan) -> dict[str, dict[str, Any]]:
    """Per SAE: images, PFVs and dead latents from its latent_stats (None before its reduce)."""
    reduced = Manifest(plan.root).records(REDUCE_STAGE)
    out = {}
    for sae in plan.saes:
        row: dict[str, Any] = {"layer": sae.layer, "n_latents": sae.n_latents, "images": None,
                               "pfvs": None, "dead": None}
        if sae.sae_id in reduced:
            stats = fs.read_parquet(path(plan.root, "latent_stats", sae.sae_id, "part-000000"),
                                    ["dead", "n_pfvs", "n_images"])
            row.update(images=stats["n_images"][0].as_py(), pfvs=stats["n_pfvs"][0].as_py(),
                       dead=sum(stats["dead"].to_pylist()))
        out[sae.sae_id] = row
    return out
