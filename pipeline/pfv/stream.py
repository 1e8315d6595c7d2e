"""Shuffled PFV batches for SAE training that can restart at any data position.

Why not Ray Data's `random_shuffle` / `local_shuffle_buffer_size`: their order depends on
block arrival, so a resumed run could only replay and skip, and never reproduce the batches.
Here the order is a pure function of (parts, seed, rank, world size):

* rank r of W trains on parts r, r+W, ... (round-robin, `split_shards`);
* epoch e visits the rank's parts in a permutation seeded by (seed, e), in windows of
  `window_parts` parts; the rows of window w are permuted by (seed, e, w);
* the rows of consecutive windows and epochs form one endless stream, cut into batches.

Batch i is rows [i·B, (i+1)·B) of that stream, so `stream(position)` seeks straight to the
window holding row position·B: only that window is read, never the batches before it. Ranks
step in lockstep, so `position` is the same on every rank.

Parts are read by a `Reader` (numpy here; the Ray job streams them through Ray Data); when a
rank's share fits in `cache_bytes` it is read once and kept in memory across epochs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.data.shards import split_shards
from pipeline.pfv.parts import PFVPart
from pipeline.store import fs

Reader = Callable[[Sequence[PFVPart]], Iterator[np.ndarray]]
DEFAULT_CACHE_BYTES = 2 << 30


def numpy_reader(parts: Sequence[PFVPart]) -> Iterator[np.ndarray]:
    """Each part's PFV array [rows, C] in order, read with numpy (local or fsspec)."""
    for p in parts:
        yield np.asarray(fs.read_npy(p.values, mmap=False))


class PFVStream:
    """A `batches(position)` factory (pipeline.sae.train_sae's resume contract) over PFV parts.

    Args:
        parts: every training part of one layer (committed parts, in part order).
        batch_size: PFVs per batch on this rank.
        seed: seeds the part and row permutations.
        rank, world_size: this worker's share of the parts.
        window_parts: parts shuffled together (the shuffle buffer, in parts).
        reader: reads parts; default `numpy_reader`.
        cache_bytes: keep the rank's share in memory when it is at most this many bytes.
    """

    def __init__(self, parts: Sequence[PFVPart], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, window_parts: int = 8, reader: Reader | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if batch_size < 1 or window_parts < 1:
            raise ValueError(f"batch_size={batch_size} and window_parts={window_parts} must be >= 1")
        self.parts = split_shards([p for p in parts if p.rows > 0], rank, world_size)
        if not self.parts:
            raise ValueError(
                f"worker {rank} of {world_size} gets no PFV part ({len(parts)} non-empty parts "
                f"for {world_size} workers): extract more shards or train with fewer workers")
        self.rows = np.array([p.rows for p in self.parts], dtype=np.int64)
        self.epoch_rows = int(self.rows.sum())
        self.batch_size, self.seed, self.window_parts = batch_size, seed, window_parts
        self.reader = reader or numpy_reader
        self.cache_bytes = cache_bytes
        self._cache: dict[int, np.ndarray] = {}
        self._cached: bool | None = None

    def windows(self, epoch: int) -> list[np.ndarray]:
        """Indices into `self.parts` of each window of `epoch`, in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.parts))
        return [order[i:i + self.window_parts] for i in range(0, len(order), self.window_parts)]

    def __call__(self, position: int = 0) -> Iterator[Tensor]:
        """Endless float32 batches Tensor[batch_size, C], starting with batch `position`."""
        if position < 0:
            raise ValueError(f"position={position} must be >= 0")
        epoch, offset = divmod(position * self.batch_size, self.epoch_rows)
        pending: list[np.ndarray] = []
        held = 0
        while True:
            for w, window in enumerate(self.windows(epoch)):
                rows = int(self.rows[window].sum())
                if offset >= rows:  # seeking: skip whole windows unread
                    offset -= rows
                    continue
                data = self._window(window)
                perm = np.random.default_rng([self.seed, epoch, w]).permutation(len(data))
                pending.append(data[perm[offset:]])
                held += rows - offset
                offset = 0
                while held >= self.batch_size:
                    batch, pending = _take(pending, self.batch_size)
                    held -= self.batch_size
                    yield torch.from_numpy(batch.astype(np.float32, copy=False))
            epoch += 1

    def _window(self, window: np.ndarray) -> np.ndarray:
        """The rows of the window's parts, concatenated in window order."""
        if self.cached and not self._cache:
            # the whole share fits: one read of every part, reused by every epoch
            self._cache = self._read(range(len(self.parts)))
        arrays = self._cache or self._read(window)
        return np.concatenate([arrays[int(i)] for i in window])

    def _read(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        indices = [int(i) for i in indices]
        arrays = dict(zip(indices, self.reader([self.parts[i] for i in indices])))
        if len(arrays) != len(indices):
            raise ValueError(f"the reader returned {len(arrays)} of {len(indices)} parts")
        for i, a in arrays.items():
            if len(a) != self.parts[i].rows:
                raise ValueError(f"{self.parts[i].values} holds {len(a)} rows, "
                                 f"the manifest says {self.parts[i].rows}")
        return arrays

    @property
    def cached(self) -> bool:
        """Whether the rank's share is kept in memory (at most `cache_bytes`)."""
        if self._cached is None:
            self._cached = self.epoch_rows * _row_bytes(self.parts[0].values) <= self.cache_bytes
        return self._cached


def _row_bytes(url: str) -> int:
    """Bytes per row of a 2-D `.npy` file, from its header alone."""
    filesystem, path = fs.filesystem(url)
    with filesystem.open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def _take(pending: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first n rows of the queued arrays, and the queue without them."""
    out, rest, need = [], list(pending), n
    while need:
        head = rest[0]
        if len(head) <= need:
            out.append(head)
            rest.pop(0)
            need -= len(head)
        else:
            out.append(head[:need])
            rest[0] = head[need:]
            need = 0
    return (out[0] if len(out) == 1 else np.concatenate(out)), rest
