"""pipeline.host: a worker's malloc keeps freed memory, so a large tensor made again costs no
page faults (docs/architecture.md, "Workers")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# minor page faults of making and freeing a 96 MB tensor five times, after twelve times (glibc
# reuses a freed block for an aligned one only once a few freed blocks have merged)
SCRIPT = """
import resource, sys, torch
from pipeline.host import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(12):
    torch.ones(24 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(24 * 2**20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[1])


def test_kept_memory_makes_a_large_tensor_again_without_page_faults():
    """On Linux with glibc, where the tests run (CI included); elsewhere keep_freed_memory
    returns False and this test fails, as it should: nothing there keeps freed memory."""
    applied, kept = _faults("keep")
    _, default = _faults("default")
    assert applied == "True"
    # by default each 96 MB tensor is a fresh mmap: 24,576 pages of 4 KiB faulted in per tensor
    assert default > 5 * 20_000, default
    assert kept < 1_000, kept
