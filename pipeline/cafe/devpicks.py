"""Exemplar picks straight from stored PFVs: a stand-in for the scan stage in tests and benchmarks.

`top_picks` writes `exemplar_picks/sae=SAE_ID/part-000000.parquet` (EXEMPLAR_PICKS, kind "top"
only): per latent, the `per_latent` images where it is strongest, each at its argmax position.
The scan stage (`pipeline/latents`, `jobs/scan.py`) writes the real picks (with quantile picks
and streaming top-k over every PFV); this one holds every part's activations of one chunk of
images in memory, which is fine for test and demo sizes only.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.pfv.parts import committed_parts, read_layers
from pipeline.pfv.sae_runs import read_saes
from pipeline.sae import load_sae
from pipeline.store import fs
from schemas import EXEMPLAR_PICKS


@torch.no_grad()
def top_picks(root: str, sae_id: str, per_latent: int, atlas_id: str = "atlas") -> pa.Table:
    """Top-`per_latent` (image, argmax position) picks of every latent that fires, over the
    positions the extraction stored (all, or its per-image sample); written and returned."""
    row = {r["sae_id"]: r for r in read_saes(root)}[sae_id]
    layer, sae = row["layer"], load_sae(row["weights"])
    spec = read_layers(root)[layer]
    per_image = int(spec["positions_per_image"])  # extract stores each image's rows together
    best = torch.full((0, sae.cfg.n_latents), -1.0)
    ids, pos = torch.zeros(0, dtype=torch.long), torch.zeros(0, sae.cfg.n_latents, dtype=torch.long)
    for part in committed_parts(root, layer):
        values = torch.from_numpy(np.asarray(fs.read_npy(part.values), np.float32))
        table = fs.read_parquet(part.ids)
        image_ids = torch.from_numpy(table["image_id"].to_numpy()[::per_image].copy())
        stored = torch.from_numpy(table["position"].to_numpy().astype(np.int64)).view(-1, per_image)
        acts = sae.encode(values).view(len(image_ids), per_image, -1)
        top, arg = acts.max(1)  # each image once per latent, at its argmax
        best = torch.cat([best, top])
        ids, pos = torch.cat([ids, image_ids]), torch.cat([pos, stored.gather(1, arg)])
        keep = best.topk(min(per_latent, len(best)), dim=0).indices.unique()
        best, ids, pos = best[keep], ids[keep], pos[keep]
    vals, idx = best.topk(min(per_latent, len(best)), dim=0)  # [k, F]
    rows = []
    for latent in range(sae.cfg.n_latents):
        for rank in range(vals.shape[0]):
            if vals[rank, latent] <= 0:
                break
            i = int(idx[rank, latent])
            p = int(pos[i, latent])
            y, x = divmod(p - int(spec["num_special"]), int(spec["grid_w"]))
            rows.append({"atlas_id": atlas_id, "layer": layer, "sae_id": sae_id, "latent": latent,
                         "kind": "top", "rank": rank, "image_id": int(ids[i]),
                         "activation": float(vals[rank, latent]), "position": p, "y": y, "x": x})
    picks = pa.Table.from_pylist(rows, schema=EXEMPLAR_PICKS)
    fs.write_parquet(picks, fs.join(root, "exemplar_picks", f"sae={sae_id}", "part-000000.parquet"),
                     EXEMPLAR_PICKS)
    return picks
