"""`Atlas`: the read side of a built atlas - SQL over its views, latents, search, similar.

    atlas = Atlas.open("demo_out")
    atlas.sql("SELECT layer, count(*) FROM latents WHERE NOT dead GROUP BY layer")
    atlas.latent("layer4", 17)                      # stats + exemplars with decoded iERF masks
    atlas.similar("layer4", 17, k=10)               # nearest latents by decoder direction
    atlas.search("examples/img.png", box=(32, 32, 24, 24))   # latents whose exemplar regions look alike

A layer name stands for its SAE when the layer has one; with a sweep of several SAEs per
layer, name the SAE (`sae_id`) instead. The model and the SAEs are loaded on first use.

The model stack (torch, timm, faiss) is imported inside the methods that need it: it takes
seconds to import, and `Atlas.open(...).sql(...)` (the `sql` command) needs none of it.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline.atlas.regions import box_positions
from pipeline.atlas.views import SOURCES, QueryLimitError, check_read_only, connect
from pipeline.atlas.views import literal as _q
from pipeline.data.images import load as load_image
from pipeline.store import AtlasRoot, fs
from pipeline.viz import denormalise

if TYPE_CHECKING:
    import torch

    from pipeline.atlas.index import LoadedIndex
    from pipeline.atlas.routes import Route
    from pipeline.models import LoadedModel
    from pipeline.sae import SAE

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# exemplar regions fetched per requested latent before aggregating by latent (max similarity)
_REGIONS_PER_RESULT = 50
# a latent's exemplars: the cafe stage's masked picks, else the scan's picks (the cafe stage may
# have masked only some latents), strongest first per kind
EXEMPLAR_TABLES = ("exemplars", "exemplar_picks")
EXEMPLAR_ORDER = "kind DESC, rank"
_EXEMPLARS_SHOWN = 8

SIMILAR = pa.schema([("layer", pa.string()), ("sae_id", pa.string()), ("latent", pa.int32()),
                     ("similarity", pa.float32()), ("label_hint", pa.string())])
SIMILAR_MANY = pa.schema([("of_latent", pa.int32()), *list(SIMILAR)[:4]])
SEARCH = pa.schema([*list(SIMILAR)[:4], ("activation", pa.float32()),
                    ("match_image_id", pa.int64()), ("match_position", pa.int32()),
                    ("exemplar_image_ids", pa.list_(pa.int64())), ("label_hint", pa.string())])


@dataclass
class LatentInfo:
    """One SAE latent: its SAE's row, its `latents` row, its exemplars and their iERF masks.

    `exemplars`: the latent's rows of `exemplars` (or of `exemplar_picks` before the cafe
    stage), ordered by kind then rank, without the PNG column. For exemplar i at input
    resolution: `masks[i]` its iERF mass mask bool[H, W], `ierfs[i]` the PNG's grey levels
    uint8[H, W] (a heat map of positive relevance, >= 128 exactly on the mask; see
    pipeline.cafe.masks.encode_png); None without the cafe stage.
    """

    sae: dict[str, Any]
    latent: int
    stats: dict[str, Any] | None
    exemplars: pa.Table
    masks: list[np.ndarray | None] = field(repr=False)
    ierfs: list[np.ndarray | None] = field(repr=False)


class Atlas:
    """A built atlas, opened read-only (see the module docstring)."""

    def __init__(self, root: str, con: duckdb.DuckDBPyConnection, files: dict[str, int],
                 atlas_id: str) -> None:
        self.root, self.atlas_id, self._con, self._files = root, atlas_id, con, files
        self._saes: dict[str, SAE] = {}
        self._indexes: dict[tuple[str, str], LoadedIndex] = {}
        self._model: LoadedModel | None = None
        self._route_finders: dict[tuple[str, int], Any] = {}

    @classmethod
    def open(cls, path: str | os.PathLike, threads: int | None = None) -> Atlas:
        """Open the atlas at `path` (a local folder or an fsspec URL) read-only.

        Tables still missing (a stage not run yet) do not stop it: a query that reads one
        fails naming the stage to run. FileNotFoundError when `path` holds no atlas table.
        """
        root = os.fspath(path)
        if not fs.exists(root):
            raise FileNotFoundError(f"no atlas at {root}: the folder does not exist")
        atlas_id = Path(root.rstrip("/")).name
        stage = fs.join(root, "stages", "extract.json")
        if fs.exists(stage):
            atlas_id = fs.read_json(stage)["config"].get("atlas_id", atlas_id)
        con, files = connect(root, atlas_id, threads=threads)
        if not any(files.values()):
            raise FileNotFoundError(f"no atlas at {root}: none of the tables "
                                    f"{', '.join(SOURCES)} has files there; build one with "
                                    f"`concept-atlas build CONFIG --out {root}`")
        return cls(root, con, files, atlas_id)

    def cursor(self) -> Atlas:
        """This atlas on a DuckDB cursor of its own, for another thread: the same database,
        views and locked settings (the sandbox holds), and the same loaded model, SAEs and
        indexes. DuckDB runs the queries of different cursors concurrently, those of one
        connection one after another (the atlas browser gives each worker thread one)."""
        twin = Atlas(self.root, self._con.cursor(), self._files, self.atlas_id)
        twin._saes, twin._indexes = self._saes, self._indexes
        twin._route_finders, twin._model = self._route_finders, self._model
        return twin

    # ---- SQL ------------------------------------------------------------------------------

    def sql(self, query: str, *, timeout: float | None = None,
            max_rows: int | None = None) -> pa.Table:
        """Run one read-only query (SELECT / WITH / FROM / DESCRIBE / SUMMARIZE) -> Arrow table.

        Anything else (COPY, ATTACH, INSTALL, CREATE, INSERT, SET, PRAGMA, CALL...) raises
        ReadOnlyError before it runs; reading files outside the atlas is refused by DuckDB.
        `timeout`: seconds after which the query is interrupted (QueryLimitError); `max_rows`:
        the result is cut there (the table's schema metadata says `truncated: true`).
        """
        statement = check_read_only(self._con, query)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout={timeout}: expected a number of seconds > 0")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: expected an int >= 1")
        timer = threading.Timer(timeout, self._con.interrupt) if timeout else None
        try:
            if timer is not None:
                timer.start()
            reader = self._con.sql(statement).to_arrow_reader(batch_size=65536)
            batches, rows, truncated = [], 0, False
            for batch in reader:
                if max_rows is not None and rows + batch.num_rows > max_rows:
                    batches.append(batch.slice(0, max_rows - rows))
                    truncated = True
                    break
                batches.append(batch)
                rows += batch.num_rows
            table = pa.Table.from_batches(batches, schema=reader.schema)
        except duckdb.InterruptException:
            raise QueryLimitError(f"the query ran past its time limit of {timeout:g} s and was "
                                  "stopped (give a longer --timeout, or a narrower query)") from None
        except duckdb.Error as exc:
            raise ValueError(str(exc)) from None
        finally:
            if timer is not None:
                timer.cancel()
        return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                              b"truncated": b"true"}) if truncated else table

    def has(self, table: str) -> bool:
        """Whether table `table` has files in this atlas."""
        if table not in self._files:
            raise ValueError(f"unknown table {table!r}; tables: {', '.join(self._files)}")
        return self._files[table] > 0

    def tables(self) -> pa.Table:
        """One row per table: name, present, files, folder, the stage that writes it."""
        return pa.Table.from_pylist([
            {"table": name, "present": n > 0, "files": n,
             "folder": fs.join(self.root, SOURCES[name].folder), "stage": SOURCES[name].stage}
            for name, n in self._files.items()])

    # ---- SAEs and latents -----------------------------------------------------------------

    @cached_property
    def saes(self) -> dict[str, dict[str, Any]]:
        """Rows of the `saes` table by sae_id."""
        if not self.has("saes"):
            return {}
        return {r["sae_id"]: r for r in self.sql("SELECT * FROM saes ORDER BY sae_id").to_pylist()}

    def resolve_sae(self, name: str) -> dict[str, Any]:
        """The `saes` row of an sae_id, or of the only SAE of a layer; ValueError otherwise."""
        if name in self.saes:
            return self.saes[name]
        of_layer = [r for r in self.saes.values() if r["layer"] == name]
        if len(of_layer) == 1:
            return of_layer[0]
        layers = sorted({r["layer"] for r in self.saes.values()})
        if of_layer:
            raise ValueError(f"layer {name!r} has {len(of_layer)} SAEs "
                             f"({', '.join(r['sae_id'] for r in of_layer)}); name one of them")
        raise ValueError(f"unknown layer or SAE {name!r}; layers with an SAE: "
                         f"{', '.join(layers) or 'none'}; SAEs: {', '.join(self.saes) or 'none'}")

    def expand(self, names: Sequence[str]) -> list[str]:
        """sae_ids of `names`: an sae_id stands for itself, a layer for every SAE it has."""
        out: list[str] = []
        for name in names:
            of_layer = [s for s, r in self.saes.items() if r["layer"] == name]
            out += [name] if name in self.saes else (of_layer or [self.resolve_sae(name)["sae_id"]])
        return list(dict.fromkeys(out))

    def sae(self, sae_id: str) -> SAE:
        """The trained SAE `sae_id` (loaded once, on CPU)."""
        if sae_id not in self._saes:
            from pipeline.sae import load_sae

            row = self.resolve_sae(sae_id)
            # the atlas may have moved since training: prefer the weights inside it
            inside = fs.join(self.root, "sae_weights", row["sae_id"])
            path = inside if fs.exists(inside + ".safetensors") else row["weights"]
            local = fs.local_path(path)
            if local is None:
                raise ValueError(f"SAE weights at {path} are remote; copy the atlas locally")
            self._saes[sae_id] = load_sae(local)
        return self._saes[sae_id]

    def check_latent(self, sae: dict[str, Any], latent: int) -> int:
        """`latent` as an int if SAE `sae` has it; ValueError giving the valid range."""
        n = int(sae["n_latents"])
        if not 0 <= int(latent) < n:
            raise ValueError(f"latent {latent} is out of range for SAE {sae['sae_id']} "
                             f"(layer {sae['layer']}): valid latents are 0..{n - 1}")
        return int(latent)

    def latent(self, layer: str, latent: int, with_stats: bool = True) -> LatentInfo:
        """Stats row and exemplars (with decoded iERF masks) of latent `latent` of `layer`'s SAE.

        `with_stats=False` leaves the stats row out (None): a caller holding the `latents` rows
        already saves the view's aggregation over every exemplar."""
        sae = self.resolve_sae(layer)
        latent = self.check_latent(sae, latent)
        where = f"WHERE sae_id = {_q(sae['sae_id'])} AND latent = {latent}"
        stats = None
        if with_stats and self.has("latent_stats"):
            rows = self.sql(f"SELECT * FROM latents {where}").to_pylist()
            stats = rows[0] if rows else None
        ex = pa.table({})
        for table in EXEMPLAR_TABLES:
            if ex.num_rows == 0 and self.has(table):
                ex = self.sql(f"SELECT * FROM {table} {where} ORDER BY {EXEMPLAR_ORDER}")
        ierfs: list[np.ndarray | None] = [None] * ex.num_rows
        masks: list[np.ndarray | None] = [None] * ex.num_rows
        if "ierf_png" in ex.column_names:
            from pipeline.cafe.masks import MASK_LEVEL, decode_png

            ierfs = [decode_png(b) for b in ex["ierf_png"].to_pylist()]
            masks = [g >= MASK_LEVEL for g in ierfs]
            ex = ex.drop_columns(["ierf_png"])
        return LatentInfo(sae, latent, stats, ex, masks, ierfs)

    # ---- latent -> latent ----------------------------------------------------------------

    def comparable(self, sae_id: str) -> list[str]:
        """The SAEs whose decoder directions live in a space of the same width as `sae_id`'s."""
        d = self.saes[sae_id]["d_in"]
        return [s for s, r in self.saes.items() if r["d_in"] == d]

    def similar(self, layer: str, latent: int, k: int = 10,
                layers: Sequence[str] | None = None, hints: bool = True) -> pa.Table:
        """The `k` latents whose unit decoder directions are nearest (cosine) to this latent's.

        `layers`: layers or sae_ids to search (default: every SAE of the same width d_in,
        this one included, so the latent itself comes first with similarity 1). `hints=False`
        leaves `label_hint` null (for a caller that holds the `latents` rows already).

        [choice] Decoder directions are compared only between SAEs of the same width: two
        layers of different widths have no common space (ViT blocks share the residual
        stream's width and space; CNN stages of equal width are compared formally, their
        channels need not mean the same). A layer of another width is refused with a message
        naming the comparable ones; its relation to this latent is what ICAT edges measure.
        """
        src = self.resolve_sae(layer)
        rows = self.similar_many(src["sae_id"], [self.check_latent(src, latent)], k,
                                 layers).drop_columns(["of_latent"]).to_pylist()
        if not hints:  # a caller that holds the `latents` rows adds them itself
            return pa.Table.from_pylist([dict(r, label_hint=None) for r in rows], SIMILAR)
        return self._with_hints(rows, SIMILAR)

    def similar_many(self, layer: str, latents: Sequence[int] | None = None, k: int = 10,
                     layers: Sequence[str] | None = None) -> pa.Table:
        """`similar` of many latents of one SAE at once (default: all of them), without label
        hints: the SIMILAR_MANY rows, each query latent's `k` nearest (itself first) under
        `of_latent`, queries in the order given. One batched search per index: on a
        16,384-latent SAE the whole SAE takes about as long as a thousand single queries."""
        import torch

        from pipeline.atlas.index import normalise_rows

        _check_k(k)
        src = self.resolve_sae(layer)
        n = int(src["n_latents"])
        queries = (np.arange(n) if latents is None else
                   np.array([self.check_latent(src, q) for q in latents], dtype=np.int64))
        targets = self._comparable_targets(src, layers)

        # the index's rows of these latents (`index.decoder_vectors` normalises row by row)
        directions = self.sae(src["sae_id"]).decoder_directions[torch.from_numpy(queries)]
        query = normalise_rows(directions.detach().float().cpu().numpy())
        sims, names, layer_of, found, is_self = [], [], [], [], []
        for target in dict.fromkeys(targets):
            index = self.index("decoder", target)
            s, ids = index.search(query, k)
            valid = ids >= 0
            # the id rows of the hits only (an index may hold millions)
            hits = index.ids.take(pa.array(np.where(valid, ids, 0).ravel()))
            lat = hits["latent"].to_numpy().reshape(ids.shape)
            sae_of = np.asarray(hits["sae_id"].to_pylist(), dtype=object).reshape(ids.shape)
            sims.append(np.where(valid, s, -np.inf))
            names.append(sae_of)
            layer_of.append(np.asarray(hits["layer"].to_pylist(), dtype=object).reshape(ids.shape))
            found.append(lat)
            is_self.append((sae_of == src["sae_id"]) & (lat == queries[:, None]) & valid)
        sim, name, lay, lat, me = (np.concatenate(a, axis=1) for a in
                                   (sims, names, layer_of, found, is_self))
        # best first; the latent itself first on ties (another SAE may hold an identical
        # direction); a stable sort keeps each index's own order otherwise
        order = np.lexsort((~me, -sim), axis=1)[:, :k]
        pick = partial(np.take_along_axis, indices=order, axis=1)
        sim, name, lay, lat = pick(sim), pick(name), pick(lay), pick(lat)
        keep = np.isfinite(sim)
        return pa.table({
            "of_latent": pa.array(np.broadcast_to(queries[:, None], sim.shape)[keep], pa.int32()),
            "layer": pa.array(lay[keep], pa.string()),
            "sae_id": pa.array(name[keep], pa.string()),
            "latent": pa.array(lat[keep], pa.int32()),
            "similarity": pa.array(sim[keep], pa.float32())}, schema=SIMILAR_MANY)

    def _comparable_targets(self, src: dict[str, Any], layers: Sequence[str] | None
                            ) -> list[str]:
        """The sae_ids `layers` names (default: every comparable SAE); ValueError naming the
        comparable ones when one has another width (see `similar`)."""
        ok = self.comparable(src["sae_id"])
        targets = self.expand(layers) if layers else ok
        bad = [t for t in targets if t not in ok]
        if bad:
            names = ", ".join(f"{self.saes[t]['layer']} ({t}, d_in={self.saes[t]['d_in']})"
                              for t in bad)
            comparable = ", ".join(f"{self.saes[t]['layer']} ({t})" for t in ok)
            raise ValueError(
                f"cannot compare decoder directions of {src['layer']} (d_in={src['d_in']}) with "
                f"{names}: they live in spaces of different widths; comparable: {comparable}. "
                f"Cross-width relations come from ICAT edges (the `edges` view)")
        return targets

    def index(self, kind: str, sae_id: str) -> LoadedIndex:
        """The FAISS index `kind` ('decoder' or 'regions') of `sae_id` (read once)."""
        if (kind, sae_id) not in self._indexes:
            from pipeline.atlas.index import read_index

            self._indexes[(kind, sae_id)] = read_index(self.root, kind, sae_id)
        return self._indexes[(kind, sae_id)]

    # ---- image -> latent -----------------------------------------------------------------

    def model(self) -> LoadedModel:
        """The extraction's model (loaded on first use), checked against the PFVs' weights."""
        if self._model is None:
            self._model = AtlasRoot(self.root).model()
        return self._model

    def input_image(self, image: ImageInput) -> tuple[torch.Tensor, np.ndarray]:
        """(model input Tensor[1, 3, H, W], the same image as uint8[H, W, 3]) of an image."""
        loaded = self.model()
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        x = loaded.preprocess(image)
        cfg = loaded.data_config
        return x, denormalise(x[0].cpu().numpy(), cfg["mean"], cfg["std"])

    def layer_info(self, layer: str) -> dict[str, Any]:
        """The `layers` row of `layer`."""
        rows = self.sql(f"SELECT * FROM layers WHERE layer = {_q(layer)}").to_pylist()
        if not rows:
            raise ValueError(f"layer {layer!r} was not extracted; layers: "
                             f"{', '.join(self.sql('SELECT layer FROM layers')['layer'].to_pylist())}")
        return rows[0]

    def routes(self, image: ImageInput, target: int | str | None = None, k: int = 3,
               method: str = "ig", steps: int = 32, depth: int | None = None,
               label: int | None = None) -> Route:
        """The concept route of one image into a class logit (`pipeline.atlas.routes.routes`:
        ICAT edges computed for this image, top-k incoming per node, down the tapped layers).
        The model, SAEs and segments are loaded on the first call per (method, steps) and kept,
        so routing many images pays the loading once."""
        from pipeline.atlas.routes import RouteFinder

        finder = self._route_finders.get((method, steps))
        if finder is None:
            finder = RouteFinder(self.root, method, steps, atlas=self)
            self._route_finders[(method, steps)] = finder
        return finder(image, target, k, depth, label)

    def search(self, image: ImageInput, box: Sequence[int] | None = None,
               layer: str | None = None, k: int = 10,
               min_activation: float | None = None) -> pa.Table:
        """Latents whose exemplar regions are nearest to a region of `image`, per SAE.

        The region is `box` = (x, y, w, h) in pixels of the model input (after resize and crop;
        the whole image when None); on each layer's grid it covers the cells whose centres lie
        inside the box (`regions.box_positions`; `regions.cells_extent` draws them). For each
        SAE searched (`layer`'s, or every SAE with a region index):
        (a) the region's mean PFV, embedded like the index (`index.region_vectors`), is matched
            against every exemplar region of the SAE's latents; a latent scores the best
            cosine similarity among its exemplars (`similarity`; its best exemplar is
            `match_image_id`/`match_position`);
        (b) `activation` is the latent's SAE activation on the region: the max over the
            region's positions of the SAE encoding of each PFV (0 when it does not fire there).
        [choice] Similarities of different SAEs live in different spaces (other widths, other
        dictionaries) and are not comparable, so each SAE reports its own `k` best by (a):
        rows come grouped by SAE, layers in model order (docs/atlas.md "Search").
        `min_activation` keeps only latents whose (b) reaches it (0: only latents that fire on
        the region). `exemplar_image_ids` lists each latent's top exemplars (by rank),
        `label_hint` comes from `latents`.
        """
        import torch

        from pipeline.atlas.index import paths
        from pipeline.icat.segment import layer_order
        from pipeline.models import tap

        _check_k(k)
        if min_activation is not None and not min_activation >= 0:
            raise ValueError(f"min_activation={min_activation}: expected a number >= 0 "
                             "(SAE activations are non-negative)")
        targets = [self.resolve_sae(layer)["sae_id"]] if layer else [
            s for s in self.saes if fs.exists(paths(self.root, "regions", s)["meta"])]
        if not targets:
            raise FileNotFoundError(f"no region index in {self.root}; build the indexes with "
                                    f"`concept-atlas index {self.root}`")
        x, _ = self.input_image(image)
        model = self.model().model
        layer_names = layer_order(model, sorted({self.saes[t]["layer"] for t in targets}))
        targets.sort(key=lambda t: (layer_names.index(self.saes[t]["layer"]), t))
        pfvs = tap(model, x, layer_names)
        rows = []
        with torch.no_grad():
            for sae_id in targets:
                found = self._search_sae(sae_id, pfvs[self.saes[sae_id]["layer"]].values[0],
                                         tuple(x.shape[-2:]), box, k, min_activation)
                rows += sorted(found, key=lambda r: -r["similarity"])[:k]
        return self._with_hints(rows, SEARCH)

    def _search_sae(self, sae_id: str, values: torch.Tensor, input_hw: tuple[int, int],
                    box: Sequence[int] | None, k: int, min_activation: float | None
                    ) -> list[dict[str, Any]]:
        from pipeline.atlas.index import region_vectors

        row = self.saes[sae_id]
        info = self.layer_info(row["layer"])
        positions = box_positions(box, input_hw, (info["grid_h"], info["grid_w"]),
                                  info["num_special"])
        region = values[positions].float().cpu()
        sae = self.sae(sae_id)
        query = region_vectors(sae, region.mean(0, keepdim=True).numpy())
        index = self.index("regions", sae_id)
        acts = sae.encode(region).amax(0)
        total, n = index.index.ntotal, max(k * _REGIONS_PER_RESULT, 500)
        while True:  # widen the search until k latents pass (or every region was seen)
            sims, ids = index.search(query, n)
            keep = ids[0] >= 0
            hits = index.ids.take(pa.array(ids[0][keep])).to_pylist()
            best: dict[int, dict[str, Any]] = {}
            for s, hit in zip(sims[0][keep], hits):  # by similarity: the first hit is the max
                lat = hit["latent"]
                if lat not in best and (min_activation is None or
                                        (acts[lat] > 0 and acts[lat] >= min_activation)):
                    best[lat] = {"similarity": float(s), **hit}
            if len(best) >= k or n >= total:
                break
            n *= 4
        tops = _top_exemplars(index.ids)
        return [{"layer": row["layer"], "sae_id": sae_id, "latent": lat,
                 "similarity": h["similarity"], "activation": float(acts[lat]),
                 "match_image_id": h["image_id"], "match_position": h["position"],
                 "exemplar_image_ids": tops.get(lat, [])}
                for lat, h in best.items()]

    def _with_hints(self, rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
        """`rows` as a table with each latent's `label_hint` (null before the cafe stage)."""
        hints: dict[tuple[str, int], str | None] = {}
        if rows and self.has("latent_stats"):
            pairs = ", ".join(f"({_q(r['sae_id'])}, {int(r['latent'])})" for r in rows)
            found = self.sql(f"SELECT sae_id, latent, label_hint FROM latents "
                             f"WHERE (sae_id, latent) IN ({pairs})").to_pylist()
            hints = {(h["sae_id"], h["latent"]): h["label_hint"] for h in found}
        for r in rows:
            r["label_hint"] = hints.get((r["sae_id"], r["latent"]))
        return pa.Table.from_pylist(rows, schema=schema)

    def images(self, image_ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The images `image_ids` as the model saw them: uint8[H, W, 3] at input resolution.

        Read from the shards named in the `images` table (one pass per shard, decoding only
        the wanted samples); FileNotFoundError names a shard that is gone.
        """
        from pipeline.data.errors import ErrorLog
        from pipeline.data.shards import iter_samples

        wanted = sorted({int(i) for i in image_ids})
        if not wanted:
            return {}
        rows = self.sql(f"SELECT image_id, shard, key FROM images WHERE image_id IN "
                        f"({', '.join(map(str, wanted))})").to_pylist()
        by_shard: dict[str, dict[str, int]] = {}
        for r in rows:
            by_shard.setdefault(r["shard"], {})[r["key"]] = r["image_id"]
        out = {}
        for shard, keys in by_shard.items():
            if not fs.exists(shard):
                raise FileNotFoundError(f"shard {shard} of the atlas's images is gone; the "
                                        f"exemplar images cannot be shown")
            for sample in iter_samples([shard], ErrorLog(), decode_image=set(keys)):
                if sample.key in keys and sample.image is not None:
                    out[keys[sample.key]] = self.input_image(sample.image)[1]
        missing = [i for i in wanted if i not in out]
        if missing:
            raise ValueError(f"{len(missing)} image(s) cannot be read ({missing[:5]}...): not in "
                             f"the images table, or their samples in the shards are unreadable")
        return out


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: expected an int >= 1 (results to return)")


def _top_exemplars(ids: pa.Table) -> dict[int, list[int]]:
    """{latent: image_ids of its `top` exemplars by rank} from a region index's id table."""
    top = ids.filter(pc.equal(ids["kind"], "top"))
    top = top.sort_by([("latent", "ascending"), ("rank", "ascending")])
    out: dict[int, list[int]] = {}
    for lat, img in zip(top["latent"].to_pylist(), top["image_id"].to_pylist()):
        if len(out.setdefault(lat, [])) < _EXEMPLARS_SHOWN:
            out[lat].append(img)
    return out
