"""Writing WebDataset shards: byte-reproducible tar members, atomic shards, and a pool of
processes that writes shards in parallel with one progress bar.

A shard's bytes depend on its samples only (fixed member mtime, mode and owner, USTAR format),
so the same samples give the same file whatever the machine, the order of the workers or the
number of processes. Each shard is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import queue
import tarfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm import tqdm

Report = Callable[[int], None]


def shard_name(shard: int) -> str:
    """File name of shard number `shard`."""
    return f"shard-{shard:06d}.tar"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member whose header depends on its name and size only."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[dict[str, bytes]],
                report: Report | None = None) -> int:
    """Write `samples` ({"__key__": key, ext: bytes, ...}, members in dict order) to the shard
    at `path`, atomically; `report(n)` every 32 samples and at the end. The samples written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext, data in sample.items():
                    if ext != "__key__":
                        add_member(tar, f"{key}.{ext}", data)
                done += 1
                if report is not None and done % 32 == 0:
                    report(32)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if report is not None and done % 32:
        report(done % 32)
    return done


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, bar: tqdm) -> list[Any]:
    """`fn(*job, report=...)` for every job, in `workers` processes (in this one when 1), the
    bar advanced by what each job reports; the results in job order.

    The processes are started with the `spawn` method: the caller may hold threads (torch,
    tqdm) that fork would copy in a broken state. `fn` must be importable (a module function).
    """
    if workers <= 1:
        return [fn(*job, report=bar.update) for job in jobs]
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Queue()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress,)) as pool:
        futures = [pool.submit(_in_worker, fn, job) for job in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(progress, bar)
        results = [f.result() for f in futures]
    _drain(progress, bar)
    return results


_progress_queue = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue


def _in_worker(fn: Callable[..., Any], job: tuple) -> Any:
    return fn(*job, report=_progress_queue.put if _progress_queue is not None else None)


def _drain(progress: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue.Empty:
            return
