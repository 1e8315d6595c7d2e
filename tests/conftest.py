"""Shared test setup: offline hub, marks for slow / Ray / GPU tests."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Only the test suite turns Ray's token authentication off (its instances are loopback-only);
# the tests of the authentication itself give their subprocesses an environment without it.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--runray", action="store_true", help="also run tests marked ray")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_ray = pytest.mark.skip(reason="ray: run with --runray")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device visible")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "ray" in item.keywords and not config.getoption("--runray"):
            item.add_marker(skip_ray)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): its
    matrices are tiny, and on a shared 2-core machine extra intra-op threads only spin
    against other processes (measured 13x slower with 2 threads under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance (2 CPUs) for every test that needs one; yields its GCS address."""
    import ray

    from jobs.cluster import init_ray

    init_ray(num_cpus=2, log_to_driver=False)  # loopback only, as every local instance
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ---- the tiny atlas (tests/tiny.py), built once per session without Ray ------------------


@pytest.fixture(scope="session")
def extracted(tmp_path_factory) -> str:
    """An extraction root with 3 parts of 12 images (the last one held out)."""
    from dataclasses import replace

    from pipeline.data.synthetic import write_shards
    from pipeline.pfv.extract import ShardExtractor, decode_shard, plan_extract
    from pipeline.store import Manifest
    from tiny import EXTRACT

    root = tmp_path_factory.mktemp("sae_job")
    shards = [str(p) for p in write_shards(root / "data", n=36, seed=1, size=64, shard_size=12,
                                           workers=1, progress=False)]
    out = str(root / "out")
    plan = plan_extract(out, replace(EXTRACT, shards=tuple(shards)))
    extractor = ShardExtractor(plan.cfg, plan.out)
    for task in plan.pending:
        Manifest(out).commit(extractor.run(task, decode_shard(task.shard, plan.data_config)))
    return out


@pytest.fixture(scope="session")
def atlas(extracted, tmp_path_factory) -> str:
    """The tiny extraction with one SAE per layer trained in process (a test module that
    needs another atlas overrides this fixture with its own)."""
    from pipeline.sae.stage import make_runs, train_runs
    from pipeline.sae.train import LocalSession
    from tiny import CHANNELS, SWEEP, TRAIN, copy_of

    root = copy_of(extracted, tmp_path_factory.mktemp("icat") / "atlas")
    train_runs(root, make_runs(SWEEP, CHANNELS, TRAIN), TRAIN,
               LocalSession(tmp_path_factory.mktemp("ckpt")))
    return root


@pytest.fixture(scope="session")
def straight(atlas, tmp_path_factory) -> tuple[str, dict]:
    """A copy of `atlas` with the icat stage's edges, and the stage's summary."""
    import jobs.icat
    from tiny import ICAT, copy_of

    root = copy_of(atlas, tmp_path_factory.mktemp("straight") / "root")
    return root, jobs.icat.run(root, ICAT, progress=False)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> str:
    """The tiny build config (tests/tiny.py BUILD) run through every stage in this process:
    an atlas with exemplars, iERF masks, indexes and ICAT edges (the browser tests)."""
    import yaml

    from jobs import build
    from tiny import BUILD

    base = tmp_path_factory.mktemp("built")
    config = base / "build.yaml"
    config.write_text(yaml.safe_dump(BUILD))
    build.run(str(config), out=str(base / "atlas"), progress=False)
    return str(base / "atlas")
