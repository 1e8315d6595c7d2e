"""One writer per output folder: a second run is refused naming the first, or waits with --wait;
a killed holder releases the folder."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from jobs.cli import main

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from jobs.lock import output_lock
with output_lock(sys.argv[1], "concept-atlas build configs/x.yaml"):
    print("held", flush=True)
    sys.stdin.read()
"""


def holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_first_and_a_killed_holder_frees_it(tmp_path,
                                                                              capsys) -> None:
    root = tmp_path / "out"
    first = holder(root)
    try:
        assert main(["make-data", str(root), "--n", "2", "--size", "32", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is being written by another run" in err and f"pid {first.pid}" in err
        assert "concept-atlas build configs/x.yaml" in err and "--wait" in err
        assert not (root / "dataset.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(["make-data", str(root), "--n", "2", "--size", "32", "--no-progress"]) == 0


def test_wait_queues_behind_the_holder(tmp_path) -> None:
    root = tmp_path / "out"
    first = holder(root)
    waiter = subprocess.Popen([sys.executable, "-m", "jobs.cli", "make-data", str(root), "--n",
                               "2", "--size", "32", "--no-progress", "--wait"], cwd=REPO,
                              text=True, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    line = waiter.stderr.readline()
    assert "waiting for the other run" in line and not (root / "dataset.json").exists()
    first.stdin.close()  # the holder finishes
    first.wait()
    assert waiter.wait(timeout=120) == 0 and (root / "dataset.json").is_file()
