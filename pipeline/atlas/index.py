"""FAISS indexes of an atlas: decoder directions (latent -> latent), exemplar regions (image -> latent).

Layout under the atlas root, one index per SAE (docs/architecture.md, "Principles": vectors in the
index, keys in a Parquet id table beside it, row i of the ids = FAISS id i):

    index/decoder/SAE_ID.faiss, SAE_ID.parquet, SAE_ID.json   unit decoder directions
    index/regions/SAE_ID.faiss, SAE_ID.parquet, SAE_ID.json   exemplar region embeddings

All vectors are L2-normalised and searched by inner product, i.e. cosine similarity. The index
type depends on the size: an exact `Flat` index below `EXACT_BELOW` vectors, an IVF/PQ index
with a re-ranking stage above it (`ivfpq_factory`), searched with `nprobe` lists. The JSON
holds what built it (factory, nprobe, k_factor, d, n, the SAE's weights).

Region embedding [choice]: the PFV at an exemplar's (image, position) as the SAE's encoder
reads it, `scale * x - b_dec` (pipeline.sae.model), then L2-normalised. Centring by b_dec
(the geometric median of the training PFVs) removes the direction every post-ReLU PFV shares,
which would otherwise make every region look alike under cosine similarity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import faiss
import numpy as np
import pyarrow as pa
import torch

from pipeline.pfv.extract import IMAGES_PER_PART
from pipeline.pfv.parts import committed_parts
from pipeline.sae import SAE
from pipeline.stage import Options, option
from pipeline.store import fs

KINDS = ("decoder", "regions")
EXACT_BELOW = 100_000


@dataclass(frozen=True)
class IndexOptions(Options):
    """The FAISS indexes of an atlas: exact (Flat) below `exact_below` vectors, else IVF/PQ."""

    section: ClassVar[str] = "index"

    exact_below: int = option(EXACT_BELOW, "vectors below which an index is exact (Flat); "
                              "IVF/PQ above", min=0)
    factory: str | None = option(None, "force one FAISS factory string for every index")
    force: bool = option(False, "rebuild indexes whose inputs are unchanged (they are kept by "
                         "default)", runtime=True)


DEFAULT_NPROBE = 32
K_FACTOR = 16  # a refined index re-ranks K_FACTOR * k candidates


@dataclass
class LoadedIndex:
    """A FAISS index, its id table (row i = FAISS id i) and its build record."""

    index: faiss.Index
    ids: pa.Table
    meta: dict[str, Any]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32[Q, k], ids int64[Q, k]) of the `k` nearest rows; id -1 pads."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.index.d:
            raise ValueError(f"query width {q.shape[1]} does not match the index's d={self.index.d}")
        return self.index.search(q, min(k, self.index.ntotal))


def paths(root: str, kind: str, sae_id: str) -> dict[str, str]:
    """The three files of index `kind` ('decoder' or 'regions') of SAE `sae_id`."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; kinds: {', '.join(KINDS)}")
    base = fs.join(root, "index", kind, sae_id)
    return {"faiss": base + ".faiss", "ids": base + ".parquet", "meta": base + ".json"}


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def ivfpq_factory(n: int, d: int) -> str:
    """FAISS factory string of the approximate index for `n` vectors of width `d`.

    [choice] `IVF{nlist},PQ{m}x4fs,Refine(SQ8)`: about sqrt(n) inverted lists (a power of two,
    at least 64), so a probe scans ~sqrt(n) codes; a 4-bit fast-scan PQ with d/4 sub-quantizers
    (d/8 bytes a vector, no polysemous training to skip) proposes `K_FACTOR * k` candidates,
    which an 8-bit scalar quantizer (d bytes) re-ranks. The PQ error, not nprobe, is what caps
    recall: on 1M x 128 clustered vectors (benchmarks/atlas_queries.py) the plain
    `IVF,PQ{d/4}np` index stays near recall@10 0.3 at any nprobe, the refined one reaches
    ~0.9 with K_FACTOR 16, in ~150 bytes a vector instead of 512 for float32.
    """
    nlist = max(64, 2 ** round(math.log2(math.sqrt(max(n, 1)))))
    m = d // 4 if d % 4 == 0 else (d // 2 if d % 2 == 0 else d)
    return f"IVF{nlist},PQ{m}x4fs,Refine(SQ8)"


def build_index(vectors: np.ndarray, exact_below: int = EXACT_BELOW,
                factory: str | None = None, train_size: int = 65_536, seed: int = 0
                ) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product index of unit rows `vectors` float32[n, d], and its build record.

    `factory` overrides the choice by size (exact `Flat` below `exact_below`, else
    `ivfpq_factory`). A trained index learns from `train_size` rows drawn with `seed`.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    factory = factory or ("Flat" if n < exact_below else ivfpq_factory(n, d))
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rows = np.random.default_rng(seed).choice(n, size=min(n, train_size), replace=False)
        index.train(x[np.sort(rows)])
    index.add(x)
    meta = {"factory": factory, "n": int(n), "d": int(d), "nprobe": None, "k_factor": None,
            "metric": "inner_product"}
    _tune(index, meta)
    return index, meta


def _tune(index: faiss.Index, meta: dict[str, Any]) -> None:
    """Set (or restore from `meta`) the search-time knobs: IVF nprobe, refine k_factor."""
    if "IVF" in meta["factory"]:
        ivf = faiss.extract_index_ivf(index)
        meta["nprobe"] = meta.get("nprobe") or min(DEFAULT_NPROBE, ivf.nlist)
        ivf.nprobe = meta["nprobe"]
    if "Refine" in meta["factory"]:
        meta["k_factor"] = meta.get("k_factor") or K_FACTOR
        faiss.downcast_index(index).k_factor = meta["k_factor"]


def write_index(root: str, kind: str, sae_id: str, index: faiss.Index, ids: pa.Table,
                meta: dict[str, Any]) -> None:
    """Write the index, its ids and its record (the record last: it marks the index complete)."""
    if ids.num_rows != index.ntotal:
        raise ValueError(f"{ids.num_rows} id rows for an index of {index.ntotal} vectors")
    p = paths(root, kind, sae_id)
    data = faiss.serialize_index(index)
    fs.write_atomic(p["faiss"], lambda f: f.write(data.tobytes()))
    fs.write_parquet(ids, p["ids"])
    fs.write_json(meta, p["meta"])


def read_index(root: str, kind: str, sae_id: str) -> LoadedIndex:
    """The index `kind` of `sae_id`; FileNotFoundError pointing at `concept-atlas index`."""
    p = paths(root, kind, sae_id)
    if not fs.exists(p["meta"]):
        raise FileNotFoundError(f"no {kind} index of SAE {sae_id} in this atlas (missing "
                                f"{p['meta']}); build it with `concept-atlas index {root}`")
    filesystem, path = fs.filesystem(p["faiss"])
    with filesystem.open(path, "rb") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    meta = fs.read_json(p["meta"])
    _tune(index, meta)
    return LoadedIndex(index, fs.read_parquet(p["ids"]), meta)


def decoder_vectors(sae: SAE) -> np.ndarray:
    """float32[n_latents, d_in]: the SAE's unit decoder directions (row j = latent j)."""
    return normalise_rows(sae.decoder_directions.detach().float().cpu().numpy())


@torch.no_grad()
def region_vectors(sae: SAE, pfvs: np.ndarray) -> np.ndarray:
    """Region embeddings float32[n, d_in] of raw PFVs [n, d_in]: `scale * x - b_dec`, unit norm."""
    x = torch.as_tensor(np.asarray(pfvs, np.float32))
    centred = x * sae.scale.float().cpu() - sae.b_dec.detach().float().cpu()
    return normalise_rows(centred.numpy())


def gather_pfvs(root: str, layer: str, image_ids: np.ndarray, positions: np.ndarray
                ) -> np.ndarray:
    """Stored PFVs float32[n, C] of `layer` at the pairs (image_ids[i], positions[i]).

    The part of an image is `image_id // IMAGES_PER_PART`; each needed part's id table is
    read once and the rows found by a sorted search. ValueError names a pair with no stored
    PFV (e.g. a position the extraction did not sample).
    """
    image_ids = np.asarray(image_ids, np.int64)
    positions = np.asarray(positions, np.int64)
    parts = {int(p.part.split("-")[1]): p for p in committed_parts(root, layer)}
    out: np.ndarray | None = None
    part_of = image_ids // IMAGES_PER_PART
    for index in np.unique(part_of):
        if int(index) not in parts:
            missing = image_ids[part_of == index][0]
            raise ValueError(f"image {missing} has no committed PFV part of layer {layer!r} "
                             f"(part-{int(index):06d}); committed: {len(parts)} parts")
        part = parts[int(index)]
        ids = fs.read_parquet(part.ids)
        keys = _pair_keys(ids["image_id"].to_numpy(), ids["position"].to_numpy())
        order = np.argsort(keys, kind="stable")
        want = np.flatnonzero(part_of == index)
        wanted = _pair_keys(image_ids[want], positions[want])
        found = np.minimum(np.searchsorted(keys, wanted, sorter=order), len(keys) - 1)
        rows = order[found]
        bad = keys[rows] != wanted
        if bad.any():
            i = want[np.argmax(bad)]
            raise ValueError(f"no stored PFV of layer {layer!r} at image {image_ids[i]}, "
                             f"position {positions[i]} (part {part.part})")
        values = fs.read_npy(part.values)
        if out is None:
            out = np.empty((len(image_ids), values.shape[1]), np.float32)
        out[want] = values[np.sort(rows)][np.argsort(np.argsort(rows))]
    return out if out is not None else np.zeros((0, 0), np.float32)


def _pair_keys(image_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    # positions < 2**20 (a 1024x1024 grid): one sortable int64 per (image, position)
    return np.asarray(image_ids, np.int64) * (1 << 20) + np.asarray(positions, np.int64)
