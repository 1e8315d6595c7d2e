"""The build config (`concept-atlas build CONFIG.yaml`): parsing and whole-config checks.

A config has these sections (see `configs/demo.yaml`):

    atlas_id: demo                  # stored in every table row
    out: demo_out                   # output root (local path or fsspec URL; --out overrides)
    data:                           # exactly one of:
      synthetic: {n, seed, size, shard_size, shortcut_prob}   # make-data writes OUT/data
      shards: PATTERN_OR_LIST       # existing WebDataset shards
    model: {name, weights}
    extract: {layers, positions, include_special, seed, dtype, batch_size,
              actors, cpus_per_actor, gpus_per_actor, in_process}
    train_sae: {sweep: [{layer, sae: {...}, name?, steps?}], steps, checkpoint_every,
                holdout_parts, workers, ...}  # TrainOptions fields
    scan: {top_per_image, n_top, n_quantile, ...}            # ScanOptions fields (needs train_sae)
    cafe: {mask_mass, faithfulness_per_latent, steps, patch, ...}  # CafeOptions (needs scan)
    index: {exact_below, factory}                            # FAISS indexes (needs scan)
    icat: {methods, steps, images_per_shard, top_edges, ...} # ICATOptions fields (needs train_sae)

`check_build` runs every check of every stage before any of them starts, so a bad layer,
model, shard path or SAE config fails in seconds with a message naming it, not after an
hour of extraction.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.atlas.index import IndexOptions
from pipeline.cafe.stage import CafeOptions
from pipeline.icat.stage import ICATOptions
from pipeline.latents.scan import ScanOptions
from pipeline.models import LayerSpec
from pipeline.pfv.extract import (
    STAGE as EXTRACT,
)
from pipeline.pfv.extract import (
    ExtractConfig,
    check_model,
    stage_identity,
)
from pipeline.sae.stage import SAERun, TrainOptions, make_runs
from pipeline.store import check_stage_config, fs

SECTIONS = ("atlas_id", "out", "data", "model", "extract", "train_sae", "scan", "cafe", "index",
            "icat")
# later stages: section name -> (options class, the section it needs, runtime keys: how the
# stage runs, which its outputs do not depend on)
STAGE_OPTIONS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    "scan": (ScanOptions, "train_sae", ("in_process",)),
    "cafe": (CafeOptions, "scan", ("in_process", "actors", "cpus_per_actor", "gpus_per_actor")),
    "index": (IndexOptions, "scan", ()),
    "icat": (ICATOptions, "train_sae", ("in_process", "actors", "cpus_per_actor",
                                        "gpus_per_actor", "reduce_memory")),
}
SYNTHETIC_KEYS = ("n", "seed", "size", "shard_size", "shortcut_prob")
SYNTHETIC_DEFAULTS = {"seed": 0, "size": 128, "shard_size": 1000, "shortcut_prob": 0.0}
EXTRACT_RUNTIME_KEYS = ("actors", "cpus_per_actor", "gpus_per_actor", "in_process")


@dataclass
class BuildConfig:
    """A parsed build config; `data_dir` is where synthetic shards go (OUT/data)."""

    atlas_id: str
    out: str
    synthetic: dict[str, Any] | None
    shards: str | list[str] | None
    extract: ExtractConfig
    extract_runtime: dict[str, Any]
    train: TrainOptions | None
    sweep: list[dict[str, Any]] = field(default_factory=list)
    # options of the later stages by section name (absent: the stage does not run), and their
    # runtime keys (`in_process`), which the outputs do not depend on
    stages: dict[str, Any] = field(default_factory=dict)
    stage_runtime: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def data_dir(self) -> str:
        return fs.join(self.out, "data")

    @property
    def shard_spec(self) -> str | list[str]:
        return self.data_dir if self.synthetic is not None else self.shards


@dataclass
class CheckedBuild:
    """What the checks found: layer specs of the model and the SAE runs of the sweep."""

    specs: dict[str, LayerSpec]
    runs: list[SAERun]
    n_shards: int


def load_build_config(path: str | os.PathLike[str], out: str | None = None) -> BuildConfig:
    """Parse a build YAML; unknown sections or keys are errors naming the known ones."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    _known(raw, SECTIONS, str(path))
    for needed in ("data", "model", "extract"):
        if needed not in raw:
            raise ValueError(f"{path}: missing section '{needed}'")
    data = _section(raw, "data", ("synthetic", "shards"))
    if ("synthetic" in data) == ("shards" in data):
        raise ValueError(f"{path}: data needs exactly one of 'synthetic' or 'shards'")
    synthetic = None
    if "synthetic" in data:
        synthetic = dict(SYNTHETIC_DEFAULTS, **(data["synthetic"] or {}))
        _known(synthetic, SYNTHETIC_KEYS, "data.synthetic")
        if not isinstance(synthetic.get("n"), int) or synthetic["n"] < 1:
            raise ValueError(f"data.synthetic.n={synthetic.get('n')!r}: expected an int >= 1")
    model = _section(raw, "model", ("name", "weights"))
    if "name" not in model:
        raise ValueError(f"{path}: model.name is missing")
    ext = _section(raw, "extract", tuple(f.name for f in dataclasses.fields(ExtractConfig)
                                         if f.name not in ("model", "weights"))
                   + EXTRACT_RUNTIME_KEYS)
    runtime = {k: ext.pop(k) for k in EXTRACT_RUNTIME_KEYS if k in ext}
    positions = ext.pop("positions", None)
    weights = model.get("weights", "default")
    extract = ExtractConfig(
        model=model["name"], weights=None if str(weights).lower() == "none" else weights,
        positions=None if positions in (None, "all") else positions,
        layers=tuple(ext.pop("layers", ())), **ext)
    train, sweep = None, []
    if raw.get("train_sae") is not None:
        section = dict(raw["train_sae"])
        sweep = list(section.pop("sweep", None) or [])
        _known(section, tuple(f.name for f in dataclasses.fields(TrainOptions)) + ("sweep",),
               "train_sae")
        train = TrainOptions(**section)
    stages, stage_runtime = {}, {}
    for name, (options, needs, runtime_keys) in STAGE_OPTIONS.items():
        if raw.get(name, False) is False:  # absent; an empty section means the defaults
            continue
        if raw.get(needs) is None:
            raise ValueError(f"{path}: section '{name}' needs section '{needs}'")
        section = dict(raw.get(name) or {})
        if not isinstance(section, dict):
            raise ValueError(f"section '{name}' must be a mapping of {options.__name__} fields")
        _known(section, tuple(f.name for f in dataclasses.fields(options)) + runtime_keys, name)
        stage_runtime[name] = {k: section.pop(k) for k in runtime_keys if k in section}
        stages[name] = options(**section)
    return BuildConfig(atlas_id=str(raw.get("atlas_id", "atlas")),
                       out=os.fspath(out or raw.get("out") or "atlas_out"),
                       synthetic=synthetic, shards=data.get("shards"), extract=extract,
                       extract_runtime=runtime, train=train, sweep=sweep, stages=stages,
                       stage_runtime=stage_runtime)


def check_build(cfg: BuildConfig) -> CheckedBuild:
    """Every check of every stage, before any work. Raises ValueError / FileNotFoundError."""
    if cfg.synthetic is not None:
        n_shards = math.ceil(cfg.synthetic["n"] / cfg.synthetic["shard_size"])
        existing = synthetic_mismatch(cfg)
        if existing:
            raise ValueError(f"{cfg.data_dir} holds another synthetic dataset ({existing}); "
                             f"delete it or use another output folder")
    else:
        from pipeline.data.shards import expand_shards

        n_shards = len(expand_shards(cfg.shards))
    specs, _, weights_fp = check_model(cfg.extract)
    check_stage_config(cfg.out, EXTRACT, stage_identity(cfg.extract, weights_fp, cfg.atlas_id),
                       write=False)
    runs: list[SAERun] = []
    if cfg.train is not None:
        runs = make_runs(cfg.sweep, {n: s.channels for n, s in specs.items()}, cfg.train)
        if n_shards < cfg.train.holdout_parts + cfg.train.workers:
            raise ValueError(
                f"{n_shards} shards cannot hold out train_sae.holdout_parts="
                f"{cfg.train.holdout_parts} and feed train_sae.workers={cfg.train.workers} "
                f"(needs {cfg.train.holdout_parts + cfg.train.workers}); use more shards")
    return CheckedBuild(specs=specs, runs=runs, n_shards=n_shards)


def synthetic_mismatch(cfg: BuildConfig) -> str:
    """'' when OUT/data is absent or holds the configured synthetic dataset, else the diffs."""
    url = fs.join(cfg.data_dir, "dataset.json")
    if cfg.synthetic is None or not fs.exists(url):
        return ""
    spec = fs.read_json(url)
    return ", ".join(f"{k}: {spec.get(k)!r} -> {v!r}" for k, v in cfg.synthetic.items()
                     if spec.get(k) != v)


def _section(raw: dict[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"section '{name}' must be a mapping with keys {list(keys)}")
    _known(section, keys, name)
    return dict(section)


def _known(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {list(keys)}")
