"""The parts driver. Progress: a worker's reports move the stage's bar while its part runs, and
the finished part's count replaces them (never counted twice, a failed part's reports undone).
Lost actors (Ray-marked): a part whose actor is lost after Ray's own restarts and retries are
spent is sent again to a fresh actor (as when a node is lost: tests/test_multinode_faults.py),
a bounded number of times, and is committed once."""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from jobs.interrupt import catching_ctrl_c
from jobs.parts import RESEND_DELAY_S, Actors, PartCommitter, Progress, _run_here, run_parts
from pipeline.stage import ActorRuntime, PartProgress
from pipeline.store import AtlasRoot, PartRecord

# Ray's workers cannot import this test module: its classes travel by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class Part:
    part: str
    input: str = "shard.tar"


def record(part: str, rows: int) -> PartRecord:
    return PartRecord(stage="x", part=part, input="shard.tar", input_fingerprint="f",
                      config_hash="h", rows=rows)


def test_reports_move_the_bar_from_the_first_batch(tmp_path) -> None:
    committer = PartCommitter("x", AtlasRoot(str(tmp_path)), "t", 2, Progress("img", 12),
                              True, None)
    seen = []

    class Worker(PartProgress):
        def __init__(self, device: str) -> None:
            pass

        def run(self, task: Part) -> PartRecord:
            for _ in range(3):
                self.report(2)
                seen.append(committer.bar.n)
            return record(task.part, 6)

    _run_here([Part("part-000000"), Part("part-000001")], Actors(Worker),
              ActorRuntime(in_process=True), committer)
    assert seen == [2, 4, 6, 8, 10, 12] and committer.bar.n == 12 and committer.done == 2


def test_late_reports_are_dropped_and_a_failed_part_is_taken_back(tmp_path) -> None:
    committer = PartCommitter("x", AtlasRoot(str(tmp_path)), "t", 3, Progress("img", 30),
                              True, None)
    committer.tick({"part-000000": 4, "part-000001": 3})
    assert committer.bar.n == 7
    committer.ok(record("part-000000", 10))  # its 4 reported units become its 10
    assert committer.bar.n == 13
    committer.tick({"part-000000": 2})  # arrived after the part was committed: counted already
    assert committer.bar.n == 13
    committer.fail(Part("part-000001"), "boom")  # its 3 reported units are taken back
    assert committer.bar.n == 10 and committer.failed == {"part-000001": "boom"}


class SignalsInFinalizer:
    """An object whose finalizer receives a Ctrl-C: Python runs the handler inside `__del__`,
    where the KeyboardInterrupt it raises is printed and dropped (as in Ray's handles)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100_000))  # the handler runs here, inside the finalizer


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_parts(tmp_path) -> None:
    ran = []

    class Worker:
        def __init__(self, device: str) -> None:
            pass

        def run(self, task: Part) -> PartRecord:
            ran.append(task.part)
            SignalsInFinalizer()  # dropped at once: the Ctrl-C lands in its finalizer
            return record(task.part, 1)

    def run(root: AtlasRoot) -> None:
        committer = PartCommitter("x", root, "t", 3, Progress("img", 3), False, None)
        _run_here([Part(f"part-00000{i}") for i in range(3)], Actors(Worker),
                  ActorRuntime(in_process=True), committer)

    with catching_ctrl_c():  # the command's handler: the loop stops at its next part
        with pytest.raises(KeyboardInterrupt):
            run(AtlasRoot(str(tmp_path / "a")))
    assert ran == ["part-000000"]
    ran.clear()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:  # Python's own handler: the signal is swallowed and every part runs
        run(AtlasRoot(str(tmp_path / "b")))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(ran) == 3


def dying_worker(deaths: int):
    """A worker class whose process exits on the first `deaths` attempts at part-000001
    (counted in a file next to the input, so a restarted or fresh actor keeps counting)."""

    class Dies:
        def __init__(self, device: str) -> None:
            self.device = device

        def run(self, task: Part) -> PartRecord:
            counter = Path(task.input)  # one line per attempt: when it started
            attempt = len(counter.read_text().split()) if counter.exists() else 0
            with counter.open("a") as f:
                f.write(f"{time.time()}\n")
            if task.part == "part-000001" and attempt < deaths:
                os._exit(1)  # the actor's process dies mid-call, as on a lost node
            return PartRecord(stage="t", part=task.part, input=task.input, input_fingerprint="",
                              config_hash="c", rows=1)

    return Dies


def run(tmp_path: Path, deaths: int, parts: list[str]) -> tuple[dict[str, str], AtlasRoot]:
    root = AtlasRoot(str(tmp_path / "out"))
    tasks = [Part(p, str(tmp_path / p)) for p in parts]
    # Ray restarts an actor once and retries its call once: two deaths spend both
    runtime = ActorRuntime(actors=1, cpus_per_actor=1, max_retries=1)
    failed = run_parts("t", root, "t", tasks, Actors(dying_worker(deaths)), runtime,
                       progress=Progress("part", len(tasks)), show=False)
    return failed, root


def attempts(tmp_path: Path, part: str) -> int:
    return len(starts(tmp_path, part))


def starts(tmp_path: Path, part: str) -> list[float]:
    return [float(t) for t in (tmp_path / part).read_text().split()]


@pytest.mark.ray
def test_a_part_whose_actor_dies_past_rays_retries_is_sent_again_to_a_fresh_actor(
        ray_cluster, tmp_path) -> None:
    parts = ["part-000000", "part-000001", "part-000002"]
    failed, root = run(tmp_path, 2, parts)
    assert failed == {}
    assert sorted(root.manifest.records("t")) == parts
    assert attempts(tmp_path, "part-000001") == 3  # two deaths under Ray's retries, then done
    # sent again only after a wait (a lost node's actors look alive until the GCS finds it dead)
    second, resent = starts(tmp_path, "part-000001")[1:]
    assert resent - second >= RESEND_DELAY_S
    errors = pq.read_table(root.join("errors", "stage=t")).num_rows
    assert errors == 0


@pytest.mark.ray
def test_a_part_that_kills_every_actor_fails_after_its_retries(ray_cluster, tmp_path) -> None:
    failed, root = run(tmp_path, 10, ["part-000001"])
    assert list(failed) == ["part-000001"]
    # each actor: its call and Ray's one retry; then one fresh actor, the same again
    assert attempts(tmp_path, "part-000001") == 4
    assert root.manifest.records("t") == {}
