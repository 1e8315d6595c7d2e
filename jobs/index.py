"""`concept-atlas index`: the FAISS indexes of an atlas (decoder directions, exemplar regions).

A plain function (no Ray): per SAE, one index of its unit decoder directions and, once the
scan stage has picked exemplars, one index of the exemplars' region embeddings (the PFV at
each exemplar's (image_id, position), read from the PFV parts). See pipeline.atlas.index for
the layout, the embedding and the choice of index type. An index whose inputs (its vectors,
its id rows and the build options) hash to the `inputs` of its existing record is kept, not
rebuilt (`force=True` rebuilds): re-running a build after a later stage failed costs no FAISS
training. The record (`.json`) is written last, so a crash leaves an index that `Atlas` does
not see rather than a half-written one.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.atlas import Atlas
from pipeline.atlas import index as idx
from pipeline.atlas.views import literal
from pipeline.store import fs

# the region index's id table: which exemplar each vector is
REGION_COLUMNS = ["sae_id", "layer", "latent", "kind", "rank", "image_id", "position", "y", "x",
                  "activation"]


def build_indexes(root: str, exact_below: int = idx.EXACT_BELOW, factory: str | None = None,
                  progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Build every SAE's decoder and region indexes under `root/index/`; returns a summary.

    `exact_below`: vectors below which an index is exact (Flat); `factory` forces a FAISS
    factory string for every index. Region indexes need the exemplars (`exemplar_picks`, or
    `exemplars` when only they exist); without them only decoder indexes are built. An index
    whose inputs are unchanged since it was built is kept (summary row `reused`) unless `force`.
    """
    atlas = Atlas.open(root)
    if not atlas.saes:
        raise ValueError(f"{root} has no trained SAE (the saes table is empty); run train-sae")
    # the scan's picks are every exemplar; the cafe stage adds masks to the same keys and may
    # have run on a subset, so its table is only the fallback
    picks = "exemplar_picks" if atlas.has("exemplar_picks") else (
        "exemplars" if atlas.has("exemplars") else None)
    summary: dict[str, Any] = {"root": root, "exemplars_from": picks, "indexes": []}
    t0 = time.time()
    for sae_id, row in tqdm(atlas.saes.items(), desc="index", unit="SAE", disable=not progress):
        sae = atlas.sae(sae_id)
        source = {"sae_id": sae_id, "weights": row["weights"], "n_latents": row["n_latents"]}
        vectors = idx.decoder_vectors(sae)
        ids = pa.table({"sae_id": [sae_id] * len(vectors), "layer": [row["layer"]] * len(vectors),
                        "latent": np.arange(len(vectors), dtype=np.int32)})
        _build(root, "decoder", sae_id, vectors, ids, dict(source, vectors="decoder directions"),
               exact_below, factory, force, summary)
        if picks is None:
            continue
        ex = atlas.sql(f"SELECT {', '.join(REGION_COLUMNS)} FROM {picks} "
                       f"WHERE sae_id = {literal(sae_id)} ORDER BY latent, kind DESC, rank")
        if ex.num_rows == 0:
            continue
        pfvs = idx.gather_pfvs(root, row["layer"], ex["image_id"].to_numpy(),
                               ex["position"].to_numpy())
        _build(root, "regions", sae_id, idx.region_vectors(sae, pfvs), ex,
               dict(source, vectors="scale * pfv - b_dec, unit norm", exemplars=picks),
               exact_below, factory, force, summary)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _build(root: str, kind: str, sae_id: str, vectors: np.ndarray, ids: pa.Table,
           meta: dict[str, Any], exact_below: int, factory: str | None, force: bool,
           summary: dict[str, Any]) -> None:
    inputs = _inputs_digest(vectors, ids, dict(meta, exact_below=exact_below, factory=factory))
    record = idx.paths(root, kind, sae_id)["meta"]
    old = fs.read_json(record) if fs.exists(record) else None
    if not force and old is not None and old.get("inputs") == inputs:
        built, reused = old, True
    else:
        index, built = idx.build_index(vectors, exact_below=exact_below, factory=factory)
        built = dict(meta, **built, inputs=inputs)
        idx.write_index(root, kind, sae_id, index, ids, built)
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


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.index ATLAS`: build the indexes and print the summary."""
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__.splitlines()[0])
    p.add_argument("atlas")
    p.add_argument("--exact-below", type=int, default=idx.EXACT_BELOW)
    p.add_argument("--factory", default=None)
    p.add_argument("--force", action="store_true", help="rebuild indexes whose inputs are unchanged")
    a = p.parse_args(argv)
    report(build_indexes(a.atlas, a.exact_below, a.factory, force=a.force))
    return 0


def report(summary: dict[str, Any]) -> None:
    """Print one line per index built, then the total."""
    for row in summary["indexes"]:
        print(f"{row['kind']:<8} {row['sae_id']:<32} {row['n']:>9} x {row['d']:<5} "
              f"{row['factory']}{'  (unchanged, kept)' if row['reused'] else ''}")
    kept = sum(row["reused"] for row in summary["indexes"])
    print(f"[index] {len(summary['indexes'])} indexes ({kept} unchanged, kept) in "
          f"{summary['seconds']} s (exemplars from {summary['exemplars_from'] or 'nowhere: run scan'})")


if __name__ == "__main__":
    sys.exit(main())
