"""Edges aggregated over images: sums, counts, scopes, and the top incoming edges per node.

Per image, a layer pair gives a score per (upstream latent or error node, downstream node,
method). Over images an edge holds the sum of its scores (`weight`) and the number of images
where it was non-zero (`n_images`), once over all images (scope "all") and once per class
(scope "class=C") for images with a label. Sums and counts add, so shards are aggregated into
partial tables (the map) and partial tables into the edges table (the reduce) with the same
function; the top-k cut runs once, on the reduced table.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.icat.attribution import PairScores
from schemas import EDGES

KEY = ["src_layer", "src_latent", "dst_layer", "dst_latent", "method", "scope"]


def edge_rows(scores: dict[str, PairScores], labels: np.ndarray, src_layer: str, dst_layer: str,
              atlas_id: str) -> pa.Table:
    """Per-image non-zero edges of one layer pair as an EDGES table (n_images = 1 per row).

    scores: {method: PairScores}, all over the same rows; labels: int[N] per batch image
    (-1 unknown). Each row is emitted under scope "all" and, when labelled, "class=C".
    """
    parts = []
    for method, s in scores.items():
        w = s.scores[method].detach().double().cpu().numpy()  # [Q, F + 1]
        q, f = np.nonzero(w)
        src = np.where(f == w.shape[1] - 1, -1, f).astype(np.int32)
        dst = s.node.cpu().numpy()[q].astype(np.int32)
        label = labels[s.image.cpu().numpy()[q]]
        weight = w[q, f]
        scope = np.full(len(q), "all", dtype=object)
        known = label >= 0
        parts.append((src, dst, weight, scope, method))
        parts.append((src[known], dst[known], weight[known],
                      np.array([f"class={c}" for c in label[known]], dtype=object), method))
    n = sum(len(p[0]) for p in parts)
    table = pa.table({
        "atlas_id": pa.array([atlas_id] * n, pa.string()),
        "src_layer": pa.array([src_layer] * n, pa.string()),
        "src_latent": pa.array(np.concatenate([p[0] for p in parts]) if n else [], pa.int32()),
        "dst_layer": pa.array([dst_layer] * n, pa.string()),
        "dst_latent": pa.array(np.concatenate([p[1] for p in parts]) if n else [], pa.int32()),
        "method": pa.array([m for p in parts for m in [p[4]] * len(p[0])], pa.string()),
        "scope": pa.array(np.concatenate([p[3] for p in parts]) if n else [], pa.string()),
        "weight": pa.array(np.concatenate([p[2] for p in parts]) if n else [], pa.float64()),
        "n_images": pa.array(np.ones(n, np.int64), pa.int64()),
    })
    return table.cast(EDGES)


def combine(tables: list[pa.Table], atlas_id: str) -> pa.Table:
    """Sum `weight` and `n_images` per edge over EDGES tables (per-image rows or partials)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return EDGES.empty_table()
    merged = pa.concat_tables([t.select(EDGES.names).cast(EDGES) for t in tables])
    out = merged.group_by(KEY, use_threads=False).aggregate(
        [("weight", "sum"), ("n_images", "sum")])
    out = out.rename_columns([{"weight_sum": "weight", "n_images_sum": "n_images"}.get(c, c)
                              for c in out.column_names])
    out = out.append_column("atlas_id", pa.array([atlas_id] * out.num_rows, pa.string()))
    return sort_edges(out.select(EDGES.names).cast(EDGES))


def top_incoming(table: pa.Table, top_edges: int, min_weight: float = 0.0) -> pa.Table:
    """Keep, per downstream node, method and scope, the `top_edges` incoming edges of largest
    |weight| with |weight| >= min_weight. **[choice]** The error node's edge is always kept,
    so what the latents do not explain is never dropped from the graph."""
    if top_edges < 1:
        raise ValueError(f"top_edges={top_edges}: expected an int >= 1")
    if table.num_rows == 0:
        return table
    group = _group_ids(table, ["dst_layer", "dst_latent", "method", "scope"])
    absw = np.abs(table.column("weight").to_numpy())
    # within a group, larger |weight| first; ties broken by src (layer, latent) for determinism
    src_latent = table.column("src_latent").to_numpy()
    src_layer = _group_ids(table, ["src_layer"])
    order = np.lexsort((src_latent, src_layer, -absw, group))
    rank = np.empty(len(order), np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    counts = np.diff(np.r_[starts, len(order)])
    rank[order] = np.arange(len(order)) - np.repeat(starts, counts)
    is_error = src_latent == -1
    keep = is_error | ((rank - _errors_before(order, is_error, starts, counts) < top_edges)
                       & (absw >= min_weight))
    return sort_edges(table.filter(pa.array(keep)))


def sort_edges(table: pa.Table) -> pa.Table:
    """Deterministic row order: by key (so equal inputs give byte-equal parts)."""
    return table.sort_by([(k, "ascending") for k in KEY])


def _group_ids(table: pa.Table, columns: list[str]) -> np.ndarray:
    keys = pc.binary_join_element_wise(*[pc.cast(table.column(c), pa.string()) for c in columns],
                                       "\x1f")
    return np.unique(keys.to_numpy(zero_copy_only=False), return_inverse=True)[1].reshape(-1)


def _errors_before(order: np.ndarray, is_error: np.ndarray, starts: np.ndarray,
                   counts: np.ndarray) -> np.ndarray:
    """For each row, how many error-node rows rank above it in its group (they do not use up
    the top_edges budget of the latents)."""
    err_sorted = is_error[order].astype(np.int64)
    cum = np.cumsum(err_sorted) - err_sorted
    base = np.repeat(cum[starts], counts)
    out = np.empty(len(order), np.int64)
    out[order] = cum - base
    return out
