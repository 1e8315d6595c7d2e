"""The scan stage: sparse activations, latent statistics and exemplar picks over every PFV.

The atlas is tiny: the in-process extraction of tests/test_train_sae_job.py (3 parts of 12
images; layer2 keeps 16 sampled positions per image, layer4 all 16) and three SAEs trained
for a few steps on it, two of them on layer4. Every table is checked against a brute-force
computation over all PFVs at once, with plain Python sorts for the selections.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from tiny import copy_of

from jobs.scan import run
from pipeline.latents import LatentSketch, Picks, ScanOptions, priority
from pipeline.latents.groups import source_groups
from pipeline.latents.scan import Layout, ScanUnit, activations_table
from pipeline.pfv.parts import committed_parts, read_values
from pipeline.sae.stage import TrainOptions, make_runs, train_runs
from pipeline.sae.train import LocalSession
from pipeline.store import AtlasRoot
from pipeline.sae import load_sae
from pipeline.store import Manifest, fs

SWEEP = [
    {"layer": "layer2", "sae": {"n_latents": 64, "k": 4, "batch_size": 64, "lr": 1e-3}},
    {"layer": "layer4", "sae": {"n_latents": 96, "k": 8, "batch_size": 48, "lr": 1e-3}},
    {"layer": "layer4", "sae": {"n_latents": 40, "k": 12, "batch_size": 48, "lr": 1e-3}},
]
TRAIN = TrainOptions(steps=15, checkpoint_every=15, fidelity_images=4, eval_pfvs=500)
# small enough that every selection truncates: images fire on more than 5 latents, latents
# on more than 4 + 6 images; 50 PFVs per batch = 3 images, so parts span several batches
OPTIONS = ScanOptions(top_per_image=5, n_top=4, n_quantile=3, sample_size=6, seed=7,
                      batch_pfvs=50)
IN_PROCESS = dataclasses.replace(OPTIONS, in_process=True)
TABLES = {"activations": ("sae_id", "image_id", "rank"),
          "latent_stats": ("sae_id", "latent"),
          "exemplar_picks": ("sae_id", "latent", "kind", "rank")}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def atlas(extracted, tmp_path_factory) -> str:  # this module's atlas: three SAEs
    """The extraction with the SAEs of SWEEP trained on it (no scan yet)."""
    root = copy_of(extracted, tmp_path_factory.mktemp("scan") / "atlas")
    channels = {n: r["channels"] for n, r in AtlasRoot(root).layers().items()}
    runs = make_runs(SWEEP, channels, TRAIN)
    train_runs(root, runs, TRAIN, LocalSession(Path(root) / "_ckpt"))
    return root


@pytest.fixture(scope="module")
def scanned(atlas, tmp_path_factory) -> tuple[str, dict]:
    """An uninterrupted in-process scan of a copy of `atlas`: (root, summary)."""
    root = copy_of(atlas, tmp_path_factory.mktemp("scanned") / "atlas")
    return root, run(root, IN_PROCESS, progress=False)


def read_tables(root: str) -> dict[str, pa.Table]:
    """The three scan tables, every part, sorted by their keys (hive column dropped)."""
    out = {}
    for name, keys in TABLES.items():
        files = sorted(Path(root, name).glob("sae=*/*.parquet"))
        table = pa.concat_tables([pq.read_table(f) for f in files])
        out[name] = table.sort_by([(k, "ascending") for k in keys])
    return out


# ---- brute force over all PFVs at once ---------------------------------------------------


def brute_force(root: str, sae_row: dict, options: ScanOptions,
                groups: dict[int, int] | None = None) -> dict[str, list[dict]]:
    """The three tables of one SAE from one encode of every PFV and Python sorts; with
    `groups` ({image_id: source group}) at most `options.per_source` top picks per group."""
    layer = AtlasRoot(root).layers()[sae_row["layer"]]
    parts = committed_parts(root, sae_row["layer"])
    ids = pa.concat_tables([pq.read_table(p.ids) for p in parts])
    p = layer["positions_per_image"]
    with torch.inference_mode():
        acts = load_sae(sae_row["weights"]).encode(torch.from_numpy(read_values(parts))).numpy()
    n_pfvs, n_latents = acts.shape
    per_image = acts.reshape(-1, p, n_latents)
    images = ids["image_id"].to_numpy()[::p]
    positions = ids["position"].to_numpy().reshape(-1, p)
    peak, arg = per_image.max(1), per_image.argmax(1)  # argmax: first position at the max

    def cell(pos: int) -> tuple[int, int]:
        return divmod(pos - layer["num_special"], layer["grid_w"])

    def pick(i: int, f: int) -> dict:
        pos = int(positions[i, arg[i, f]])
        y, x = cell(pos)
        return {"image_id": int(images[i]), "latent": f, "act": float(peak[i, f]),
                "position": pos, "y": y, "x": x}

    activations = []
    for i in range(len(images)):
        fired = sorted((f for f in range(n_latents) if peak[i, f] > 0),
                       key=lambda f: (-peak[i, f], f))[:options.top_per_image]
        activations += [dict(pick(i, f), rank=r) for r, f in enumerate(fired)]
    picks, stats = [], []
    for f in range(n_latents):
        firing = [i for i in range(len(images)) if peak[i, f] > 0]
        top: list[int] = []
        for i in sorted(firing, key=lambda i: (-peak[i, f], images[i])):
            same = sum(groups[images[j]] == groups[images[i]] for j in top) if groups else 0
            if len(top) < options.n_top and (not groups or same < options.per_source):
                top.append(i)
        picks += [dict(pick(i, f), kind="top", rank=r) for r, i in enumerate(top)]
        prio = priority(images, np.full(len(images), f), options.seed)
        sample = sorted(firing, key=lambda i: (prio[i], images[i]))[:options.sample_size]
        rest = sorted((i for i in sample if i not in top), key=lambda i: (peak[i, f], images[i]))
        m, q = len(rest), options.n_quantile
        chosen = sorted({math.floor((j + 0.5) * m / q) for j in range(q)}) if m else []
        picks += [dict(pick(rest[c], f), kind="quantile", rank=len(chosen) - 1 - r)
                  for r, c in enumerate(chosen)]
        col = acts[:, f]
        stats.append({"latent": f, "count": int((col > 0).sum()), "images": len(firing),
                      "total": float(col.astype(np.float64).sum()), "max": float(col.max())})
    return {"activations": activations, "picks": picks, "stats": stats,
            "n_pfvs": n_pfvs, "n_images": len(images)}


def rows_of(table: pa.Table, sae_id: str, *columns: str) -> list[tuple]:
    t = table.filter(pc.equal(table["sae_id"], sae_id))
    return list(zip(*(t[c].to_pylist() for c in columns)))


def test_tables_equal_a_brute_force_computation_over_all_pfvs(scanned) -> None:
    root, summary = scanned
    tables = read_tables(root)
    saes = AtlasRoot(root).saes()
    assert len(saes) == 3 and summary["reduced"] == [s["sae_id"] for s in saes]
    for sae in saes:
        bf = brute_force(root, sae, OPTIONS)
        got = rows_of(tables["activations"], sae["sae_id"], "image_id", "rank", "latent",
                      "max_act", "position", "y", "x")
        want = sorted((a["image_id"], a["rank"], a["latent"], np.float32(a["act"]),
                       a["position"], a["y"], a["x"]) for a in bf["activations"])
        assert got == want, sae["sae_id"]
        got = rows_of(tables["exemplar_picks"], sae["sae_id"], "latent", "kind", "rank",
                      "image_id", "activation", "position", "y", "x")
        want = sorted((p["latent"], p["kind"], p["rank"], p["image_id"], np.float32(p["act"]),
                       p["position"], p["y"], p["x"]) for p in bf["picks"])
        assert got == want, sae["sae_id"]
        kinds = {k for _, k, *_ in got}
        assert kinds == {"top", "quantile"}
        # the sample truncated: some latent fires on more images than the sketch keeps
        assert max(s["images"] for s in bf["stats"]) > OPTIONS.sample_size
        stats = tables["latent_stats"].filter(
            pc.equal(tables["latent_stats"]["sae_id"], sae["sae_id"])).to_pydict()
        count = np.array([s["count"] for s in bf["stats"]])
        np.testing.assert_array_equal(stats["latent"], np.arange(sae["n_latents"]))
        np.testing.assert_array_equal(stats["freq"], count / bf["n_pfvs"])
        np.testing.assert_array_equal(stats["image_freq"],
                                      [s["images"] / bf["n_images"] for s in bf["stats"]])
        np.testing.assert_allclose(stats["mean_act"], [s["total"] / max(1, s["count"])
                                                       for s in bf["stats"]], rtol=1e-5)
        np.testing.assert_array_equal(stats["max_act"], [s["max"] for s in bf["stats"]])
        np.testing.assert_array_equal(stats["dead"], count == 0)
        assert set(stats["n_pfvs"]) == {bf["n_pfvs"]} and set(stats["n_images"]) == {36}


def test_top_picks_keep_one_image_per_source_photo(atlas, scanned, tmp_path) -> None:
    # images 0-2, 3-5, ... of every part become crops of one photo: 4 photos of 9 crops, each
    # spread over the 3 parts (the merge of part sketches is exercised)
    root = copy_of(atlas, tmp_path / "atlas")
    for f in sorted(Path(root, "images").glob("*.parquet")):
        table = pq.read_table(f)
        source = [f"photo-{(i % 1_000_000) // 3}" for i in table["image_id"].to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("source"), "source",
                                        pa.array(source, pa.string())), f)
    run(root, IN_PROCESS, progress=False)
    groups = source_groups(pa.concat_tables(
        [pq.read_table(f) for f in sorted(Path(root, "images").glob("*.parquet"))]))
    assert len(set(groups.values())) == 4
    got_tables, unlimited = read_tables(root), read_tables(scanned[0])
    exercised = 0
    for sae in AtlasRoot(root).saes():
        want = brute_force(root, sae, OPTIONS, groups)["picks"]
        got = rows_of(got_tables["exemplar_picks"], sae["sae_id"], "latent", "kind", "rank",
                      "image_id", "activation")
        assert got == sorted((p["latent"], p["kind"], p["rank"], p["image_id"],
                              np.float32(p["act"])) for p in want), sae["sae_id"]
        top = [(lat, groups[i]) for lat, kind, _, i, _ in got if kind == "top"]
        assert len(top) == len(set(top))  # one pick per (latent, photo)
        before = [(lat, groups[i]) for lat, kind, _, i, _ in rows_of(
            unlimited["exemplar_picks"], sae["sae_id"], "latent", "kind", "rank", "image_id",
            "activation") if kind == "top"]
        exercised += len(before) - len(set(before))
    assert exercised > 0  # without the cap some latents had several crops of one photo


def test_each_image_keeps_min_of_top_per_image_and_its_firing_latents(scanned) -> None:
    root, summary = scanned
    table = read_tables(root)["activations"]
    for sae in AtlasRoot(root).saes():
        layer = AtlasRoot(root).layers()[sae["layer"]]
        parts = committed_parts(root, sae["layer"])
        with torch.inference_mode():
            acts = load_sae(sae["weights"]).encode(torch.from_numpy(read_values(parts)))
        firing = (acts.reshape(36, layer["positions_per_image"], -1) > 0).any(1).sum(1)
        images = [i for i, in rows_of(table, sae["sae_id"], "image_id")]
        counts = np.unique(images, return_counts=True)[1]
        np.testing.assert_array_equal(counts, np.minimum(OPTIONS.top_per_image, firing.numpy()))
        assert (firing > OPTIONS.top_per_image).any()  # the cap was exercised
    assert summary["parts_new"] == 9 and summary["pfvs_new"] == 3 * 36 * 16


def test_activations_order_ties_by_latent_and_map_positions_to_grid_cells() -> None:
    # a ViT-like layout: 1 CLS token, then a 3-wide grid
    unit = ScanUnit("s", "blocks.1", "", None, Layout(grid_w=3, num_special=1,
                                                      positions_per_image=10), "", "t")
    picks = Picks(np.array([5, 2, 9, 7, 1], np.int32), np.array([8, 8, 8, 8, 3], np.int64),
                  np.array([0.5, 0.5, 0.9, 0.5, 0.1], np.float32),
                  np.array([0, 4, 9, 1, 2], np.int32), np.array([8, 8, 8, 8, 3], np.int64))
    table = activations_table(picks, 3, unit).to_pydict()
    assert list(zip(table["image_id"], table["rank"], table["latent"])) == [
        (3, 0, 1), (8, 0, 9), (8, 1, 2), (8, 2, 5)]  # latent 7 ties with 2 and 5 and loses
    assert list(zip(table["y"], table["x"])) == [(0, 1), (2, 2), (1, 0), (-1, -1)]


# ---- the sketches ------------------------------------------------------------------------


def random_picks(rng: np.random.Generator, images: np.ndarray, n_latents: int) -> Picks:
    """Per image a random set of firing latents; activations on a coarse grid (many ties)."""
    lat, img = [], []
    for i in images:
        fired = rng.choice(n_latents, size=rng.integers(1, n_latents), replace=False)
        lat.append(fired)
        img.append(np.full(len(fired), i))
    lat, img = np.concatenate(lat).astype(np.int32), np.concatenate(img).astype(np.int64)
    act = (rng.integers(1, 5, len(lat)) / 4).astype(np.float32)
    # source groups of 5 consecutive image ids (crops of one photo), scattered over the parts
    return Picks(lat, img, act, rng.integers(0, 9, len(lat)).astype(np.int32), img // 5000)


@pytest.mark.parametrize("per_group", [None, 1, 2])
def test_merged_part_sketches_equal_the_sketch_of_all_images_ties_included(per_group) -> None:
    rng = np.random.default_rng(0)
    n_latents, n_top, k, seed = 7, 5, 9, 3
    images = rng.permutation(400).astype(np.int64) * 1000  # parts hold unsorted image ids
    all_picks = random_picks(rng, images, n_latents)
    # brute force: per latent, a walk down every (image, latent) pair in order, keeping a pair
    # while fewer than n_top are kept and its group holds fewer than per_group
    want_top, want_sample = [], []
    for f in range(n_latents):
        mine = [j for j in range(len(all_picks)) if all_picks.latent[j] == f]
        kept: list[int] = []
        for j in sorted(mine, key=lambda j: (-all_picks.activation[j], all_picks.image_id[j])):
            same = sum(all_picks.group[i] == all_picks.group[j] for i in kept)
            if len(kept) < n_top and (per_group is None or same < per_group):
                kept.append(j)
        want_top += kept
        prio = priority(all_picks.image_id[mine], all_picks.latent[mine], seed)
        order = sorted(range(len(mine)), key=lambda j: (prio[j], all_picks.image_id[mine[j]]))
        want_sample += [mine[j] for j in order[:k]]
    sketches = []
    for chunk in np.array_split(images, 6):
        part = all_picks.take(np.flatnonzero(np.isin(all_picks.image_id, chunk)))
        zeros = np.zeros(n_latents)
        sketches.append(LatentSketch(0, len(chunk), zeros, zeros, zeros, zeros.astype(np.float32),
                                     part.top(n_top, per_group), part.sample(k, seed)))
    random.Random(1).shuffle(sketches)  # any merge order
    merged = sketches[0]
    for s in sketches[1:]:
        merged = merged.merge(s, n_top, k, seed, per_group)
    assert merged.n_images == 400
    for got, want in ((merged.top, want_top), (merged.sample, want_sample)):
        expect = all_picks.take(np.array(want))
        assert sorted(zip(got.latent, got.image_id, got.activation, got.position)) == \
            sorted(zip(expect.latent, expect.image_id, expect.activation, expect.position))
    ties = np.unique(merged.top.activation[merged.top.latent == 0], return_counts=True)[1]
    assert ties.max() > 1  # ties at equal activation were broken by image_id
    per_latent_group = np.unique(np.c_[merged.top.latent, merged.top.group], axis=0,
                                 return_counts=True)[1]
    if per_group is None:
        assert per_latent_group.max() > 2  # the data has groups the cap would cut
    else:
        assert per_latent_group.max() == per_group


def test_sample_is_uniform_over_firing_images_whatever_the_activation() -> None:
    # the priority hash ignores activations: strong and weak halves are sampled alike
    images = np.arange(20000, dtype=np.int64)
    act = np.where(images < 10000, 1.0, 0.01).astype(np.float32)
    picks = Picks(np.zeros(20000, np.int32), images, act, np.zeros(20000, np.int32), images)
    sample = picks.sample(2000, seed=0)
    strong = int((sample.activation == 1).sum())
    assert len(sample) == 2000 and abs(strong - 1000) < 100  # ~3 standard deviations
    assert not np.array_equal(sample.image_id, picks.sample(2000, seed=1).image_id)


def test_sketch_survives_a_save_and_load(tmp_path) -> None:
    rng = np.random.default_rng(1)
    picks = random_picks(rng, np.arange(30, dtype=np.int64), 5)
    sketch = LatentSketch(99, 30, np.arange(5), np.arange(5) * 2, np.linspace(0, 1, 5),
                          np.ones(5, np.float32), picks.top(3), picks.sample(4, 0))
    sketch.save(str(tmp_path / "s.npz"))
    back = LatentSketch.load(str(tmp_path / "s.npz"))
    assert (back.n_pfvs, back.n_images) == (99, 30)
    for name in ("count", "images", "total", "peak"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sketch, name))
    for kind in ("top", "sample"):
        for name in ("latent", "image_id", "activation", "position"):
            np.testing.assert_array_equal(getattr(getattr(back, kind), name),
                                          getattr(getattr(sketch, kind), name))


# ---- crashes, re-runs, failures ----------------------------------------------------------


class DriverCrash(BaseException):
    """Stands for the driver dying: not an Exception, so no part-level handler catches it."""


def assert_same_tables(a: dict[str, pa.Table], b: dict[str, pa.Table]) -> None:
    for name in TABLES:
        assert a[name].num_rows == b[name].num_rows, name
        assert a[name].equals(b[name]), name


def test_crashed_driver_resumes_and_the_output_is_identical(atlas, scanned, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "atlas")
    committed = []

    def crash_after_four_parts(record) -> None:
        committed.append(record.part)
        if len(committed) == 4:
            raise DriverCrash(record.part)

    with pytest.raises(DriverCrash):
        run(root, IN_PROCESS, progress=False, on_part=crash_after_four_parts)
    # what a crash mid-part leaves: finished but uncommitted files, a temporary
    # units run SAE by SAE, part by part: the second SAE's last part was not committed
    folder = Path(root, "activations", f"sae={AtlasRoot(root).saes()[1]['sae_id']}")
    (folder / "part-000002.parquet").write_bytes(b"stale")
    (folder / ".part-000002.parquet.tmp-0123456789ab").write_bytes(b"half")
    assert not Path(root, "latent_stats").exists()  # nothing reduced: SAEs were incomplete
    summary = run(root, IN_PROCESS, progress=False)
    assert (summary["parts_skipped"], summary["parts_new"]) == (4, 5)
    assert len(summary["reduced"]) == 3 and not summary["incomplete"]
    assert_same_tables(read_tables(scanned[0]), read_tables(root))
    assert not [p for p in Path(root).rglob("*") if ".tmp-" in p.name]
    # a further re-run does nothing, not even a reduce
    again = run(root, IN_PROCESS, progress=False)
    assert (again["parts_new"], again["parts_skipped"], again["reduced"]) == (0, 9, [])


def test_crash_before_the_reduce_reduces_on_rerun_without_rescanning(atlas, scanned,
                                                                      tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "atlas")

    def crash_at_last_part(record) -> None:
        if len(Manifest(root).records("scan")) == 9:
            raise DriverCrash(record.part)

    with pytest.raises(DriverCrash):
        run(root, IN_PROCESS, progress=False, on_part=crash_at_last_part)
    summary = run(root, IN_PROCESS, progress=False)
    assert summary["parts_new"] == 0 and len(summary["reduced"]) == 3
    assert_same_tables(read_tables(scanned[0]), read_tables(root))


def test_rewritten_sae_weights_rescan_only_that_sae(atlas, scanned, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "atlas")  # fingerprints hold paths: scan the copy first
    run(root, IN_PROCESS, progress=False)
    weights = Path(root, "sae_weights", "layer4-topk-96-k8.safetensors")
    os.utime(weights, (1, 1))  # same bytes, new fingerprint: as if trained again
    summary = run(root, IN_PROCESS, progress=False)
    assert (summary["parts_new"], summary["parts_skipped"]) == (3, 6)
    assert summary["reduced"] == ["layer4-topk-96-k8"]
    assert_same_tables(read_tables(scanned[0]), read_tables(root))


def test_scan_writes_to_a_fsspec_url(atlas, scanned, tmp_path) -> None:
    root = "file://" + copy_of(atlas, tmp_path / "atlas")
    summary = run(root, IN_PROCESS, progress=False)
    assert summary["parts_new"] == 9 and len(summary["reduced"]) == 3
    assert_same_tables(read_tables(scanned[0]), read_tables(str(tmp_path / "atlas")))


def test_failed_part_is_reported_and_only_its_sae_waits(atlas, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "atlas")
    broken = committed_parts(root, "layer2")[1]
    Path(broken.values).write_bytes(b"not an npy file")
    summary = run(root, IN_PROCESS, progress=False)
    [(name, reason)] = summary["parts_failed"].items()
    assert name == "layer2-topk-64-k4__part-000001" and "ValueError" in reason
    assert summary["incomplete"] == ["layer2-topk-64-k4"]
    assert sorted(summary["reduced"]) == ["layer4-topk-40-k12", "layer4-topk-96-k8"]
    assert summary["saes"]["layer2-topk-64-k4"]["dead"] is None
    errors = pq.read_table(Path(root, "errors", "stage=scan")).to_pylist()
    assert len(list(Path(root, "errors", "stage=scan").glob("*.parquet"))) == 9
    assert [(e["shard"], e["reason"]) for e in errors] == [(broken.values, reason)]


def test_other_options_in_the_same_output_are_refused_naming_the_key(scanned) -> None:
    root, _ = scanned
    with pytest.raises(ValueError, match="n_top"):
        run(root, ScanOptions(top_per_image=5, n_top=8, n_quantile=3, sample_size=6, seed=7,
                              in_process=True), progress=False)


@pytest.mark.parametrize("kwargs, named", [
    ({"top_per_image": 0}, "top_per_image=0"),
    ({"top_per_image": 40000}, "int16"),
    ({"sample_size": 4, "n_quantile": 8}, "sample_size=4 < scan.n_quantile=8"),
    ({"seed": -1}, "seed=-1"),
])
def test_bad_options_are_refused_naming_the_value(kwargs, named) -> None:
    with pytest.raises(ValueError, match=named):
        ScanOptions(**kwargs)


def test_unknown_sae_is_refused_naming_the_trained_ones(atlas) -> None:
    with pytest.raises(ValueError, match="layer4-topk-96-k8"):
        run(atlas, dataclasses.replace(IN_PROCESS, saes=("layer9-x",)), progress=False)


@pytest.mark.slow  # two CLI runs in fresh interpreters
def test_killed_driver_process_resumes_and_the_output_is_identical(atlas, scanned,
                                                                   tmp_path) -> None:
    root = Path(copy_of(atlas, tmp_path / "atlas"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.identity().items()]
    args = [sys.executable, "-m", "jobs.cli", "scan", str(root), "--in-process",
            "--no-progress", *flags, f"--batch-pfvs={OPTIONS.batch_pfvs}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    repo = Path(__file__).parents[1]
    driver = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    manifest = root / "manifest" / "stage=scan"
    while driver.poll() is None and not (manifest.is_dir() and any(manifest.glob("*.json"))):
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = len(list(manifest.glob("*.json")))
    assert 1 <= done < 9, "the driver should die after its first part, before the last"
    rerun = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done} done, {9 - done} to do" in rerun.stdout
    assert_same_tables(read_tables(scanned[0]), read_tables(str(root)))
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a loaded machine
def test_worker_module_imports_no_model_stack() -> None:
    code = ("import sys, pipeline.latents.scan; "
            "print(sorted(m for m in ('timm', 'ray', 'pipeline.pfv.extract') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


# ---- on Ray ------------------------------------------------------------------------------


@pytest.mark.ray
def test_on_ray_with_a_killed_worker_the_tables_equal_the_in_process_run(
        ray_cluster, atlas, scanned, tmp_path) -> None:
    root = copy_of(atlas, tmp_path / "atlas")
    killed: list[int] = []

    def kill_a_worker_once(record) -> None:
        # the worker that wrote this part is busy with a queued one, which Ray retries
        if not killed:
            pid = int(record.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    options = dataclasses.replace(OPTIONS, cpus_per_task=0.5)
    summary = run(root, options, address=ray_cluster, progress=False,
                  on_part=kill_a_worker_once)
    assert killed and not summary["parts_failed"] and summary["parts_new"] == 9
    assert len(summary["reduced"]) == 3
    assert_same_tables(read_tables(scanned[0]), read_tables(root))
    assert fs.listdir(fs.join(root, "scan_parts", "sae=layer2-topk-64-k4")) and len(
        Manifest(root).records("scan")) == 9


def test_source_groups_equal_a_brute_force_over_every_pair() -> None:
    # random hashes with planted near-copies (1-3 bits flipped) and far ones (4+ bits), chains
    # (a ~ b ~ c with a, c apart), shared sources, near-flat hashes and missing values
    rng = np.random.default_rng(0)
    base = rng.integers(-2**63, 2**63 - 1, 300, dtype=np.int64)
    hashes = list(base)
    for h in base[:120]:
        flips = rng.choice(64, size=rng.integers(1, 7), replace=False)
        flipped = (int(h) & (2**64 - 1)) ^ sum(1 << int(b) for b in flips)
        hashes.append(flipped - 2**64 if flipped >= 2**63 else flipped)
    hashes = [int(h) for h in hashes] + [0, 0, -1, 3]  # near-flat: never grouped
    n = len(hashes)
    sources = [None] * n
    sources[5] = sources[250] = "photo.jpg"  # otherwise unrelated
    table = pa.table({"image_id": np.arange(n, dtype=np.int64)[::-1] * 7,  # read in reverse
                      "source": pa.array(sources[::-1], pa.string()),
                      "phash": pa.array(hashes[::-1], pa.int64())})
    got = source_groups(table)

    def bits(h: int) -> int:
        return bin(h & (2**64 - 1)).count("1")

    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            near = (8 <= bits(hashes[i]) <= 56 and 8 <= bits(hashes[j]) <= 56
                    and bits(hashes[i] ^ hashes[j]) <= 3)
            if near or (sources[i] is not None and sources[i] == sources[j]):
                parent[max(find(i), find(j))] = min(find(i), find(j))
    ids = np.arange(n) * 7
    # a group is named by its smallest image_id
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(int(ids[i]))
    want = {image: min(members[find(i)]) for i in range(n) for image in [int(ids[i])]}
    assert got == want
    sizes = Counter(want.values())
    assert 40 < sum(v > 1 for v in sizes.values()) < 120  # near-copies grouped, far ones not
    assert got[5 * 7] == got[250 * 7]
    assert len({got[i * 7] for i in range(n - 4, n)}) == 4


def test_a_bucket_that_grows_with_the_data_is_compared_in_bounded_blocks(monkeypatch) -> None:
    # every hash shares its low 16-bit band (a flat strip of the pictures), so all 500 images
    # fall in one bucket; 100 of them are near-copies (1-3 bits flipped) of others
    from pipeline.latents import groups

    rng = np.random.default_rng(1)
    base = [(int(h) << 16) | 0x1234 for h in rng.integers(0, 2**47, 400)]
    copies = [h ^ sum(1 << int(b) for b in rng.choice(np.arange(16, 63), rng.integers(1, 4),
                                                         replace=False)) for h in base[:100]]
    hashes = base + copies
    table = pa.table({"image_id": np.arange(500, dtype=np.int64),
                      "phash": pa.array(hashes, pa.int64())})
    compared: list[int] = []
    popcount = groups._popcount
    monkeypatch.setattr(groups, "_popcount", lambda x: (
        compared.append(x.size) if x.ndim == 2 else None, popcount(x))[1])
    monkeypatch.setattr(groups, "_BLOCK_CELLS", 1000)
    got = source_groups(table)
    assert compared and max(compared) <= 1000  # 2 rows of the 500-image bucket at a time
    assert all(got[400 + i] == got[i] == i for i in range(100))  # each copy with its original
    assert len(set(got.values())) == 400  # random originals (~24 bits apart) stay apart
