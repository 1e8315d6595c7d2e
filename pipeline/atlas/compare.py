"""Compare two atlas folders file by file: are two builds the same atlas?

Used to show that a rebuilt, resumed or restructured pipeline writes the same outputs. Every
file under both roots is compared by its kind:

- Parquet tables: rows as sets (sorted), after dropping the columns that legitimately vary
  between two builds (`VARYING`) and writing each root's own path as `<root>`;
- JSON records (manifest, stage configs, index and SAE records): the same, key by key;
- NumPy arrays: exact equality of dtype, shape and values;
- anything else (SAE weights, PNG masks, FAISS indexes): byte equality.

Folders holding a run's scratch state (Ray Train's checkpoints, temporary files) are skipped.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store import fs

# columns / keys whose values differ between two builds of the same atlas: wall-clock times,
# the process that did the work, and input fingerprints (a file's path and modification time),
# with the hashes that fold them in (a scan's config hash covers its SAE file's fingerprint, an
# index's `inputs` digest its SAE's path)
VARYING = frozenset({
    "started", "finished", "worker", "input_fingerprint", "seconds", "train_seconds",
    "tokens_per_s", "config_hash", "inputs",
})
SCRATCH = ("_ray_train", "_local_train")


@dataclass
class Comparison:
    """What differs between two atlas roots: `only_a` / `only_b` (relative paths), `differ`
    (path -> a short reason); `same` counts the files that matched."""

    a: str
    b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    differ: dict[str, str] = field(default_factory=dict)
    same: int = 0

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.differ)

    def text(self) -> str:
        lines = [f"{self.same} files equal"]
        lines += [f"only in {self.a}: {p}" for p in self.only_a]
        lines += [f"only in {self.b}: {p}" for p in self.only_b]
        lines += [f"differs: {p}: {why}" for p, why in sorted(self.differ.items())]
        return "\n".join(lines)


def compare_atlases(a: str, b: str, ignore: Iterable[str] = (),
                    skip: Iterable[str] = ()) -> Comparison:
    """Compare every file under roots `a` and `b` (local paths or fsspec URLs).

    `ignore`: more column / key names that may differ (added to `VARYING`); `skip`: relative
    path prefixes left out on both sides (e.g. "saliency/" for files only a demo writes).
    """
    varying = VARYING | set(ignore)
    skip = tuple(SCRATCH) + tuple(skip)
    files_a, files_b = _files(a, skip), _files(b, skip)
    result = Comparison(a, b, only_a=sorted(set(files_a) - set(files_b)),
                        only_b=sorted(set(files_b) - set(files_a)))
    for rel in sorted(set(files_a) & set(files_b)):
        why = _diff(fs.join(a, rel), fs.join(b, rel), rel, (a, b), varying)
        if why:
            result.differ[rel] = why
        else:
            result.same += 1
    return result


def _files(root: str, skip: tuple[str, ...]) -> list[str]:
    filesystem, base = fs.filesystem(root)
    if not filesystem.exists(base):
        raise FileNotFoundError(f"no atlas at {root}")
    base = base.rstrip("/")
    found = []
    for path in filesystem.find(base):
        rel = path[len(base):].lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if rel.startswith(skip) or ".tmp-" in name or name == ".lock":
            continue
        found.append(rel)
    return found


def _diff(url_a: str, url_b: str, rel: str, roots: tuple[str, str],
          varying: frozenset[str] | set[str]) -> str:
    """'' when the two files hold the same content, else a short reason."""
    data = [fs.read_bytes(url_a), fs.read_bytes(url_b)]
    if data[0] == data[1]:
        return ""
    if rel.endswith(".parquet"):
        tables = [_normal_table(pq.read_table(io.BytesIO(d)), root, varying)
                  for d, root in zip(data, roots)]
        if tables[0].schema != tables[1].schema:
            return f"schemas differ: {tables[0].schema.names} vs {tables[1].schema.names}"
        if tables[0].num_rows != tables[1].num_rows:
            return f"{tables[0].num_rows} vs {tables[1].num_rows} rows"
        if not tables[0].equals(tables[1]):
            return _first_difference(tables[0], tables[1])
        return ""
    if rel.endswith(".json"):
        docs = [_normal_json(json.loads(d), root, varying) for d, root in zip(data, roots)]
        return "" if docs[0] == docs[1] else f"JSON differs: {_json_difference(*docs)}"
    if rel.endswith(".npy"):
        arrays = [np.load(io.BytesIO(d), allow_pickle=False) for d in data]
        if arrays[0].dtype != arrays[1].dtype or arrays[0].shape != arrays[1].shape:
            return f"arrays {arrays[0].dtype}{arrays[0].shape} vs {arrays[1].dtype}{arrays[1].shape}"
        bad = np.flatnonzero(arrays[0].reshape(-1) != arrays[1].reshape(-1))
        return f"{len(bad)} of {arrays[0].size} values differ" if len(bad) else ""
    return f"bytes differ ({len(data[0])} vs {len(data[1])} bytes)"


def _normal_root(root: str) -> str:
    return root if "://" in root else os.path.abspath(root)


def _normal_table(table: pa.Table, root: str, varying: frozenset[str] | set[str]) -> pa.Table:
    """Varying columns dropped, the root's path written as <root>, rows sorted."""
    table = table.drop_columns([c for c in table.column_names if c in varying])
    prefix = _normal_root(root)
    columns = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column = pc.replace_substring(column, prefix, "<root>")
        columns.append(column)
    table = pa.table(columns, names=table.column_names)
    sortable = [c for c, t in zip(table.column_names, table.schema.types)
                if not (pa.types.is_nested(t) or pa.types.is_binary(t))]
    return table.sort_by([(c, "ascending") for c in sortable]) if sortable else table


def _normal_json(doc: Any, root: str, varying: frozenset[str] | set[str]) -> Any:
    if isinstance(doc, dict):
        return {k: _normal_json(v, root, varying) for k, v in doc.items() if k not in varying}
    if isinstance(doc, list):
        return [_normal_json(v, root, varying) for v in doc]
    if isinstance(doc, str):
        return doc.replace(_normal_root(root), "<root>")
    return doc


def _first_difference(a: pa.Table, b: pa.Table) -> str:
    for name in a.column_names:
        if not a[name].equals(b[name]):
            left, right = a[name].to_pylist(), b[name].to_pylist()
            rows = [i for i, (x, y) in enumerate(zip(left, right)) if x != y]
            return (f"column {name!r}: {len(rows)} rows differ, e.g. {left[rows[0]]!r} vs "
                    f"{right[rows[0]]!r}" if rows else f"column {name!r} differs")
    return "tables differ"


def _json_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _json_difference(a.get(key), b.get(key), f"{path}.{key}")
    return f"{path or '.'}: {a!r} vs {b!r}"[:300]
