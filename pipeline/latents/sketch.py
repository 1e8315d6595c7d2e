"""Mergeable per-latent sketches of a scan: counts, sums, maxima, top-N and a bottom-k sample.

A scan sees the dataset part by part (one PFV part per image shard). Everything it keeps per
latent is a *mergeable summary*: merging the summaries of two disjoint sets of images gives
exactly the summary of their union, so the reduce may fold the parts in any order and a
re-run of one part never changes the result of the others.

* Counts, sums and maxima add (max) elementwise.
* Top-N by activation: every candidate is an (image, latent) pair with the latent's maximum
  over the image's positions, so an image appears at most once per latent. The order is a
  *total* order, activation descending then image_id ascending, so the top N of a union equals
  the top N of the union of each side's top N, ties included.
* With at most m picks per source group (crops of one photo, near-duplicates: `group`), the
  top N is taken greedily in that order, skipping a candidate whose group already holds m
  picks. This too merges exactly: a candidate the greedy keeps on the union has fewer than m
  kept candidates of its group and fewer than N kept candidates above it on the union, and at
  least as many as on its own side (a candidate kept on its side but not on the union has a
  full group above it there), so its side keeps it as well.
* The uniform sample is a bottom-k sketch: each (image, latent) pair gets a pseudo-random
  priority, a hash of (image_id, latent, seed), and the sample of a latent is its k firing
  images of smallest (priority, image_id). The k smallest of a union are among the k smallest
  of each side, so merged sketches equal the sketch of the union exactly, and the sample is
  uniform over the images where the latent fires (the hash is independent of activations).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np

from pipeline.store import fs
from pipeline.store.hashing import splitmix64


def rank_within(groups: np.ndarray, *keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order entries by group, then by `keys` (ascending, first key most significant).

    Returns (order, rank): `order` indexes the entries sorted that way, and `rank[i]` is the
    0-based rank of entry `order[i]` within its group. `groups` and `keys` are 1-d, same length.
    """
    order = np.lexsort((*reversed(keys), groups))
    g = groups[order]
    start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[start, len(g)])
    rank = np.arange(len(g)) - np.repeat(start, sizes)
    return order, rank


def priority(image_id: np.ndarray, latent: np.ndarray, seed: int) -> np.ndarray:
    """uint64 sampling priority of (image, latent) pairs: a hash, the same on every worker."""
    salt = splitmix64(np.asarray([seed], np.uint64))[0]
    return splitmix64(splitmix64(image_id.astype(np.uint64) ^ salt)
                       + latent.astype(np.uint64))


@dataclass(frozen=True)
class Picks:
    """(image, latent) candidates: the latent's max over the image and its argmax position."""

    latent: np.ndarray  # int32 [n]
    image_id: np.ndarray  # int64 [n]
    activation: np.ndarray  # float32 [n]
    position: np.ndarray  # int32 [n], in the layer's [P] layout
    group: np.ndarray  # int64 [n], the image's source group (pipeline.latents.scan.source_groups)

    @classmethod
    def empty(cls) -> Picks:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                   np.zeros(0, np.int32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.latent)

    def take(self, index: np.ndarray) -> Picks:
        return Picks(*(getattr(self, f.name)[index] for f in fields(self)))

    def concat(self, other: Picks) -> Picks:
        return Picks(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                       for f in fields(self)))

    def top(self, n: int, per_group: int | None = None) -> Picks:
        """The `n` strongest per latent (activation desc, image_id asc), sorted that way; with
        `per_group`, at most that many of one source group (the greedy of the module doc)."""
        candidates = self
        if per_group is not None:
            # a candidate survives the greedy's group cap exactly when fewer than per_group
            # stronger candidates of its (latent, group) exist: the cap only ever looks back
            # at its own group
            pairs = np.stack([self.latent.astype(np.int64), self.group], axis=1)
            pair = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
            order, rank = rank_within(pair, -self.activation, self.image_id)
            candidates = self.take(np.sort(order[rank < per_group]))
        order, rank = rank_within(candidates.latent, -candidates.activation,
                                  candidates.image_id)
        return candidates.take(order[rank < n])

    def sample(self, k: int, seed: int) -> Picks:
        """The bottom-k sketch per latent: the `k` smallest (priority, image_id) of each."""
        order, rank = rank_within(self.latent, priority(self.image_id, self.latent, seed),
                                  self.image_id)
        return self.take(order[rank < k])


@dataclass(frozen=True)
class LatentSketch:
    """Per-latent summary of the PFVs of a set of images (one part, or a merge of parts).

    count: int64 [L], PFVs where the latent is > 0; images: int64 [L], images where it fires;
    total: float64 [L], sum of its activations; peak: float32 [L], its maximum (0 if silent);
    top: its n_top strongest images; sample: its bottom-k sample of firing images.
    """

    n_pfvs: int
    n_images: int
    count: np.ndarray
    images: np.ndarray
    total: np.ndarray
    peak: np.ndarray
    top: Picks
    sample: Picks

    def merge(self, other: LatentSketch, n_top: int, sample_size: int, seed: int,
              per_group: int | None = None) -> LatentSketch:
        """The sketch of the union of two disjoint image sets (exact; see the module doc)."""
        if len(self.count) != len(other.count):
            raise ValueError(f"cannot merge sketches of {len(self.count)} and "
                             f"{len(other.count)} latents")
        return LatentSketch(
            self.n_pfvs + other.n_pfvs, self.n_images + other.n_images,
            self.count + other.count, self.images + other.images, self.total + other.total,
            np.maximum(self.peak, other.peak),
            self.top.concat(other.top).top(n_top, per_group),
            self.sample.concat(other.sample).sample(sample_size, seed))

    def save(self, url: str) -> None:
        """Write as one `.npz` (plain arrays, no pickle), atomically."""
        arrays = {"n_pfvs": np.int64(self.n_pfvs), "n_images": np.int64(self.n_images),
                  "count": self.count, "images": self.images, "total": self.total,
                  "peak": self.peak}
        for kind in ("top", "sample"):
            picks = getattr(self, kind)
            arrays.update({f"{kind}.{f.name}": getattr(picks, f.name) for f in fields(picks)})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        fs.write_atomic(url, lambda f: f.write(buf.getbuffer()))

    @classmethod
    def load(cls, url: str) -> LatentSketch:
        fsys, path = fs.filesystem(url)
        with fsys.open(path, "rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
            picks = {kind: Picks(*(z[f"{kind}.{f.name}"] for f in fields(Picks)))
                     for kind in ("top", "sample")}
            return cls(int(z["n_pfvs"]), int(z["n_images"]), z["count"], z["images"],
                       z["total"], z["peak"], picks["top"], picks["sample"])
