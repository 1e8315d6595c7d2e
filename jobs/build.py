"""`concept-atlas build CONFIG.yaml`: every stage a build config asks for, in order, each
resumable; every check of every stage runs first, so a bad config fails before any work.

A config has these sections (see `configs/demo.yaml`); each stage's section holds the fields
of its options class (`jobs.stages`), checked by type and bounds:

    atlas_id: demo                  # stored in every table row
    out: demo_out                   # output root (local path or fsspec URL; --out overrides)
    data:                           # exactly one of:
      synthetic: {n, seed, size, shard_size, shortcut_prob}   # make-data writes OUT/data
      images: {src, resize, crop, crops, ...}                 # make-shards writes OUT/data
      shards: PATTERN_OR_LIST       # existing WebDataset shards
    model: {name, weights}
    extract: {layers, positions, include_special, seed, dtype, batch_size, actors, ...}
    train_sae: {sweep: [{layer, sae: {...}, name?, steps?}], steps, checkpoint_every, ...}
    scan: {...}   cafe: {...}   index: {...}   icat: {...}   # later stages, each optional
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from jobs import stages as registry
from jobs.lock import output_lock
from jobs.stages import RunContext
from pipeline.store import fs

if TYPE_CHECKING:
    from pipeline.models import LayerSpec
    from pipeline.sae.stage import SAERun
    from pipeline.stage import Options

TOP = ("atlas_id", "out", "data", "model")
# what a build's data section may hold: one data stage's section, or existing shards
DATA_KINDS = ("synthetic", "images", "shards")


class StageFailed(RuntimeError):
    """A stage finished with parts that failed (recorded in the errors table); re-run to retry."""


@dataclass
class BuildConfig:
    """A parsed build config: the output root and the options of every stage it asks for, by
    stage name, in stage order."""

    atlas_id: str
    out: str
    options: dict[str, Options] = field(default_factory=dict)

    @property
    def data_dir(self) -> str:
        """Where make-data writes the synthetic shards: OUT/data."""
        return fs.join(self.out, "data")

    @property
    def extract(self) -> Options:
        return self.options["extract"]

    @extract.setter
    def extract(self, value: Options) -> None:
        self.options["extract"] = value

    @property
    def train(self) -> Options | None:
        return self.options.get("train-sae")

    @train.setter
    def train(self, value: Options) -> None:
        self.options["train-sae"] = value


@dataclass
class CheckedBuild:
    """What the checks found: the model's layer specs, the SAE runs of the sweep, the shards."""

    specs: dict[str, LayerSpec] = field(default_factory=dict)
    runs: list[SAERun] = field(default_factory=list)
    n_shards: int = 0


def load_build_config(path: str | os.PathLike[str], out: str | None = None) -> BuildConfig:
    """Parse a build YAML; unknown sections or keys, and values of the wrong type or out of
    bounds, are errors naming them and what is valid."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    known = list(TOP) + [s.options.section for s in registry.STAGES
                         if not s.options.section.startswith("data.")]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections {known}")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known keys: {known}")
    for needed in ("data", "model", "extract"):
        if raw.get(needed) is None:
            raise ValueError(f"{path}: missing section '{needed}'")
    atlas_id = raw.get("atlas_id", "atlas")
    if not isinstance(atlas_id, str):
        raise ValueError(f"atlas_id={atlas_id!r}: expected a string")
    cfg = BuildConfig(atlas_id=atlas_id, out=os.fspath(out or raw.get("out") or "atlas_out"))
    data = _mapping(raw, "data", DATA_KINDS)
    model = _mapping(raw, "model", ("name", "weights"))
    if len(data) != 1:
        raise ValueError(f"{path}: data needs exactly one of {' or '.join(map(repr, DATA_KINDS))}")
    if "name" not in model:
        raise ValueError(f"{path}: model.name is missing")
    for stage in registry.STAGES:
        section = stage.options.section
        if section.startswith("data."):  # a data stage: the data section names at most one
            kind = section.split(".", 1)[1]
            if kind in data:
                cfg.options[stage.name] = stage.options.from_section(data[kind])
            continue
        if raw.get(section, False) is False:  # absent; an empty section means the defaults
            continue
        if stage.needs is not None and raw.get(stage.needs) is None:
            raise ValueError(f"{path}: section '{section}' needs section '{stage.needs}'")
        given: dict[str, Any] = {}
        if stage.name == "extract":
            shards = data["shards"] if "shards" in data else [cfg.data_dir]
            given = dict(model=model["name"], weights=model.get("weights", "default"),
                         atlas_id=atlas_id, shards=[shards] if isinstance(shards, str) else shards)
        cfg.options[stage.name] = stage.options.from_section(raw.get(section), **given)
    return cfg


def check_build(cfg: BuildConfig) -> CheckedBuild:
    """Every check of every stage the config asks for, before any work (ValueError /
    FileNotFoundError naming the problem)."""
    checked = CheckedBuild()
    for stage in registry.STAGES:
        if stage.name in cfg.options and stage.check is not None:
            stage.check(cfg, checked)
    return checked


def run(config: str, out: str | None = None, address: str | None = None,
        stages: Sequence[str] | None = None, progress: bool = True,
        wait: bool = False) -> dict[str, Any]:
    """Check the whole config, then run the stages it asks for (or only `stages`) in order.

    Returns {stage name: its summary}. Each stage skips the work a previous run finished.
    Raises StageFailed after a stage whose parts failed (the later stages need them).
    """
    return run_build(load_build_config(config, out), address, stages, name=config,
                     progress=progress, wait=wait)


def run_build(cfg: BuildConfig, address: str | None = None, stages: Sequence[str] | None = None,
              name: str = "build", progress: bool = True, wait: bool = False) -> dict[str, Any]:
    """`run` for an already parsed (possibly edited) config. Every check runs first, writing
    nothing; then one build per output folder at a time (`jobs.lock`: another is refused, or
    waited for with `wait`)."""
    known = [s.name for s in registry.STAGES]
    unknown = sorted(set(stages or ()) - set(known))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages: {known}")
    t0 = time.time()
    check_build(cfg)
    plan = [s for s in registry.STAGES
            if s.name in cfg.options and (not stages or s.name in stages)]
    print(f"[build] {name} -> {cfg.out}: stages {', '.join(s.name for s in plan)} "
          f"(checked in {time.time() - t0:.1f}s)", flush=True)
    context = RunContext(address=address, progress=progress)
    results, times = {}, {}
    with output_lock(cfg.out, f"concept-atlas build {name}", wait):
        for stage in plan:
            t = time.time()
            try:
                result = stage.run(stage.root(cfg), cfg.options[stage.name], context)
            except KeyboardInterrupt:
                done = ", ".join(times) or "none"
                print(f"\n[build] interrupted in {stage.name} after {time.time() - t:.0f}s "
                      f"(stages finished: {done}); committed parts and checkpoints are kept: "
                      "run the same command again to resume", file=sys.stderr, flush=True)
                raise
            if isinstance(result, dict) and result.get("parts_failed"):
                raise StageFailed(f"{stage.name}: {len(result['parts_failed'])} parts failed "
                                  "(see the errors table); re-run the build to retry them")
            results[stage.name] = result
            times[stage.name] = time.time() - t
    print("[build] done in " + ", ".join(f"{n} {s:.0f}s" for n, s in times.items())
          + f"; total {time.time() - t0:.0f}s. Outputs in {cfg.out}/", flush=True)
    return results


def _mapping(raw: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"section '{name}' must be a mapping with keys {list(keys)}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; known keys: {list(keys)}")
    return dict(section)
