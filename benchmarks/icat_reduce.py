"""Benchmark the ICAT reduce: the old in-memory reduce (every partial read and concatenated,
`combine` + `top_incoming`) against the DuckDB out-of-core reduce (`reduce_partials`), in one run.

    python benchmarks/icat_reduce.py                      # 200 partials x 200k rows
    python benchmarks/icat_reduce.py --partials 50 --rows 100000 --memory-limit 256MB

Synthetic partials (numpy, seeded), one row per key per partial as the map writes them: one
layer pair, 4 methods, scope "all" plus `--classes` class scopes, `--latents` upstream latents
(and the error node) x `--nodes` downstream nodes, so most keys recur across partials. Each
reduce runs in a fresh child process; its peak RSS is the child's `ru_maxrss` (the imports,
torch included, are reported apart). The two outputs
are compared (rows, keys, max relative weight difference).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.results_io import write_results  # noqa: E402
from pipeline.icat.aggregate import combine, reduce_partials, top_incoming  # noqa: E402
from pipeline.store import fs  # noqa: E402
from schemas import EDGES  # noqa: E402

METHODS = ["ig", "grad_x_act", "grad", "srd"]


def make_partials(folder: str, partials: int, rows: int, latents: int, nodes: int, classes: int,
                  seed: int) -> list[str]:
    """Write `partials` EDGES files of `rows` distinct keys each; returns their paths."""
    rng = np.random.default_rng(seed)
    scopes = pa.array(["all"] + [f"class={c}" for c in range(classes)])
    methods = pa.array(METHODS)
    space = (latents + 1) * nodes * len(METHODS) * len(scopes)
    files = []
    for i in range(partials):
        code = np.sort(rng.choice(space, rows, replace=False))
        code, scope = np.divmod(code, len(scopes))
        code, method = np.divmod(code, len(METHODS))
        src, dst = np.divmod(code, nodes)
        table = pa.table({
            "atlas_id": pa.array(["bench"] * rows), "src_layer": pa.array(["layer3"] * rows),
            "src_latent": (src - 1).astype(np.int32), "dst_layer": pa.array(["layer4"] * rows),
            "dst_latent": dst.astype(np.int32), "method": methods.take(method),
            "scope": scopes.take(scope), "weight": rng.normal(size=rows) * rng.random(rows),
            "n_images": rng.integers(1, 16, rows)})
        files.append(os.path.join(folder, f"part-{i:06d}.parquet"))
        fs.write_parquet(table, files[-1], EDGES)
    return files


def in_memory(files: list[str], top: int) -> pa.Table:
    """The reduce before DuckDB: every partial in memory, summed, cut."""
    return top_incoming(combine([pq.read_table(f) for f in files], "bench"), top)


def out_of_core(files: list[str], top: int, memory_limit: str, spill: str) -> pa.Table:
    [reader] = reduce_partials(files, [("layer3", "layer4")], "bench", top,
                               memory_limit=memory_limit, spill_dir=spill)
    return reader.read_all()


def _child(kind: str, files: list[str], top: int, memory_limit: str, spill: str, out: str,
           queue: Any) -> None:
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after the imports
    t0 = time.perf_counter()
    try:
        table = in_memory(files, top) if kind == "in_memory" else out_of_core(files, top, memory_limit, spill)
    except BaseException as exc:
        queue.put({"error": repr(exc)})  # the parent waits on the queue: never leave it empty
        raise
    seconds = time.perf_counter() - t0
    pq.write_table(table, out)
    queue.put({"seconds": round(seconds, 2), "rows": table.num_rows,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "rss_after_imports_mb": round(baseline, 1)})


def run_child(kind: str, *args: Any) -> dict[str, Any]:
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_child, args=(kind, *args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{kind} reduce failed: {result['error']}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partials", type=int, default=200)
    p.add_argument("--rows", type=int, default=200_000, help="rows per partial")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--nodes", type=int, default=64, help="downstream nodes")
    p.add_argument("--classes", type=int, default=9, help="class scopes besides 'all'")
    p.add_argument("--top-edges", type=int, default=32)
    p.add_argument("--memory-limit", default="1GB", help="DuckDB's limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/icat_reduce.json")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="icat-reduce-bench-") as folder:
        t0 = time.perf_counter()
        files = make_partials(folder, a.partials, a.rows, a.latents, a.nodes, a.classes, a.seed)
        print(f"{a.partials} partials x {a.rows:,} rows written in {time.perf_counter() - t0:.0f}s",
              flush=True)
        arrow_mb = sum(pq.read_metadata(f).num_rows for f in files) * pq.read_table(files[0]).nbytes \
            / a.rows / 2 ** 20
        parquet_mb = sum(os.path.getsize(f) for f in files) / 2 ** 20
        outs = {k: os.path.join(folder, f"{k}.parquet") for k in ("in_memory", "duckdb")}
        spill = os.path.join(folder, ".spill")
        results = {k: run_child(k, files, a.top_edges, a.memory_limit, spill, outs[k]) for k in outs}
        old, new = (pq.read_table(outs[k]) for k in outs)
    same_keys = old.drop_columns(["weight"]).equals(new.drop_columns(["weight"]))
    rel = np.abs(new["weight"].to_numpy() - old["weight"].to_numpy()) / np.maximum(
        np.abs(old["weight"].to_numpy()), 1e-300) if same_keys else None
    result = {
        "partials": a.partials, "rows_per_partial": a.rows, "latents": a.latents, "nodes": a.nodes,
        "methods": len(METHODS), "scopes": a.classes + 1, "top_edges": a.top_edges,
        "partials_parquet_mb": round(parquet_mb, 1), "partials_arrow_mb": round(arrow_mb, 1),
        "duckdb_memory_limit": a.memory_limit, "reduce": results, "same_rows_and_keys": same_keys,
        "max_rel_weight_diff": None if rel is None else float(rel.max()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "duckdb": duckdb.__version__, "pyarrow": pa.__version__},
    }
    print(f"partials: {parquet_mb:,.0f} MB Parquet, {arrow_mb:,.0f} MB in Arrow; DuckDB limit "
          f"{a.memory_limit}")
    print(f"{'reduce':<12}{'seconds':>10}{'peak RSS MB':>14}{'after imports':>15}{'rows':>12}")
    for kind, r in results.items():
        print(f"{kind:<12}{r['seconds']:>10}{r['peak_rss_mb']:>14}{r['rss_after_imports_mb']:>15}"
              f"{r['rows']:>12,}")
    print(f"same rows and keys: {same_keys}; max relative weight difference: "
          f"{result['max_rel_weight_diff']}")
    write_results(Path(a.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
