"""Source groups of an atlas's images: crops of one photo and near-duplicate pictures.

The scan keeps at most `per_source` top exemplars of a latent per group (docs/method.md §5), so
that a latent's top picks are not one photo many times. Two images are in one group when

* they name the same source file (`images.source`: make-shards writes it for every crop), or
* their difference hashes (`images.phash`, pipeline.data.images.dhash) differ in at most
  `MAX_DISTANCE` of 64 bits (a re-encoded or resized copy differs in 0-2), unless a hash is
  near-flat (see `_MIN_BITS`);

and groups are closed transitively (union-find). A group is named by its smallest image_id, so
the grouping depends only on the set of images, not on the order they are read in.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# [choice] at most 3 differing bits: the 4 disjoint 16-bit bands of two such hashes then share
# at least one band exactly (pigeonhole), so candidate pairs are found by bucketing on each band
# instead of comparing every pair; re-encodings at JPEG quality 40 and 1/3 resizes of the bundled
# photos differ in 1 bit (tests/test_images.py), unrelated photos in ~32
MAX_DISTANCE = 3
_BANDS = 4
# [choice] a hash with fewer than 8 (or more than 56) bits set describes a near-flat picture (a
# plain background, a lone shape on it); such hashes are shared by unrelated images (measured
# on the synthetic scenes: 19 of 3000 images share a hash with another, 10 once these are left
# out), so they do not group
_MIN_BITS = 8
# pairs of one bucket compared at once: a band value shared by many images (a flat strip of
# the picture) makes a bucket that grows with the dataset, and a fixed number of rows against
# all of it took 1.1 GB at 100,000 synthetic images (docs/scale.md §3); cells bound it to
# a few arrays of 32 MiB
_BLOCK_CELLS = 1 << 22


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 of `x` (any shape)."""
    flat = np.ascontiguousarray(x, np.uint64).reshape(-1)
    return np.unpackbits(flat.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).reshape(x.shape)


def source_groups(images: pa.Table) -> dict[int, int]:
    """{image_id: group} for the rows of an `images` table (columns image_id, and source and
    phash when present: an atlas extracted before they existed gives one group per image)."""
    ids = np.asarray(images.column("image_id").to_numpy(zero_copy_only=False), np.int64)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    uf = _UnionFind(len(ids))
    if "source" in images.column_names:
        first: dict[str, int] = {}
        sources = images.column("source").to_pylist()
        for i, k in enumerate(order.tolist()):
            if sources[k] is not None:
                uf.union(first.setdefault(sources[k], i), i)
    if "phash" in images.column_names:
        column = images.column("phash")
        valid = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False))[order]
        hashes = np.asarray(column.fill_null(0).to_numpy(), np.int64)[order].view(np.uint64)
        bits = _popcount(hashes)
        usable = np.flatnonzero(valid & (bits >= _MIN_BITS) & (bits <= 64 - _MIN_BITS))
        for band in range(_BANDS):
            key = (hashes[usable] >> np.uint64(16 * band)) & np.uint64(0xFFFF)
            by_key = np.argsort(key, kind="stable")
            sorted_key = key[by_key]
            starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
            for start, stop in zip(starts, np.r_[starts[1:], len(sorted_key)]):
                if stop - start < 2:
                    continue
                members = usable[by_key[start:stop]]
                rows = max(1, _BLOCK_CELLS // len(members))
                for row in range(0, len(members), rows):  # bounded memory per bucket
                    block = members[row:row + rows]
                    near = _popcount(hashes[block][:, None] ^ hashes[members][None, :])
                    for a, b in zip(*np.nonzero(near <= MAX_DISTANCE)):
                        if row + a < b:
                            uf.union(int(block[a]), int(members[b]))
    return {int(ids[i]): int(ids[uf.find(i)]) for i in range(len(ids))}
