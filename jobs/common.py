"""What every Ray job driver shares: connecting to Ray, and the count of GPUs it offers."""
from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), else start one locally.

    A no-op when this process is already connected (tests, `build` running several stages).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # a local instance needs no dashboard; a cluster has its own (started by `ray start`)
    ray.init(address=address, include_dashboard=False if address is None else None,
             log_to_driver=True)


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU-only machine)."""
    return float(ray.cluster_resources().get("GPU", 0))
