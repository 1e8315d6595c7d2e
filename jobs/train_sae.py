"""`concept-atlas train-sae`: an SAE sweep on extracted PFVs with Ray Train (DDP), resumable.

One `TorchTrainer` runs the whole sweep (several layers, several SAE configs), one run after
another, each data-parallel over `workers` workers (1 locally). PFV parts stream through Ray
Data inside each worker, in the seeded, seekable order of `pipeline.pfv.stream.PFVStream`.
Checkpoints (weights, optimiser state, step, data position) are reported to Ray Train, which
persists them under `OUT/_ray_train/`; after a worker failure Ray Train restarts the group and
the loop resumes from `ray.train.get_checkpoint()`; a re-run of the job restores the same
Ray Train run (same name and storage path) and skips the SAEs already committed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
from ray.util.debug import log_once
import torch
from torch import nn

from jobs.cluster import cluster_gpus, init_ray, on_loopback, verbose
from pipeline.pfv.parts import PFVPart
from pipeline.sae import SAE
from pipeline.sae.checkpoint import is_sealed_copy
from pipeline.sae.stage import SAERun, TrainOptions, plan_runs, print_summary, train_runs
from pipeline.sae.train import LocalSession
from pipeline.store import AtlasRoot, fs


class RayTrainSession:
    """The training loop's runtime inside a Ray Train worker. `storage`: the run's folder in
    Ray Train's storage (`RunConfig.storage_path` / `name`)."""

    def __init__(self, storage: str) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.storage = storage

    def prepare(self, sae: SAE) -> nn.Module:
        return ray.train.torch.prepare_model(sae)  # DDP only when world_size > 1

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()
        known = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else ""
        newer = unregistered_checkpoint(self.storage, known)
        if newer is not None:
            yield newer
        elif checkpoint is None:
            yield None
        else:
            with checkpoint.as_directory() as folder:
                yield folder

    def persist(self, folder: str | None, metrics: dict[str, Any]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)


def unregistered_checkpoint(storage: str, known: str) -> str | None:
    """The newest whole checkpoint folder in a Ray Train run's storage (`storage`) that is newer
    than the checkpoint `known` (the folder name of Ray Train's latest; "" for none), or None.

    Ray Train learns of a reported checkpoint only when its controller next polls the workers:
    when a node is lost between a report and that poll, the restarted group is handed an older
    checkpoint (or none, and would train from step 0) although the newer one is in storage.
    Copies cut short by the loss are skipped (`is_sealed_copy`). Every rank reads the same
    folder, so all resume from the same step. Remote storage is not searched (Ray Train's
    checkpoint is used there)."""
    local = fs.local_path(storage)
    if local is None or not os.path.isdir(local):
        return None
    # Ray Train names checkpoint folders by the time of the report, so names sort by age
    newer = sorted((n for n in os.listdir(local) if n.startswith("checkpoint_") and n > known),
                   reverse=True)
    return next((os.path.join(local, n) for n in newer
                 if is_sealed_copy(os.path.join(local, n))), None)


# The process group of a training run on this machine. torch's TCPStore server binds every
# interface whatever MASTER_ADDR says, and Ray Train's torch backend starts one for the group;
# on an instance whose GCS is on loopback (a local run: every worker is on this machine) the
# store is opened instead on a socket bound to 127.0.0.1, and gloo / NCCL use the loopback
# interface, so a local run listens on nothing beyond 127.0.0.1 (docs: README "Run on a cluster").
LOOPBACK_IFNAME = "lo" if sys.platform.startswith("linux") else "lo0"
_LOOPBACK_STORE: list[Any] = []  # rank 0's listening socket and store, alive while it trains


def _open_loopback_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: a TCPStore server on a fresh 127.0.0.1 socket; its port."""
    import socket
    from datetime import timedelta

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(world_size)
    port = sock.getsockname()[1]
    store = torch.distributed.TCPStore(
        "127.0.0.1", port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False, master_listen_fd=sock.fileno())
    _LOOPBACK_STORE[:] = [sock, store]
    return port


def _join_loopback_group(backend: str, rank: int, world_size: int, port: int,
                         timeout_s: int) -> None:
    """On every rank: join the process group through the loopback store."""
    from datetime import timedelta

    os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = LOOPBACK_IFNAME
    timeout = timedelta(seconds=timeout_s)
    store = (_LOOPBACK_STORE[1] if rank == 0 else
             torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                        timeout=timeout))
    torch.distributed.init_process_group(backend, store=store, rank=rank,
                                         world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(ray.train.torch.TorchConfig().backend_cls):  # type: ignore[misc]
    """Ray Train's torch backend with its process group set up on loopback (shutdown and the
    device handling are Ray's)."""

    def on_start(self, worker_group: Any, backend_config: ray.train.torch.TorchConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        world = len(worker_group)
        port = worker_group.execute_single(0, _open_loopback_store, world,
                                           backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, _join_loopback_group, backend, rank,
                                                   world, port, backend_config.timeout_s)
                 for rank in range(world)])


@dataclasses.dataclass
class LoopbackTorchConfig(ray.train.torch.TorchConfig):
    """`TorchConfig` whose process group listens on 127.0.0.1 only (a local instance)."""

    @property
    def backend_cls(self) -> type:
        return LoopbackTorchBackend


def torch_config() -> ray.train.torch.TorchConfig:
    """The process-group setup for the connected instance: loopback when its GCS is local."""
    return LoopbackTorchConfig() if on_loopback() else ray.train.torch.TorchConfig()


def ray_data_reader(parts: Sequence[PFVPart]) -> Iterator[np.ndarray]:
    """Each part's PFVs [rows, C], read in parallel by Ray Data, in part order."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # parts come back in the order asked
    # one small read per window or run: per-read progress bars would drown the job's log (and
    # Ray Data says once that they are off: that once is spent here, so it stays quiet)
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.read_numpy([p.values for p in parts], override_num_blocks=len(parts))
    pending: list[np.ndarray] = []
    held, index = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        pending.append(batch["data"])
        held += len(batch["data"])
        # blocks need not match files: regroup rows by the manifest's row counts
        while index < len(parts) and held >= parts[index].rows:
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield rows[:parts[index].rows]
            pending, held = [rows[parts[index].rows:]], held - parts[index].rows
            index += 1
    if index != len(parts):
        raise ValueError(f"Ray Data read {index} of {len(parts)} PFV parts completely")


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker entry point of the TorchTrainer."""
    if not config["verbose"]:
        # Ray Train sets the worker's root logger to INFO (its report lines, timm's loading
        # lines would interleave with the progress lines, which are printed, not logged)
        logging.getLogger().setLevel(logging.WARNING)
    options = TrainOptions(**config["options"])
    torch.set_num_threads(max(1, int(options.cpus_per_worker)))
    train_runs(config["root"], [SAERun.from_dict(d) for d in config["runs"]], options,
               RayTrainSession(config["storage"]), reader=ray_data_reader,
               crash_at=config.get("crash_at"),
               log=config["log"])


@contextlib.contextmanager
def _own_sigint(root: AtlasRoot, pending: Sequence[SAERun]) -> Iterator[None]:
    """Ctrl-C during `TorchTrainer.fit` stops the training and then the caller, as it would
    anywhere else.

    Ray Train installs a SIGINT handler that aborts the run gracefully (the latest checkpoint
    stays, and the next run resumes from it) but never puts the previous handler back: a Ctrl-C
    in any later stage of a build was ignored. Its abort also ends in `fit` returning, or in a
    SystemExit from inside the handler, not in KeyboardInterrupt. The handler is restored here,
    and a fit that ended with runs left uncommitted is reported as the interruption it was.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit as e:  # Ray's handler exits from inside fit after a graceful abort
        raise KeyboardInterrupt("Ray Train stopped the SAE runs; their checkpoints are kept") from e
    finally:
        signal.signal(signal.SIGINT, previous)
    committed = {r["sae_id"] for r in root.saes()}
    left = [r.sae_id for r in pending if r.sae_id not in committed]
    if left:
        raise KeyboardInterrupt(f"Ray Train stopped before {', '.join(left)} "
                                "finished; their checkpoints are kept")


def run(root: AtlasRoot | str, options: TrainOptions, *, address: str | None = None,
        progress: bool = True, crash_at: tuple[str, int] | None = None) -> list[dict[str, Any]]:
    """Train every unfinished SAE of `options.sweep` on the PFVs under `root`; its `saes` rows.

    Runs in this process (`options.in_process`) or on Ray Train, data-parallel over
    `options.workers`. `progress`: a line every tenth of a run's steps. `crash_at` = (sae_id,
    step): that run fails once at that step (tests of recovery).
    """
    t0 = time.time()
    root = AtlasRoot.of(root)
    runs, pending = plan_runs(root, options)
    print(f"[train-sae] {len(runs)} SAEs under {root}: {len(runs) - len(pending)} done, "
          f"{len(pending)} to train", flush=True)
    if pending and options.in_process:
        local = fs.local_path(root.url)
        if local is None:
            raise ValueError(f"in_process training keeps checkpoints on a local disk; {root} "
                             "is remote: train on Ray instead")
        torch.set_num_threads(max(1, int(options.cpus_per_worker)))
        train_runs(root, pending, options, LocalSession(os.path.join(local, "_local_train")),
                   crash_at=crash_at, log=progress)
    elif pending:
        # Ray Train tees a worker's print into its logger too, and the driver then shows each
        # progress line twice; the setting is propagated to the workers
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        init_ray(address)
        use_gpu = options.use_gpu if options.use_gpu is not None else cluster_gpus() > 0
        trainer = ray.train.torch.TorchTrainer(
            _train_loop,
            torch_config=torch_config(),
            train_loop_config={
                "root": root.url, "runs": [r.to_dict() for r in pending],
                "storage": root.join("_ray_train", "train-sae"),
                "options": dataclasses.asdict(options), "crash_at": crash_at, "log": progress,
                "verbose": verbose(),
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=options.workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": options.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                # one name per output: a re-run restores the latest checkpoint, which the loop
                # uses only for the run it belongs to (its config is stored with it)
                name="train-sae",
                storage_path=root.join("_ray_train"),  # the run's folder: "storage" above
                failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                # its checkpoint and report lines, and its transient warnings under load
                # ("Failed to send resource request"), would bury the progress lines;
                # --verbose shows them, failures still raise
                logging_config=ray.train.LoggingConfig(
                    log_level="INFO" if verbose() else "ERROR")),
        )
        with _own_sigint(root, pending):
            trainer.fit()
    rows = [r for r in root.saes() if r["sae_id"] in {x.sae_id for x in runs}]
    print_summary(rows, time.time() - t0, root.extract().model)
    return rows
