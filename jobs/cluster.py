"""Connecting a stage's driver to Ray: a private loopback-only local instance or the user's
cluster, and what the connected instance offers (GPUs, whether it is on this machine)."""
from __future__ import annotations

import ipaddress
import logging
import os
import sys

import ray
import torch


# Ray's own log lines (INFO and WARNING from the driver and every worker: resource requests,
# checkpoint reports, state-API retries) are shown only with `--verbose`; the stages' progress
# lines and errors always are
_VERBOSE = os.environ.get("CONCEPT_ATLAS_VERBOSE", "") not in ("", "0")


def set_verbose(verbose: bool) -> None:
    """Show Ray's own log lines (for the Ray instance this process connects to next)."""
    global _VERBOSE
    _VERBOSE = verbose


def verbose() -> bool:
    """Whether Ray's own log lines are shown."""
    return _VERBOSE


def logging_config() -> ray.LoggingConfig:
    """The log level of Ray's loggers in the driver and the workers."""
    return ray.LoggingConfig(log_level="INFO" if _VERBOSE else "ERROR")


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             log_to_driver: bool = True) -> None:
    """Connect to the Ray cluster at `address` (or `RAY_ADDRESS`), else start a private one here.

    A no-op when this process is already connected (tests, `build` running several stages).
    A local instance listens on loopback only and keeps Ray's token authentication on (see
    `start_local_ray`); a cluster is the user's own, reached as Ray's docs describe.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        start_local_ray(num_cpus=num_cpus, log_to_driver=log_to_driver)
    else:
        ray.init(address=address, log_to_driver=log_to_driver, logging_config=logging_config())


# Ray's switch for "no multi-node cluster on this host": with it off, the node's address is the
# loopback one, so the GCS, raylet, object manager, workers and agents bind to 127.0.0.1 instead
# of every interface (Ray's own mode for laptops; read when `ray` is imported, inherited by the
# processes a local instance starts)
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Train's watcher of node preemption (spot instances drained by a cloud): a single-machine
# instance has no node to lose, and the watcher's start prints an error-level line from Ray's
# core worker into every local train-sae (ray-project/ray#53727); a user's setting wins
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def start_local_ray(*, num_cpus: int | None = None, log_to_driver: bool = True) -> str:
    """Start a Ray instance on this machine that nothing outside it can reach; its GCS address.

    Every Ray process binds to the loopback interface (no dashboard), and token authentication
    stays as the user has it: Ray enables it by default for a new local instance (the token
    goes to `~/.ray/auth_token`), so even a local process without the token cannot submit work.
    `RAY_AUTH_MODE=disabled` (which only the test suite sets) turns it off with a warning.

    Raises:
        RuntimeError: Ray came up on a non-loopback address (a Ray release that ignores the
            loopback switch); the instance is shut down first, so nothing stays exposed.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_ONLY_ENV] = "0"
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # inherited by the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # in case `ray` was imported before the line above
    auth = os.environ.get("RAY_AUTH_MODE")
    if auth is not None and auth.lower() == "disabled":
        print("[ray] warning: RAY_AUTH_MODE=disabled: the local Ray instance accepts work "
              "from any process on this machine without a token", file=sys.stderr, flush=True)
    # Ray announces its default (token auth on) with a warning on every start; it is the
    # setting we want, so the line would only bury the progress output
    auth_logger = logging.getLogger(AUTH_LOGGER)
    level = auth_logger.level
    auth_logger.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=log_to_driver, logging_config=logging_config())
    finally:
        auth_logger.setLevel(level)
    gcs = ray.get_runtime_context().gcs_address
    if not on_loopback():
        ray.shutdown()
        raise RuntimeError(f"the local Ray instance came up on {gcs}, reachable from the "
                           "network; this Ray release ignores the loopback-only setting "
                           f"{LOOPBACK_ONLY_ENV}=0 (run on a cluster with --address instead)")
    return gcs


def on_loopback() -> bool:
    """Whether the connected instance's GCS listens on loopback: every node is on this machine."""
    host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0].strip("[]")
    return ipaddress.ip_address(host).is_loopback


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 on a CPU-only machine)."""
    return float(ray.cluster_resources().get("GPU", 0))


def local_device() -> str:
    """The device of an in-process run: CUDA when this process sees a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"
