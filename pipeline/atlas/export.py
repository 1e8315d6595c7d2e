"""An atlas's SAEs in SAELens's on-disk format (`concept-atlas export-sae`).

Each SAE goes to `OUT/SAE_ID/` (`cfg.json` + `sae_weights.safetensors`, pipeline/sae/saelens.py),
with SAELens's `hook_name` set to the layer the SAE reads and `model_name` to the atlas's
model; `metadata.concept_atlas` keeps what SAELens has no field for: the atlas and SAE ids, the
model's weight source and fingerprint, what a PFV of the layer is, and the held-out metrics.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from pipeline.atlas.api import Atlas
from pipeline.sae.saelens import export_saelens
from pipeline.store import AtlasRoot

_METRICS = ("fvu", "l0", "dead_frac", "dense_frac", "logit_agreement", "logit_kl", "steps",
            "tokens")


def export_saes(atlas: Atlas, out: str | os.PathLike[str],
                names: Sequence[str] | None = None) -> list[Path]:
    """Write every SAE of `names` (layers or sae_ids; default: all) to `out/SAE_ID/`; returns
    the folders. ValueError naming an unknown layer or an atlas without SAEs."""
    if not atlas.saes:
        raise ValueError(f"the atlas at {atlas.root} has no trained SAE; run "
                         f"`concept-atlas train-sae {atlas.root}` first")
    root = AtlasRoot.of(atlas.root)
    extract = root.extract()
    layers = root.layers()
    folders = []
    for sae_id in atlas.expand(list(names) if names else list(atlas.saes)):
        row = atlas.saes[sae_id]
        layer = layers.get(row["layer"], {})
        metadata = {
            "atlas_id": row["atlas_id"], "sae_id": sae_id, "layer": row["layer"],
            "model_weights": extract.weights, "weights_fingerprint": extract.weights_fingerprint,
            # what one input row is: a CNN tap's channel vector at one position, a ViT's token
            "pfv": {k: layer.get(k) for k in ("kind", "channels", "grid_h", "grid_w",
                                              "num_special")},
            "heldout": {k: row[k] for k in _METRICS},
        }
        folders.append(export_saelens(atlas.sae(sae_id), Path(out) / sae_id,
                                      hook_name=row["layer"], model_name=extract.model,
                                      metadata=metadata))
    return folders
