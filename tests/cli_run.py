"""A `concept-atlas` command in a subprocess, its output collected line by line while it runs,
for the tests that interrupt or fault a running build (test_interrupt, the multi-node faults)."""
from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("concept-atlas"))


class CliRun:
    """`concept-atlas *args` started now (in the repository, with `env` or this process's)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([CLI, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, done: Callable[[], object], what: str, timeout: float = 300) -> None:
        """Poll `done()` until true; fail naming `what` if the run ends first or `timeout` s
        pass."""
        deadline = time.time() + timeout
        while not done():
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no {what} after {timeout}s:\n{self.output[-3000:]}"
            time.sleep(0.1)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        """The first match of `pattern` (multi-line) in the output, waiting up to `timeout` s."""
        self.wait_until(lambda: re.search(pattern, self.output, re.M), repr(pattern), timeout)
        found = re.search(pattern, self.output, re.M)
        assert found is not None
        return found

    def finish(self, timeout: float) -> int:
        """Its exit status, killing it (and failing) after `timeout` s."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"still running {timeout}s later:\n{self.output[-3000:]}")
        self.reader.join(timeout=10)
        return code
