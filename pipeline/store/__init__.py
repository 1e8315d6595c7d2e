"""Atomic part writes, the manifest of finished parts, input fingerprints (ARCHITECTURE.md principle 2)."""
from pipeline.store import fs
from pipeline.store.manifest import (
    Manifest,
    PartRecord,
    check_stage_config,
    config_hash,
    fingerprint,
    now,
    worker_id,
)

__all__ = ["Manifest", "PartRecord", "check_stage_config", "config_hash", "fingerprint", "fs",
           "now", "worker_id"]
