"""What each page of the atlas browser shows, as plain JSON-ready dicts (no HTTP, no HTML).

`AtlasContent` wraps one opened `Atlas` (one DuckDB database, the model and SAEs loaded on
first use). Each worker thread queries it on its own cursor (`Atlas.cursor`); the model takes
turns behind one lock (docs/architecture.md, "The atlas browser"). What every page reads again
and again is read once and kept: an SAE's `latents` rows (the view aggregates every exemplar
on each query), its activations for the histograms, its exemplar rows and its layer's ICAT
edges (`KeptRows`), the last latent pages. The atlas does not
change while it is served. Rendered pictures live in `pipeline.browser.render`; the web app
(`pipeline.browser.app`) turns these dicts into pages or their `?format=json` twins.

Every lookup of a layer, latent or image that the atlas lacks raises `NotFound`, whose message
names what exists.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.atlas.api import EXEMPLAR_ORDER, EXEMPLAR_TABLES, Atlas, LatentInfo
from pipeline.atlas.views import literal
from pipeline.store import AtlasRoot

# the columns of a layer table, in display order, and the ones it may be sorted by
LAYER_COLUMNS = ("latent", "freq", "image_freq", "max_act", "mean_act", "label_hint",
                 "label_hint_frac", "label_source", "n_sources", "n_exemplars", "cafe_ins_auc", "cafe_del_auc",
                 "cafe_faithful", "gt_iou_ierf", "gt_iou_act", "dead")
PER_PAGE_MAX = 1000
HISTOGRAM_BINS = 30
NEIGHBOURS = 8  # ICAT edges and FAISS neighbours listed per latent
TOP_PER_LAYER = 6  # latents listed per layer on an image page
EXEMPLAR_KINDS = ("top", "quantile")
PAGES_KEPT = 2048  # latent and layer pages' contents kept in memory (each kind)
IMAGES_KEPT = 256
# an SAE's activations rows kept in memory for its latents' histograms (8 bytes a row)
ACTIVATIONS_KEPT = 20_000_000
# an SAE's exemplar rows (without their PNGs) and a layer's ICAT edges kept in memory, so that
# a cold latent page slices them instead of running three Parquet queries (40 of its 65 ms on
# the 16k-latent atlas, docs/browser.md "Speed"); a larger table is queried per latent
ROWS_KEPT = 5_000_000
# an SAE's decoder neighbours are searched for all its latents at once, at start, when that is
# at most this many (latent, indexed direction) pairs: 16k x 16k takes about 1 s, and a cold
# latent page then slices them instead of its own FAISS search (2 of its 7 ms; docs/browser.md
# "Speed"); a larger SAE searches per latent
NEIGHBOURS_KEPT_PAIRS = 16_384 * 16_384


@dataclass(frozen=True)
class KeptRows:
    """Rows of a query sorted by an int key column (then by the query's order; the key column
    itself dropped), each key's rows at `offsets[key]:offsets[key + 1]`."""

    offsets: np.ndarray
    table: pa.Table

    @classmethod
    def of(cls, table: pa.Table, key: str, n: int) -> KeptRows:
        """`table` (sorted by int column `key` in 0..n-1) kept by key, without that column."""
        return cls(np.searchsorted(table[key].to_numpy(), np.arange(n + 1)),
                   table.drop_columns([key]))

    def rows(self, key: int) -> list[dict[str, Any]]:
        if not 0 <= key < len(self.offsets) - 1:
            return []
        lo, hi = int(self.offsets[key]), int(self.offsets[key + 1])
        return self.table.slice(lo, hi - lo).to_pylist()


class NotFound(LookupError):
    """A layer, latent, image or page the atlas does not have; the message names what exists."""


@dataclass(frozen=True)
class LayerQuery:
    """A page of a layer table: sorted by `sort` (descending when `desc`), filtered to labels
    containing `q` (case-insensitive) and, with `alive`, to latents that fired."""

    sort: str = "freq"
    desc: bool = True
    q: str = ""
    alive: bool = False
    page: int = 1
    per: int = 100

    def __post_init__(self) -> None:
        if self.sort not in LAYER_COLUMNS:
            raise ValueError(f"sort={self.sort!r}: expected one of {', '.join(LAYER_COLUMNS)}")
        if not 1 <= self.per <= PER_PAGE_MAX:
            raise ValueError(f"per={self.per}: expected 1..{PER_PAGE_MAX} rows per page")
        if self.page < 1:
            raise ValueError(f"page={self.page}: expected a page number >= 1")


class AtlasContent:
    """The pages of one atlas (see the module docstring). `atlas`: an opened `Atlas`."""

    def __init__(self, atlas: Atlas) -> None:
        self.atlas = atlas
        # the model and the SAE loading take turns; queries run on each thread's own cursor
        self.lock = threading.RLock()
        self._local = threading.local()
        self._latent_info = functools.lru_cache(maxsize=256)(self._load_latent)
        self._sae_latents = functools.lru_cache(maxsize=None)(self._read_sae_latents)
        self._latent_pages = functools.lru_cache(maxsize=PAGES_KEPT)(self._latent_page)
        self._layer_pages = functools.lru_cache(maxsize=PAGES_KEPT)(self._layer_page)
        self._image_pages = functools.lru_cache(maxsize=IMAGES_KEPT)(self._image_page)
        self._sae_activations = functools.lru_cache(maxsize=4)(self._read_sae_activations)
        self._kept = functools.lru_cache(maxsize=64)(self._read_kept)
        self._neighbours = functools.lru_cache(maxsize=None)(self._read_neighbours)
        self._class_names: list[str] | None | bool = False
        # what every page asks, read once before any request (no two threads compute them)
        for name in ("fingerprint", "saes", "layers", "_with_exemplars", "_names", "methods"):
            getattr(self, name)  # a cached_property: computed and kept now
        # and what the first latent page of each SAE would otherwise load while a user waits
        # (about 200 ms of a cold page): its latents rows, histogram values, weights, decoder
        # index and every latent's neighbours
        for sae_id in self.saes:
            if self.atlas.has("latent_stats"):
                self.sae_latents(sae_id)
            if self.atlas.has("activations"):
                self._sae_activations(sae_id)
            self.exemplars(sae_id, 0)
            if self.methods:
                self._edges(self.saes[sae_id], 0, self.methods[0])
            # without weights or an index, the latent page says why it has no neighbours
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.atlas.sae(sae_id)
                self.atlas.index("decoder", sae_id)
                self._neighbours(sae_id)

    @property
    def db(self) -> Atlas:
        """The atlas on this thread's own DuckDB cursor (`Atlas.cursor`)."""
        twin = getattr(self._local, "atlas", None)
        if twin is None:
            twin = self._local.atlas = self.atlas.cursor()
        return twin

    # ---- what exists ---------------------------------------------------------------------

    @functools.cached_property
    def fingerprint(self) -> str:
        """A content hash of the atlas: its committed parts (manifest records: stage, part,
        config hash, input fingerprint), else its table files and their sizes. Rendered
        pictures are cached under it, so a rebuilt atlas never shows stale ones."""
        a = self.db
        if a.has("manifest"):
            rows = a.sql("SELECT stage, part, config_hash, input_fingerprint, rows "
                         "FROM manifest ORDER BY ALL").to_pylist()
        else:
            rows = a.tables().to_pylist()
        text = json.dumps([a.atlas_id, rows], default=str, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @functools.cached_property
    def saes(self) -> dict[str, dict[str, Any]]:
        """The `saes` rows by sae_id, without the bulky config column."""
        return {s: {k: v for k, v in r.items() if k != "config"}
                for s, r in self.db.saes.items()}

    @functools.cached_property
    def layers(self) -> dict[str, dict[str, Any]]:
        """The `layers` rows by layer name (extracted layers)."""
        if not self.atlas.has("layers"):
            return {}
        return {r["layer"]: r for r in self.db.sql("SELECT * FROM layers ORDER BY layer")
                .to_pylist()}

    def class_names(self) -> list[str] | None:
        """The model's class names (the atlas's data or the model's own), None when unknown."""
        if self._class_names is False:
            try:
                names = AtlasRoot(self.atlas.root).class_names()
            except (FileNotFoundError, ValueError):
                names = None
            self._class_names = names.names if names is not None else None
        return self._class_names or None

    def class_name(self, index: int) -> str:
        names = self.class_names() or []
        return names[index] if 0 <= index < len(names) else f"class {index}"

    def sae_of(self, name: str) -> dict[str, Any]:
        """The SAE row of a layer name or sae_id; NotFound naming the ones that exist."""
        if name in self.saes:
            return self.saes[name]
        of_layer = [r for r in self.saes.values() if r["layer"] == name]
        if len(of_layer) == 1:
            return of_layer[0]
        if of_layer:
            raise NotFound(f"layer {name!r} has {len(of_layer)} SAEs: open one of "
                           f"{', '.join(r['sae_id'] for r in of_layer)}")
        raise NotFound(f"no layer or SAE {name!r} in atlas {self.atlas.atlas_id}; layers with "
                       f"an SAE: {', '.join(self.layer_names()) or 'none'}; SAEs: "
                       f"{', '.join(self.saes) or 'none'}")

    @functools.cached_property
    def _names(self) -> list[str]:
        """Layer names with exactly one SAE (addressed by layer) and the sae_ids of the rest."""
        counts: dict[str, int] = {}
        for r in self.saes.values():
            counts[r["layer"]] = counts.get(r["layer"], 0) + 1
        return sorted({r["layer"] if counts[r["layer"]] == 1 else s
                       for s, r in self.saes.items()})

    def layer_names(self) -> list[str]:
        """Layer names with exactly one SAE (addressed by layer) and the sae_ids of the rest."""
        return self._names

    @functools.cached_property
    def methods(self) -> list[str]:
        """The ICAT methods of the atlas's edges."""
        return (self.db.sql("SELECT DISTINCT method FROM edges ORDER BY method")["method"]
                .to_pylist() if self.atlas.has("edges") else [])

    def slug(self, sae_id: str) -> str:
        """The name under which an SAE's pages live: its layer when the layer has one SAE."""
        layer = self.saes[sae_id]["layer"]
        return layer if layer in self.layer_names() else sae_id

    @functools.cached_property
    def _with_exemplars(self) -> set[tuple[str, int]]:
        table = next((t for t in EXEMPLAR_TABLES if self.atlas.has(t)), None)
        if table is None:
            return set()
        rows = self.db.sql(f"SELECT DISTINCT sae_id, latent FROM {table} "
                              f"WHERE kind = 'top' AND rank = 0").to_pylist()
        return {(r["sae_id"], r["latent"]) for r in rows}

    def has_exemplar(self, sae_id: str | None, latent: int) -> bool:
        """Whether a latent has a top exemplar to show as its thumbnail."""
        return (sae_id, latent) in self._with_exemplars

    def check_latent(self, name: str, latent: str | int) -> tuple[dict[str, Any], int]:
        """(SAE row, latent id) of a path's `layer` and `latent`; NotFound naming the range."""
        sae = self.sae_of(name)
        n = int(sae["n_latents"])
        text = str(latent)
        if not text.isdigit() or not 0 <= int(text) < n:
            raise NotFound(f"no latent {text!r} in {name} (SAE {sae['sae_id']}): its latents "
                           f"are 0..{n - 1}")
        return sae, int(text)

    def check_image(self, image_id: str | int) -> dict[str, Any]:
        """The `images` row of an image id; NotFound naming how many there are and a few ids."""
        text = str(image_id)
        rows = []
        if text.isdigit() and self.atlas.has("images"):
            rows = self.db.sql(f"SELECT * FROM images WHERE image_id = {int(text)}"
                                  ).to_pylist()
        if rows:
            return rows[0]
        some = self.db.sql("SELECT count(*) AS n, min(image_id) AS lo, max(image_id) AS hi "
                              "FROM images").to_pylist()[0] if self.atlas.has("images") else {}
        raise NotFound(f"no image {text!r} in atlas {self.atlas.atlas_id}: it has "
                       f"{some.get('n', 0)} images, ids {some.get('lo')}..{some.get('hi')} "
                       f"(not contiguous: part * 1000000 + index in the shard)")

    # ---- pages ---------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """The atlas: model, data, layers, SAEs with their quality numbers, the build's stages."""
        a = self.db
        extract = _stage_config(a, "extract")
        data = (a.sql("SELECT count(*) AS images, count(DISTINCT shard) AS shards, "
                      "count(DISTINCT label) AS labels FROM images").to_pylist()[0]
                if a.has("images") else {})
        stages = []
        if a.has("manifest"):
            stages = a.sql(
                "SELECT stage, count(*) AS parts, sum(rows) AS rows, sum(errors) AS errors, "
                "round(sum(epoch(finished) - epoch(started)), 2) AS part_seconds, "
                "round(epoch(max(finished)) - epoch(min(started)), 2) AS wall_seconds, "
                "min(started) AS started FROM manifest GROUP BY stage ORDER BY started"
            ).to_pylist()
        errors = {r["stage"]: r["n"] for r in a.sql(
            "SELECT stage, count(*) AS n FROM errors GROUP BY stage").to_pylist()
        } if a.has("errors") else {}
        dead = {r["sae_id"]: r for r in a.sql(
            "SELECT sae_id, count(*) AS latents, sum(dead::INT) AS dead_scanned "
            "FROM latent_stats GROUP BY sae_id").to_pylist()} if a.has("latent_stats") else {}
        for s in stages:
            s["error_rows"] = errors.get(s["stage"], 0)
        saes = [dict(r, page=self.slug(s), scanned=dead.get(s)) for s, r in self.saes.items()]
        return {"atlas_id": a.atlas_id, "root": a.root, "fingerprint": self.fingerprint,
                "model": {k: extract.get(k) for k in ("model", "weights", "positions", "dtype")},
                "data": dict(data, classes=len(self.class_names() or []) or None),
                "layers": list(self.layers.values()), "saes": saes, "stages": stages,
                "tables": [t for t in a.tables().to_pylist()]}

    def sae_latents(self, sae_id: str) -> pa.Table:
        """The `latents` rows of one SAE, read once: the view aggregates every exemplar on each
        query, and the layer table and latent pages read the same rows again and again."""
        return self._sae_latents(sae_id)

    def _read_sae_latents(self, sae_id: str) -> pa.Table:
        return self.db.sql(f"SELECT * FROM latents WHERE sae_id = {literal(sae_id)} "
                           f"ORDER BY latent")

    def scratch(self) -> duckdb.DuckDBPyConnection:
        """This thread's private in-memory DuckDB (no file access): it sorts and filters Arrow
        tables the browser already holds."""
        con = getattr(self._local, "scratch", None)
        if con is None:
            con = self._local.scratch = duckdb.connect(":memory:")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        return con

    def layer(self, name: str, query: LayerQuery) -> dict[str, Any]:
        """One page of the latents of layer (or SAE) `name`, sorted, filtered and cut by DuckDB
        over the SAE's `latents` rows (`sae_latents`); the last PAGES_KEPT are kept (callers
        must not change the dict)."""
        return self._layer_pages(name, query)

    def _layer_page(self, name: str, query: LayerQuery) -> dict[str, Any]:
        sae = self.sae_of(name)
        if not self.atlas.has("latent_stats"):
            return {"sae": sae, "slug": self.slug(sae["sae_id"]), "query": query.__dict__,
                    "total": 0, "rows": [], "columns": [], "pages": 0,
                    "note": "no latent statistics yet: run the scan stage"}
        where = ["TRUE"]
        if query.q:
            where.append(f"contains(lower(coalesce(label_hint, '')), {literal(query.q.lower())})")
        if query.alive:
            where.append("NOT dead")
        clause = " AND ".join(where)
        order = f"{query.sort} {'DESC' if query.desc else 'ASC'} NULLS LAST, latent"
        con = self.scratch()
        con.register("sae_latents", self.sae_latents(sae["sae_id"]))
        try:
            total = con.sql(f"SELECT count(*) FROM sae_latents WHERE {clause}").fetchall()[0][0]
            rows = con.sql(
                f"SELECT {', '.join(LAYER_COLUMNS)} FROM sae_latents WHERE {clause} ORDER BY "
                f"{order} LIMIT {query.per} OFFSET {(query.page - 1) * query.per}"
            ).to_arrow_table().to_pylist()
        finally:
            con.unregister("sae_latents")
        # ground-truth columns only where the data has masks (synthetic data); CAFE ones
        # only after the cafe stage
        shown = [c for c in LAYER_COLUMNS
                 if not c.startswith(("gt_", "cafe_", "label_"))
                 or any(r[c] is not None for r in rows)]
        return {"sae": sae, "slug": self.slug(sae["sae_id"]), "query": query.__dict__,
                "total": total, "pages": max(1, math.ceil(total / query.per)),
                "columns": shown, "rows": [{c: r[c] for c in shown} for r in rows]}

    def stats(self, sae_id: str, latent: int) -> dict[str, Any] | None:
        """The `latents` row of one latent (None before the scan stage)."""
        i = self._stats_row(sae_id, latent)
        return None if i is None else self.sae_latents(sae_id).slice(i, 1).to_pylist()[0]

    def label_hint(self, sae_id: str, latent: int) -> str | None:
        """A latent's `label_hint` (None before the scan stage or without one)."""
        i = self._stats_row(sae_id, latent)
        return None if i is None else self.sae_latents(sae_id)["label_hint"][i].as_py()

    def _stats_row(self, sae_id: str, latent: int) -> int | None:
        """The index of a latent's row in `sae_latents` (None without one)."""
        if not self.atlas.has("latent_stats"):
            return None
        table = self.sae_latents(sae_id)
        # the rows are sorted by latent and every latent has one: row i is latent i
        if latent < table.num_rows and table["latent"][latent].as_py() == latent:
            return latent
        i = pc.index(table["latent"], latent).as_py()
        return i if i >= 0 else None

    def activations(self, sae_id: str, latent: int) -> np.ndarray:
        """The per-image max activations of a latent (its rows of `activations`). An SAE with
        at most ACTIVATIONS_KEPT rows is read once, sorted by latent (a latent page then
        slices it); a larger one is queried per latent."""
        if not self.atlas.has("activations"):
            return np.zeros(0, np.float32)
        kept = self._sae_activations(sae_id)
        if kept is None:
            return self.db.sql(f"SELECT max_act FROM activations WHERE sae_id = "
                               f"{literal(sae_id)} AND latent = {latent}")["max_act"].to_numpy()
        offsets, values = kept
        return values[offsets[latent]:offsets[latent + 1]]

    def _read_sae_activations(self, sae_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        n = self.db.sql(f"SELECT count(*) AS n FROM activations WHERE sae_id = "
                        f"{literal(sae_id)}")["n"][0].as_py()
        if n > ACTIVATIONS_KEPT:
            return None
        t = self.db.sql(f"SELECT latent, max_act FROM activations WHERE sae_id = "
                        f"{literal(sae_id)} ORDER BY latent")
        latents = t["latent"].to_numpy()
        offsets = np.searchsorted(latents, np.arange(int(self.saes[sae_id]["n_latents"]) + 1))
        return offsets, t["max_act"].to_numpy()

    def latent_info(self, sae_id: str, latent: int) -> LatentInfo:
        """`Atlas.latent` of an SAE's latent (kept for the last 256 asked)."""
        return self._latent_info(sae_id, latent)

    def _load_latent(self, sae_id: str, latent: int) -> LatentInfo:
        return self.db.latent(sae_id, latent, with_stats=False)

    def latent(self, name: str, latent_text: str | int, method: str | None = None
               ) -> dict[str, Any]:
        """A latent: statistics, activation histogram, exemplars, CAFE scores, ICAT edges
        (`method`: one of the atlas's, default the first), decoder-direction neighbours. The
        atlas does not change while it is served, so the last PAGES_KEPT are kept (callers
        must not change the dict)."""
        return self._latent_pages(name, str(latent_text), method)

    def _latent_page(self, name: str, latent_text: str, method: str | None) -> dict[str, Any]:
        sae, latent = self.check_latent(name, latent_text)
        sae_id = sae["sae_id"]
        stats = self.stats(sae_id, latent)
        acts = self.activations(sae_id, latent)
        methods = self.methods
        if method is not None and method not in methods:
            raise ValueError(f"method={method!r}: this atlas has ICAT edges of "
                             f"{', '.join(methods) or 'no method (run the icat stage)'}")
        method = method or (methods[0] if methods else None)
        exemplars = [{k: v for k, v in r.items() if k not in ("atlas_id", "layer", "sae_id")}
                     for r in self.exemplars(sae_id, latent)]
        return {"sae": sae, "slug": self.slug(sae_id), "latent": latent,
                "stats": stats, "histogram": histogram(acts), "exemplars": exemplars,
                "cafe": _cafe_bars(stats), "methods": methods, "method": method,
                "edges": self._edges(sae, latent, method) if method else None,
                "similar": self._similar(sae_id, latent)}

    def exemplars(self, sae_id: str, latent: int) -> list[dict[str, Any]]:
        """A latent's exemplar rows without their iERF PNGs (kind descending, then rank): the
        cafe stage's, or the scan's picks where the cafe stage masked none of this latent's
        (as `Atlas.latent`)."""
        n = int(self.saes[sae_id]["n_latents"])
        for select in self._exemplar_selects:
            rows = self.rows(f"{select} WHERE sae_id = {literal(sae_id)}", "latent",
                             EXEMPLAR_ORDER, n, latent)
            if rows:
                return rows
        return []

    @functools.cached_property
    def _exemplar_selects(self) -> list[str]:
        """SELECT ... FROM each exemplar table the atlas has, every column but the PNGs."""
        selects = []
        for table in EXEMPLAR_TABLES:
            if self.atlas.has(table):
                columns = self.db.sql(f"SELECT * FROM {table} LIMIT 0").column_names
                selects.append(f"SELECT {', '.join(c for c in columns if c != 'ierf_png')} "
                               f"FROM {table}")
        return selects

    def rows(self, query: str, key: str, order: str, n: int, value: int,
             limit: int | None = None) -> list[dict[str, Any]]:
        """The rows of `query` (a SELECT with a WHERE, holding int column `key` in 0..n-1)
        whose `key` is `value`, in `order`, at most `limit`, without the `key` column: sliced
        from the whole query's rows kept in memory (`KeptRows`, read on first use) when it has
        at most ROWS_KEPT rows, else queried for this value alone."""
        kept = self._kept(query, key, order, n)
        if kept is not None:
            return kept.rows(value)[:limit]
        cut = f" LIMIT {limit}" if limit is not None else ""
        return (self.db.sql(f"{query} AND {key} = {value} ORDER BY {order}{cut}")
                .drop_columns([key]).to_pylist())

    def _read_kept(self, query: str, key: str, order: str, n: int) -> KeptRows | None:
        total = self.db.sql(f"SELECT count(*) AS n FROM ({query})")["n"][0].as_py()
        if total > ROWS_KEPT:
            return None
        return KeptRows.of(self.db.sql(f"{query} ORDER BY {key}, {order}"), key, n)

    def _edges(self, sae: dict[str, Any], latent: int, method: str
               ) -> dict[str, list[dict[str, Any]]]:
        """The latent's strongest ICAT edges (scope 'all'): the classes and next-layer latents
        it drives, the previous layer's latents that feed it."""
        layer, n = sae["layer"], int(sae["n_latents"])
        base = f"FROM edges WHERE method = {literal(method)} AND scope = 'all'"
        out = self.rows(f"SELECT src_latent, dst_layer AS layer, dst_latent AS latent, weight, "
                        f"n_images {base} AND src_layer = {literal(layer)}", "src_latent",
                        "weight DESC", n, latent, 3 * NEIGHBOURS)
        into = self.rows(f"SELECT dst_latent, src_layer AS layer, src_latent AS latent, weight, "
                         f"n_images {base} AND dst_layer = {literal(layer)}", "dst_latent",
                         "weight DESC", n, latent, NEIGHBOURS)
        classes = [dict(e, name=self.class_name(e["latent"])) for e in out
                   if e["layer"] == "logits"][:NEIGHBOURS]
        feeds = [self._node(e) for e in out if e["layer"] != "logits"][:NEIGHBOURS]
        return {"classes": classes, "feeds": feeds, "fed_by": [self._node(e) for e in into]}

    def _node(self, edge: dict[str, Any]) -> dict[str, Any]:
        """An ICAT edge's other end with the page it links to (None for an error node or a
        layer without a single SAE)."""
        of_layer = [s for s, r in self.saes.items() if r["layer"] == edge["layer"]]
        linked = edge["latent"] >= 0 and len(of_layer) == 1
        sae_id = of_layer[0] if linked else None
        return dict(edge, sae_id=sae_id, slug=self.slug(sae_id) if linked else None,
                    thumb=self.has_exemplar(sae_id, edge["latent"]))

    def _similar(self, sae_id: str, latent: int) -> dict[str, Any]:
        """FAISS neighbours by decoder direction, or why there are none."""
        try:
            kept = self._neighbours(sae_id)
            rows = (kept.rows(latent) if kept is not None else
                    self.db.similar(sae_id, latent, k=NEIGHBOURS + 1, hints=False).to_pylist())
        except (FileNotFoundError, ValueError) as exc:
            return {"rows": [], "note": str(exc)}
        rows = [{"layer": r["layer"], "sae_id": r["sae_id"], "latent": r["latent"],
                 "similarity": r["similarity"],
                 "label_hint": self.label_hint(r["sae_id"], r["latent"]),
                 "slug": self.slug(r["sae_id"]),
                 "thumb": self.has_exemplar(r["sae_id"], r["latent"])}
                for r in rows if (r["sae_id"], r["latent"]) != (sae_id, latent)]
        return {"rows": rows[:NEIGHBOURS], "note": None}

    def _read_neighbours(self, sae_id: str) -> KeptRows | None:
        """Every latent's NEIGHBOURS + 1 nearest (`Atlas.similar_many`), or None when the SAE
        and its comparable indexes hold more than NEIGHBOURS_KEPT_PAIRS pairs."""
        n = int(self.saes[sae_id]["n_latents"])
        vectors = sum(self.db.index("decoder", t).index.ntotal for t in self.db.comparable(sae_id))
        if n * vectors > NEIGHBOURS_KEPT_PAIRS:
            return None
        # similar_many lists the queries (here every latent) in order: sorted by of_latent
        return KeptRows.of(self.db.similar_many(sae_id, k=NEIGHBOURS + 1), "of_latent", n)

    def image(self, image_text: str | int, target: str | None = None,
              route_method: str = "grad_x_act") -> dict[str, Any]:
        """An image: its label, the model's top classes, the SRD saliency targets, its top
        latents per SAE with their peak cells, and its concept route (a model forward and a
        route each: the last IMAGES_KEPT are kept; callers must not change the dict)."""
        return self._image_pages(str(image_text), target or None, route_method)

    def _image_page(self, image_text: str, target: str | None, route_method: str
                    ) -> dict[str, Any]:
        row = self.check_image(image_text)
        image_id = int(row["image_id"])
        logits = self.logits(image_id)
        order = np.argsort(-logits)
        predicted = int(order[0])
        chosen = None
        if target not in (None, ""):
            if not str(target).isdigit() or not 0 <= int(target) < len(logits):
                raise ValueError(f"target={target!r}: expected a class index 0..{len(logits) - 1}")
            chosen = int(target)
        top = (self.db.sql(
            f"SELECT sae_id, layer, latent, max_act, position, rank FROM activations "
            f"WHERE image_id = {image_id} AND rank < {TOP_PER_LAYER} "
            f"ORDER BY layer, sae_id, rank").to_pylist()
               if self.atlas.has("activations") else [])
        by_sae: dict[str, list[dict[str, Any]]] = {}
        for r in top:
            hint = (self.stats(r["sae_id"], r["latent"]) or {}).get("label_hint")
            by_sae.setdefault(r["sae_id"], []).append(dict(r, slug=self.slug(r["sae_id"]),
                                                           label_hint=hint))
        return {"image": row, "label_name": None if row["label"] is None
                else self.class_name(row["label"]),
                "predicted": predicted, "predicted_name": self.class_name(predicted),
                "top_classes": [{"class": int(c), "name": self.class_name(int(c)),
                                 "logit": float(logits[c])} for c in order[:5]],
                "targets": [t for t in (predicted, chosen) if t is not None],
                "latents": by_sae, "route": self.route(image_id, predicted, route_method)}

    def logits(self, image_id: int) -> np.ndarray:
        """The model's logits float[n_classes] on an atlas image."""
        import torch

        with self.lock:
            x, _ = self.atlas.input_image(self.pixels(image_id))
            with torch.no_grad():
                return self.atlas.model().model(x)[0].float().numpy()

    def pixels(self, image_id: int) -> np.ndarray:
        """An atlas image as the model saw it, uint8[H, W, 3] (decoded from its shard)."""
        with self.lock:
            return self.atlas.images([image_id])[image_id]

    def route(self, image_id: int, target: int, method: str) -> dict[str, Any]:
        """The concept route of an atlas image into class `target` (`Atlas.routes`), as nodes
        with their pages and SVG positions and edges; or why there is none."""
        if not self.saes:
            return {"note": "no SAEs in this atlas: run the train-sae stage", "nodes": []}
        try:
            with self.lock:
                r = self.atlas.routes(self.pixels(image_id), target=target, k=3, method=method)
        except (ValueError, FileNotFoundError) as exc:
            return {"note": str(exc), "nodes": []}
        nodes = []
        for n in r.nodes:
            sae_id = r.saes.get(n.layer)
            linked = sae_id is not None and n.latent >= 0
            nodes.append({"id": n.id, "layer": n.layer, "latent": n.latent,
                          "activation": n.activation, "label_hint": n.label_hint,
                          "sae_id": sae_id if linked else None,
                          "slug": self.slug(sae_id) if linked else None,
                          "thumb": self.has_exemplar(sae_id, n.latent),
                          "name": self.class_name(n.latent) if n.layer == "logits" else None})
        return {"note": None, "method": r.method, "target": r.target, "layers": r.layers,
                "nodes": nodes, "edges": [e.__dict__ for e in r.edges]}

    def sql(self, query: str, max_rows: int, timeout: float) -> pa.Table:
        """`Atlas.sql` (the same read-only sandbox as `concept-atlas sql`), under the lock."""
        return self.db.sql(query, timeout=timeout, max_rows=max_rows)

    def search(self, pixels: np.ndarray, box: Sequence[int] | None, layer: str | None,
               k: int) -> list[dict[str, Any]]:
        """`Atlas.search` of an image uint8[H, W, 3] (model input) and box, with page slugs."""
        if layer:
            layer = self.sae_of(layer)["sae_id"]
        with self.lock:
            rows = self.atlas.search(pixels, box=box, layer=layer, k=k).to_pylist()
        return [dict(r, slug=self.slug(r["sae_id"]), thumb=self.has_exemplar(r["sae_id"], r["latent"]))
                for r in rows]


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of `values` (per-image max activations) in `bins` equal bins from 0 to the max."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"edges": [], "counts": [], "n": 0}
    counts, edges = np.histogram(values, bins=bins, range=(0.0, float(max(values.max(), 1e-9))))
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n": int(values.size)}


def _cafe_bars(stats: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """CAFE insertion/deletion AUCs of the latent's top exemplars for the three orders."""
    if not stats or stats.get("cafe_ins_auc") is None:
        return None
    return [{"order": order, "insertion": stats[ins], "deletion": stats[dele]}
            for order, ins, dele in (("iERF", "cafe_ins_auc", "cafe_del_auc"),
                                     ("activation", "ins_auc_act", "del_auc_act"),
                                     ("random", "ins_auc_random", "del_auc_random"))]


def _stage_config(atlas: Atlas, stage: str) -> dict[str, Any]:
    """The recorded config of a stage (`stages/S.json`), {} when it has not run."""
    from pipeline.store import fs

    path = fs.join(atlas.root, "stages", f"{stage}.json")
    return fs.read_json(path).get("config", {}) if fs.exists(path) else {}
