"""One writer per output folder: a build or a stage command takes an exclusive lock on its root
(`ROOT/.lock`, an OS file lock released when the process ends, even by a crash), so a second
run into the same folder is refused with the first one named, or queued with `--wait`."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

from pipeline.store import fs

LOCK_NAME = ".lock"


class OutputLocked(ValueError):
    """Another run holds the output folder."""


@contextlib.contextmanager
def output_lock(root: str, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `root` (a local folder) while the body runs.

    Raises OutputLocked naming the holder (host, pid, command, since when) unless `wait`, which
    blocks until the holder is done. A remote root (fsspec URL) is not locked: object stores
    have no file locks (run one build per output there). A folder that cannot be written
    (a read-only copy) needs no lock: nothing can change it.
    """
    local = fs.local_path(root)
    if local is None:
        yield
        return
    path = os.path.join(local, LOCK_NAME)
    created = not os.path.exists(local)
    try:
        os.makedirs(local, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise OutputLocked(f"{root} is being written by another run ({holder}); let it "
                                   "finish, or run again with --wait to queue behind it") from None
            print(f"[lock] waiting for the other run on {root} ({holder})", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                  "command": command, "since": time.strftime(
                                      "%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
        if created and os.listdir(local) == [LOCK_NAME]:
            # a run refused before it wrote anything leaves no folder behind
            os.remove(path)
            os.rmdir(local)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return "a run that left no description"
    if not info:
        return "a run that left no description"
    return (f"`{info.get('command', '?')}`, pid {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {info.get('since', '?')}")
