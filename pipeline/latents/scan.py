"""The scan stage's unit of work, Ray-free: one SAE over one PFV part (docs/method.md §§5-6).

A unit encodes the part's PFVs with the SAE in batches of whole images and reduces each image
to every latent's maximum over the image's positions (and the argmax position). From these
per-image maxima it writes

    activations/sae=SAE_ID/part-NNNNNN.parquet   ACTIVATIONS: per image its `top_per_image`
                                                 strongest latents (ties: smaller latent)
    scan_parts/sae=SAE_ID/part-NNNNNN.npz        the part's LatentSketch (pipeline.latents.sketch)

and returns its manifest record (stage `scan`, part `SAE_ID__part-NNNNNN`); the driver commits
it after both files are in place. `pipeline.latents.reduce` merges the sketches of an SAE's
parts; `pipeline.latents.plan` lists the units and tracks what is committed.

This module is what a Ray worker imports: it avoids the model stack (timm), so a worker starts
in the time of torch and pyarrow.

Units: activations are the SAE's, in its normalised input space (`SAE.encode` multiplies raw
PFVs by the stored `scale`, so layers with very different PFV norms give comparable numbers).
"""
from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from pipeline.latents.sketch import LatentSketch, Picks, rank_within
from pipeline.pfv.parts import PFVPart
from pipeline.sae import SAE, load_sae
from pipeline.stage import TaskRuntime, option
from pipeline.store import PartRecord, fingerprint, fs, now, worker_id
from schemas import ACTIVATIONS

STAGE = "scan"
# the folders the stage writes (all under the output root, one sub-folder per SAE)
FOLDERS = ("activations", "scan_parts", "latent_stats", "exemplar_picks")
_INT16_MAX = int(np.iinfo(np.int16).max)


@dataclass(frozen=True)
class ScanOptions(TaskRuntime):
    """What the scan keeps (hashed into the stage config; another value in the same output is
    refused), and how it runs (runtime fields: the outputs do not depend on them)."""

    section: ClassVar[str] = "scan"

    top_per_image: int = option(32, "latents kept per image in `activations`", min=1,
                                max=_INT16_MAX,
                                expect=f"an int in [1, {_INT16_MAX}] (activations.rank is int16)")
    n_top: int = option(32, "'top' exemplar picks per latent", min=1)
    n_quantile: int = option(8, "'quantile' exemplar picks per latent", min=1)
    sample_size: int = option(256, "per-latent uniform sample of firing images the quantile "
                              "picks come from (bottom-k sketch)", min=1)
    seed: int = option(0, "seed of that sample's hash", min=0)
    per_source: int | None = option(
        1, "'top' picks per source group at most: crops of one photo (`images.source`) or "
        "near-duplicates (`images.phash` within 3 bits) count as one source (docs/method.md "
        "§5); none: no limit",
        min=1)
    batch_pfvs: int = option(16384, "PFVs encoded at once (memory ~ batch_pfvs x n_latents x 4 "
                             "bytes; whole images per batch)", runtime=True, min=1)
    saes: tuple[str, ...] | None = option(None, "scan only these sae_ids (default: every "
                                          "trained SAE)", input=True, flag="--sae")

    def check(self) -> None:
        if self.sample_size < self.n_quantile:
            raise ValueError(f"scan.sample_size={self.sample_size} < scan.n_quantile="
                             f"{self.n_quantile}: the sample must hold every quantile pick")


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
    # {image_id: source group} of the part's images (pipeline.latents.groups); an image not
    # listed is a group of its own
    groups: dict[int, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.sae_id}__{self.pfv.part}"

    @property
    def part(self) -> str:
        return self.name

    @property
    def input(self) -> str:
        return self.pfv.values

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.pfv.values)


def path(root: str, folder: str, sae_id: str, part: str, suffix: str = ".parquet") -> str:
    """`root/folder/sae=SAE_ID/part + suffix`: where the scan writes its outputs."""
    return fs.join(root, folder, f"sae={sae_id}", part + suffix)


# ---- one unit ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _sae(weights: str, digest: str, device: str) -> SAE:
    """The SAE saved at `weights` (no suffix), cached: a worker scans many parts of one SAE.

    `digest` (the unit's config hash, which covers the weights file's fingerprint) is in the
    cache key so SAE weights rewritten in place are loaded again.
    """
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
                 batch_pfvs: int, groups: np.ndarray | None = None
                 ) -> tuple[Picks, np.ndarray, np.ndarray]:
    """Encode PFVs image by image and reduce each image to its latents' maxima.

    Args:
        values: [n·P, C] PFVs of n images, P consecutive rows per image.
        image_ids: int64 [n]; positions: int32 [n, P], the position of each row.
        groups: int64 [n], each image's source group (default: its image_id).
    Returns:
        (picks, count, total): one pick per (image, firing latent) with the latent's max over
        the image and the first position reaching it; per latent int64 [L] PFVs > 0 and
        float64 [L] sum of activations.
    """
    n, p = positions.shape
    groups = image_ids.astype(np.int64) if groups is None else groups
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
        value, where = peak[img, lat].cpu().numpy(), arg[img, lat].cpu().numpy()
        img, lat = img.cpu().numpy(), lat.cpu().numpy()
        picks.append(Picks(lat.astype(np.int32), image_ids[start + img], value,
                           positions[start + img, where], groups[start + img]))
    merged = functools.reduce(Picks.concat, picks)
    return merged, count.cpu().numpy(), total.cpu().numpy()


def scan_unit(unit: ScanUnit, options: ScanOptions, root: str,
              device: str | torch.device = "cpu") -> PartRecord:
    """Scan one (SAE, PFV part): write its activations and sketch; return its record."""
    started = now()
    sae = _sae(unit.weights, unit.config_hash, str(device))
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
    groups = np.asarray([unit.groups.get(i, i) for i in image_ids.tolist()], np.int64)
    picks, count, total = image_maxima(sae, values, image_ids, positions, options.batch_pfvs,
                                       groups)
    peak = np.zeros(sae.cfg.n_latents, np.float32)
    np.maximum.at(peak, picks.latent, picks.activation)
    sketch = LatentSketch(
        n_pfvs=len(image_col), n_images=len(image_ids), count=count,
        images=np.bincount(picks.latent, minlength=sae.cfg.n_latents).astype(np.int64),
        total=total, peak=peak, top=picks.top(options.n_top, options.per_source),
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


def scan_task(unit: ScanUnit, options: ScanOptions, root: str) -> PartRecord:
    """`scan_unit` as a task body: int(cpus_per_task) torch threads; CUDA when the Ray task was
    given a GPU (gpus_per_task > 0) or, in process, when this process sees one."""
    torch.set_num_threads(max(1, int(options.cpus_per_task)))
    cuda = options.gpus_per_task > 0 or (options.in_process and torch.cuda.is_available())
    return scan_unit(unit, options, root, "cuda" if cuda else "cpu")
