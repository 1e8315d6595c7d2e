"""The manifest of finished parts, input fingerprints and stage config hashes.

A stage maps inputs (shards, SAE runs) to parts. After every output file of a part has been
renamed into place, the driver commits one record `manifest/stage=S/PART.json`: that write is
the commit point. On a re-run a part is skipped when its record exists with the current
config hash and the current fingerprint of its input; anything else is recomputed, and since
part names are deterministic the new files replace any left by a crash (no duplicates).

`stages/S.json` holds the config of a stage's outputs; a re-run with a different config is
refused before any work (mixing parts of two configs in one table would be silently wrong).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline.store import fs
from schemas import MANIFEST, SCHEMA_VERSION


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over canonical JSON of `config` plus the schema version."""
    text = json.dumps({"config": config, "schema_version": SCHEMA_VERSION}, sort_keys=True,
                      default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(url: str) -> str:
    """Fingerprint of an input file: its path, size and modification time (or ETag).

    Cheap (one stat) and changes when the file is replaced or rewritten; a content hash would
    read every shard twice.
    """
    filesystem, path = fs.filesystem(url)
    info = filesystem.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    text = json.dumps([os.fspath(url), info.get("size"), str(stamp)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def now() -> float:
    return datetime.now(timezone.utc).timestamp()


def worker_id() -> str:
    """host:pid of this process, recorded with each part it produces."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class PartRecord:
    """One finished part. `outputs` maps each output (table or file) to the rows written."""

    stage: str
    part: str
    input: str
    input_fingerprint: str
    config_hash: str
    rows: int
    outputs: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    worker: str = ""
    started: float = 0.0
    finished: float = 0.0


class Manifest:
    """The `manifest/` folder under an output root (local path or fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.root = os.fspath(root)

    def _dir(self, stage: str) -> str:
        return fs.join(self.root, "manifest", f"stage={stage}")

    def commit(self, record: PartRecord) -> None:
        """Record a finished part (atomically; call after its outputs are in place)."""
        fs.write_json(asdict(record), fs.join(self._dir(record.stage), f"{record.part}.json"))

    def records(self, stage: str) -> dict[str, PartRecord]:
        """Committed records of `stage` by part name."""
        found = {}
        for url in fs.listdir(self._dir(stage), suffix=".json"):
            rec = PartRecord(**fs.read_json(url))
            found[rec.part] = rec
        return found

    def done(self, stage: str, config_hash_: str) -> dict[str, PartRecord]:
        """Records of `stage` written under `config_hash_` (the parts a re-run may skip)."""
        return {p: r for p, r in self.records(stage).items() if r.config_hash == config_hash_}

    def table(self, stage: str, atlas_id: str) -> pa.Table:
        """The records of `stage` as the `manifest` table, in part order."""
        rows = []
        for rec in sorted(self.records(stage).values(), key=lambda r: r.part):
            row = asdict(rec)
            row.update(atlas_id=atlas_id, outputs=json.dumps(rec.outputs, sort_keys=True),
                       started=_utc(rec.started), finished=_utc(rec.finished))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=MANIFEST)


def check_stage_config(root: str, stage: str, config: dict[str, Any], write: bool = True,
                       parts_of: Sequence[str] | None = None) -> str:
    """Record `config` as the config of `stage` under `root`, or refuse a different one.

    Returns its hash. Raises ValueError naming the differing keys when `root` already holds
    parts of this stage (committed under any stage of `parts_of`, default `stage` itself) built
    with another config. A recorded config that no committed part depends on (a run refused or
    stopped before its first part) is replaced: it binds nothing. `write=False` only checks.
    """
    url = fs.join(os.fspath(root), "stages", f"{stage}.json")
    digest = config_hash(config)
    if fs.exists(url):
        old = fs.read_json(url)
        if old["config_hash"] == digest:
            return digest
        manifest = Manifest(os.fspath(root))
        if any(manifest.records(s) for s in (parts_of or (stage,))):
            new = json.loads(json.dumps(config, default=str))
            keys = sorted(k for k in set(old["config"]) | set(new)
                          if old["config"].get(k) != new.get(k)) or ["schema_version"]
            diffs = ", ".join(f"{k}: {old['config'].get(k)!r} -> {new.get(k)!r}" for k in keys)
            raise ValueError(
                f"{root} already holds '{stage}' outputs built with another config ({diffs}); "
                f"use another output folder, or delete {root} to rebuild it")
    if write:
        fs.write_json({"stage": stage, "config": config, "config_hash": digest,
                       "schema_version": SCHEMA_VERSION}, url)
    return digest


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)
