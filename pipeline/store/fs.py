"""Storage paths that are local paths or fsspec URLs, and writes that appear only when complete.

Every output file is written under a hidden temporary name in its final folder and renamed
into place when it is complete (docs/architecture.md, "Crash and resume"). On a local disk the rename is
atomic; on an object store (`s3://`, `gs://`) `mv` is a copy then a delete, and the copy is a
single PUT, so a reader still never sees a half-written object under the final name. Readers
(pyarrow, DuckDB, Ray Data) skip names that start with `.` or `_`, so a temporary left by a
crash is never read; `remove_temporaries` clears them before a stage starts.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"
# ~128k rows per row group: DuckDB and Ray Data parallelise over row groups
ROW_GROUP_SIZE = 128 * 1024


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) of a local path or URL."""
    return fsspec.core.url_to_fs(os.fspath(url))


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URL (always `/`: fsspec paths are posix)."""
    return posixpath.join(os.fspath(root).rstrip("/") or "/", *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def listdir(url: str, suffix: str = "") -> list[str]:
    """Sorted full URLs of the visible files in folder `url` ending with `suffix` ([] if none)."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if not _hidden(posixpath.basename(p))]
    return sorted(_same_scheme(url, fs, p) for p in names if p.endswith(suffix))


def write_atomic(url: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(file)` on a temporary file beside `url`, then rename it to `url`."""
    fs, path = filesystem(url)
    folder, name = posixpath.split(path)
    fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{name}{TMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    except BaseException:
        # a failed write must not leave its temporary behind (a crash still can: see module doc)
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_parquet(table: pa.Table, url: str, schema: pa.Schema | None = None) -> None:
    """Write `table` (cast to `schema` when given) as zstd Parquet, atomically."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    write_atomic(url, lambda f: pq.write_table(
        table, f, compression="zstd", row_group_size=ROW_GROUP_SIZE))


def write_npy(array: np.ndarray, url: str) -> None:
    """Write `array` as a `.npy` file, atomically (no pickle: plain dtypes only)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_atomic(url, lambda f: f.write(buf.getbuffer()))


def write_json(obj: Any, url: str) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(url, lambda f: f.write(text.encode()))


def read_json(url: str) -> Any:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def read_bytes(url: str) -> bytes:
    """The whole content of a file."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_npy(url: str, mmap: bool = True) -> np.ndarray:
    """A `.npy` array; memory-mapped when `url` is local and `mmap` is set."""
    fs, path = filesystem(url)
    if mmap and _is_local(fs):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def remove_temporaries(url: str) -> int:
    """Delete the temporaries left by crashed writers anywhere under `url`; returns how many."""
    fs, path = filesystem(url)
    if not fs.isdir(path):
        return 0
    stale = [p for p in fs.find(path) if TMP_MARK in posixpath.basename(p)]
    for p in stale:
        fs.rm(p)
    return len(stale)


def local_path(url: str) -> str | None:
    """The local filesystem path of `url`, or None when it lives on a remote store."""
    fs, path = filesystem(url)
    return path if _is_local(fs) else None


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _same_scheme(url: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    # keep the caller's spelling: a plain local root gives plain paths, a URL gives URLs
    return fs.unstrip_protocol(path) if "://" in os.fspath(url) else path
