"""The index stage: the FAISS indexes of an atlas (decoder directions, exemplar regions).

A plain function (no Ray): per SAE, one index of its unit decoder directions and, once the
scan stage has picked exemplars, one index of the exemplars' region embeddings (the PFV at
each exemplar's (image_id, position), read from the PFV parts). See pipeline.atlas.index for
the layout, the embedding and the choice of index type. Each index is one part of the stage
`index` whose config hash is the hash of its inputs (its vectors, its id rows and the build
options): an index whose committed record has the current hash is kept, not rebuilt
(`force=True` rebuilds), so re-running a build after a later stage failed costs no FAISS
training. The index's own record (`.json`) is written after its files and the manifest record
last, so a crash leaves an index that `Atlas` does not see rather than a half-written one.
"""
from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.atlas import index as idx
from pipeline.atlas.api import Atlas
from pipeline.atlas.index import IndexOptions
from pipeline.atlas.views import literal
from pipeline.store import AtlasRoot, PartRecord, fs, now, worker_id

# the region index's id table: which exemplar each vector is
REGION_COLUMNS = ["sae_id", "layer", "latent", "kind", "rank", "image_id", "position", "y", "x",
                  "activation"]


STAGE = "index"


def run(root: AtlasRoot | str, options: IndexOptions | None = None, *,
        progress: bool = True) -> dict[str, Any]:
    """The index stage: `build_indexes`, then its report; returns the summary."""
    summary = build_indexes(root, options, progress)
    print_summary(summary)
    return summary


def build_indexes(root: AtlasRoot | str, options: IndexOptions | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Build every SAE's decoder and region indexes under `root/index/`; returns a summary.

    Region indexes need the exemplars (`exemplar_picks`, or `exemplars` when only they exist);
    without them only decoder indexes are built. An index whose inputs are unchanged since it
    was built is kept (summary row `reused`) unless `options.force`.
    """
    options = options or IndexOptions()
    root = AtlasRoot.of(root)
    atlas = Atlas.open(root.url)
    if not atlas.saes:
        raise ValueError(f"{root} has no trained SAE (the saes table is empty); run train-sae")
    # the scan's picks are every exemplar; the cafe stage adds masks to the same keys and may
    # have run on a subset, so its table is only the fallback
    picks = "exemplar_picks" if atlas.has("exemplar_picks") else (
        "exemplars" if atlas.has("exemplars") else None)
    summary: dict[str, Any] = {"root": root.url, "exemplars_from": picks, "indexes": []}
    t0 = time.time()
    for sae_id, row in tqdm(atlas.saes.items(), desc="index", unit="SAE", disable=not progress):
        sae = atlas.sae(sae_id)
        source = {"sae_id": sae_id, "weights": row["weights"], "n_latents": row["n_latents"]}
        vectors = idx.decoder_vectors(sae)
        ids = pa.table({"sae_id": [sae_id] * len(vectors), "layer": [row["layer"]] * len(vectors),
                        "latent": np.arange(len(vectors), dtype=np.int32)})
        _build(root, "decoder", sae_id, vectors, ids, dict(source, vectors="decoder directions"),
               options, summary)
        if picks is None:
            continue
        ex = atlas.sql(f"SELECT {', '.join(REGION_COLUMNS)} FROM {picks} "
                       f"WHERE sae_id = {literal(sae_id)} ORDER BY latent, kind DESC, rank")
        if ex.num_rows == 0:
            continue
        pfvs = idx.gather_pfvs(root.url, row["layer"], ex["image_id"].to_numpy(),
                               ex["position"].to_numpy())
        _build(root, "regions", sae_id, idx.region_vectors(sae, pfvs), ex,
               dict(source, vectors="scale * pfv - b_dec, unit norm", exemplars=picks),
               options, summary)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _build(root: AtlasRoot, kind: str, sae_id: str, vectors: np.ndarray, ids: pa.Table,
           meta: dict[str, Any], options: IndexOptions, summary: dict[str, Any]) -> None:
    inputs = _inputs_digest(vectors, ids, dict(meta, exact_below=options.exact_below,
                                               factory=options.factory))
    part = f"{kind}__{sae_id}"
    done = root.manifest.done(STAGE, inputs)
    record = idx.paths(root.url, kind, sae_id)["meta"]
    if not options.force and part in done and fs.exists(record):
        built, reused = fs.read_json(record), True
    else:
        started = now()
        index, built = idx.build_index(vectors, exact_below=options.exact_below,
                                       factory=options.factory)
        built = dict(meta, **built, inputs=inputs)
        idx.write_index(root.url, kind, sae_id, index, ids, built)
        root.manifest.commit(PartRecord(
            stage=STAGE, part=part, input=meta["weights"], input_fingerprint=inputs,
            config_hash=inputs, rows=built["n"], outputs={f"index/{kind}": built["n"]},
            worker=worker_id(), started=started, finished=now()))
        reused = False
    summary["indexes"].append({"kind": kind, "sae_id": sae_id, "n": built["n"], "d": built["d"],
                               "factory": built["factory"], "reused": reused})


def _inputs_digest(vectors: np.ndarray, ids: pa.Table, options: dict[str, Any]) -> str:
    """Hash of everything an index is built from: the exact float32 vectors, the id rows (Arrow
    IPC bytes) and the options, so any change to the SAE, the exemplars or the settings
    rebuilds it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ids.schema) as writer:
        writer.write_table(ids)
    h.update(sink.getvalue().to_pybytes())
    h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()


def print_summary(summary: dict[str, Any]) -> None:
    """Print one line per index built, then the total."""
    for row in summary["indexes"]:
        print(f"{row['kind']:<8} {row['sae_id']:<32} {row['n']:>9} x {row['d']:<5} "
              f"{row['factory']}{'  (unchanged, kept)' if row['reused'] else ''}")
    kept = sum(row["reused"] for row in summary["indexes"])
    print(f"[index] {len(summary['indexes'])} indexes ({kept} unchanged, kept) in "
          f"{summary['seconds']} s (exemplars from {summary['exemplars_from'] or 'nowhere: run scan'})")

