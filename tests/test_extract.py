"""PFV extraction: exact row counts, fault tolerance, resume, corrupt shards, checks before work.

The data is tiny (3 good shards of 12 images at 64 px, one truncated shard, one garbage file)
and the model is demo_resnet with seeded random weights, so the tests never depend on the
shipped weights. Ray tests share one local instance (the `ray_cluster` fixture).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.data.errors import ErrorLog
from pipeline.data.shards import iter_samples
from pipeline.data.synthetic import write_shards
from pipeline.pfv.extract import (
    IMAGES_PER_PART,
    ExtractOptions,
    candidate_positions,
    plan_extract,
    sample_positions,
)
from pipeline.pfv.parts import committed_parts
from pipeline.store import AtlasRoot, Manifest, PartRecord, check_stage_config, fingerprint, fs

REPO = Path(__file__).resolve().parents[1]
CFG = ExtractOptions(model="demo_resnet", weights=None, atlas_id="t", layers=("layer2", "layer4"),
                    positions=5, batch_size=16)
POSITIONS = {"layer2": 5, "layer4": 5}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """3 good shards, one cut in the middle of a sample, one that is not a tar at all."""
    root = tmp_path_factory.mktemp("shards")
    paths = [str(p) for p in write_shards(root, n=36, seed=0, size=64, shard_size=12, workers=1,
                                          progress=False)]
    data = Path(paths[0]).read_bytes()
    (root / "shard-000003.tar").write_bytes(data[: len(data) * 2 // 3])
    (root / "shard-000004.tar").write_bytes(b"not a tar archive at all" * 64)
    return paths + [str(root / "shard-000003.tar"), str(root / "shard-000004.tar")]


def expected_images(shard: str) -> list[str]:
    """Keys the shard reader yields for `shard`: what the part must hold, no more, no less."""
    return [s.key for s in iter_samples([shard], ErrorLog(), decode_image=False)]


def read_outputs(out: str) -> dict[str, object]:
    """Every committed output, for comparing two runs."""
    result: dict[str, object] = {}
    for layer in CFG.layers:
        for p in committed_parts(out, layer):
            result[f"{layer}/{p.part}/values"] = np.load(p.values)
            result[f"{layer}/{p.part}/ids"] = pq.read_table(p.ids).to_pydict()
    for url in fs.listdir(fs.join(out, "images"), ".parquet"):
        result[f"images/{Path(url).name}"] = pq.read_table(url).to_pydict()
    return result


def assert_same_outputs(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:
            assert a[key] == b[key], key


# ---- Ray-free --------------------------------------------------------------------------


def test_sampled_positions_are_distinct_sorted_and_independent_of_batching() -> None:
    cand = np.arange(1, 65, dtype=np.int32)  # a ViT layer without its CLS token
    ids = np.arange(100, dtype=np.int64) + 3 * IMAGES_PER_PART
    pos = sample_positions(ids, cand, 7, seed=1, layer="blocks.2")
    assert pos.shape == (100, 7)
    assert all(len(set(row)) == 7 and list(row) == sorted(row) for row in pos)
    assert pos.min() >= 1 and pos.max() <= 64
    np.testing.assert_array_equal(pos[40:60], sample_positions(ids[40:60], cand, 7, 1, "blocks.2"))
    assert not np.array_equal(pos, sample_positions(ids, cand, 7, 2, "blocks.2"))  # seeded
    # every position is drawn about equally often (a biased hash would favour some)
    counts = np.bincount(sample_positions(np.arange(20000), cand, 7, 0, "x").ravel(), minlength=65)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()


def test_all_positions_excludes_special_tokens_unless_asked() -> None:
    from pipeline.models import LayerSpec

    spec = LayerSpec("blocks.2", "vit", 128, (8, 8), True, num_special=1)
    assert candidate_positions(spec, include_special=False).tolist() == list(range(1, 65))
    assert candidate_positions(spec, include_special=True).tolist() == list(range(65))


def test_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path) -> None:
    def crash(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        fs.write_atomic(str(tmp_path / "part-000000.parquet"), crash)
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_changes_when_a_shard_is_rewritten(tmp_path) -> None:
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"a" * 10)
    before = fingerprint(str(shard))
    assert fingerprint(str(shard)) == before
    shard.write_bytes(b"b" * 11)
    assert fingerprint(str(shard)) != before


def test_other_config_in_the_same_output_is_refused_naming_the_key(tmp_path) -> None:
    check_stage_config(str(tmp_path), "extract", {"layers": ["layer2"], "seed": 0})
    # nothing committed yet: the recorded config binds nothing and is replaced
    assert check_stage_config(str(tmp_path), "extract", {"layers": ["layer4"], "seed": 0})
    Manifest(str(tmp_path)).commit(PartRecord("extract", "part-000000", "x.tar", "f", "h", rows=1))
    with pytest.raises(ValueError, match=r"layers: \['layer4'\] -> \['layer3'\]"):
        check_stage_config(str(tmp_path), "extract", {"layers": ["layer3"], "seed": 0})


@pytest.mark.parametrize("kwargs, named", [
    (dict(layers=("layer9",)), "unknown layer 'layer9'"),
    (dict(model="demo_resnett"), "unknown model 'demo_resnett'"),
    (dict(positions=100), "positions=100 exceeds the 16 positions of layer 'layer4'"),
    (dict(weights="missing.safetensors"), "weights file not found"),
])
def test_bad_config_fails_before_any_output_is_written(tmp_path, shards, kwargs, named) -> None:
    cfg = ExtractOptions(**{**CFG.__dict__, "shards": tuple(shards), **kwargs})
    with pytest.raises((ValueError, FileNotFoundError), match=named):
        plan_extract(str(tmp_path / "out"), cfg)
    assert not (tmp_path / "out").exists()


def test_missing_shards_fail_before_any_output_is_written(tmp_path, shards) -> None:
    with pytest.raises(FileNotFoundError, match="shard-000099.tar"):
        plan_extract(str(tmp_path / "out"),
                     replace(CFG, shards=(*shards, str(tmp_path / "shard-000099.tar"))))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, named", [
    (dict(positions=0), "positions=0"), (dict(dtype="int8"), "dtype='int8'"),
    (dict(layers=()), "layers=\\[\\]"), (dict(layers=("a", "a")), "listed twice"),
])
def test_extract_config_rejects_bad_values(kwargs, named) -> None:
    with pytest.raises(ValueError, match=named):
        ExtractOptions(**{**CFG.__dict__, **kwargs})


# ---- whole jobs: in process by default, on Ray with --runray -----------------------------


@pytest.fixture(scope="module")
def extracted(shards, tmp_path_factory) -> tuple[str, dict]:
    """The reference extraction, run in process (no Ray)."""
    from jobs.extract import run

    out = str(tmp_path_factory.mktemp("extracted") / "out")
    summary = run(out, replace(CFG, shards=tuple(shards), in_process=True), progress=False,
                  stats=False)
    return out, summary


def test_row_counts_are_exact(extracted, shards) -> None:
    check_row_counts(*extracted, shards)


def check_row_counts(out: str, summary: dict, shards: list[str]) -> None:
    records = Manifest(out).records("extract")
    assert sorted(records) == [f"part-{i:06d}" for i in range(5)] and not summary["parts_failed"]
    for i, shard in enumerate(shards):
        keys = expected_images(shard)
        rec = records[f"part-{i:06d}"]
        assert rec.rows == len(keys) and rec.input == os.path.abspath(shard)
        images = pq.read_table(fs.join(out, "images", f"part-{i:06d}.parquet")).to_pydict()
        assert images["key"] == keys
        assert images["image_id"] == [i * IMAGES_PER_PART + j for j in range(len(keys))]
        for layer, k in POSITIONS.items():
            assert rec.outputs[f"pfv/layer={layer}"] == k * len(keys)
    assert [rec.rows for rec in sorted(records.values(), key=lambda r: r.part)][:3] == [12] * 3
    for layer, k in POSITIONS.items():
        parts = committed_parts(out, layer)
        values = [np.load(p.values) for p in parts]
        ids = [pq.read_table(p.ids) for p in parts]
        assert all(len(v) == len(t) == p.rows for v, t, p in zip(values, ids, parts))
        assert all(v.dtype == np.float16 and v.shape[1] == AtlasRoot(out).layers()[layer]["channels"]
                   for v in values)
        pairs = [(a, b) for t in ids for a, b in zip(t["image_id"].to_pylist(),
                                                      t["position"].to_pylist())]
        assert len(pairs) == len(set(pairs)) == k * summary["images"]


def test_corrupt_shards_are_reported_and_skipped(extracted, shards) -> None:
    out, summary = extracted
    errors = pq.read_table(fs.join(out, "errors", "stage=extract")).to_pylist()
    by_shard = {e["shard"] for e in errors}
    assert by_shard == {os.path.abspath(shards[3]), os.path.abspath(shards[4])}
    garbage = [e for e in errors if e["shard"] == os.path.abspath(shards[4])]
    assert len(garbage) == 1 and garbage[0]["key"] == "" and "unreadable shard" in garbage[0]["reason"]
    assert summary["errors"] == len(errors)
    assert summary["images"] == 36 + len(expected_images(shards[3]))


def test_rerun_skips_every_committed_part(extracted, shards) -> None:
    from jobs.extract import run

    out, _ = extracted
    before = read_outputs(out)
    # Ray not needed
    summary = run(out, replace(CFG, shards=tuple(shards)), progress=False, stats=False)
    assert summary["parts_skipped"] == 5 and summary["parts_new"] == 0
    assert_same_outputs(before, read_outputs(out))


def test_rewritten_shard_is_extracted_again(extracted, shards, tmp_path) -> None:
    from jobs.extract import run

    out = str(tmp_path / "out")
    shutil.copytree(extracted[0], out)
    copies = [str(tmp_path / Path(s).name) for s in shards]
    for src, dst in zip(shards, copies):
        shutil.copy(src, dst)
    shutil.copytree(extracted[0], out, dirs_exist_ok=True)
    summary = run(out, replace(CFG, shards=tuple(copies), in_process=True), progress=False,
                  stats=False)
    assert summary["parts_new"] == 5  # other paths: other fingerprints
    Path(copies[1]).write_bytes(Path(shards[1]).read_bytes())  # same bytes, new mtime
    os.utime(copies[1], (1, 1))
    summary = run(out, replace(CFG, shards=tuple(copies), in_process=True), progress=False,
                  stats=False)
    assert summary["parts_new"] == 1 and summary["parts_skipped"] == 4


def kill_driver_after_first_part_and_rerun(args: list[str], out: Path, parts: int) -> str:
    """Start the extract CLI, SIGKILL it once a part is committed, re-run it; its stdout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    manifest = out / "manifest" / "stage=extract"
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None:
        if manifest.is_dir() and any(manifest.glob("*.json")):
            break
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = len(list(manifest.glob("*.json")))
    assert 1 <= done_before < parts, "the driver should die after the first part, before the last"
    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done_before} done, {parts - done_before} to do" in rerun.stdout
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    return rerun.stdout


def extract_args(shards: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "extract", str(out), "--shards", *shards,
            "--model", "demo_resnet", "--weights", "none", "--layers", *CFG.layers,
            "--positions", "5", "--batch-size", "16", "--atlas-id", "t", "--no-progress"]


class DriverCrash(BaseException):
    """Stands for the driver dying: not an Exception, so no part-level handler catches it."""


def test_crashed_driver_resumes_and_the_output_is_identical(extracted, shards, tmp_path) -> None:
    from jobs.extract import run

    def crash_after_first_part(record) -> None:
        raise DriverCrash(record.part)

    out = tmp_path / "out"
    with pytest.raises(DriverCrash):
        run(str(out), replace(CFG, shards=tuple(shards), in_process=True), progress=False,
            stats=False, on_part=crash_after_first_part)
    # what a crash mid-part leaves: a finished but uncommitted file, a temporary
    layer2 = out / "pfv" / "layer=layer2"
    (layer2 / "part-000001.npy").write_bytes(b"stale")
    (layer2 / ".part-000002.npy.tmp-0123456789ab").write_bytes(b"half")
    summary = run(str(out), replace(CFG, shards=tuple(shards), in_process=True),
                  progress=False, stats=False)
    assert summary["parts_skipped"] == 1 and summary["parts_new"] == 4
    assert_same_outputs(read_outputs(extracted[0]), read_outputs(str(out)))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.slow
def test_killed_driver_process_resumes_and_the_output_is_identical(extracted, shards,
                                                                   tmp_path) -> None:
    out = tmp_path / "out"
    kill_driver_after_first_part_and_rerun(extract_args(shards, out) + ["--in-process"], out, 5)
    assert_same_outputs(read_outputs(extracted[0]), read_outputs(str(out)))


@pytest.mark.ray
def test_on_ray_the_rows_equal_the_in_process_run(ray_cluster, extracted, shards,
                                                  tmp_path) -> None:
    from jobs.extract import run

    out = str(tmp_path / "out")
    summary = run(out, replace(CFG, shards=tuple(shards)), progress=False, stats=False)
    check_row_counts(out, summary, shards)
    assert_same_outputs(read_outputs(extracted[0]), read_outputs(out))


# runs by default (about 30 s with Ray's start-up): the acceptance test of fault tolerance
def test_killed_model_actor_mid_job_gives_the_same_rows_without_duplicates(
        ray_cluster, extracted, shards, tmp_path) -> None:
    from jobs.extract import run

    killed: list[int] = []

    def kill_actor_once(record) -> None:
        # the actor that wrote this part is already busy with the next one (2 queued calls)
        if not killed:
            pid = int(record.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = str(tmp_path / "out")
    summary = run(out, replace(CFG, shards=tuple(shards)), progress=False, stats=False,
                  on_part=kill_actor_once)
    assert killed and not summary["parts_failed"] and summary["parts_done"] == 5
    workers = {r.worker for r in Manifest(out).records("extract").values()}
    assert len(workers) == 2  # the parts after the kill came from the restarted actor
    assert_same_outputs(read_outputs(extracted[0]), read_outputs(out))


@pytest.mark.ray
def test_killed_ray_driver_resumes_and_the_output_is_identical(ray_cluster, extracted, shards,
                                                               tmp_path) -> None:
    out = tmp_path / "out"
    # the driver joins the test's Ray instance; its actors die with it
    kill_driver_after_first_part_and_rerun(extract_args(shards, out) + ["--address", ray_cluster],
                                           out, 5)
    assert_same_outputs(read_outputs(extracted[0]), read_outputs(str(out)))


@pytest.mark.ray
def test_extraction_writes_to_a_fsspec_url(ray_cluster, shards, tmp_path) -> None:
    from jobs.extract import run

    out = "file://" + str(tmp_path / "out")
    summary = run(out, replace(CFG, shards=tuple(shards[:1])), progress=False, stats=False)
    assert summary["images"] == 12 and committed_parts(out, "layer2")[0].values.startswith("file://")
