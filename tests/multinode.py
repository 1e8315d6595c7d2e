"""A Ray cluster of a head and several worker nodes on this machine, loopback only, for the
multi-node fault tests (tests/test_multinode_faults.py), and `concept-atlas build` runs on it.

Each node is its own raylet with its own logical CPUs, object store and temp folder; stages
reach the cluster with `--address`, as on a real one. The nodes are started with Ray's own
mini-cluster for tests (`ray.cluster_utils.Cluster`) rather than `ray start`: on Linux
`ray start --address 127.0.0.1:PORT` swaps the loopback address for the host's network address
(Ray's multi-node mode), so its nodes would listen on every interface, and in Ray's
loopback-only mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, jobs/cluster.py) `ray start` refuses
worker nodes. `Cluster` starts the same processes (GCS, one raylet per node) in that mode, each
bound to 127.0.0.1, and a reaper stops them if the test process dies.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
from cli_run import CliRun

from jobs.cluster import LOOPBACK_ONLY_ENV

# a raylet's socket path (TEMP/session_DATE_PID/sockets/plasma_store, ~70 characters past TEMP)
# must fit in a Unix socket address (107 bytes)
MAX_TEMP_DIR = 36


def cluster_env() -> dict[str, str]:
    """The environment of the cluster's processes and of the drivers that connect to it:
    loopback-only Ray, no token (the tests' instances are loopback-only)."""
    return {**os.environ, LOOPBACK_ONLY_ENV: "0", "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1"}


class LocalCluster:
    """A head node (no CPUs: it runs the drivers' helpers only, as a production head) and worker
    nodes of `cpus` logical CPUs each, under `temp` (one folder per node)."""

    def __init__(self, temp: Path, workers: int = 2, cpus: int = 2,
                 start_timeout: float = 120) -> None:
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        if len(str(temp)) > MAX_TEMP_DIR:
            raise ValueError(f"Ray's temp folder {temp} is longer than {MAX_TEMP_DIR} "
                             "characters: its socket paths would not fit in a Unix address")
        os.environ.update({LOOPBACK_ONLY_ENV: "0", "RAY_AUTH_MODE": "disabled"})
        ray_constants.ENABLE_RAY_CLUSTER = False  # read when `ray` was imported
        self.temp, self.cpus, self.start_timeout = temp, cpus, start_timeout
        self.added = 0
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, temp_dir=str(temp / "h"), include_dashboard=False))
        for _ in range(workers):
            self.add_worker()

    @property
    def address(self) -> str:
        """The GCS address (`--address`)."""
        return self.cluster.address

    def add_worker(self) -> object:
        """Start one more worker node; its `ray._private.node.Node`."""
        self.added += 1
        # its own log monitor: it streams the prints of the workers under its temp folder to
        # their drivers (Ray's Cluster starts one per machine, watching the head's folder only)
        node = self.cluster.add_node(num_cpus=self.cpus, temp_dir=str(self.temp / f"w{self.added}"),
                                     include_log_monitor=True)
        self.cluster.wait_for_nodes(timeout=self.start_timeout)
        return node

    @property
    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.unique_id)

    def raylet(self, node) -> psutil.Process:
        """The raylet process of `node`."""
        [info] = node.all_processes["raylet"]
        return psutil.Process(info.process.pid)

    def node_running(self, title: str, timeout: float = 120) -> object:
        """The worker node one of whose Ray workers has a process title matching `title` (a
        regex: `ray::WorkerActor`, `ray::RayTrainWorker`), waiting up to `timeout` s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for node in self.workers:
                for proc in self.raylet(node).children(recursive=True):
                    try:
                        if re.search(title, " ".join(proc.cmdline())):
                            return node
                    except (psutil.NoSuchProcess, psutil.ZombieProcess):
                        continue
            time.sleep(0.2)
        raise AssertionError(f"no worker node runs a {title!r} process after {timeout}s")

    def kill_raylet(self, node, replace: bool = True) -> None:
        """SIGKILL `node`'s raylet (its workers die with it, as on a lost machine), wait until
        the cluster has dropped it, and start a fresh node in its place when `replace` (as an
        autoscaler would), so the next test has as many workers."""
        raylet = self.raylet(node)
        raylet.send_signal(signal.SIGKILL)
        raylet.wait(timeout=30)
        # the node's processes that outlive their raylet for a moment (agents, workers)
        self.cluster.remove_node(node, allow_graceful=False)
        # until the GCS has found the raylet dead (its health checks, ~15 s) and dropped it
        self.cluster.wait_for_nodes(timeout=120)
        if replace:
            self.add_worker()

    def shutdown(self) -> None:
        self.cluster.shutdown()


def cluster_run(*args: str) -> CliRun:
    """`concept-atlas *args` on the cluster (`cluster_env()`), its output collected."""
    return CliRun(*args, env=cluster_env())
