"""The icat stage, Ray-free: plan the layer pairs, score one shard (map), reduce to `edges`.

Inputs: an atlas root after extract and train-sae. Pairs: the layers with an SAE, in forward
order, each with the next one, and the last one with the class logits (docs/method.md §7).

Outputs (every file atomic, every part committed in the manifest after its files):
    icat_partial/part-N.parquet   EDGES sums and counts of shard N, all edges (stage icat-map)
    edges/part-K.parquet          EDGES of layer pair K after the reduce and the top-k cut
                                  (stage icat, one record per pair); the reduce runs in DuckDB
                                  out of core and spills to icat_partial/.reduce-spill/
                                  (local roots) or a local temporary folder (remote roots)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import IO, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipeline.icat.aggregate import (
    REDUCE_MEMORY,
    check_memory_limit,
    combine,
    edge_rows,
    reduce_partials,
)
from pipeline.icat.attribution import (
    METHODS,
    RULES,
    Decomposed,
    LayerSAE,
    PairScores,
    Readout,
    attribute,
    downstream_rows,
)
from pipeline.icat.segment import LOGITS, Segment, layer_order
from pipeline.icat.srd_scores import srd_scores
from pipeline.models import tap
from pipeline import srd
from pipeline.models import list_layers
from pipeline.pfv.extract import candidate_positions, decode_shard
from pipeline.sae import load_sae
from pipeline.stage import (
    ActorRuntime,
    ShardTask,
    all_or_int,
    option,
    pairs,
    parts_line,
    summarize_parts,
)
from pipeline.store import (
    EXTRACT_STAGE,
    TRAIN_STAGE,
    AtlasRoot,
    ExtractRecord,
    PartRecord,
    check_stage_config,
    config_hash,
    fs,
    now,
    worker_id,
)
from schemas import EDGES

STAGE = "icat"
MAP_STAGE = "icat-map"
ALL_METHODS: tuple[str, ...] = METHODS + ("srd",)


@dataclass(frozen=True)
class ICATOptions(ActorRuntime):
    """What the icat stage computes. Every field but the runtime ones (batch sizes, the actor
    pool, the reduce's memory) is part of the config hash (docs/method.md §7)."""

    section: ClassVar[str] = "icat"

    methods: tuple[str, ...] = option(ALL_METHODS, "edge scores to compute", choices=ALL_METHODS,
                                      nonempty=True)
    steps: int = option(32, "ICAT-IG quadrature steps", min=1)
    rule: str = option("gauss_legendre", "ICAT-IG quadrature rule", choices=RULES)
    scale_error: bool = option(False, "scale the SAE error with alpha on the IG path ([choice] "
                               "default: held fixed)")
    images_per_shard: int | None = option(16, "images scored per shard, evenly spaced in shard "
                                          "order (0 or all: every image)", min=1,
                                          parse=lambda v: None if v in (0, "0") else all_or_int(v))
    top_edges: int = option(32, "incoming edges kept per downstream node", min=1)
    min_weight: float = option(0.0, "edges below this weight are dropped")
    position: int | None = option(None, "read downstream latents at this SAE position "
                                  "(default: the sum over positions)", min=0)
    saes: dict[str, str] | None = option(None, "the SAE of a layer, LAYER=SAE_ID ([choice] "
                                         "default: the one of lowest held-out FVU)", flag="--sae",
                                         parse=pairs)
    layers: tuple[str, ...] | None = option(None, "the layers to connect (default: every layer "
                                            "with an SAE)")
    logits: bool = option(True, "add the last layer -> class logits pair")
    batch_size: int = option(64, "(image, node) rows per forward", runtime=True, min=1)
    image_batch: int = option(8, "images decomposed together", runtime=True, min=1)
    cpus_per_actor: float = option(0.5, "Ray CPUs per actor (and its torch threads)",
                                   runtime=True, gt=0)
    reduce_memory: str = option(REDUCE_MEMORY, "DuckDB memory limit of the reduce, e.g. 16GB "
                                "(past it, it spills to disk)", runtime=True)

    def check(self) -> None:
        check_memory_limit(self.reduce_memory)


@dataclass
class ICATPlan:
    """A validated icat run: pairs, SAEs, the map tasks left, the config hash."""

    root: str
    options: ICATOptions
    extract: ExtractRecord
    data_config: dict[str, Any]
    atlas_id: str
    saes: dict[str, dict[str, Any]]  # layer -> saes row, in forward order
    pairs: list[tuple[str, str]]
    config_hash: str
    tasks: list[ShardTask]
    pending: list[ShardTask]


def plan_icat(root: AtlasRoot | str, options: ICATOptions, record: bool = True) -> ICATPlan:
    """Check the atlas, pick the SAEs and pairs, record the stage config, list the work left.

    `record=False` only reads the atlas (no stage config written or checked: the protocol and
    the benchmarks score pairs without writing edges).
    Raises FileNotFoundError without an extraction, ValueError naming a layer or SAE that does
    not exist, or when `root` holds icat outputs of another config.
    """
    atlas = AtlasRoot.of(root)
    root = atlas.url
    extract = atlas.extract()
    saes = _choose_saes(atlas, options)
    loaded = atlas.model()
    order = layer_order(loaded.model, list(saes))
    saes = {layer: saes[layer] for layer in order}
    pairs = list(zip(order, order[1:])) + ([(order[-1], LOGITS)] if options.logits else [])
    if not pairs:
        raise ValueError(f"one layer with an SAE ({order}) and logits=False: no pair to connect")
    train = atlas.manifest.records(TRAIN_STAGE)
    identity = dict(options.identity(), extract=extract.config_hash, pairs=pairs,
                    srd_rules=srd.RULES_VERSION if "srd" in options.methods else None,
                    saes={layer: [row["sae_id"], train[row["sae_id"]].config_hash]
                          for layer, row in saes.items()})
    digest = (check_stage_config(root, STAGE, identity, parts_of=(STAGE, MAP_STAGE)) if record
              else config_hash(identity))
    done = atlas.manifest.done(MAP_STAGE, digest)
    tasks = [ShardTask(int(r.part.split("-")[1]), r.input, r.input_fingerprint, digest)
             for r in sorted(atlas.manifest.done(EXTRACT_STAGE, extract.config_hash).values(),
                             key=lambda r: r.part)]
    pending = [t for t in tasks if t.part not in done or done[t.part].input_fingerprint != t.fingerprint]
    return ICATPlan(root, options, extract, loaded.data_config, extract.atlas_id, saes, pairs,
                    digest, tasks, pending)


def _choose_saes(root: AtlasRoot, options: ICATOptions) -> dict[str, dict[str, Any]]:
    rows = root.saes()
    if not rows:
        raise ValueError(f"no trained SAEs under {root}; run train-sae first")
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_layer.setdefault(row["layer"], []).append(row)
    layers = list(options.layers) if options.layers is not None else sorted(by_layer)
    chosen = {}
    for layer in layers:
        if layer not in by_layer:
            raise ValueError(f"layer {layer!r} has no SAE under {root}; layers with SAEs: "
                             f"{', '.join(sorted(by_layer))}")
        want = (options.saes or {}).get(layer)
        cands = [r for r in by_layer[layer] if want is None or r["sae_id"] == want]
        if not cands:
            raise ValueError(f"sae_id {want!r} is not an SAE of layer {layer!r}; SAEs: "
                             f"{', '.join(r['sae_id'] for r in by_layer[layer])}")
        chosen[layer] = min(cands, key=lambda r: (r["fvu"], r["sae_id"]))
    return chosen


def sample_images(n: int, k: int | None) -> np.ndarray:
    """Indices of the images scored in a shard of n: all, or k evenly spaced (deterministic)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


@dataclass
class PairResult:
    """Scores of one layer pair on a batch, with what produced them (the protocol reuses it).

    image, node: LongTensor[Q] rows; mask: the frozen readout mask (None for logits);
    scores: {method: PairScores} (PairScores.scores[method] is Tensor[Q, F + 1]).
    """

    segment: Segment
    dec: Decomposed
    readout: Readout
    image: torch.Tensor
    node: torch.Tensor
    mask: torch.Tensor | None
    scores: dict[str, PairScores]


def _sample_rows(image: torch.Tensor, per_image: int, seed: int) -> torch.Tensor:
    """Indices of at most `per_image` rows per image, a seeded sample, in row order."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(len(image), generator=gen).to(image.device)
    order = torch.argsort(image.double() * 2 + noise)  # by image, shuffled within
    ranks = torch.empty_like(order)
    first = torch.searchsorted(image[order].contiguous(), image[order].contiguous(), right=False)
    ranks[order] = torch.arange(len(order), device=image.device) - first
    return torch.nonzero(ranks < per_image)[:, 0]


class ShardScorer:
    """Holds the model, the SAEs and the segments; scores shards into partial edge tables."""

    def __init__(self, plan: ICATPlan, device: str | torch.device = "cpu") -> None:
        self.plan, self.options = plan, plan.options
        self.loaded = AtlasRoot(plan.root).model(device)
        model = self.loaded.model
        for p in model.parameters():
            p.requires_grad_(False)  # gradients are taken w.r.t. activations only
        specs = {s.name: s for s in list_layers(model) if s.name in plan.saes}
        self.saes = {
            layer: LayerSAE(layer, load_sae(row["weights"], device),
                            torch.as_tensor(candidate_positions(specs[layer], plan.extract.include_special),
                                            device=device).long())
            for layer, row in plan.saes.items()}
        self.segments = {(a, b): Segment(model, a, b, specs) for a, b in plan.pairs}
        for a, b in plan.pairs:
            n_pos = 0 if b == LOGITS else len(self.saes[b].positions)
            if b != LOGITS and self.options.position is not None and not 0 <= self.options.position < n_pos:
                raise ValueError(f"position={self.options.position}: layer {b!r}'s SAE reads "
                                 f"{n_pos} positions; use 0..{n_pos - 1} or None (sum)")

    def score_pair(self, pair: tuple[str, str], pixels: torch.Tensor, labels: np.ndarray,
                   taps: dict[str, Any] | None = None, rows_per_image: int | None = None,
                   seed: int = 0) -> PairResult:
        """Every method's scores of one layer pair for a batch of preprocessed images.

        rows_per_image: score at most this many downstream nodes per image (seeded sample;
        the protocol uses it), else every active node.
        """
        opts, model = self.options, self.loaded.model
        a, b = pair
        taps = taps if taps is not None else tap(model, pixels, list(self.saes))
        segment = self.segments[pair]
        dec = Decomposed.of(self.saes[a], taps[a].values)
        down = None if b == LOGITS else self.saes[b]
        readout = Readout(down, opts.position)
        labels_t = torch.as_tensor(labels, device=pixels.device).long()
        image, node, mask = downstream_rows(segment, dec, pixels, readout, labels=labels_t)
        if rows_per_image is not None:
            keep = _sample_rows(image, rows_per_image, seed)
            image, node, mask = image[keep], node[keep], None if mask is None else mask[keep]
        scores: dict[str, PairScores] = {}
        grad_methods = tuple(m for m in opts.methods if m in METHODS)
        if grad_methods:
            s = attribute(segment, dec, readout, image, node, mask, pixels,
                          methods=grad_methods, steps=opts.steps, rule=opts.rule,
                          scale_error=opts.scale_error, batch_size=opts.batch_size)
            scores.update({m: s for m in grad_methods})
        if "srd" in opts.methods:
            down_acts = None if down is None else down.encode(taps[b].values)
            if down_acts is not None and opts.position is not None:
                keep_pos = torch.zeros_like(down_acts)
                keep_pos[:, opts.position] = 1
                down_acts = down_acts * keep_pos
            srd = srd_scores(model, pixels, dec, down, down_acts, image, node, opts.batch_size)
            scores["srd"] = PairScores(image, node, srd.sum(1), srd.new_zeros(len(image)),
                                       {"srd": srd})
        return PairResult(segment, dec, readout, image, node, mask, scores)

    def score(self, pixels: torch.Tensor, labels: np.ndarray) -> list[pa.Table]:
        """EDGES tables (per-image rows) of every pair for a batch of preprocessed images."""
        taps = tap(self.loaded.model, pixels, list(self.saes))
        return [edge_rows(self.score_pair(pair, pixels, labels, taps).scores, labels, *pair,
                          self.plan.atlas_id) for pair in self.segments]

    def run(self, task: ShardTask, crash_after_batches: int | None = None) -> PartRecord:
        """Score part `task` and write its partial edges; return its (uncommitted) record."""
        started = now()
        decoded = decode_shard(task.shard, self.plan.data_config)
        take = sample_images(len(decoded.keys), self.options.images_per_shard)
        pixels, labels = decoded.pixels[take], decoded.labels[take]
        tables = []
        batch = self.options.image_batch
        for i, lo in enumerate(tqdm(range(0, len(take), batch), desc=f"icat {task.part}",
                                    unit="batch", leave=False, disable=len(take) <= batch)):
            if crash_after_batches is not None and i >= crash_after_batches:
                raise InjectedFailure(f"injected failure in {task.part} after {i} batches")
            x = torch.as_tensor(pixels[lo:lo + batch], device=self.loaded.device)
            tables.extend(self.score(x, labels[lo:lo + batch]))
        partial = combine(tables, self.plan.atlas_id)
        fs.write_parquet(partial, fs.join(self.plan.root, "icat_partial", f"{task.part}.parquet"), EDGES)
        return PartRecord(stage=MAP_STAGE, part=task.part, input=task.shard,
                          input_fingerprint=task.fingerprint, config_hash=task.config_hash,
                          rows=len(take), outputs={"icat_partial": partial.num_rows},
                          errors=len(decoded.errors), worker=worker_id(), started=started,
                          finished=now())


class InjectedFailure(RuntimeError):
    """Raised by `ShardScorer.run(crash_after_batches=...)` to test recovery."""


def reduce_edges(plan: ICATPlan, memory_limit: str = REDUCE_MEMORY) -> dict[str, int]:
    """Sum the committed partials, cut to the top incoming edges, write one part per pair.

    The sums and the cut run in DuckDB under `memory_limit`, spilling to disk
    (`aggregate.reduce_partials`), so the partials never need to fit in memory. A pair part is
    skipped when its `icat` record already covers exactly the committed map parts (same config,
    same partial fingerprints); else it is rewritten under its deterministic name and committed.
    Returns {part: rows} of every pair part.
    """
    manifest = AtlasRoot(plan.root).manifest
    done = manifest.done(MAP_STAGE, plan.config_hash)
    parts = sorted(done)
    inputs = config_hash({"parts": [(p, done[p].input_fingerprint, done[p].outputs) for p in parts]})
    reduced = manifest.done(STAGE, plan.config_hash)
    names = [f"part-{k:06d}" for k in range(len(plan.pairs))]
    if all(n in reduced and reduced[n].input_fingerprint == inputs for n in names):
        return {n: reduced[n].rows for n in names}
    # only the committed parts count: a partial file without its record is ignored
    files = [fs.join(plan.root, "icat_partial", f"{p}.parquet") for p in parts]
    local = fs.local_path(plan.root)
    spill = None if local is None else fs.join(local, "icat_partial", ".reduce-spill")
    readers = reduce_partials(files, plan.pairs, plan.atlas_id, plan.options.top_edges,
                              plan.options.min_weight, memory_limit=memory_limit, spill_dir=spill)
    written = {}
    started = now()
    for part, (a, b), reader in zip(names, plan.pairs, readers):
        rows = _write_reader(reader, fs.join(plan.root, "edges", f"{part}.parquet"))
        manifest.commit(PartRecord(
            stage=STAGE, part=part, input=f"{a}->{b}", input_fingerprint=inputs,
            config_hash=plan.config_hash, rows=rows, outputs={"edges": rows},
            errors=0, worker=worker_id(), started=started, finished=now()))
        written[part] = rows
        started = now()
    return written


def _write_reader(reader: pa.RecordBatchReader, url: str) -> int:
    """Stream `reader`'s batches into one zstd Parquet file at `url`, atomically (a pair's
    edges need not fit in memory either); one row group per batch. Returns the rows."""
    rows = 0

    def write(f: IO[bytes]) -> None:
        nonlocal rows
        with pq.ParquetWriter(f, reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch, row_group_size=fs.ROW_GROUP_SIZE)
                rows += batch.num_rows

    fs.write_atomic(url, write)
    return rows


def summarize(plan: ICATPlan, failed: dict[str, str], edges: dict[str, int], map_seconds: float,
              seconds: float) -> dict[str, Any]:
    """Pairs, parts done / new / failed, edges per pair and timings of an icat run."""
    root = AtlasRoot(plan.root)
    skipped = [t.part for t in plan.tasks if t not in plan.pending]
    parts = summarize_parts(root, MAP_STAGE, plan.config_hash, skipped, failed, seconds, "images")
    return {
        "root": plan.root, "pairs": [f"{a}->{b}" for a, b in plan.pairs],
        "saes": {layer: row["sae_id"] for layer, row in plan.saes.items()},
        "methods": list(plan.options.methods), "steps": plan.options.steps,
        "parts_done": parts["parts_done"], "parts_new": parts["parts_new"],
        "parts_skipped": parts["parts_skipped"], "parts_failed": failed, "images": parts["rows"],
        "edges": {f"{a}->{b}": edges.get(f"part-{k:06d}", 0)
                  for k, (a, b) in enumerate(plan.pairs)},
        "map_seconds": round(map_seconds, 2), "seconds": round(seconds, 2),
        "images_per_s": parts["worker_images_per_s"],
    }


def print_summary(s: dict[str, Any]) -> None:
    if s["parts_failed"]:
        print("[icat] edges not reduced: re-run to retry the failed shards", file=sys.stderr)
    print(parts_line(STAGE, s, f"{s['images']} images") + f"; edges per pair {s['edges']}",
          flush=True)
