"""Planning a scan: the SAEs and PFV parts under an output root, and what is committed.

Driver side only (it reads the extraction's config and the saes table): workers import
`pipeline.latents.scan`.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.latents.groups import source_groups
from pipeline.latents.reduce import REDUCE_STAGE, SAEScan
from pipeline.latents.scan import STAGE, Layout, ScanOptions, ScanUnit, path
from pipeline.pfv.extract import IMAGES_PER_PART
from pipeline.pfv.parts import committed_parts
from pipeline.stage import part_name
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


def plan_scan(root: AtlasRoot | str, options: ScanOptions) -> ScanPlan:
    """Check the extraction and the SAEs under `root` and list the units; no output but the
    stage config (`stages/scan.json`), which refuses other options before any work.

    `options.saes` restricts the scan to those SAEs (default: every committed SAE).
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
    if options.saes is not None:
        known = {s["sae_id"] for s in saes}
        unknown = sorted(set(options.saes) - known)
        if unknown:
            raise ValueError(f"unknown SAEs {unknown}; trained SAEs: {sorted(known)}")
        saes = [s for s in saes if s["sae_id"] in set(options.saes)]
    check_stage_config(root, STAGE, {"options": options.identity(), "extract": extract_hash},
                       parts_of=(STAGE, REDUCE_STAGE))
    done = atlas.manifest.records(STAGE)
    groups = part_groups(root)
    plans, pending, skipped = [], [], 0
    for row in saes:
        weights = fs.join(root, "sae_weights", row["sae_id"])
        digest = config_hash({"options": options.identity(), "extract": extract_hash,
                              "sae": fingerprint(weights + ".safetensors")})
        lay = layers[row["layer"]]
        layout = Layout(lay["grid_w"], lay["num_special"], lay["positions_per_image"])
        # a part's picks depend on its images' groups, which new images elsewhere can change
        units = [ScanUnit(row["sae_id"], row["layer"], weights, p, layout,
                          config_hash({"unit": digest, "groups": groups[p.part][1]}), atlas_id,
                          groups[p.part][0]) for p in committed_parts(root, row["layer"])]
        for unit in units:
            if is_current(unit, done.get(unit.name)):
                skipped += 1
            else:
                pending.append(unit)
        plans.append(SAEScan(row["sae_id"], row["layer"], row["n_latents"], layout, units,
                             atlas_id))
    return ScanPlan(root, atlas_id, options, plans, pending, skipped)


def part_groups(root: str) -> defaultdict[str, tuple[dict[int, int], str]]:
    """Per extract part: {image_id: source group} of its images that share a group with
    another image, and a hash of that mapping (pipeline.latents.groups)."""
    folder = fs.join(root, "images")
    tables = [fs.read_parquet(url) for url in fs.listdir(folder, ".parquet")]
    every = source_groups(pa.concat_tables(tables, promote_options="default")) if tables else {}
    shared = Counter(every.values())
    by_part: dict[str, dict[int, int]] = defaultdict(dict)
    for image_id, group in every.items():
        if shared[group] > 1:
            by_part[part_name(image_id // IMAGES_PER_PART)][image_id] = group
    out: defaultdict[str, tuple[dict[int, int], str]] = defaultdict(lambda: ({}, ""))
    for part, mapping in by_part.items():
        out[part] = (mapping, config_hash({"groups": sorted(mapping.items())}))
    return out


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


def summarize(plan: ScanPlan, failed: dict[str, str], reduced: list[str],
              incomplete: list[str], seconds: float) -> dict[str, Any]:
    """Totals over the committed parts, what this run did, and per-SAE results."""
    records = AtlasRoot(plan.root).manifest.records(STAGE)
    units = [u for u in plan.pending if u.name in records and u.name not in failed]
    new = [records[u.name] for u in units]
    pfvs_new = sum(u.pfv.rows for u in units)
    busy = sum(r.finished - r.started for r in new)
    return {
        "root": plan.root, "saes": summary_rows(plan),
        "parts": sum(len(s.units) for s in plan.saes),
        "parts_new": len(new), "parts_skipped": plan.skipped, "parts_failed": failed,
        # an image scanned by several SAEs counts once
        "images_new": sum({u.pfv.part: records[u.name].rows for u in units}.values()),
        "saes_new": len({u.sae_id for u in units}),
        "pfvs_new": pfvs_new, "seconds": round(seconds, 2),
        "pfvs_per_s": round(pfvs_new / seconds, 1) if new and seconds > 0 else None,
        "task_pfvs_per_s": round(pfvs_new / busy, 1) if busy > 0 else None,
        "reduced": reduced, "incomplete": incomplete,
    }


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['pfvs_per_s']:.0f} PFVs/s" if s["pfvs_per_s"] else ""
    print(f"[scan] {s['parts_new']} parts scanned ({s['images_new']} images by "
          f"{s['saes_new']} SAEs, {s['pfvs_new']} PFVs), {s['parts_skipped']} skipped, {len(s['parts_failed'])} failed, "
          f"{len(s['reduced'])} SAEs reduced in {s['seconds']:.1f}s{rate}")
    print(f"{'sae_id':<28} {'layer':<10} {'latents':>7} {'images':>8} {'PFVs':>10} {'dead':>6}")
    for sae_id, r in s["saes"].items():
        cells = [r[k] if r[k] is not None else "-" for k in ("images", "pfvs", "dead")]
        print(f"{sae_id:<28} {r['layer']:<10} {r['n_latents']:>7} {cells[0]:>8} {cells[1]:>10} "
              f"{cells[2]:>6}")
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")
    if s["incomplete"]:
        print(f"  not reduced (parts missing; re-run scan): {', '.join(s['incomplete'])}")
