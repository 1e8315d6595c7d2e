"""The cafe stage, Ray-free: plan the parts, and turn one image part's picks into exemplar rows.

Input: the exemplar picks (`exemplar_picks/**.parquet`, EXEMPLAR_PICKS rows written by the
scan stage), the extraction (model, preprocessing, images table, shards) and the SAEs.
Picks are grouped by the image part they come from (image_id // IMAGES_PER_PART): part
`part-NNNNNN` reads shard NNNNNN once, decodes only its picked images, records the frozen
pattern once per image batch and propagates every seed of those images together, and writes
    exemplars/part-NNNNNN.parquet          EXEMPLARS rows, one per pick
    errors/stage=cafe/part-NNNNNN.parquet  picks whose image could not be read
The driver (`jobs/cafe.py`) commits the manifest record after both are in place. A part's input
fingerprint covers its shard and its picks, so new picks for a part recompute it.
"""
from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from pipeline import srd
from pipeline.cafe import faithfulness, groundtruth
from pipeline.cafe.fieldcrop import FieldCrop, field_crop
from pipeline.cafe.ierf import as_shares, batched_latent_ierfs
from pipeline.cafe.masks import act_masks, bbox, encode_png, iou, mass_masks, upsample
from pipeline.cafe.stem import PatchStem, compose, patch_stem, substituted
from pipeline.data.errors import ErrorLog, ErrorRecord
from pipeline.data.shards import iter_samples
from pipeline.models import make_transform, tap
from pipeline.pfv.extract import IMAGES_PER_PART
from pipeline.sae import SAE, load_sae
from pipeline.stage import (
    ActorRuntime,
    PartProgress,
    ShardTask,
    option,
    part_name,
    parts_line,
    summarize_parts,
)
from pipeline.store import (
    EXTRACT_STAGE,
    TRAIN_STAGE,
    AtlasRoot,
    PartRecord,
    check_stage_config,
    config_hash,
    fingerprint,
    fs,
    now,
    worker_id,
)
from schemas import EXEMPLAR_PICKS, EXEMPLARS

STAGE = "cafe"
PICKS_DIR = "exemplar_picks"


FRACTION = "a fraction in (0, 1]"


@dataclass(frozen=True)
class CafeOptions(ActorRuntime):
    """How exemplars are explained. Only `identity()` fields change the rows (and the hash)."""

    section: ClassVar[str] = "cafe"

    # [choice] 0.99: the mass of highest ground-truth IoU on the concept latents of one
    # demo_resnet atlas (generator seed 101), reported on another (seed 202), by
    # benchmarks/cafe_eval.py mass (docs/cafe_eval.md); the former 0.9 had been chosen on the
    # atlas it was reported on. iERF maps of a ReLU net are sparse: below ~0.95 the masks are
    # a few scattered pixels
    mask_mass: float = option(0.99, "the iERF mask is the smallest pixel set holding this "
                              "fraction of the positive relevance (docs/method.md §6)",
                              gt=0, max=1, expect=FRACTION)
    act_threshold: float = option(0.5, "the activation map is thresholded at this fraction of "
                                  "its maximum (act_overlap, gt_iou_act)", gt=0, max=1,
                                  expect=FRACTION)
    faithfulness_per_latent: int = option(
        4, "insertion / deletion AUCs for the 'top' picks of rank below this, per latent (2 + "
        "6 (steps - 1) forwards each); the others get nulls", min=0)
    steps: int = option(16, "insertion / deletion steps", min=2)
    patch: int = option(8, "side of the square input patches, pixels", min=1)
    seed: int = option(0, "seeds the random patch order", min=0)
    image_batch: int = option(8, "images per recorded SRD pattern (all their seeds propagate "
                              "together)", runtime=True, min=1)
    seed_chunk: int = option(64, "seeds per image per propagation pass (bounds memory)",
                             runtime=True, min=1)
    forward_batch: int = option(128, "perturbed images per forward pass of the faithfulness "
                                "check", runtime=True, min=1)
    field_crop: bool = option(True, "crop a CNN layer's faithfulness images to the checked "
                              "position's receptive field where that is checked to be exact "
                              "(pipeline/cafe/fieldcrop.py; equal up to float rounding)",
                              runtime=True)
    patch_stem: bool = option(True, "compute a CNN's first convolution and the per-position "
                              "modules after it on the faithfulness images from 16 sums per "
                              "image where that is checked to be exact (pipeline/cafe/stem.py; "
                              "equal up to float rounding)", runtime=True)


@dataclass(frozen=True)
class CafeTask(ShardTask):
    """Image part `index` (its shard read once) with its picks (EXEMPLAR_PICKS rows)."""

    picks: pa.Table


@dataclass(frozen=True)
class CafeContext:
    """What a worker needs besides its tasks (small and picklable, sent once per actor)."""

    root: str
    atlas_id: str
    options: CafeOptions
    data_config: dict[str, Any]
    saes: dict[str, dict[str, str]]  # sae_id -> {"layer", "weights"}
    layers: dict[str, dict[str, Any]]  # the layers table by layer


@dataclass
class CafePlan:
    """A validated cafe run: the parts left to do and the ones committed under this config."""

    context: CafeContext
    config_hash: str
    pending: list[CafeTask]
    done: dict[str, PartRecord]
    picks: int


def read_picks(root: str) -> pa.Table:
    """Every exemplar pick under `root/exemplar_picks/` (any folder layout), as EXEMPLAR_PICKS."""
    folder = fs.join(root, PICKS_DIR)
    filesystem, path = fs.filesystem(folder)
    files = sorted(p for p in (filesystem.find(path) if filesystem.isdir(path) else [])
                   if p.endswith(".parquet") and not any(
                       s.startswith((".", "_")) for s in p[len(path):].split("/")))
    if not files:
        raise FileNotFoundError(f"no exemplar picks under {folder}; run the scan stage first")
    tables = []
    for p in files:
        t = fs.read_parquet(filesystem.unstrip_protocol(p) if "://" in root else p)
        missing = sorted(set(EXEMPLAR_PICKS.names) - set(t.column_names))
        if missing:
            raise ValueError(f"{p} is not an exemplar_picks table: columns {missing} missing")
        tables.append(t.select(EXEMPLAR_PICKS.names).cast(EXEMPLAR_PICKS))
    return pa.concat_tables(tables)


def plan_cafe(root: AtlasRoot | str, options: CafeOptions) -> CafePlan:
    """Check the inputs, record the stage config and list the parts left to do.

    Raises ValueError / FileNotFoundError naming a missing extraction, a pick of an unknown SAE
    or image part, or a config that differs from the one `root` already holds cafe rows of.
    """
    atlas = AtlasRoot.of(root)
    root = atlas.url
    extract = atlas.extract()
    atlas_id = extract.atlas_id
    saes = {r["sae_id"]: r for r in atlas.saes()}
    picks = read_picks(root)
    _check_picks(picks, saes)
    train = atlas.manifest.records(TRAIN_STAGE)
    extracted = atlas.manifest.records(EXTRACT_STAGE)
    used = sorted(set(picks["sae_id"].to_pylist()))
    identity = dict(options.identity(), atlas_id=atlas_id, extract=extract.config_hash,
                    srd_rules=srd.RULES_VERSION,
                    saes={s: train[s].config_hash for s in used})
    digest = check_stage_config(root, STAGE, identity)
    loaded = atlas.model()
    context = CafeContext(
        root=root, atlas_id=atlas_id, options=options, data_config=loaded.data_config,
        saes={s: {"layer": r["layer"], "weights": r["weights"]} for s, r in saes.items()},
        layers=atlas.layers())
    done = atlas.manifest.done(STAGE, digest)
    parts = pc.floor(pc.divide(picks["image_id"], IMAGES_PER_PART)).to_numpy().astype(np.int64)
    pending, kept = [], {}
    for index in np.unique(parts).tolist():
        name = part_name(index)
        if name not in extracted:
            raise ValueError(f"picks of image part {name} (image_id {index * IMAGES_PER_PART}..) "
                             f"but the extraction under {root} has no such part")
        part_picks = picks.filter(pa.array(parts == index))
        shard = extracted[name].input
        task = CafeTask(index, shard, _part_fingerprint(shard, part_picks), digest, part_picks)
        rec = done.get(name)
        if rec is not None and rec.input == shard and rec.input_fingerprint == task.fingerprint:
            kept[name] = rec
        else:
            pending.append(task)
    return CafePlan(context, digest, pending, kept, len(picks))


def _check_picks(picks: pa.Table, saes: dict[str, dict[str, Any]]) -> None:
    pairs = set(zip(picks["sae_id"].to_pylist(), picks["layer"].to_pylist()))
    for sae_id, layer in sorted(pairs):
        if sae_id not in saes:
            raise ValueError(f"picks of SAE {sae_id!r}, which is not trained here; "
                             f"SAEs: {', '.join(sorted(saes)) or 'none'}")
        if saes[sae_id]["layer"] != layer:
            raise ValueError(f"picks of SAE {sae_id!r} on layer {layer!r}; it reads layer "
                             f"{saes[sae_id]['layer']!r}")


def _part_fingerprint(shard: str, picks: pa.Table) -> str:
    cols = picks.select(["sae_id", "latent", "kind", "rank", "image_id", "position"])
    return config_hash({"shard": fingerprint(shard), "picks": cols.to_pydict()})


class CafeWorker(PartProgress):
    """Holds the model and the SAEs (loaded once) and turns tasks into written parts
    (reporting the picks of each image batch, so the bar moves before a part is done)."""

    def __init__(self, context: CafeContext, device: str | torch.device = "cpu") -> None:
        self.ctx, self.opt = context, context.options
        self.loaded = AtlasRoot(context.root).model(device)
        self.model, self.device = self.loaded.model.eval(), self.loaded.device
        self.transform = make_transform(context.data_config)
        self._saes: dict[str, SAE] = {}
        self._crops: dict[tuple[str, tuple[int, int]], FieldCrop | None] = {}
        self._stems: dict[tuple[str, tuple[int, int]], PatchStem | None] = {}

    def sae(self, sae_id: str) -> SAE:
        if sae_id not in self._saes:
            self._saes[sae_id] = load_sae(self.ctx.saes[sae_id]["weights"], self.device)
        return self._saes[sae_id]

    def run(self, task: CafeTask) -> PartRecord:
        """Explain every pick of `task`, write its exemplars and errors parts, return its record."""
        started = now()
        rows: list[dict[str, Any]] = []
        batches, bad = self.read(task)
        for x, picks, gts in batches:
            rows += self.explain(x, picks, gts)
            self.report(sum(len(ps) for ps in picks))
        rows.sort(key=lambda r: (r["sae_id"], r["latent"], r["kind"], r["rank"]))
        table = pa.Table.from_pylist([dict(r, atlas_id=self.ctx.atlas_id) for r in rows],
                                     schema=EXEMPLARS)
        fs.write_parquet(table, fs.join(self.ctx.root, "exemplars", f"{task.part}.parquet"),
                         EXEMPLARS)
        AtlasRoot(self.ctx.root).write_errors(STAGE, task.part, self.ctx.atlas_id, bad)
        return PartRecord(stage=STAGE, part=task.part, input=task.shard,
                          input_fingerprint=task.fingerprint, config_hash=task.config_hash,
                          rows=len(rows), outputs={"exemplars": len(rows), "errors": len(bad)},
                          errors=len(bad), worker=worker_id(), started=started, finished=now())

    def read(self, task: CafeTask) -> tuple[list[tuple[Tensor, list[list[dict[str, Any]]],
                                                       list[list[groundtruth.GTObject]]]],
                                            list[ErrorRecord]]:
        """The picked images of `task` in image batches of `image_batch`: ([(x Tensor[N, 3, H, W]
        on the worker's device, picks per image, ground-truth objects per image)], the errors of
        picks whose image could not be read). Shared by the stage and the CAFE benchmarks."""
        keys = _image_keys(self.ctx.root, task)
        picks = task.picks.to_pylist()
        wanted = {keys[p["image_id"]] for p in picks if p["image_id"] in keys}
        errors = ErrorLog()
        pixels, metas = {}, {}
        for sample in iter_samples([task.shard], errors, STAGE, decode_image=wanted):
            if sample.key in wanted:
                pixels[sample.key] = self.transform(sample.image)
                metas[sample.key] = sample.meta
        # a picked sample the reader could not use is recorded by it; an image_id that the
        # images table does not know (picks from another extraction) is recorded here
        bad = [e for e in errors if e.key in wanted or e.key == ""]
        bad += [ErrorRecord(STAGE, task.shard, "", f"image_id {i} of a pick is not in the "
                            f"images table of {task.part}")
                for i in sorted({p["image_id"] for p in picks} - set(keys))]
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for p in picks:
            if keys.get(p["image_id"]) in pixels:
                by_image[p["image_id"]].append(p)
        ids = sorted(by_image)
        batches = []
        for lo in range(0, len(ids), self.opt.image_batch):
            batch = ids[lo:lo + self.opt.image_batch]
            x = torch.stack([pixels[keys[i]] for i in batch]).to(self.device)
            gts = [groundtruth.objects(metas[keys[i]], self.ctx.data_config) for i in batch]
            batches.append((x, [by_image[i] for i in batch], gts))
        return batches, bad

    @torch.no_grad()
    def explain(self, x: Tensor, picks: list[list[dict[str, Any]]],
                gts: list[list[groundtruth.GTObject]]) -> list[dict[str, Any]]:
        """Rows of every pick of an image batch x Tensor[N, 3, H, W]; picks[i] are image i's."""
        rows: list[dict[str, Any]] = []
        checks: dict[str, list[tuple[dict[str, Any], int, dict[str, Any], Tensor, Tensor]]] = \
            defaultdict(list)
        for layer, i, ps, maps, consts, acts in self.latent_maps(x, picks):
            rows += self._rows(x[i], ps, maps, consts, acts, gts[i], checks[layer], i)
        # the faithfulness images of every checked pick of a layer share forward passes
        for layer, layer_checks in checks.items():
            for (row, *_), scores in zip(layer_checks, self._faithfulness(x, layer, layer_checks)):
                row.update(scores)
        return rows

    @torch.no_grad()
    def latent_maps(self, x: Tensor, picks: list[list[dict[str, Any]]]
                    ) -> list[tuple[str, int, list[dict[str, Any]], Tensor, Tensor, Tensor]]:
        """Per (layer, image) with picks: (layer, image index, its picks on that layer, latent
        iERFs as shares Tensor[S, H, W], their constants Tensor[S], activation maps on the
        layer grid Tensor[S, h, w]), for an image batch x Tensor[N, 3, H, W]."""
        graph = srd.build(self.model, x)[0]
        by_layer: dict[str, list[list[dict[str, Any]]]] = defaultdict(lambda: [[] for _ in x])
        for i, image_picks in enumerate(picks):
            for p in image_picks:
                by_layer[p["layer"]][i].append(p)
        pfvs = tap(self.model, x, list(by_layer))
        out = []
        for layer, layer_picks in by_layer.items():
            positions = [torch.tensor([p["position"] for p in ps], dtype=torch.long)
                         for ps in layer_picks]
            readouts = [self._readouts(ps, x) for ps in layer_picks]
            maps, consts = batched_latent_ierfs(self.model, graph, x, layer, positions,
                                                [d for d, _ in readouts], [o for _, o in readouts],
                                                self.opt.seed_chunk)
            for i, ps in enumerate(layer_picks):
                if ps:
                    acts = self._act_maps(layer, ps, pfvs[layer].values[i])
                    out.append((layer, i, ps, *as_shares(maps[i], consts[i]), acts))
        return out

    def _readouts(self, picks: list[dict[str, Any]], x: Tensor) -> tuple[Tensor, Tensor]:
        """Each pick's latent readout on its layer's PFVs (`SAE.readout`): ([S, C], [S])."""
        if not picks:
            return x.new_zeros(0, 0), x.new_zeros(0)
        pairs = [self.sae(p["sae_id"]).readout(torch.tensor([p["latent"]])) for p in picks]
        return torch.cat([d for d, _ in pairs]), torch.cat([o for _, o in pairs])

    def _act_maps(self, layer: str, picks: list[dict[str, Any]], values: Tensor) -> Tensor:
        """Each pick's latent activation over the image's grid positions: Tensor[S, h, w]."""
        spec = self.ctx.layers[layer]
        grid = values[spec["num_special"]:].float()
        acts = {s: self.sae(s).encode(grid) for s in {p["sae_id"] for p in picks}}  # [h*w, F]
        return torch.stack([acts[p["sae_id"]][:, p["latent"]] for p in picks]).reshape(
            len(picks), spec["grid_h"], spec["grid_w"])

    def _rows(self, image: Tensor, picks: list[dict[str, Any]], maps: Tensor, consts: Tensor,
              acts: Tensor, gt: list[groundtruth.GTObject],
              checks: list[tuple[dict[str, Any], int, dict[str, Any], Tensor, Tensor]],
              index: int) -> list[dict[str, Any]]:
        """The rows of one image's picks, AUCs null; the picks that get a faithfulness check are
        appended to `checks` as (row, index, pick, iERF, upsampled activation map)."""
        masks, thresholds = mass_masks(maps, self.opt.mask_mass)
        act_up = upsample(acts, tuple(image.shape[1:]))
        act_on = act_masks(act_up, self.opt.act_threshold)
        masks_np, act_np = masks.cpu().numpy(), act_on.cpu().numpy()
        maps_np, thr = maps.cpu().numpy(), thresholds.cpu().numpy()
        rows = []
        for j, p in enumerate(picks):
            row = dict(p, ierf_png=encode_png(maps_np[j], masks_np[j], float(thr[j])),
                       bbox=bbox(masks_np[j]), mask_frac=float(masks_np[j].mean()),
                       act_overlap=iou(masks_np[j], act_np[j]), ierf_constant=float(consts[j]))
            row.update(dict.fromkeys(f"{m}_auc_{o}" for o in faithfulness.ORDERS
                                     for m in ("ins", "del")))
            if p["kind"] == "top" and p["rank"] < self.opt.faithfulness_per_latent:
                checks.append((row, index, p, maps[j], act_up[j]))
            row.update(groundtruth.match(masks_np[j], act_np[j], gt))
            rows.append(row)
        return rows

    def _faithfulness(self, x: Tensor, layer: str,
                      checks: list[tuple[dict[str, Any], int, dict[str, Any], Tensor, Tensor]],
                      ) -> list[dict[str, float | None]]:
        """The AUC columns of each checked pick of `layer` on the image batch `x`.

        Every pick's 2 + 6 (steps - 1) perturbed images (`faithfulness.shown`) stream through
        the model `forward_batch` at a time, across picks; each image's readout is its own pick's
        latent at the pick's position (`readout`), so a pick's curves are the ones it gets
        alone, up to float rounding of the batched forward. Where they are exact, the images are
        cropped to the position's receptive field (`crop_of`) and the model's stem is gathered
        from 16 sums per pick (`stem_of`).
        """
        if not checks:
            return []
        per = faithfulness.rows_per_exemplar(self.opt.steps)
        shape = (x.shape[-2], x.shape[-1])
        crop = self.crop_of(layer, shape)
        size = shape if crop is None else crop.size
        stem = self.stem_of(layer, size)
        ids = faithfulness.patch_ids(shape, self.opt.patch).to(x.device)
        # (top, left, position in the window) of each check's images
        windows = [(0, 0, p["position"]) if crop is None else crop.window(p["position"])
                   for _, _, p, _, _ in checks]

        def shown() -> Iterator[Tensor]:
            for _, _, pick, ierf, act_up in checks:
                gen = torch.Generator().manual_seed(zlib.crc32(
                    f"{self.opt.seed}:{pick['sae_id']}:{pick['latent']}:{pick['image_id']}"
                    .encode()))
                orders = faithfulness.patch_orders(ierf.cpu(), act_up.cpu(), self.opt.patch, gen)
                yield faithfulness.shown(orders, self.opt.steps)

        def cut(j: int) -> tuple[Tensor, Tensor]:
            """Check j's image and patch ids in its window."""
            top, left, _ = windows[j]
            rows, cols = slice(top, top + size[0]), slice(left, left + size[1])
            return x[checks[j][1]][:, rows, cols], ids[rows, cols]

        reads = [self.readout(p["sae_id"], p["latent"], at)
                 for (_, _, p, _, _), (_, _, at) in zip(checks, windows)]
        owner = torch.arange(len(checks)).repeat_interleave(per)
        values, lo = [], 0
        tables: dict[int, Tensor] = {}  # a check's stem sums, from its first to its last row
        for batch in faithfulness.rebatch(shown(), self.opt.forward_batch):
            rows = owner[lo:lo + len(batch)]
            own = [(j, rows == j) for j in rows.unique().tolist()]
            if stem is None:
                images = [faithfulness.composites(*cut(j), batch[sel]) for j, sel in own]
                pfvs = tap(self.model, torch.cat(images), [layer])[layer].values
            else:
                segments = []
                for j, sel in own:
                    window = stem.window(shape, *windows[j][:2], size)
                    if j not in tables:
                        tables[j] = stem.table(self.model, cut(j)[0], window)
                    segments.append((tables[j], window, batch[sel]))
                # the stem ignores the images passed: any values, already in the tap's layout
                unread = torch.empty(len(batch), 3, *size, device=x.device,
                                     memory_format=torch.channels_last)
                with substituted(self.model, stem, compose(segments)):
                    pfvs = tap(self.model, unread, [layer])[layer].values
            lo += len(batch)
            for j, sel in own:
                values.append(reads[j](pfvs[sel.to(pfvs.device)]).float().cpu())
                if (j + 1) * per <= lo:
                    tables.pop(j, None)
        curves = faithfulness.from_readouts(torch.cat(values).view(len(checks), per),
                                            self.opt.steps)
        return [faithfulness.aucs(c) for c in curves]

    def crop_of(self, layer: str, shape: tuple[int, int]) -> FieldCrop | None:
        """The receptive-field crops of `layer` at input `shape` (measured and checked once per
        worker; None where they are off, not exact or not worth it: `fieldcrop.field_crop`)."""
        if not self.opt.field_crop:
            return None
        if (layer, shape) not in self._crops:
            self._crops[(layer, shape)] = field_crop(self.model, layer, shape, self.device)
        return self._crops[(layer, shape)]

    def stem_of(self, layer: str, shape: tuple[int, int]) -> PatchStem | None:
        """The patch stem for checks of `layer` on inputs of `shape` (found and checked once per
        worker; None where it is off, absent or not exact: `stem.patch_stem`)."""
        if not self.opt.patch_stem:
            return None
        if (layer, shape) not in self._stems:
            self._stems[(layer, shape)] = patch_stem(self.model, layer, shape, self.opt.patch,
                                                     self.device)
        return self._stems[(layer, shape)]

    def readout(self, sae_id: str, latent: int, position: int) -> Callable[[Tensor], Tensor]:
        """The latent's value at `position` from PFVs of its layer Tensor[B, P, C] -> [B]
        (`pfv_readout`)."""
        return pfv_readout(self.sae(sae_id), latent, position)


def pfv_readout(sae: SAE, latent: int, position: int) -> Callable[[Tensor], Tensor]:
    """An SAE latent's value at `position` (tap layout) from PFVs of its layer:
    Tensor[B, P, C] -> Tensor[B].

    [choice] ReLU of the latent's pre-activation, not its TopK activation: the TopK selection is
    a competition with the other latents that the iERF does not decompose, and it would zero
    the curve whenever another latent overtakes this one. At the pick the two are equal (a
    picked latent is selected).
    """
    # the SAE's parameters are constants here: gradients (latent_readout's) go to the images
    w, b = sae.W_enc[latent].detach().float(), sae.b_enc[latent].detach().float()
    shift = float(sae.b_dec.detach().float() @ w)

    def read(values: Tensor) -> Tensor:
        return torch.relu(float(sae.scale) * (values[:, position].float() @ w) - shift + b)

    return read


def latent_readout(model: torch.nn.Module, sae: SAE, layer: str, latent: int, position: int,
                   grad: bool = False) -> faithfulness.Readout:
    """An SAE latent's value at `position` of `layer` for a batch of images:
    Tensor[B, 3, H, W] -> Tensor[B] (`pfv_readout` of the layer's PFVs); with `grad` it keeps
    the graph back to the images."""
    read = pfv_readout(sae, latent, position)
    device = next(model.parameters()).device
    return lambda images: read(tap(model, images.to(device), [layer], grad=grad)[layer].values)


def _image_keys(root: str, task: CafeTask) -> dict[int, str]:
    """image_id -> sample key of the picked images of `task`'s part (the images table)."""
    wanted = set(task.picks["image_id"].to_pylist())
    images = fs.read_parquet(fs.join(root, "images", f"{task.part}.parquet"),
                             columns=["image_id", "key"])
    return {i: k for i, k in zip(images["image_id"].to_pylist(), images["key"].to_pylist())
            if i in wanted}


AUC_COLUMNS = tuple(f"{m}_auc_{o}" for o in ("ierf", "act", "random") for m in ("ins", "del"))


def summarize(plan: CafePlan, failed: dict[str, str], seconds: float) -> dict[str, Any]:
    """Totals over every committed part of this config, what this run did, and mean scores."""
    root = AtlasRoot(plan.context.root)
    parts = summarize_parts(root, STAGE, plan.config_hash, list(plan.done), failed, seconds,
                            "exemplars")
    summary: dict[str, Any] = {"root": root.url, **parts, "exemplars": parts["rows"]}
    records = root.manifest.done(STAGE, plan.config_hash)
    urls = [root.join("exemplars", f"{p}.parquet") for p in sorted(records)]
    if urls:
        cols = ["mask_frac", "act_overlap", "ierf_constant", *AUC_COLUMNS, "gt_iou_ierf",
                "gt_iou_act"]
        table = pa.concat_tables(fs.read_parquet(u, columns=cols) for u in urls)
        summary["means"] = {c: _mean(table[c]) for c in cols}
        summary["faithfulness_rows"] = table.num_rows - table["ins_auc_ierf"].null_count
        summary["gt_matched_rows"] = table.num_rows - table["gt_iou_ierf"].null_count
    return summary


def _mean(column: Any) -> float | None:
    value = pc.mean(column).as_py()
    return None if value is None else round(float(value), 4)


def print_summary(s: dict[str, Any]) -> None:
    rate = f", {s['exemplars_per_s']} exemplars/s" if s["exemplars_per_s"] else ""
    print(parts_line(STAGE, s, f"{s['exemplars']} exemplars") + f", {s['errors']} errors{rate}")
    means = s.get("means", {})
    if means:
        print("  means: " + ", ".join(f"{k} {v}" for k, v in means.items() if v is not None))
    for part, reason in s["parts_failed"].items():
        print(f"  failed {part}: {reason}")
