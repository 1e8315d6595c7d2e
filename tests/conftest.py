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
