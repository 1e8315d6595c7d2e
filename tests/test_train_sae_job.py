"""The SAE training job: seekable streams, true resume, held-out metrics, the saes table.

The PFVs come from a tiny in-process extraction (3 shards of 12 images, demo_resnet with
seeded random weights). Ray-free tests drive the training loop with `LocalSession`; the Ray
tests run the same loop inside Ray Train and compare weights with it.
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.pfv.parts import PFVPart, committed_parts
from pipeline.pfv.stream import PFVStream
from pipeline.sae import load_sae
from pipeline.sae.stage import TrainOptions, make_runs, train_runs
from pipeline.sae.train import InjectedFailure, LocalSession
from pipeline.store import AtlasRoot, fs
from tiny import CHANNELS, SWEEP, TRAIN, copy_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(root: str, sae_id: str) -> dict[str, torch.Tensor]:
    return load_file(fs.join(root, "sae_weights", f"{sae_id}.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ---- the stream ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted_parts(tmp_path_factory) -> list[PFVPart]:
    """Parts whose row r of part i holds the value 1000·i + r in every column."""
    root = tmp_path_factory.mktemp("parts")
    parts = []
    for i, rows in enumerate([37, 50, 13, 64, 20, 41]):
        values = (np.arange(rows)[:, None] + 1000 * i + np.zeros((1, 3))).astype(np.float32)
        fs.write_npy(values, str(root / f"p{i}.npy"))
        parts.append(PFVPart(f"part-{i:06d}", str(root / f"p{i}.npy"), "", rows))
    return parts


@pytest.mark.parametrize("cache_bytes", [0, 1 << 30])
def test_stream_restarted_at_any_position_yields_the_same_batches(counted_parts,
                                                                  cache_bytes) -> None:
    stream = PFVStream(counted_parts, batch_size=16, seed=3, window_parts=2,
                       cache_bytes=cache_bytes)
    it = stream(0)
    full = [next(it) for _ in range(50)]  # > 3 epochs of 225 rows
    for position in (1, 7, 13, 14, 29, 45):
        it = stream(position)
        for expected in full[position:]:
            assert torch.equal(next(it), expected)


def test_stream_epoch_visits_every_row_once_in_a_seeded_order(counted_parts) -> None:
    total = sum(p.rows for p in counted_parts)
    rows = torch.cat([b for b, _ in zip(PFVStream(counted_parts, 25, seed=0)(0), range(9))])
    epoch = rows[:total, 0].tolist()
    assert sorted(epoch) == sorted(1000 * i + r for i, p in enumerate(counted_parts)
                                   for r in range(p.rows))
    assert epoch != sorted(epoch)
    other = torch.cat([b for b, _ in zip(PFVStream(counted_parts, 25, seed=1)(0), range(9))])
    assert not torch.equal(rows, other)


def test_stream_gives_each_worker_its_own_parts(counted_parts) -> None:
    seen = []
    for rank in range(3):
        stream = PFVStream(counted_parts, 8, seed=0, rank=rank, world_size=3)
        seen.append({int(v) // 1000 for b, _ in zip(stream(0), range(20)) for v in b[:, 0]})
    assert seen == [{0, 3}, {1, 4}, {2, 5}]
    with pytest.raises(ValueError, match="worker 6 of 7 gets no PFV part"):
        PFVStream(counted_parts, 8, seed=0, rank=6, world_size=7)


# ---- the sweep -------------------------------------------------------------------------


@pytest.mark.parametrize("entry, named", [
    ({"layer": "layer3", "sae": {"n_latents": 64}}, "layer 'layer3' is not extracted"),
    ({"layer": "layer2", "sae": {"n_latents": 64, "k": 65}}, "k=65: must be <= n_latents=64"),
    ({"layer": "layer4", "sae": {"n_latents": 2**24}}, "n_latents=16777216 x d_in=128 needs"),
    ({"layer": "layer2", "sae": {"d_in": 32}}, "d_in is the layer's width"),
    ({"layer": "layer2", "sae": {"n_latent": 64}}, "unknown SAEConfig fields"),
    ({"layer": "layer2", "sea": {}}, "unknown keys \\['sea'\\]"),
])
def test_bad_sweep_entry_fails_naming_the_entry_and_the_problem(entry, named) -> None:
    with pytest.raises(ValueError, match=named):
        make_runs([entry], CHANNELS, TRAIN)


def test_duplicate_run_names_are_refused() -> None:
    entry = {"layer": "layer2", "sae": {"n_latents": 64, "k": 4}}
    with pytest.raises(ValueError, match="names runs twice"):
        make_runs([entry, entry], CHANNELS, TRAIN)


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(extracted, tmp_path) -> None:
    runs = make_runs(SWEEP, CHANNELS, TRAIN)
    straight = copy_of(extracted, tmp_path / "straight")
    assert train_runs(straight, runs, TRAIN, LocalSession(tmp_path / "ckpt-a")) == [
        r.sae_id for r in runs]

    crashed = copy_of(extracted, tmp_path / "crashed")
    session = LocalSession(tmp_path / "ckpt-b")
    with pytest.raises(InjectedFailure):  # the second dies at step 25, after its checkpoint
        train_runs(crashed, runs, TRAIN, session, crash_at=(runs[1].sae_id, 25))
    assert [r["sae_id"] for r in AtlasRoot(crashed).saes()] == [runs[0].sae_id]
    assert train_runs(crashed, runs, TRAIN, session) == [runs[1].sae_id]
    for run in runs:
        assert_same_weights(weights(straight, run.sae_id), weights(crashed, run.sae_id))
    # finished runs are skipped by a further re-run
    assert train_runs(crashed, runs, TRAIN, session) == []


def test_saes_table_holds_held_out_metrics_and_loadable_weights(extracted, tmp_path) -> None:
    root = copy_of(extracted, tmp_path / "root")
    runs = make_runs(SWEEP, CHANNELS, TRAIN)
    train_runs(root, runs, TRAIN, LocalSession(tmp_path / "ckpt"))
    table = pq.read_table(fs.join(root, "saes"))
    assert table.schema.metadata[b"table"] == b"saes"
    rows = {r["sae_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["layer2-topk-64-k4", "layer4-small"]
    held = committed_parts(root, "layer4")[-1]
    for run in runs:
        row = rows[run.sae_id]
        assert 0 <= row["fvu"] < 1 and row["l0"] == pytest.approx(run.cfg.k)
        assert 0 <= row["dead_frac"] <= 1 and 0 <= row["dense_frac"] <= 1
        assert 0 <= row["logit_agreement"] <= 1 and row["logit_kl"] >= 0
        assert row["heldout_images"] == 12 and row["tokens"] == 40 * run.cfg.batch_size
        sae = load_sae(row["weights"])
        assert sae.cfg == run.cfg
    assert rows["layer4-small"]["heldout_pfvs"] == held.rows == 12 * 16 and held.part == "part-000002"


# ---- on Ray Train ----------------------------------------------------------------------


@pytest.mark.ray
def test_ray_train_job_recovers_from_a_worker_failure_with_the_same_weights(
        ray_cluster, extracted, tmp_path) -> None:
    from jobs.train_sae import run

    reference = copy_of(extracted, tmp_path / "reference")
    runs = make_runs(SWEEP[1:], CHANNELS, TRAIN)
    train_runs(reference, runs, TRAIN, LocalSession(tmp_path / "ckpt"))

    root = copy_of(extracted, tmp_path / "ray")
    rows = run(root, replace(TRAIN, sweep=SWEEP[1:], max_failures=1),
               crash_at=("layer4-small", 25))
    assert [r["sae_id"] for r in rows] == ["layer4-small"]
    assert_same_weights(weights(reference, "layer4-small"), weights(root, "layer4-small"))


@pytest.mark.ray
def test_ray_train_rerun_after_a_failed_job_resumes_from_its_checkpoint(
        ray_cluster, extracted, tmp_path) -> None:
    import ray.train

    from jobs.train_sae import run

    reference = copy_of(extracted, tmp_path / "reference")
    runs = make_runs(SWEEP, CHANNELS, TRAIN)
    train_runs(reference, runs, TRAIN, LocalSession(tmp_path / "ckpt"))

    root = copy_of(extracted, tmp_path / "ray")
    with pytest.raises(ray.train.TrainingFailedError):  # the first SAE finishes, the second dies
        run(root, replace(TRAIN, sweep=SWEEP, max_failures=0), crash_at=("layer4-small", 25))
    assert [r["sae_id"] for r in AtlasRoot(root).saes()] == ["layer2-topk-64-k4"]
    rows = run(root, replace(TRAIN, sweep=SWEEP, max_failures=0))
    assert [r["sae_id"] for r in rows] == ["layer2-topk-64-k4", "layer4-small"]
    for r in runs:
        assert_same_weights(weights(reference, r.sae_id), weights(root, r.sae_id))


@pytest.mark.ray
def test_ray_train_job_trains_data_parallel_on_two_workers(ray_cluster, extracted,
                                                           tmp_path) -> None:
    from jobs.train_sae import run

    root = copy_of(extracted, tmp_path / "ddp")
    options = TrainOptions(steps=20, checkpoint_every=10, fidelity_images=12, workers=2,
                           cpus_per_worker=0.5)  # leaves a CPU for Ray Data's read tasks
    [row] = run(root, replace(options, sweep=SWEEP[1:]))
    assert row["tokens"] == 20 * 48 * 2  # both workers' batches count
    assert 0 <= row["fvu"] and row["heldout_images"] == 12


def test_an_unreadable_held_out_shard_is_refused_before_any_training(tmp_path) -> None:
    from jobs.extract import run as extract
    from jobs.train_sae import run as train
    from pipeline.data.synthetic import write_shards
    from tiny import EXTRACT

    shards = [str(p) for p in write_shards(tmp_path / "data", n=24, seed=2, size=64,
                                           shard_size=12, workers=1, progress=False)]
    garbage = tmp_path / "data" / "shard-000002.tar"
    garbage.write_bytes(b"not a tar archive at all" * 64)  # the last shard: the held-out one
    root = str(tmp_path / "out")
    summary = extract(root, replace(EXTRACT, shards=(*shards, str(garbage)), in_process=True),
                      progress=False, stats=False)
    assert summary["parts_done"] == 3 and summary["errors"] == 1
    with pytest.raises(ValueError, match="held-out parts part-000002 hold no PFVs"):
        train(root, replace(TRAIN, sweep=tuple(SWEEP), in_process=True))
    assert not AtlasRoot(root).saes()


class _RayStorage:
    """A session that persists like Ray Train: each report a `checkpoint_<time>` folder in the
    run's storage; it starts every run afresh."""

    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, storage: Path) -> None:
        self.storage, self.names = storage, []
        storage.mkdir(parents=True)

    def prepare(self, sae: torch.nn.Module) -> torch.nn.Module:
        return sae

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[None]:
        yield None

    def persist(self, folder: str | None, metrics: dict) -> None:
        name = f"checkpoint_2026-12-03_07-12-{len(self.names):02d}.000000"
        shutil.copytree(folder, self.storage / name)
        self.names.append(name)


def test_a_checkpoint_ray_train_never_registered_is_resumed_not_step_0(tmp_path, monkeypatch
                                                                         ) -> None:
    """A node lost between a checkpoint's report and the controller's next poll: Ray Train
    hands the restarted group an older checkpoint (here the first) or none; the loop resumes
    from the newest whole copy in storage, skips a copy cut short, and ends with the weights
    of an uninterrupted run."""
    import ray.train

    from jobs import train_sae as job
    from pipeline.sae.config import SAEConfig
    from pipeline.sae.train import fit

    cfg = SAEConfig(d_in=8, n_latents=16, k=2, batch_size=32)
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(60)]
    torch.manual_seed(0)
    straight = fit(cfg, data, 60, _RayStorage(tmp_path / "straight"), checkpoint_every=10)
    storage = tmp_path / "_ray_train" / "train-sae"
    writer = _RayStorage(storage)
    torch.manual_seed(0)
    with pytest.raises(InjectedFailure):
        fit(cfg, data, 60, writer, checkpoint_every=10, tag={"run": "a"}, crash_at_step=35)
    assert len(writer.names) == 3  # steps 10, 20, 30
    # a newer copy cut short by the lost node: its optimiser state truncated
    cut = storage / "checkpoint_2026-12-03_07-12-99.000000"
    shutil.copytree(storage / writer.names[-1], cut)
    (cut / "train_state.pt").write_bytes((cut / "train_state.pt").read_bytes()[:100])
    assert job.unregistered_checkpoint(str(storage), writer.names[0]) == str(storage / writer.names[2])
    assert job.unregistered_checkpoint(str(storage), writer.names[2]) is None

    # Ray Train's controller registered only the first (step 10)
    registered = ray.train.Checkpoint(str(storage / writer.names[0]))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: registered)
    monkeypatch.setattr(ray.train, "get_context", lambda: type(
        "Context", (), {"get_world_rank": lambda self: 0, "get_world_size": lambda self: 1})())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    session = job.RayTrainSession(str(storage))
    monkeypatch.setattr(session, "persist", lambda folder, metrics: None)
    monkeypatch.setattr(session, "prepare", lambda sae: sae)  # one worker: no DDP
    resumed = fit(cfg, data, 60, session, checkpoint_every=10, tag={"run": "a"})
    assert resumed.start.step == 30  # not Ray's 10, not 0, not the cut copy
    assert_same_weights(straight.sae.state_dict(), resumed.sae.state_dict())
