"""Atomic part writes, the manifest of finished parts, input fingerprints, the atlas root."""
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
from pipeline.store.root import EXTRACT_STAGE, TRAIN_STAGE, AtlasRoot, ExtractRecord

__all__ = ["EXTRACT_STAGE", "TRAIN_STAGE", "AtlasRoot", "ExtractRecord", "Manifest", "PartRecord", "check_stage_config", "config_hash", "fingerprint", "fs",
           "now", "worker_id"]
