"""Faults on a real multi-node Ray cluster (a head and two worker nodes on this machine,
tests/multinode.py): a worker node's raylet killed during extract, during train-sae (DDP, one
worker per node) and during cafe, and the driver killed mid-stage and run again. Each ends in
tables equal to a clean build on the same cluster, row for row (`compare_atlases`: every
Parquet table's rows sorted, every JSON record and array compared; only the columns that
legitimately vary between two builds are left out, `VARYING`: the wall-clock times and rates
`started`, `finished`, `seconds`, `train_seconds`, `tokens_per_s`; `worker`, the host:pid that
did a part; and `input_fingerprint`, `config_hash`, `inputs`, which hold or fold in paths and
modification times; each root's own path in a string is written as `<root>`).

The faulted build runs one stage at a time into one output folder, in the order of the tests
(`--stages`), and is compared after each with the outputs of the stages run so far; each test
skips when the one before it left its stage unfinished. Every wait is bounded.
"""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cli_run import CLI, CliRun
from multinode import LocalCluster, cluster_env, cluster_run
from pipeline.atlas.compare import compare_atlases

# the first test also starts the cluster and makes the clean build
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]

# 16 shards of 12 images: extract and cafe have 16 parts each, enough to lose a node while
# some parts are committed and others are in flight
N, SHARD = 192, 12
PARTS = N // SHARD
STEPS = 200


def config(shards: Path) -> dict:
    """The tiny build (tests/tiny.py's model, layers and SAEs) on Ray: two model actors, two DDP
    workers of 1.6 CPUs each, which on nodes of 3 CPUs puts one worker on each node."""
    return {
        "atlas_id": "multinode",
        "data": {"shards": str(shards)},
        "model": {"name": "demo_resnet", "weights": "none"},
        "extract": {"layers": ["layer2", "layer4"], "positions": 8, "batch_size": SHARD,
                    "actors": 2, "cpus_per_actor": 1},
        "train_sae": {"steps": STEPS, "checkpoint_every": 20, "fidelity_images": 8,
                      "workers": 2, "cpus_per_worker": 1.6, "sweep": [
                          {"layer": "layer2", "sae": {"n_latents": 32, "k": 4, "batch_size": 32}},
                          {"layer": "layer4", "sae": {"n_latents": 64, "k": 8,
                                                      "batch_size": 32}}]},
        "scan": {"top_per_image": 4, "n_top": 3, "n_quantile": 2},
        "cafe": {"faithfulness_per_latent": 1, "steps": 4, "patch": 16, "actors": 2,
                 "cpus_per_actor": 1},
    }


# what each stage writes (relative paths under the root), to compare the stages run so far
OUTPUTS = {
    "extract": ("images/", "layers/", "pfv/", "errors/stage=extract/", "manifest/stage=extract/",
                "stages/extract.json"),
    "train-sae": ("saes/", "sae_weights/", "manifest/stage=train-sae/"),
    "scan": ("activations/", "latent_stats/", "exemplar_picks/", "scan_parts/",
             "errors/stage=scan/", "manifest/stage=scan", "stages/scan.json"),
    "cafe": ("exemplars/", "errors/stage=cafe/", "manifest/stage=cafe/", "stages/cafe.json"),
}


def assert_same_tables(faulted: Path, clean: Path, stages: list[str]) -> None:
    """The outputs of `stages` under `faulted` equal those of the clean build, and nothing else
    is there."""
    others = [p for stage, paths in OUTPUTS.items() if stage not in stages for p in paths]
    result = compare_atlases(str(clean), str(faulted), skip=others)
    assert result.equal, result.text()
    tables = {p.split("/")[0] for p in OUTPUTS[stages[-1]] if not p.startswith(
        ("manifest", "stages", "errors"))}
    assert result.same > len(tables)


def committed(root: Path, stage: str) -> int:
    return len(list((root / "manifest" / f"stage={stage}").glob("*.json")))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # a short folder: Ray's socket paths below it must fit in a Unix address
    nodes = LocalCluster(tmp_path_factory.mktemp("r"), workers=2, cpus=3)
    yield nodes
    nodes.shutdown()


@pytest.fixture(scope="module")
def build_yaml(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("multinode")
    shards = folder / "shards"
    subprocess.run([CLI, "make-data", str(shards), "--n", str(N), "--seed", "3", "--size", "64",
                    "--shard-size", str(SHARD)], check=True, env=cluster_env(), timeout=300,
                   capture_output=True)
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump(config(shards)))
    return path


@pytest.fixture(scope="module")
def clean(cluster, build_yaml, tmp_path_factory) -> Path:
    """The whole build on the cluster with no fault."""
    out = tmp_path_factory.mktemp("clean") / "out"
    run = cluster_run("build", str(build_yaml), "--out", str(out), "--address", cluster.address)
    assert run.finish(timeout=1500) == 0, story(run)
    return out


@pytest.fixture(scope="module")
def faulted(tmp_path_factory) -> Path:
    """The output folder of the build the faults hit, one stage per test."""
    return tmp_path_factory.mktemp("faulted") / "out"


def story(run: CliRun) -> str:
    """What a failed run said that matters: its stages' lines and errors, without the pages of
    Ray's state dumps that a lost node sends to the driver (the restart may be far from the end)."""
    return "\n".join(line for line in run.output.splitlines()
                     if "state-dump" not in line and ("] " in line[:40] or "rror" in line))[-6000:]


def build(cluster: LocalCluster, build_yaml: Path, out: Path, *stages: str) -> CliRun:
    return cluster_run("build", str(build_yaml), "--out", str(out), "--address",
                       cluster.address, "--stages", *stages)


def needs(root: Path, stage: str, parts: int) -> None:
    if committed(root, stage) < parts:
        pytest.skip(f"the test that runs {stage} on {root} did not finish it")


def test_a_node_lost_during_extract(cluster, build_yaml, clean, faulted) -> None:
    t0 = time.time()
    run = build(cluster, build_yaml, faulted, "extract")
    run.wait_until(lambda: committed(faulted, "extract") >= 1, "a committed extract part", 600)
    node = cluster.node_running(r"^ray::WorkerActor")
    done = committed(faulted, "extract")
    cluster.kill_raylet(node)
    assert done < PARTS, "extract finished before the node was lost: enlarge the dataset"
    assert run.finish(timeout=900) == 0, story(run)
    assert f"{PARTS} new, 0 skipped, 0 failed" in run.output
    assert_same_tables(faulted, clean, ["extract"])
    print(f"\n[multinode] extract: node lost after {done}/{PARTS} parts; "
          f"{time.time() - t0:.0f}s")


def test_a_node_lost_during_ddp_train_sae(cluster, build_yaml, clean, faulted) -> None:
    needs(faulted, "extract", PARTS)
    t0 = time.time()
    run = build(cluster, build_yaml, faulted, "train-sae")
    # two checkpoints of the first SAE (every 20 steps), before it is committed
    checkpoints = faulted / "_ray_train" / "train-sae"
    run.wait_until(lambda: len(list(checkpoints.glob("checkpoint_*"))) >= 2,
                   "two checkpoints", 900)
    node = cluster.node_running(r"^ray::RayTrainWorker")
    assert committed(faulted, "train-sae") == 0
    cluster.kill_raylet(node)
    assert run.finish(timeout=1200) == 0, story(run)
    # Ray Train restarted the group, which resumed from a checkpoint, not from step 0
    resumed = re.search(r"(\S+) resumed from its checkpoint at step (\d+)", run.output)
    assert resumed and int(resumed.group(2)) >= 20, story(run)
    assert_same_tables(faulted, clean, ["extract", "train-sae"])
    print(f"\n[multinode] train-sae: node lost, {resumed.group(1)} resumed at step "
          f"{resumed.group(2)}; {time.time() - t0:.0f}s")


def test_a_killed_driver_then_a_node_lost_during_cafe(cluster, build_yaml, clean,
                                                       faulted) -> None:
    needs(faulted, "train-sae", 2)
    t0 = time.time()
    # 1. the driver killed (SIGKILL) mid-cafe: its job's actors on the worker nodes go with it
    first = build(cluster, build_yaml, faulted, "scan", "cafe")
    first.wait_until(lambda: committed(faulted, "cafe") >= 1, "a committed cafe part", 900)
    first.proc.kill()
    first.finish(timeout=60)
    before, total = committed(faulted, "cafe"), committed(clean, "cafe")
    assert 1 <= before < total
    # 2. the re-run skips the committed parts; a worker node is lost once it commits another
    second = build(cluster, build_yaml, faulted, "scan", "cafe")
    second.wait_until(lambda: committed(faulted, "cafe") > before, "a new cafe part", 900)
    node = cluster.node_running(r"^ray::WorkerActor")
    done = committed(faulted, "cafe")
    cluster.kill_raylet(node)
    assert done < total, "cafe finished before the node was lost: enlarge the dataset"
    assert second.finish(timeout=1200) == 0, story(second)
    assert f"{total - before} new, {before} skipped, 0 failed" in second.output, \
        story(second)
    assert_same_tables(faulted, clean, ["extract", "train-sae", "scan", "cafe"])
    print(f"\n[multinode] cafe: driver killed after {before}/{total} parts, node lost after "
          f"{done}/{total}; {time.time() - t0:.0f}s")

