"""The parts driver's progress: a worker's reports move the stage's bar while its part runs, and
the finished part's count replaces them (never counted twice, a failed part's reports undone)."""
from __future__ import annotations

from dataclasses import dataclass

from jobs.parts import Actors, PartCommitter, Progress, _run_here
from pipeline.stage import ActorRuntime, PartProgress
from pipeline.store import AtlasRoot, PartRecord


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
