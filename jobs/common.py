"""What every Ray job driver shares: connecting to Ray, the GPUs it offers, and the loop that feeds
a stage's parts to Ray (an actor pool, or plain tasks) or runs them in process, handing each
result or failure to the driver's committer."""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
import torch

T = TypeVar("T")  # a stage's task (one part)
R = TypeVar("R")  # what computing it returns (a PartRecord)
# calls queued per actor (or task slot), so a worker never waits for the driver between parts
QUEUE_PER_SLOT = 2


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
        ray.init(address=address, log_to_driver=log_to_driver)


# Ray's switch for "no multi-node cluster on this host": with it off, the node's address is the
# loopback one, so the GCS, raylet, object manager, workers and agents bind to 127.0.0.1 instead
# of every interface (Ray's own mode for laptops; read when `ray` is imported, inherited by the
# processes a local instance starts)
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


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
                 log_to_driver=log_to_driver)
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


class WorkerActor:
    """A Ray actor around a stage's worker: `factory(*args, device=...)` is built once per actor
    (the model loaded once), and each call runs `worker.run(*call_args)`."""

    def __init__(self, threads: int, factory: Callable[..., Any], *args: Any) -> None:
        torch.set_num_threads(max(1, threads))
        # a GPU only when Ray gave this actor one (num_gpus > 0), not merely when one is visible
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.worker = factory(*args, device=device)

    def run(self, *call_args: Any) -> Any:
        return self.worker.run(*call_args)


def run_in_process(run_one: Callable[[T], R], tasks: Sequence[T], on_ok: Callable[[R], None],
                   on_fail: Callable[[T, str], None]) -> None:
    """`run_one` over `tasks`, one after the other in this process (no Ray); each result goes to
    `on_ok`, each exception to `on_fail(task, "Type: message")`."""
    for task in tasks:
        try:
            result = run_one(task)
        except Exception as exc:  # one broken part must not stop the others
            on_fail(task, f"{type(exc).__name__}: {exc}")
        else:
            on_ok(result)


def run_in_flight(tasks: Sequence[T], submit: Callable[[int, T], ray.ObjectRef],
                  on_ok: Callable[[R], None], on_fail: Callable[[T, str], None], *, slots: int,
                  per_slot: int = QUEUE_PER_SLOT,
                  on_actor_died: Callable[[int, T, Exception], None] | None = None) -> None:
    """Run `tasks` in order through `submit(slot, task)`, `per_slot` calls in flight per slot.

    Each finished call's slot gets the next task, so a slot's worker never waits for the driver
    between two tasks and no more than `slots * per_slot` are queued. Results go to `on_ok` in
    the order they finish; a Ray error goes to `on_fail(task, "Type: message")`, or, when the
    call's actor is gone for good (`RayActorError`), to `on_actor_died(slot, task, error)`.
    """
    queue = list(reversed(tasks))  # pop() takes them in order
    in_flight: dict[ray.ObjectRef, tuple[int, T]] = {}

    def fill(slot: int) -> None:
        task = queue.pop()
        in_flight[submit(slot, task)] = (slot, task)

    for slot in range(slots):
        for _ in range(per_slot):
            if queue:
                fill(slot)
    while in_flight:
        [ref], _ = ray.wait(list(in_flight), num_returns=1)
        slot, task = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            if on_actor_died is not None and isinstance(exc, ray.exceptions.RayActorError):
                on_actor_died(slot, task, exc)
            else:
                on_fail(task, f"{type(exc).__name__}: {exc}")
        else:
            on_ok(result)
        if queue:
            fill(slot)


def run_actor_pool(factory: Callable[..., Any], args: Sequence[Any], tasks: Sequence[T],
                   on_ok: Callable[[R], None], on_fail: Callable[[T, str], None], *,
                   n_actors: int, cpus: float, gpus: float | None, max_retries: int, role: str,
                   call: Callable[[ray.actor.ActorHandle, T], ray.ObjectRef] | None = None) -> None:
    """Run `tasks` on a pool of `WorkerActor(factory, *args)`, committing as calls finish.

    Args:
        factory, args: the worker each actor holds, `factory(*args, device=...)` (object refs
            among `args` arrive resolved).
        tasks: in the order they are submitted; `call(actor, task)` submits one (default
            `actor.run.remote(task)`).
        on_ok, on_fail: see `run_in_flight`; an actor out of restarts fails its task with
            "{role} actor died: ..." and its slot gets a fresh actor.
        n_actors: pool size (capped by the number of tasks); cpus / gpus: per actor (GPUs
            default to 1 per actor when the cluster has GPUs, else 0).
        max_retries: restarts of a dead actor and retries of its calls.
    """
    if gpus is None:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    actor_cls = ray.remote(WorkerActor).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=max_retries, max_task_retries=max_retries)
    threads = max(1, int(cpus))

    def new_actor() -> ray.actor.ActorHandle:
        return actor_cls.remote(threads, factory, *args)

    actors = [new_actor() for _ in range(max(1, min(n_actors, len(tasks))))]
    call = call or (lambda actor, task: actor.run.remote(task))

    def died(slot: int, task: T, exc: Exception) -> None:
        on_fail(task, f"{role} actor died: {exc}")
        actors[slot] = new_actor()

    run_in_flight(tasks, lambda slot, task: call(actors[slot], task), on_ok, on_fail,
                  slots=len(actors), on_actor_died=died)
