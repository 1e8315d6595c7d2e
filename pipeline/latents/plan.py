"""Planning a scan: the SAEs and PFV parts under an output root, and what is committed.

Driver side only (it reads the extraction's config and the saes table): workers import
`pipeline.latents.scan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.latents.reduce import REDUCE_STAGE, SAEScan
from pipeline.latents.scan import STAGE, Layout, ScanOptions, ScanUnit, path
from pipeline.pfv.parts import committed_parts
from pipeline.store import (
    AtlasRoot,
    PartRecord,
    check_stage_config,
    config_hash,
    fingerprint,
    fs,
)


@dataclass(frozen=True)
class ScanPlan:
    """Every SAE and unit of a scan under `root`; `pending` are the units to (re)compute."""

    root: str
    atlas_id: str
    options: ScanOptions
    saes: list[SAEScan]
    pending: list[ScanUnit]
    skipped: int


def plan_scan(root: AtlasRoot | str, options: ScanOptions,
              sae_ids: list[str] | None = None) -> ScanPlan:
    """Check the extraction and the SAEs under `root` and list the units; no output but the
    stage config (`stages/scan.json`), which refuses other options before any work.

    `sae_ids` restricts the scan to those SAEs (default: every committed SAE).
    """
    atlas = AtlasRoot.of(root)
    root = atlas.url
    extract = atlas.extract()
    extract_hash, atlas_id = extract.config_hash, extract.atlas_id
    layers = atlas.layers()
    saes = atlas.saes()
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
    done = atlas.manifest.records(STAGE)
    plans, pending, skipped = [], [], 0
    for row in saes:
        weights = fs.join(root, "sae_weights", row["sae_id"])
        digest = config_hash({"options": options.identity(), "extract": extract_hash,
                              "sae": fingerprint(weights + ".safetensors")})
        lay = layers[row["layer"]]
        layout = Layout(lay["grid_w"], lay["num_special"], lay["positions_per_image"])
        units = [ScanUnit(row["sae_id"], row["layer"], weights, p, layout, digest,
                          atlas_id) for p in committed_parts(root, row["layer"])]
        for unit in units:
            if is_current(unit, done.get(unit.name)):
                skipped += 1
            else:
                pending.append(unit)
        plans.append(SAEScan(row["sae_id"], row["layer"], row["n_latents"], layout, units,
                             atlas_id))
    return ScanPlan(root, atlas_id, options, plans, pending, skipped)


def is_current(unit: ScanUnit, record: PartRecord | None) -> bool:
    """Whether `record` is a commit of `unit` under its current config and input."""
    return (record is not None and record.config_hash == unit.config_hash
            and record.input_fingerprint == unit.fingerprint)


def reduce_status(plan: ScanPlan) -> tuple[list[SAEScan], list[SAEScan]]:
    """From the manifest now: (SAEs whose reduce must run, SAEs with parts still unscanned)."""
    manifest = AtlasRoot(plan.root).manifest
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
    reduced = AtlasRoot(plan.root).manifest.records(REDUCE_STAGE)
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
