"""Running a stage's parts: in this process or on Ray (a pool of stateful actors, or plain
tasks), committing each finished part as it returns (docs/architecture.md, "Parts").

`run_parts` is the one driver loop of every part-wise stage (extract, scan, cafe, icat). Each
finished part's manifest record is committed when it returns, so a killed driver loses only the
parts in flight; a part that fails is recorded in the `errors` table (one row, the last line of
its error), reported, and left uncommitted for the next run. A dead actor is restarted and its
calls retried (`max_retries`); part names are deterministic, so a retried part replaces its
half-done files and nothing is duplicated.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import ray
import torch
from tqdm.auto import tqdm

from jobs import interrupt
from jobs.cluster import cluster_gpus, init_ray, local_device
from pipeline.data.errors import ErrorRecord
from pipeline.host import keep_freed_memory
from pipeline.stage import ActorRuntime, PartProgress, TaskRuntime
from pipeline.store import AtlasRoot, PartRecord


class Task(Protocol):
    """A part to compute: its name and what it reads (a shard, a PFV part)."""

    @property
    def part(self) -> str: ...

    @property
    def input(self) -> str: ...


T = TypeVar("T", bound=Task)
OnPart = Callable[[PartRecord], None]
# calls queued per actor (or task slot), so a worker never waits for the driver between parts
QUEUE_PER_SLOT = 2
# how often the driver collects the progress reports of running parts
POLL_SECONDS = 0.5
# the wait before a part lost with its actor or node is sent again, doubled at each resend:
# the GCS lists a lost node's actors as alive until its health checks find the node dead
# (about 15 s, longer under load), and a part sent there meanwhile is lost at once again
RESEND_DELAY_S = 5.0
# what a lost node or actor raises in the driver (a part's own exception is a RayTaskError):
# the actor gone, or an input (a prepared batch) that lived in the lost node's object store
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
        ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError)


@dataclass(frozen=True)
class Actors:
    """Parts run by stateful workers: `factory(*args, device=...)` is built once per actor (the
    model loaded once) and computes a part with `worker.run(task, *prepared)`.

    `prepare(task)`, when given, returns (function, args) computed ahead of the worker, as a
    one-CPU Ray task (shard decoding): its result is passed to `run` after the task.
    """

    factory: Callable[..., Any]
    args: tuple[Any, ...] = ()
    prepare: Callable[[Any], tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
    role: str = "worker"


@dataclass(frozen=True)
class Tasks:
    """Parts run as independent Ray tasks: `fn(task, *args)` returns the part's record."""

    fn: Callable[..., PartRecord]
    args: tuple[Any, ...] = ()


@dataclass
class Progress:
    """The progress bar of a stage: `count(record)` units per finished part; `total` None
    estimates it from the mean per part; `extra` = (name, amount(record)) shown as a sum."""

    unit: str
    total: int | None
    count: Callable[[PartRecord], int] = lambda record: record.rows
    extra: tuple[str, Callable[[PartRecord], int]] | None = None


class PartCommitter:
    """Commits finished parts (errors part, manifest, progress) and records failed ones."""

    def __init__(self, stage: str, root: AtlasRoot, atlas_id: str, parts: int,
                 progress: Progress, show: bool, on_part: OnPart | None) -> None:
        self.stage, self.root, self.atlas_id, self.parts = stage, root, atlas_id, parts
        self.progress, self.on_part = progress, on_part
        self.failed: dict[str, str] = {}
        self.done = self.counted = self.extra = 0
        # units of parts still running, already shown on the bar (PartProgress reports)
        self.reported: dict[str, int] = {}
        self.finished: set[str] = set()
        self.bar = tqdm(total=progress.total, unit=progress.unit, desc=stage,
                        disable=not show or not parts, smoothing=0.1)

    def tick(self, counts: dict[str, int]) -> None:
        """Move the bar by the units running parts reported ({part: units}); a report that
        arrives after its part finished is already counted and is dropped."""
        interrupt.check()  # the reports come every few seconds from every kind of run
        moved = 0
        for part, n in counts.items():
            if part not in self.finished:
                self.reported[part] = self.reported.get(part, 0) + n
                moved += n
        if moved:
            self.bar.update(moved)

    def ok(self, record: PartRecord) -> None:
        if record.errors == 0:
            # replaces the errors of an earlier failed attempt at this part
            self.root.write_errors(self.stage, record.part, self.atlas_id, [])
        self.root.manifest.commit(record)
        self.done += 1
        amount = self.progress.count(record)
        self.counted += amount
        if self.progress.total is None:  # an ETA from the mean part so far
            self.bar.total = round(self.counted / self.done * self.parts)
        if self.progress.extra is not None:
            name, of = self.progress.extra
            self.extra += of(record)
            self.bar.set_postfix({name: self.extra}, refresh=False)
        self.finished.add(record.part)
        self.bar.update(amount - self.reported.pop(record.part, 0))
        if self.on_part is not None:
            self.on_part(record)

    def fail(self, task: Task, reason: str) -> None:
        reason = reason.strip().splitlines()[-1][:2000] if reason.strip() else "unknown failure"
        self.root.write_errors(self.stage, task.part, self.atlas_id,
                               [ErrorRecord(stage=self.stage, shard=task.input, key="",
                                            reason=reason)])
        print(f"[{self.stage}] {task.part} ({task.input}) failed: {reason}", file=sys.stderr,
              flush=True)
        self.failed[task.part] = reason
        self.retry(task)

    def retry(self, task: Task) -> None:
        """Take the units that `task`'s failed attempt reported off the bar: a retry reports them
        again."""
        self.bar.update(-self.reported.pop(task.part, 0))


def run_parts(stage: str, root: AtlasRoot, atlas_id: str, tasks: Sequence[T],
              execute: Actors | Tasks, runtime: ActorRuntime | TaskRuntime, *,
              progress: Progress, show: bool = True, address: str | None = None,
              on_part: OnPart | None = None) -> dict[str, str]:
    """Compute `tasks` in this process (`runtime.in_process`) or on Ray; returns the failed
    parts, {part: reason}. Every finished part is committed before this returns."""
    committer = PartCommitter(stage, root, atlas_id, len(tasks), progress, show, on_part)
    try:  # the bar is closed before an interruption's message is printed
        if tasks and runtime.in_process:
            _run_here(tasks, execute, runtime, committer)
        elif tasks:
            init_ray(address)
            if isinstance(execute, Actors):
                _run_actors(tasks, execute, runtime, committer)
            else:
                _run_tasks(tasks, execute, runtime, committer)
    finally:
        committer.bar.close()
    return committer.failed


# ---- in this process ----------------------------------------------------------------------


def _run_here(tasks: Sequence[T], execute: Actors | Tasks, runtime: ActorRuntime | TaskRuntime,
              committer: PartCommitter) -> None:
    """Every part here, one after the other; each result or exception to the committer."""
    if isinstance(execute, Actors):
        keep_freed_memory()  # this process is the worker (this setting stays changed)
        worker = execute.factory(*execute.args, device=local_device())

        def run_one(task: T) -> PartRecord:
            if isinstance(worker, PartProgress):
                worker.set_reporter(lambda n: committer.tick({task.part: n}))
            prepared = []
            if execute.prepare is not None:
                fn, args = execute.prepare(task)
                prepared = [fn(*args)]
            return worker.run(task, *prepared)
    else:
        # as many torch threads as a Ray task would get (this process's setting stays changed)
        torch.set_num_threads(max(1, int(runtime.cpus_per_task)))

        def run_one(task: T) -> PartRecord:
            return execute.fn(task, *execute.args)
    for task in tasks:
        interrupt.check()
        try:
            record = run_one(task)
        except Exception as exc:  # one broken part must not stop the others
            committer.fail(task, f"{type(exc).__name__}: {exc}")
        else:
            committer.ok(record)


# ---- on Ray -------------------------------------------------------------------------------


class WorkerActor:
    """A Ray actor around a stage's worker: `factory(*args, device=...)` is built once per actor
    (the model loaded once), and each call runs `worker.run(*call_args)`."""

    def __init__(self, threads: int, factory: Callable[..., Any], *args: Any) -> None:
        torch.set_num_threads(max(1, threads))
        keep_freed_memory()
        # a GPU only when Ray gave this actor one (num_gpus > 0), not merely when one is visible
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.worker = factory(*args, device=device)

    def run(self, ticker: ray.actor.ActorHandle, task: Task, *call_args: Any) -> Any:
        """The part `task`, its progress reports sent to `ticker` (a call argument, not a
        constructor one: a restarted actor must not need an object-store copy)."""
        if isinstance(self.worker, PartProgress):
            self.worker.set_reporter(lambda n: ticker.add.remote(task.part, n))
        return self.worker.run(task, *call_args)


class Ticker:
    """A Ray actor (no CPU) that collects the progress reports of running parts until the
    driver drains them."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, part: str, n: int) -> None:
        self.counts[part] = self.counts.get(part, 0) + n

    def drain(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _run_actors(tasks: Sequence[T], execute: Actors, runtime: ActorRuntime,
                committer: PartCommitter) -> None:
    """The parts on a pool of `WorkerActor`s, committing as calls finish; a slot whose actor is
    lost for good (out of restarts, or on a lost node) gets a fresh actor, and the parts it held
    are sent again (see `_in_flight`)."""
    gpus = runtime.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if cluster_gpus() > 0 else 0.0
    actor_cls = ray.remote(WorkerActor).options(
        num_cpus=runtime.cpus_per_actor, num_gpus=gpus, max_restarts=runtime.max_retries,
        max_task_retries=runtime.max_retries)
    threads = max(1, int(runtime.cpus_per_actor))
    # on the driver's own node: a ticker on a lost node would take the driver down with it
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)
    ticker = ray.remote(Ticker).options(num_cpus=0, scheduling_strategy=here).remote()

    def new_actor() -> ray.actor.ActorHandle:
        # the worker's arguments (options, a plan, a context: small) travel with each actor's
        # creation, so a restarted actor never depends on an object-store copy that is gone
        return actor_cls.remote(threads, execute.factory, *execute.args)

    actors = [new_actor() for _ in range(max(1, min(runtime.actors, len(tasks))))]
    remotes: dict[Callable[..., Any], Any] = {}  # each prepare function as a one-CPU Ray task

    def submit(slot: int, task: T) -> ray.ObjectRef:
        prepared = []
        if execute.prepare is not None:
            fn, fn_args = execute.prepare(task)
            if fn not in remotes:
                remotes[fn] = ray.remote(fn).options(num_cpus=1, max_retries=runtime.max_retries)
            prepared = [remotes[fn].remote(*fn_args)]
        return actors[slot].run.remote(ticker, task, *prepared)

    def replace(slot: int) -> None:
        actors[slot] = new_actor()

    _in_flight(tasks, submit, committer, slots=len(actors),
               lost_actor=(replace, runtime.max_retries, execute.role),
               poll=lambda: committer.tick(ray.get(ticker.drain.remote())))


def _run_tasks(tasks: Sequence[T], execute: Tasks, runtime: TaskRuntime,
               committer: PartCommitter) -> None:
    """The parts as Ray tasks, a bounded number at a time, committing as they finish."""
    remote = ray.remote(execute.fn).options(num_cpus=runtime.cpus_per_task,
                                            num_gpus=runtime.gpus_per_task,
                                            max_retries=runtime.max_retries)
    resources = ray.cluster_resources()
    # a slot is what one task may use; a few tasks in flight per slot keep the workers busy
    # without queueing every part
    slots = int(resources.get("CPU", 1) / runtime.cpus_per_task)
    if runtime.gpus_per_task > 0:
        slots = min(slots, int(resources.get("GPU", 0) / runtime.gpus_per_task))
    args = tuple(ray.put(a) for a in execute.args)
    _in_flight(tasks, lambda _, task: remote.remote(task, *args), committer, slots=max(1, slots))


def _in_flight(tasks: Sequence[T], submit: Callable[[int, T], ray.ObjectRef],
               committer: PartCommitter, *, slots: int, per_slot: int = QUEUE_PER_SLOT,
               lost_actor: tuple[Callable[[int], None], int, str] | None = None,
               poll: Callable[[], None] | None = None) -> None:
    """Run `tasks` in order through `submit(slot, task)`, `per_slot` calls in flight per slot.

    Each finished call's slot gets the next task, so a slot's worker never waits for the driver
    between two tasks and no more than `slots * per_slot` are queued. Results are committed in
    the order they finish; a Ray error fails its part. `poll()`, when given, runs every
    POLL_SECONDS while no call finishes, and before each commit (progress reports).

    `lost_actor` = (replace(slot), retries, role), for slots that are actors: a call lost with
    its actor or node (`LOST`) has `replace` give its slot a fresh actor when the actor is gone
    (once per lost actor, however many of its calls fail), and its part is sent again after
    RESEND_DELAY_S (doubled at each resend of that part), up to `retries` times, before it
    fails as "{role} actor died".
    Ray retries a call on its restarted actor by itself (`max_task_retries`), but when a node is
    lost its actors stay listed as alive until the GCS's health checks find the node dead, and
    the calls sent to them meanwhile spend those retries on refused connections: every in-flight
    part of a lost node failed, and resends sent at once were lost the same way under load
    (tests/test_multinode_faults.py). An actor that fails in its constructor is not retried.
    """
    queue = list(reversed(tasks))  # pop() takes them in order
    in_flight: dict[ray.ObjectRef, tuple[int, T, int]] = {}
    generation = [0] * slots  # how many times each slot's actor was replaced
    resent: dict[str, int] = {}
    waiting: list[tuple[float, T]] = []  # (when, part): lost parts waiting to be sent again
    calls = [0] * slots  # calls in flight per slot

    def fill() -> None:
        for slot in range(slots):
            while queue and calls[slot] < per_slot:
                task = queue.pop()
                in_flight[submit(slot, task)] = (slot, task, generation[slot])
                calls[slot] += 1

    fill()
    while in_flight or waiting:
        interrupt.check()
        now = time.monotonic()
        due = [task for when, task in waiting if when <= now]
        if due:
            waiting[:] = [(when, task) for when, task in waiting if when > now]
            queue.extend(reversed(due))  # the next calls, on the first free slots
            fill()
        if not in_flight:
            time.sleep(POLL_SECONDS)
            continue
        ready, _ = ray.wait(list(in_flight), num_returns=1,
                            timeout=None if poll is None and not waiting else POLL_SECONDS)
        if poll is not None:
            poll()
        if not ready:
            continue
        ref = ready[0]
        slot, task, sent_to = in_flight.pop(ref)
        calls[slot] -= 1
        try:
            record = ray.get(ref)
        except LOST as exc:
            init_failed = getattr(exc, "actor_init_failed", False)
            if lost_actor is None:
                committer.fail(task, f"{type(exc).__name__}: {exc}")
            else:
                replace, retries, role = lost_actor
                # a lost input leaves the actor alive; a lost actor's other calls fail with it
                if isinstance(exc, ray.exceptions.RayActorError) and sent_to == generation[slot]:
                    replace(slot)
                    generation[slot] += 1
                n = resent.get(task.part, 0)
                if n < retries and not init_failed:
                    resent[task.part] = n + 1
                    committer.retry(task)
                    waiting.append((time.monotonic() + RESEND_DELAY_S * 2 ** n, task))
                else:
                    committer.fail(task, f"{role} actor died: {exc}")
        except ray.exceptions.RayError as exc:
            committer.fail(task, f"{type(exc).__name__}: {exc}")
        else:
            committer.ok(record)
        fill()
