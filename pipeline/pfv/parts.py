"""Reading what the extract stage committed: PFV parts and their statistics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.store import AtlasRoot, fs

EXTRACT = "extract"


@dataclass(frozen=True)
class PFVPart:
    """One committed PFV part of a layer: `values` (.npy [rows, C]) and `ids` (.parquet)."""

    part: str
    values: str
    ids: str
    rows: int


def committed_parts(root: AtlasRoot | str, layer: str) -> list[PFVPart]:
    """The PFV parts of `layer` recorded in the manifest, in part order.

    Only committed parts are listed (never a glob): a part a crashed run left without its
    record is invisible until a re-run recomputes and commits it.
    """
    root = AtlasRoot.of(root)
    records = root.manifest.records(EXTRACT)
    key = f"pfv/layer={layer}"
    parts = [
        PFVPart(part=r.part, rows=r.outputs[key],
                values=root.join("pfv", f"layer={layer}", f"{r.part}.npy"),
                ids=root.join("pfv", f"layer={layer}", f"{r.part}.parquet"))
        for r in sorted(records.values(), key=lambda r: r.part) if key in r.outputs
    ]
    if not parts:
        found = sorted({k.split("=", 1)[1] for r in records.values() for k in r.outputs
                        if k.startswith("pfv/layer=")})
        raise ValueError(f"layer {layer!r} has no extracted PFVs under {root}; "
                         f"extracted layers: {', '.join(found) or 'none'}")
    return parts


def read_values(parts: list[PFVPart], max_rows: int | None = None) -> np.ndarray:
    """float32 [rows, C]: the parts' PFVs concatenated in order (the first `max_rows`)."""
    arrays, total = [], 0
    for p in parts:
        if max_rows is not None and total >= max_rows:
            break
        a = fs.read_npy(p.values)
        take = len(a) if max_rows is None else min(len(a), max_rows - total)
        arrays.append(np.asarray(a[:take], np.float32))
        total += take
    return np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)


def pfv_stats(values: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Summary of PFVs [M, C] (M = images x positions): norms, sparsity, dead channels."""
    v = torch.as_tensor(np.asarray(values, np.float32))
    norms = v.norm(dim=1)
    active = (v > 0).float()
    return {
        "pfvs": int(v.shape[0]),
        "channels": int(v.shape[1]),
        "mean_norm": round(float(norms.mean()), 4),
        "std_norm": round(float(norms.std()), 4),
        "zero_frac": round(float((v == 0).float().mean()), 4),
        "active_channels_per_pfv": round(float(active.sum(1).mean()), 2),
        "dead_channels": int((active.sum(0) == 0).sum()),
        "top_channels_by_mean": [int(i) for i in v.mean(0).topk(min(5, v.shape[1])).indices],
    }
