"""Benchmark the atlas's query paths: DuckDB views over Parquet, and FAISS IVF/PQ vs exact search.

    python benchmarks/atlas_queries.py                       # 1M activations rows, 1M x 128 vectors
    python benchmarks/atlas_queries.py --rows 200000 --vectors 200000 --out atlas_queries_small.json

DuckDB: a synthetic `activations` table (the ACTIVATIONS schema, 8 parts under
activations/sae=ID/, zstd Parquet as the pipeline writes it) is opened through `Atlas` (the
read-only views) and three example queries are timed (median of `--repeats` runs after one
warm-up): the top images of one latent, per-latent firing counts over the whole table, and the
latents co-firing with one latent in the same images (a self-join).

FAISS: `--vectors` unit vectors of width `--dim` drawn around 4096 random centres (region
embeddings and decoder directions are clustered; uniform random vectors are the worst case of
any approximate index), indexed with the factory `pipeline.atlas.index` picks at that size
and, for comparison, with plain `IVF,PQ{d/4}np`; `--queries` held-out vectors from the same
distribution are searched for their 10 nearest neighbours; recall@10 is measured against an
exact IndexFlatIP search of the same queries, at several nprobe (and re-ranking k_factor)
values. Timings are
wall-clock on this machine (see `machine` in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.atlas import Atlas  # noqa: E402
from pipeline.atlas import index as idx  # noqa: E402
from pipeline.store import fs  # noqa: E402
from schemas import ACTIVATIONS  # noqa: E402

SAES = {"layer3-topk-4096-k32": ("layer3", 4096), "layer4-topk-8192-k32": ("layer4", 8192)}
PARTS_PER_SAE = 4
TOP_PER_IMAGE = 32
QUERIES = {
    "top_images_of_a_latent": (
        "SELECT image_id, max_act, y, x FROM activations "
        "WHERE sae_id = 'layer4-topk-8192-k32' AND latent = 17 ORDER BY max_act DESC LIMIT 20"),
    "firing_counts_per_latent": (
        "SELECT sae_id, latent, count(*) AS images, avg(max_act) AS mean_max "
        "FROM activations GROUP BY ALL ORDER BY images DESC LIMIT 10"),
    "co_firing_latents": (
        "SELECT b.latent, count(*) AS images FROM activations a JOIN activations b "
        "ON a.image_id = b.image_id AND a.sae_id = b.sae_id "
        "WHERE a.sae_id = 'layer4-topk-8192-k32' AND a.latent = 17 AND b.latent <> 17 "
        "GROUP BY b.latent ORDER BY images DESC LIMIT 10"),
}


def write_activations(root: str, rows: int, seed: int) -> int:
    """A synthetic activations table of about `rows` rows; returns the rows written."""
    rng = np.random.default_rng(seed)
    per_part = rows // (len(SAES) * PARTS_PER_SAE)
    images_per_part = per_part // TOP_PER_IMAGE
    written = 0
    for s, (sae_id, (layer, n_latents)) in enumerate(SAES.items()):
        for p in range(PARTS_PER_SAE):
            image_ids = np.repeat(p * 1_000_000 + np.arange(images_per_part), TOP_PER_IMAGE)
            n = len(image_ids)
            # Zipf-like latent popularity: a few latents fire on many images, most on few
            latent = np.minimum(rng.zipf(1.3, n) - 1, n_latents - 1).astype(np.int32)
            acts = rng.gamma(2.0, 1.0, n).astype(np.float32)
            rank = np.tile(np.arange(TOP_PER_IMAGE, dtype=np.int16), images_per_part)
            position = rng.integers(0, 196, n).astype(np.int32)
            table = pa.table({
                "atlas_id": pa.array(["bench"] * n), "image_id": image_ids, "layer": [layer] * n,
                "sae_id": [sae_id] * n, "latent": latent, "max_act": acts, "position": position,
                "y": position // 14, "x": position % 14, "rank": rank})
            fs.write_parquet(table, fs.join(root, "activations", f"sae={sae_id}",
                                            f"part-{p:06d}.parquet"), ACTIVATIONS)
            written += n
    return written


def time_queries(atlas: Atlas, repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, q in QUERIES.items():
        atlas.sql(q)  # warm-up: file metadata and OS page cache
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = atlas.sql(q)
            times.append(time.perf_counter() - t)
        out[name] = {"median_ms": round(1000 * statistics.median(times), 2),
                     "min_ms": round(1000 * min(times), 2), "rows": result.num_rows, "sql": q}
    return out


def clustered(n: int, d: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    x = centres[picks] + (0.5 / np.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)
    return idx.normalise_rows(x)


def bench_faiss(n: int, d: int, n_queries: int, seed: int) -> dict[str, object]:
    """Build time, size, latency and recall@10 of the default index and of plain IVF/PQ."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4096, d), dtype=np.float32) / np.sqrt(d)
    base = clustered(n, d, centres, rng)
    queries = clustered(n_queries, d, centres, rng)
    exact = faiss.IndexFlatIP(d)
    exact.add(base)
    t = time.perf_counter()
    _, truth = exact.search(queries, 10)
    exact_s = time.perf_counter() - t
    default = idx.ivfpq_factory(n, d)
    plain = default.split(",")[0] + f",PQ{d // 4}np"
    indexes = []
    for factory in (default, plain):
        t = time.perf_counter()
        index, meta = idx.build_index(base, factory=factory, seed=seed)
        build_s = time.perf_counter() - t
        ivf = faiss.extract_index_ivf(index)
        refined = meta["k_factor"] is not None
        settings = ([(p, kf) for p in (16, 32, 64) for kf in (4, 16, 64)] if refined
                    else [(p, None) for p in (8, 32, 128)])
        sweep = []
        for nprobe, k_factor in settings:
            ivf.nprobe = nprobe
            if refined:
                faiss.downcast_index(index).k_factor = k_factor
            t = time.perf_counter()
            _, found = index.search(queries, 10)
            batch_s = time.perf_counter() - t
            t = time.perf_counter()
            for q in queries[:100]:
                index.search(q[None], 10)
            single_s = (time.perf_counter() - t) / 100
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
            sweep.append({"nprobe": nprobe, "k_factor": k_factor,
                          "recall_at_10": round(recall, 4),
                          "batch_ms_per_query": round(1000 * batch_s / n_queries, 4),
                          "single_query_ms": round(1000 * single_s, 3)})
        indexes.append({"factory": factory, "default": factory == default,
                        "default_nprobe": meta["nprobe"], "k_factor": meta["k_factor"],
                        "build_s": round(build_s, 1),
                        "bytes_per_vector": round(faiss.serialize_index(index).size / n, 1),
                        "sweep": sweep})
        del index
    return {"n": n, "d": d, "queries": n_queries, "vectors": "4096 centres of norm ~1, "
            "Gaussian spread of norm ~0.5, unit-normalised",
            "exact_batch_ms_per_query": round(1000 * exact_s / n_queries, 3),
            "indexes": indexes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="activations rows")
    p.add_argument("--vectors", type=int, default=1_000_000, help="FAISS base vectors")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    # one thread by default: on a shared 2-core machine OpenMP's spinning threads lose more
    # than they gain (measured: a 120k-vector build took 71 s with 2 threads, 18 s with 1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas_queries.json"))
    a = p.parse_args()
    faiss.omp_set_num_threads(a.threads)
    # the load average says how much of the CPUs other processes took during the run
    result: dict[str, object] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": a.threads,
                    "faiss": faiss.__version__, "duckdb": duckdb.__version__,
                    "loadavg_1m_start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as root:
        t = time.perf_counter()
        rows = write_activations(root, a.rows, a.seed)
        atlas = Atlas.open(root, threads=a.threads)
        parquet_mb = sum(f.stat().st_size for f in Path(root).rglob("*.parquet")) / 2**20
        result["duckdb"] = {"rows": rows, "parquet_mb": round(parquet_mb, 1),
                            "write_s": round(time.perf_counter() - t, 1),
                            "queries": time_queries(atlas, a.repeats)}
    result["faiss"] = bench_faiss(a.vectors, a.dim, a.queries, a.seed)
    result["machine"]["loadavg_1m_end"] = round(os.getloadavg()[0], 2)

    print(f"DuckDB over {rows:,} activations rows ({result['duckdb']['parquet_mb']} MB Parquet)")
    for name, q in result["duckdb"]["queries"].items():
        print(f"  {name:<28} {q['median_ms']:>9.1f} ms median  ({q['rows']} rows)")
    f = result["faiss"]
    print(f"FAISS on {f['n']:,} x {f['d']}: exact (Flat) search "
          f"{f['exact_batch_ms_per_query']} ms/query batched")
    for ix in f["indexes"]:
        print(f"  {ix['factory']}{' (default)' if ix['default'] else ''}: built in "
              f"{ix['build_s']} s, {ix['bytes_per_vector']} bytes/vector")
        print(f"  {'nprobe':>6} {'k_factor':>8} {'recall@10':>10} {'ms/query batched':>17} "
              f"{'ms single':>10}")
        for s in ix["sweep"]:
            print(f"  {s['nprobe']:>6} {s['k_factor']!s:>8} {s['recall_at_10']:>10.3f} "
                  f"{s['batch_ms_per_query']:>17.3f} {s['single_query_ms']:>10.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
