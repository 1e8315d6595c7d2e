"""Server time of the atlas browser under load: the latent page and the layer table, cold and
warm, with N concurrent clients on localhost.

    python benchmarks/browser_load.py --atlas demo_out --clients 50
    python benchmarks/browser_load.py --synthetic 16384 1000000 --clients 50

The server is `concept-atlas serve` in its own process (`--workers N`: N processes; a fresh
render cache in a temporary folder); each client is an asyncio task of one aiohttp event loop
with its own HTTP connection, requesting its share of the URLs one after another. The time
reported is the server's own (`Server-Timing: app;dur=`, from the request's arrival in the app
to the response's start, waiting for a worker thread and the atlas lock included), so the
clients' overhead is not counted; the wall time clients saw is reported too. `cold`: the first
request of each URL in a fresh server (the page not yet built, no picture cached; the server
reads each SAE's tables, weights and index at start); `warm`: the same URLs again. The
synthetic atlas has one SAE of `L` latents (d_in 128, random decoder, a FAISS decoder index),
`A` activation rows over 50,000 images, 4 exemplars per latent with iERF PNGs and 8 ICAT edges
per latent; it has no images to draw, so only pages are timed there (the pictures are timed on
a real atlas). Needs the `serve` and `bench` extras (aiohttp).
"""
from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_results  # noqa: E402


def synthetic_atlas(root: Path, n_latents: int, n_acts: int, seed: int = 0) -> str:
    """Write the synthetic atlas described in the module docstring under `root`."""
    import io

    import pyarrow as pa
    import torch
    from PIL import Image

    from pipeline.atlas import index as idx
    from pipeline.sae import SAE, SAEConfig, save_sae
    from pipeline.store import fs
    from schemas import ACTIVATIONS, EXEMPLARS, IMAGES, LATENT_STATS, LAYERS, SAES, EDGES

    rng = np.random.default_rng(seed)
    r = str(root)
    n_images, d_in, sae_id, layer = 50_000, 128, "syn-topk", "layer4"
    fs.write_parquet(pa.Table.from_pylist([dict(
        atlas_id="syn", image_id=i, shard="none.tar", key=f"{i:08d}", label=i % 5, width=128,
        height=128) for i in range(n_images)], schema=IMAGES), f"{r}/images/part-000000.parquet")
    fs.write_parquet(pa.Table.from_pylist([dict(
        atlas_id="syn", layer=layer, kind="cnn", channels=d_in, grid_h=4, grid_w=4,
        num_special=0, positions_per_image=16)], schema=LAYERS), f"{r}/layers/part-000000.parquet")
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, n_latents=n_latents, k=32))
    weights = f"{r}/sae_weights/{sae_id}"
    save_sae(sae, weights)
    fs.write_parquet(pa.Table.from_pylist([dict(
        atlas_id="syn", layer=layer, sae_id=sae_id, variant="topk", d_in=d_in,
        n_latents=n_latents, k=32, steps=1, tokens=1, fvu=0.2, l0=32.0, dead_frac=0.0,
        dense_frac=0.0, logit_agreement=0.9, logit_kl=0.1, model_accuracy=None,
        heldout_images=1, heldout_pfvs=1, weights=weights, config="{}")], schema=SAES),
        f"{r}/saes/part-{sae_id}.parquet")
    vectors = idx.decoder_vectors(sae)
    index, meta = idx.build_index(vectors)
    idx.write_index(r, "decoder", sae_id, index, pa.table({
        "sae_id": [sae_id] * n_latents, "layer": [layer] * n_latents,
        "latent": np.arange(n_latents, dtype=np.int32)}), meta)
    # activations: latents drawn with a power-law frequency, max_act exponential
    latent = np.minimum(rng.zipf(1.3, n_acts) - 1, n_latents - 1).astype(np.int32)
    acts = pa.table({
        "atlas_id": pa.array(["syn"] * n_acts), "image_id": rng.integers(0, n_images, n_acts),
        "layer": pa.array([layer] * n_acts), "sae_id": pa.array([sae_id] * n_acts),
        "latent": latent, "max_act": rng.exponential(1.0, n_acts).astype(np.float32),
        "position": rng.integers(0, 16, n_acts).astype(np.int32),
        "y": np.zeros(n_acts, np.int32), "x": np.zeros(n_acts, np.int32),
        "rank": rng.integers(0, 32, n_acts).astype(np.int16)})
    fs.write_parquet(acts.cast(ACTIVATIONS), f"{r}/activations/sae={sae_id}/part-000000.parquet",
                     ACTIVATIONS)
    counts = np.bincount(latent, minlength=n_latents)
    fs.write_parquet(pa.table({
        "atlas_id": ["syn"] * n_latents, "layer": [layer] * n_latents,
        "sae_id": [sae_id] * n_latents, "latent": np.arange(n_latents, dtype=np.int32),
        "freq": counts / (16 * n_images), "image_freq": counts / n_images,
        "mean_act": rng.uniform(0, 1, n_latents), "max_act": rng.uniform(1, 5, n_latents),
        "dead": counts == 0, "n_pfvs": np.full(n_latents, 16 * n_images),
        "n_images": np.full(n_latents, n_images)}).cast(LATENT_STATS),
        f"{r}/latent_stats/sae={sae_id}/part-000000.parquet", LATENT_STATS)
    buf = io.BytesIO()
    Image.fromarray((rng.random((128, 128)) * 255).astype(np.uint8)).save(buf, format="PNG")
    mask = buf.getvalue()
    n_ex = 4 * n_latents
    lat = np.repeat(np.arange(n_latents, dtype=np.int32), 4)
    aucs = {c: rng.uniform(0, 1, n_ex).astype(np.float32) for c in (
        "ins_auc_ierf", "del_auc_ierf", "ins_auc_act", "del_auc_act", "ins_auc_random",
        "del_auc_random")}
    shapes = np.array(["circle", "square", "triangle", "star", "cross"])
    image_ids = rng.integers(0, n_images, n_ex)
    fs.write_parquet(pa.table({
        "atlas_id": ["syn"] * n_ex, "layer": [layer] * n_ex, "sae_id": [sae_id] * n_ex,
        "latent": lat, "kind": np.tile(["top", "top", "top", "quantile"], n_latents),
        "rank": np.tile(np.array([0, 1, 2, 0], np.int32), n_latents),
        "image_id": image_ids, "activation": rng.uniform(0, 5, n_ex)
        .astype(np.float32), "position": rng.integers(0, 16, n_ex).astype(np.int32),
        "y": np.zeros(n_ex, np.int32), "x": np.zeros(n_ex, np.int32),
        "source_group": image_ids,  # every image its own source (no crops of one photo)
        "ierf_png": [mask] * n_ex, "bbox": [[0, 0, 8, 8]] * n_ex,
        "mask_frac": rng.uniform(0, 1, n_ex).astype(np.float32),
        "act_overlap": rng.uniform(0, 1, n_ex).astype(np.float32),
        "ierf_constant": np.zeros(n_ex, np.float32), **aucs,
        "gt_shape": shapes[rng.integers(0, 5, n_ex)], "gt_colour": ["red"] * n_ex,
        "gt_texture": ["solid"] * n_ex, "gt_iou_ierf": rng.uniform(0, 1, n_ex).astype(np.float32),
        "gt_iou_act": rng.uniform(0, 1, n_ex).astype(np.float32)}).cast(EXEMPLARS),
        f"{r}/exemplars/part-000000.parquet", EXEMPLARS)
    n_edges = 8 * n_latents
    fs.write_parquet(pa.table({
        "atlas_id": ["syn"] * n_edges, "src_layer": [layer] * n_edges,
        "src_latent": np.repeat(np.arange(n_latents, dtype=np.int32), 8),
        "dst_layer": ["logits"] * n_edges, "dst_latent": rng.integers(0, 5, n_edges)
        .astype(np.int32), "method": ["ig"] * n_edges, "scope": ["all"] * n_edges,
        "weight": rng.exponential(1.0, n_edges), "n_images": rng.integers(1, 50, n_edges)
    }).cast(EDGES), f"{r}/edges/part-000000.parquet", EDGES)
    return r


def shown_path(atlas: str) -> str:
    """The atlas as the results name it: a URL as given, a local folder relative to the working
    directory when inside it, else by its name (no machine's paths in a shared result)."""
    if "://" in atlas:
        return atlas
    path = Path(atlas).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else path.name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(atlas: str, cache: str, workers: int = 1, page_threads: int | None = None
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "jobs.cli", "serve", atlas, "--port", str(port),
               "--cache", cache, "--workers", str(workers)]
    if page_threads:
        command += ["--page-threads", str(page_threads)]
    proc = subprocess.Popen(command, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(1200):
        try:
            if httpx.get(url + "/static/style.css", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the server on {url} did not start")


def load(url: str, paths: list[str], clients: int) -> tuple[list[float], list[float]]:
    """Request `paths` from `clients` concurrent clients (path i by client i % clients), each
    with its own connection, one request after another; returns the server times and the
    client wall times, ms. The clients are asyncio tasks of one aiohttp event loop: the first
    version ran 50 httpx threads, whose own Python work took a good share of the 2 cores the
    server needs."""
    import asyncio

    import aiohttp

    server, wall, errors = [], [], []

    async def client(mine: list[str]) -> None:
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=1),
                                         timeout=aiohttp.ClientTimeout(total=600)) as c:
            for p in mine:
                t = time.perf_counter()
                async with c.get(p) as r:
                    await r.read()
                    dt = 1000 * (time.perf_counter() - t)
                    if r.status != 200:
                        errors.append(f"{p}: {r.status}")
                    server.append(float(r.headers["server-timing"].split("dur=")[1]))
                    wall.append(dt)

    async def run() -> None:
        await asyncio.gather(*(client(paths[i::clients]) for i in range(clients)))

    asyncio.run(run())
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[:3]}")
    return server, wall


def stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {"n": int(v.size), "p50_ms": round(float(np.percentile(v, 50)), 1),
            "p95_ms": round(float(np.percentile(v, 95)), 1), "max_ms": round(float(v.max()), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlas", help="a built atlas (e.g. demo_out)")
    p.add_argument("--synthetic", nargs=2, type=int, metavar=("LATENTS", "ACTIVATIONS"),
                   help="write a synthetic atlas of this size instead")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 50],
                   help="concurrent clients; one fresh server (cold cache) per count")
    p.add_argument("--latents", type=int, default=100, help="distinct latent pages requested")
    p.add_argument("--tables", type=int, default=50, help="distinct layer-table pages requested")
    p.add_argument("--pictures", action="store_true", help="also time exemplar PNGs (iERF)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (`serve --workers`); each loads the atlas, so a "
                        "worker's first pages may be another's cold ones")
    p.add_argument("--page-threads", type=int, default=None,
                   help="`serve --page-threads` (default: serve's own)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/...)")
    a = p.parse_args()
    if bool(a.atlas) == bool(a.synthetic):
        p.error("give --atlas or --synthetic")
    tmp = Path(tempfile.mkdtemp(prefix="browser-load-"))
    t0 = time.time()
    atlas = a.atlas or synthetic_atlas(tmp / "atlas", *a.synthetic)
    built_s = round(time.time() - t0, 1)
    from pipeline.atlas import Atlas

    opened = Atlas.open(atlas)
    size = opened.sql("SELECT (SELECT count(*) FROM latent_stats) AS latents, "
                      "(SELECT count(*) FROM activations) AS activations, "
                      "(SELECT count(*) FROM exemplars) AS exemplars").to_pylist()[0]
    saes = opened.sql("SELECT layer, sae_id, n_latents FROM saes").to_pylist()
    layers = {r["layer"] for r in saes}
    slug = {r["sae_id"]: (r["layer"] if sum(s["layer"] == r["layer"] for s in saes) == 1
                          else r["sae_id"]) for r in saes}
    rng = random.Random(0)
    alive = opened.sql("SELECT sae_id, latent FROM latent_stats WHERE NOT dead").to_pylist()
    latent_paths = [f"/latents/{slug[r['sae_id']]}/{r['latent']}"
                    for r in rng.sample(alive, min(a.latents, len(alive)))]
    sorts = ["freq", "max_act", "label_hint", "cafe_ins_auc", "latent"]
    table_paths = [f"/layers/{slug[r['sae_id']]}?sort={rng.choice(sorts)}&page="
                   f"{rng.randint(1, max(1, r['n_latents'] // 100))}&desc={rng.randint(0, 1)}"
                   for r in rng.choices(saes, k=a.tables)]
    picture_paths = []
    if a.pictures:
        ex = opened.sql("SELECT sae_id, latent, kind, rank FROM exemplars WHERE kind = 'top'"
                        ).to_pylist()
        picture_paths = [f"/render/exemplar/{slug[r['sae_id']]}/{r['latent']}/{r['kind']}/"
                         f"{r['rank']}/ierf.png" for r in rng.sample(ex, min(100, len(ex)))]
    rows = []
    for clients in a.clients:
        proc, url = start_server(atlas, str(tmp / f"cache-{clients}"), a.workers,
                                 a.page_threads)
        try:
            for name, paths in (("layer table", table_paths), ("latent page", latent_paths),
                                ("exemplar PNG", picture_paths)):
                if not paths:
                    continue
                for state in ("cold", "warm"):
                    server, wall = load(url, paths, clients)
                    rows.append({"what": name, "cache": state, "clients": clients,
                                 "workers": a.workers, "page_threads": a.page_threads,
                                 "server": stats(server), "client_wall": stats(wall),
                                 "load_average": round(os.getloadavg()[0], 1)})
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"atlas: {atlas} ({size['latents']} latents, {size['activations']} activations, "
          f"{size['exemplars']} exemplars, layers {', '.join(sorted(layers))}); "
          f"{os.cpu_count()} CPUs")
    print(f"{'page':<14} {'cache':<5} {'clients':>7} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'max ms':>8} {'wall p95':>9} {'load':>5}")
    for r in rows:
        s = r["server"]
        print(f"{r['what']:<14} {r['cache']:<5} {r['clients']:>7} {s['n']:>4} {s['p50_ms']:>8} "
              f"{s['p95_ms']:>8} {s['max_ms']:>8} {r['client_wall']['p95_ms']:>9} "
              f"{r['load_average']:>5}")
    name = "browser_load_" + ("synthetic" if a.synthetic else Path(atlas).name)
    write_results(Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"{name}.json", {
        "atlas": shown_path(atlas) if a.atlas else f"synthetic {a.synthetic[0]} latents x "
                                       f"{a.synthetic[1]} activations (written in {built_s} s)",
        "size": size, "cpus": os.cpu_count(), "workers": a.workers, "rows": rows,
        "note": "load_average: the machine's 1-minute load average when the row finished "
                "(other jobs share its CPUs)"})


if __name__ == "__main__":
    main()
