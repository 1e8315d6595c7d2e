"""`concept-atlas index`: the FAISS indexes of an atlas (decoder directions, exemplar regions).

A plain function (no Ray): per SAE, one index of its unit decoder directions and, once the
scan stage has picked exemplars, one index of the exemplars' region embeddings (the PFV at
each exemplar's (image_id, position), read from the PFV parts). See pipeline.atlas.index for
the layout, the embedding and the choice of index type. Each SAE's indexes are rebuilt from
scratch on every run; the record (`.json`) is written last, so a crash leaves an index that
`Atlas` does not see rather than a half-written one.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.atlas import Atlas
from pipeline.atlas import index as idx
from pipeline.atlas.views import literal

# the region index's id table: which exemplar each vector is
REGION_COLUMNS = ["sae_id", "layer", "latent", "kind", "rank", "image_id", "position", "y", "x",
                  "activation"]


def build_indexes(root: str, exact_below: int = idx.EXACT_BELOW, factory: str | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Build every SAE's decoder and region indexes under `root/index/`; returns a summary.

    `exact_below`: vectors below which an index is exact (Flat); `factory` forces a FAISS
    factory string for every index. Region indexes need the exemplars (`exemplar_picks`, or
    `exemplars` when only they exist); without them only decoder indexes are built.
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
               exact_below, factory, summary)
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
               exact_below, factory, summary)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary


def _build(root: str, kind: str, sae_id: str, vectors: np.ndarray, ids: pa.Table,
           meta: dict[str, Any], exact_below: int, factory: str | None,
           summary: dict[str, Any]) -> None:
    index, built = idx.build_index(vectors, exact_below=exact_below, factory=factory)
    idx.write_index(root, kind, sae_id, index, ids, dict(meta, **built))
    summary["indexes"].append({"kind": kind, "sae_id": sae_id, "n": built["n"], "d": built["d"],
                               "factory": built["factory"]})


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.index ATLAS`: build the indexes and print the summary."""
    p = argparse.ArgumentParser(prog="python -m jobs.index", description=__doc__.splitlines()[0])
    p.add_argument("atlas")
    p.add_argument("--exact-below", type=int, default=idx.EXACT_BELOW)
    p.add_argument("--factory", default=None)
    a = p.parse_args(argv)
    report(build_indexes(a.atlas, a.exact_below, a.factory))
    return 0


def report(summary: dict[str, Any]) -> None:
    """Print one line per index built, then the total."""
    for row in summary["indexes"]:
        print(f"{row['kind']:<8} {row['sae_id']:<32} {row['n']:>9} x {row['d']:<5} "
              f"{row['factory']}")
    print(f"[index] {len(summary['indexes'])} indexes in {summary['seconds']} s "
          f"(exemplars from {summary['exemplars_from'] or 'nowhere: run scan'})")


if __name__ == "__main__":
    sys.exit(main())
