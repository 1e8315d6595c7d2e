"""Edges aggregated over images: sums, counts, scopes, and the top incoming edges per node.

Per image, a layer pair gives a score per (upstream latent or error node, downstream node,
method). Over images an edge holds the sum of its scores (`weight`) and the number of images
where it was non-zero (`n_images`), once over all images (scope "all") and once per class
(scope "class=C") for images with a label. Sums and counts add: a shard's per-image rows are
summed in memory into a partial table (`combine`, the map); the partial files are summed out
of core by DuckDB and cut to the top incoming edges per node (`reduce_partials`, the reduce).
`top_incoming` is the same cut on a table in memory.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.icat.attribution import PairScores
from pipeline.store import fs
from schemas import EDGES

KEY = ["src_layer", "src_latent", "dst_layer", "dst_latent", "method", "scope"]
# DuckDB's memory limit for the reduce ([choice]; `--reduce-memory` of `concept-atlas icat`): past it the
# aggregation and the top-k window spill to disk
REDUCE_MEMORY = "4GB"
# Exact sums: each weight is split into three integer lanes of 2^-160, 2^-64 and 2^32 units
# (|lane| < 2^96; only the last rounds, below 2^-160) summed as HUGEINT, then turned into one
# double. Integer sums do not depend on the order of the rows, so the result is the same bits
# whatever DuckDB's threads, spills and file order (a float sum over threads is not).
# Weights need |w| < 2^128; N < 2^30 rows per edge keeps every lane below HUGEINT's 2^127.
_LANES = (32, -64, -160)
_MAX_WEIGHT = 2.0 ** 128


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


_MEMORY_LIMIT = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


def check_memory_limit(value: str) -> str:
    """`value` if it is a DuckDB memory limit such as "4GB" or "512MiB"; else ValueError (checked
    before the map, so a typo does not surface only after every shard was scored)."""
    if not isinstance(value, str) or not _MEMORY_LIMIT.fullmatch(value.strip()):
        raise ValueError(f"reduce_memory={value!r}: expected a size such as '4GB', '512MB' or "
                         f"'16GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return value


def reduce_partials(files: list[str], pairs: list[tuple[str, str]], atlas_id: str,
                    top_edges: int, min_weight: float = 0.0, *,
                    memory_limit: str = REDUCE_MEMORY, spill_dir: str | None = None,
                    threads: int | None = None) -> Iterator[pa.RecordBatchReader]:
    """Sum the partial EDGES files out of core and yield, per layer pair in order, its top
    incoming edges (`top_incoming`'s rule) as EDGES batches in `sort_edges` order.

    files: partial Parquet files, local paths or fsspec URLs of one filesystem. DuckDB runs
    under `memory_limit` and spills to `spill_dir` (a folder it owns: cleared before and after;
    default a system temporary folder). Sums are exact (`_LANES`), so equal inputs give equal
    bits. Raises ValueError naming the file of a non-finite or too large weight. Consume each
    reader before asking for the next pair.
    """
    if top_edges < 1:
        raise ValueError(f"top_edges={top_edges}: expected an int >= 1")
    if not files:
        yield from (pa.RecordBatchReader.from_batches(EDGES, []) for _ in pairs)
        return
    with _spill_folder(spill_dir) as spill:
        con = duckdb.connect(os.path.join(spill, "reduce.duckdb"), config={
            "memory_limit": memory_limit, "temp_directory": os.path.join(spill, "tmp"),
            "preserve_insertion_order": False, **({"threads": threads} if threads else {})})
        try:
            con.execute("SET enable_progress_bar = false")
            if fs.local_path(files[0]) is None:
                con.register_filesystem(fs.filesystem(files[0])[0])
            else:
                files = [fs.local_path(f) for f in files]
            _sum_partials(con, files)
            for a, b in pairs:
                yield _top_incoming_sql(con, a, b, atlas_id, top_edges, min_weight)
        finally:
            con.close()


def _sum_partials(con: duckdb.DuckDBPyConnection, files: list[str]) -> None:
    """Table `sums`: weight and n_images summed per KEY over `files`, exactly."""
    key = ", ".join(KEY)
    hi, mid, lo = (2.0 ** u for u in _LANES)
    try:
        con.execute(f"""
            CREATE TABLE sums AS
            WITH checked AS (
                SELECT {key}, n_images, CASE WHEN abs(weight) < $max THEN weight ELSE error(printf(
                    'weight %s in %s: expected a finite edge score below 2^128', weight::VARCHAR,
                    filename))
                    END AS w
                FROM read_parquet($files, filename = true)),
            high AS (SELECT *, trunc(w / $hi) AS a FROM checked),
            middle AS (SELECT *, trunc((w - a * $hi) / $mid) AS b FROM high),
            lanes AS (SELECT *, round((w - a * $hi - b * $mid) / $lo) AS c FROM middle)
            SELECT {key}, (sum(a::HUGEINT)::DOUBLE * $hi + sum(b::HUGEINT)::DOUBLE * $mid)
                          + sum(c::HUGEINT)::DOUBLE * $lo AS weight,
                   sum(n_images)::BIGINT AS n_images
            FROM lanes GROUP BY {key}""",
            {"files": files, "hi": hi, "mid": mid, "lo": lo, "max": _MAX_WEIGHT})
    except duckdb.InvalidInputException as exc:
        raise ValueError(f"icat reduce: {exc}") from None


def _top_incoming_sql(con: duckdb.DuckDBPyConnection, src_layer: str, dst_layer: str,
                      atlas_id: str, top_edges: int, min_weight: float) -> pa.RecordBatchReader:
    """`top_incoming` over the rows of one pair in table `sums`: the error node in a window
    partition of its own, so it is always kept and never uses up the latents' budget."""
    query = f"""
        SELECT $atlas_id AS atlas_id, {", ".join(KEY)}, weight, n_images FROM sums
        WHERE src_layer = $a AND dst_layer = $b AND (src_latent = -1 OR abs(weight) >= $min)
        QUALIFY src_latent = -1 OR row_number() OVER (
            PARTITION BY dst_latent, method, scope, src_latent = -1
            ORDER BY abs(weight) DESC, src_layer, src_latent) <= $top
        ORDER BY {", ".join(KEY)}"""
    params = {"atlas_id": atlas_id, "a": src_layer, "b": dst_layer, "min": min_weight,
              "top": top_edges}
    reader = con.sql(query, params=params).to_arrow_reader(fs.ROW_GROUP_SIZE)
    return pa.RecordBatchReader.from_batches(EDGES, (batch.cast(EDGES) for batch in reader))


@contextmanager
def _spill_folder(spill_dir: str | None) -> Iterator[str]:
    if spill_dir is None:
        with tempfile.TemporaryDirectory(prefix="icat-reduce-") as folder:
            yield folder
        return
    shutil.rmtree(spill_dir, ignore_errors=True)  # what a killed reduce left
    os.makedirs(spill_dir)
    try:
        yield spill_dir
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


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
