"""The synthetic concept dataset: shapes with known colours, textures and visible masks.

Every image is a pure function of ``(seed, index)``: its random numbers come from
``np.random.default_rng([seed, index])``, so how the dataset is sharded or parallelised never
changes an image.

Scene rule. An image holds 1-3 objects. The first object generated is the *primary* one, with a
nominal area ``s**2`` where ``s`` is 30-50% of the image side; the others get ``s`` in 12-25%
of the side. Objects lie fully inside the image and are drawn in a random order, later ones
occluding earlier ones, so the primary object may be partly hidden. A layout is accepted only if
the largest visible area is at least ``_AREA_MARGIN`` times the second largest and every object
keeps at least ``_MIN_VISIBLE_FRACTION`` of its own area visible (so the class is learnable and
every listed concept can be seen); otherwise a fresh layout is drawn from the same generator, up
to ``_MAX_ATTEMPTS`` times, after which the primary object is drawn alone. The class is the
index in ``SHAPES`` of the object with the largest *visible* pixel area (ties, which the margin
rules out except in degenerate settings, go to the object drawn first).

Planted shortcut: with probability ``shortcut_prob`` the class object's colour is replaced by
``SHORTCUT_COLOURS[class]``. The coin is drawn for every image, so the geometry of an image does
not depend on ``shortcut_prob``; only that one colour can.

Masks are run-length encoded (``rle_encode``): ``{"size": [H, W], "counts": [...]}`` where the
counts are lengths of alternating runs of False and True pixels of the mask flattened in
row-major (C) order, starting with a (possibly zero-length) run of False. Note that COCO RLE is
column-major; this one is not.
"""
from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from tqdm import tqdm

from pipeline.data.tars import run_jobs, shard_name, write_shard
from pipeline.stage import Options, option

from pipeline.data.concepts import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    SHAPES,
    SHORTCUT_COLOURS,
    TEXTURES,
)

GENERATOR_VERSION = 1

_PRIMARY_SCALE = (0.30, 0.50)
_SECONDARY_SCALE = (0.12, 0.25)
_AREA_MARGIN = 1.25
_MIN_VISIBLE_FRACTION = 0.3
_MAX_ATTEMPTS = 8
# Texture pixels are darkened, not recoloured, so the hue (the colour concept) survives.
_SHADE = 0.6
_STAR_INNER = 0.45  # inner/outer radius; a regular pentagram's 0.38 is too thin for a tiny CNN
_CROSS_HALF_WIDTH = 1.0 / 3.0  # arm half-width / arm half-length
# Nominal area of each shape as a multiple of R**2 (R = the shape's outer radius), used to give
# every shape the same area distribution: otherwise the class rule would favour circles.
_AREA_PER_R2 = {
    "circle": math.pi,
    "square": 2.0,
    "triangle": 1.5 * math.sin(2 * math.pi / 3),
    "star": 5 * _STAR_INNER * math.sin(math.pi / 5),
    "cross": 8 * _CROSS_HALF_WIDTH - 4 * _CROSS_HALF_WIDTH**2,
}


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    texture: str
    cx: float
    cy: float
    radius: float  # outer radius R of the shape
    rotation: float

    @property
    def extent(self) -> float:
        """Radius of the circle around the centre that holds the whole shape."""
        return _extent(self.shape, self.radius)


def _extent(shape: str, radius: float) -> float:
    return radius * math.hypot(1.0, _CROSS_HALF_WIDTH) if shape == "cross" else radius


def rle_encode(mask: np.ndarray) -> dict:
    """Run-length encode a boolean mask ``bool[H, W]`` (row-major runs, first run is False)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of ``rle_encode``: ``{"size": [H, W], "counts": [...]}`` -> ``bool[H, W]``."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h}*{w}={h * w}")
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def _window(obj: _Object, size: int) -> tuple[slice, slice]:
    r = obj.extent
    y0, y1 = max(0, math.floor(obj.cy - r)), min(size, math.ceil(obj.cy + r) + 1)
    x0, x1 = max(0, math.floor(obj.cx - r)), min(size, math.ceil(obj.cx + r) + 1)
    return slice(y0, y1), slice(x0, x1)


def _local_coords(obj: _Object, ys: slice, xs: slice) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a window in the object's rotated frame, ``float32[h, w]`` each."""
    y = (np.arange(ys.start, ys.stop, dtype=np.float32) + np.float32(0.5 - obj.cy))[:, None]
    x = (np.arange(xs.start, xs.stop, dtype=np.float32) + np.float32(0.5 - obj.cx))[None, :]
    c, s = np.float32(math.cos(obj.rotation)), np.float32(math.sin(obj.rotation))
    return x * c + y * s, y * c - x * s


def _shape_mask(obj: _Object, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Analytic point-in-shape test on local coordinates -> ``bool[h, w]``."""
    r = obj.radius
    if obj.shape == "circle":
        return u * u + v * v <= r * r
    if obj.shape == "cross":
        w = r * _CROSS_HALF_WIDTH
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= w)) | ((au <= w) & (av <= r))
    if obj.shape == "square":  # edges axis-aligned in the local frame; rotation is uniform anyway
        return np.maximum(np.abs(u), np.abs(v)) <= r * math.sqrt(0.5)
    if obj.shape == "triangle":  # a vertex at (R, 0); the edges' normals point at 180 and +-60 degrees
        apothem = r / 2
        return (u >= -apothem) & (0.5 * u + math.sqrt(0.75) * np.abs(v) <= apothem)
    return _star_mask(u, v, 5, r, r * _STAR_INNER)


def _star_mask(u: np.ndarray, v: np.ndarray, n: int, outer: float, inner: float) -> np.ndarray:
    """An n-pointed star, outer vertices at angles 2*pi*k/n: ``bool[h, w]``.

    Folding by the star's symmetry maps a point to ``(along, across)`` relative to its nearest
    outer vertex direction (the one it projects on most); it is inside when it lies on the
    centre's side of the edge from that vertex ``(R, 0)`` to the next inner vertex
    ``Ri * (cos(pi/n), sin(pi/n))``. Projections avoid arctan2, the slowest part otherwise, and
    mirroring ``v`` first leaves only the vertices of the upper half-plane to compare.
    """
    dx, dy = inner * math.cos(math.pi / n) - outer, inner * math.sin(math.pi / n)
    v = np.abs(v)
    along, across = u, v
    for k in range(1, n // 2 + 1):
        c, s = np.float32(math.cos(2 * math.pi * k / n)), np.float32(math.sin(2 * math.pi * k / n))
        d = u * c + v * s
        nearer = d > along
        along, across = np.where(nearer, d, along), np.where(nearer, np.abs(v * c - u * s), across)
    return dx * across - dy * (along - outer) >= 0


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray | None:
    """Pixels of the texture's darker phase (``bool[h, w]``), or None for a solid object."""
    if texture == "solid":
        return None
    # Integer cell indices: float np.mod is several times slower than floor + int parity.
    half = np.float32(period / 2)
    if texture == "stripes":
        return (np.floor(u / half).astype(np.int32) & 1).astype(bool)
    if texture == "checker":
        return ((np.floor(u / half).astype(np.int32) + np.floor(v / half).astype(np.int32)) & 1).astype(bool)
    du = u - (np.floor(u / np.float32(period)) + np.float32(0.5)) * np.float32(period)
    dv = v - (np.floor(v / np.float32(period)) + np.float32(0.5)) * np.float32(period)
    return du * du + dv * dv <= (0.3 * period) ** 2


def _background(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A muted grey-ish background, planar ``uint8[3, size, size]``, so saturated objects stand out.

    Grey levels stay in 68..192 and noise within +-20, so no value ever needs clipping. Images
    are built channel-planar because numpy broadcasts over a trailing axis of 3 very slowly.
    """
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = rng.uniform(80, 180) + rng.uniform(-12, 12, size=3)
    planes = np.empty((3, size, size), dtype=np.uint8)
    if kind == "plain":
        planes[:] = np.rint(base).astype(np.uint8)[:, None, None]
    elif kind == "noise":
        # Uniform integer noise: a third of the cost of Gaussian noise, and it looks the same.
        noise = rng.integers(-20, 21, size=(size, size), dtype=np.int16)
        planes[:] = np.rint(base).astype(np.int16)[:, None, None] + noise
    else:
        end = rng.uniform(80, 180) + rng.uniform(-12, 12, size=3)
        angle = rng.uniform(0, 2 * math.pi)
        coord = (np.arange(size, dtype=np.float32) + np.float32(0.5)) / np.float32(size) - np.float32(0.5)
        t = coord[None, :] * np.float32(math.cos(angle)) + coord[:, None] * np.float32(math.sin(angle))
        t = np.clip(t + np.float32(0.5), 0, 1)
        for c in range(3):
            planes[c] = np.rint(np.float32(base[c]) + t * np.float32(end[c] - base[c]))
    return kind, planes


def _draw_concepts(rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(shape, colour, texture) of 1-3 objects, the primary one first."""
    colours = list(COLOURS)
    n = int(rng.integers(1, 4))
    picks = rng.integers(0, [len(SHAPES), len(colours), len(TEXTURES)], size=(n, 3))
    return [(SHAPES[s], colours[c], TEXTURES[t]) for s, c, t in picks.tolist()]


def _draw_geometry(rng: np.random.Generator, concepts: list[tuple[str, str, str]], size: int) -> list[_Object]:
    """One random placement of the objects, fully inside the image, returned in drawing order."""
    objects = []
    draws = rng.random((len(concepts), 4)).tolist()  # one call: a Generator call costs microseconds
    for i, ((shape, colour, texture), (scale, turn, fx, fy)) in enumerate(zip(concepts, draws)):
        lo, hi = _PRIMARY_SCALE if i == 0 else _SECONDARY_SCALE
        radius = (lo + scale * (hi - lo)) * size / math.sqrt(_AREA_PER_R2[shape])
        extent = _extent(shape, radius)
        cx, cy = extent + fx * (size - 2 * extent), extent + fy * (size - 2 * extent)
        objects.append(_Object(shape, colour, texture, cx, cy, radius, turn * 2 * math.pi))
    return [objects[i] for i in rng.permutation(len(objects))]


@dataclass
class _Placed:
    """An object with its window, local coordinates there and its unoccluded mask there."""

    obj: _Object
    ys: slice
    xs: slice
    u: np.ndarray
    v: np.ndarray
    mask: np.ndarray


def _occlusion(objects: list[_Object], size: int) -> tuple[np.ndarray, list[_Placed], np.ndarray]:
    """Owner map ``int8[size, size]`` (-1 = background), placed objects, visible areas ``int[n]``."""
    owner = np.full((size, size), -1, dtype=np.int8)
    placed = []
    for i, obj in enumerate(objects):
        ys, xs = _window(obj, size)
        u, v = _local_coords(obj, ys, xs)
        mask = _shape_mask(obj, u, v)
        window = owner[ys, xs]
        # Exact in wrapping int8, and far cheaper than boolean-index assignment (see _paint).
        window += mask.view(np.int8) * (np.int8(i) - window)
        placed.append(_Placed(obj, ys, xs, u, v, mask))
    areas = np.array([np.count_nonzero(owner[p.ys, p.xs] == i) for i, p in enumerate(placed)])
    return owner, placed, areas


def _accepts(placed: list[_Placed], areas: np.ndarray) -> bool:
    if any(a < _MIN_VISIBLE_FRACTION * np.count_nonzero(p.mask) for p, a in zip(placed, areas)):
        return False
    top = np.sort(areas)[::-1]
    return top.size == 1 or top[0] >= _AREA_MARGIN * top[1]


def _layout(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[_Placed], np.ndarray]:
    # Concepts are drawn once and only the geometry is redrawn: redrawing the shapes on a
    # rejected layout would skew the class balance towards shapes that get rejected less.
    concepts = _draw_concepts(rng)
    for _ in range(_MAX_ATTEMPTS):
        owner, placed, areas = _occlusion(_draw_geometry(rng, concepts, size), size)
        if _accepts(placed, areas):
            return owner, placed, areas
    return _occlusion(_draw_geometry(rng, concepts[:1], size), size)


def _shade(value: int) -> int:
    """A colour channel in the texture's darker phase."""
    return round(value * _SHADE)


def _paint(planes: np.ndarray, owner: np.ndarray, placed: list[_Placed]) -> None:
    """Paint the visible part of every object into planar ``uint8[3, H, W]``, in place."""
    period = max(4.0, planes.shape[1] / 14)
    for i, p in enumerate(placed):
        visible = owner[p.ys, p.xs] == i
        dark = _texture_mask(p.obj.texture, p.u, p.v, period)
        shaded = None if dark is None else (visible & dark).view(np.uint8)
        for c, value in enumerate(COLOURS[p.obj.colour]):
            region = planes[c, p.ys, p.xs]
            # region + mask * (value - region) in wrapping uint8 is exactly `value` where the mask
            # is set and untouched elsewhere, at a fifth of the cost of boolean-index assignment.
            region += visible.view(np.uint8) * (np.uint8(value) - region)
            if shaded is not None:
                region -= shaded * np.uint8(value - _shade(value))


def _object_meta(owner: np.ndarray, placed: list[_Placed], areas: np.ndarray) -> list[dict]:
    meta = []
    for i, p in enumerate(placed):
        visible = owner[p.ys, p.xs] == i
        rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
        y0, x0 = p.ys.start, p.xs.start
        meta.append(
            {
                "shape": p.obj.shape,
                "colour": p.obj.colour,
                "texture": p.obj.texture,
                "bbox": [x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1],
                "area": int(areas[i]),
                "mask": rle_encode(owner == i),
            }
        )
    return meta


def render_sample(
    seed: int, index: int, size: int = 128, shortcut_prob: float = 0.0
) -> tuple[np.ndarray, dict]:
    """Render image ``index`` of the dataset with ``seed``.

    Returns ``uint8[size, size, 3]`` RGB and its metadata: ``{"class", "class_name",
    "background", "size": [H, W], "shortcut": bool, "objects": [{"shape", "colour", "texture",
    "bbox": [x0, y0, x1, y1], "area", "mask"}]}``, objects in drawing order (later ones on top),
    ``bbox`` the half-open pixel box of the visible mask, ``area`` its pixel count and ``mask``
    its RLE (see ``rle_encode``). ``shortcut`` says whether the shortcut colour was planted.
    """
    _check_args(seed, index, size, shortcut_prob)
    background, planes, owner, placed, areas, shortcut = _compose(seed, index, size, shortcut_prob)
    _paint(planes, owner, placed)
    cls = SHAPES.index(placed[int(np.argmax(areas))].obj.shape)
    meta = {
        "class": cls,
        "class_name": CLASS_NAMES[cls],
        "background": background,
        "size": [size, size],
        "shortcut": shortcut,
        "objects": _object_meta(owner, placed, areas),
    }
    return np.stack(list(planes), axis=-1), meta


def render_without(seed: int, index: int, shape: str, size: int = 128, shortcut_prob: float = 0.0) -> np.ndarray:
    """Image ``index`` of the dataset with ``seed`` as `render_sample` draws it, with every object
    of ``shape`` left out: the same background and the other objects in the same places, each
    now visible where the left-out objects covered it. The counterfactual of an occlusion test
    (does the model's evidence for a class come from that class's objects?), ``uint8[size, size, 3]``."""
    _check_args(seed, index, size, shortcut_prob)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    _, planes, _, placed, _, _ = _compose(seed, index, size, shortcut_prob)
    kept = [p.obj for p in placed if p.obj.shape != shape]
    if len(kept) == len(placed):
        raise ValueError(f"image {index} of seed {seed} holds no {shape}: "
                         f"it holds {', '.join(sorted({p.obj.shape for p in placed}))}")
    owner, placed, _ = _occlusion(kept, size)
    _paint(planes, owner, placed)
    return np.stack(list(planes), axis=-1)


def _check_args(seed: int, index: int, size: int, shortcut_prob: float) -> None:
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not 0.0 <= shortcut_prob <= 1.0:
        raise ValueError(f"shortcut_prob must be in [0, 1], got {shortcut_prob}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")


def _compose(
    seed: int, index: int, size: int, shortcut_prob: float
) -> tuple[str, np.ndarray, np.ndarray, list[_Placed], np.ndarray, bool]:
    """The scene before painting: background kind and planes, owner map, objects, areas, shortcut."""
    rng = np.random.default_rng([seed, index])
    background, planes = _background(rng, size)
    shortcut = bool(rng.random() < shortcut_prob)
    owner, placed, areas = _layout(rng, size)
    if shortcut:
        top = placed[int(np.argmax(areas))]
        top.obj = replace(top.obj, colour=SHORTCUT_COLOURS[SHAPES.index(top.obj.shape)])
    return background, planes, owner, placed, areas, shortcut


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(img: np.ndarray) -> bytes:
    """Lossless PNG of an RGB image ``uint8[H, W, 3]``.

    Written directly (filter type 0 on every row, zlib level 1) because Pillow's encoder tries
    every row filter and costs three times as much here, for files about 20% larger.
    """
    h, w, _ = img.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # a leading 0 per row: filter type "None"
    raw[:, 1:] = img.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 1))
        + _png_chunk(b"IEND", b"")
    )


def encode_sample(index: int, img: np.ndarray, meta: dict) -> dict:
    """The WebDataset sample of one image: ``__key__`` (``%08d``), ``png``, ``cls``, ``json`` bytes."""
    return {
        "__key__": f"{index:08d}",
        "png": png_bytes(img),
        "cls": str(meta["class"]).encode("ascii"),
        "json": json.dumps(meta, separators=(",", ":")).encode("utf-8"),
    }


def _write_shard(out_dir: Path, shard: int, start: int, stop: int, seed: int, size: int,
                 shortcut_prob: float, report: Callable[[int], None] | None) -> Path:
    """Write images ``start..stop-1`` to one shard, atomically (temp name, then rename)."""
    path = out_dir / shard_name(shard)
    write_shard(path, (encode_sample(i, *render_sample(seed, i, size, shortcut_prob))
                       for i in range(start, stop)), report)
    return path


def _check_no_stale_shards(out_dir: Path, n_shards: int) -> None:
    expected = {shard_name(i) for i in range(n_shards)}
    stale = sorted(p.name for p in out_dir.glob("shard-*.tar") if p.name not in expected)
    if stale:
        raise FileExistsError(
            f"{out_dir} already holds shards that would not belong to this dataset: "
            f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}; remove them or pick another directory"
        )


@dataclass(frozen=True)
class SyntheticOptions(Options):
    """The synthetic concept dataset to write (`make-data`; a build's `data.synthetic`)."""

    section: ClassVar[str] = "data.synthetic"

    n: int = option(help="number of images", min=1)
    seed: int = option(0, "seed of the scenes", min=0)
    size: int = option(128, "image side in pixels", min=16)
    shard_size: int = option(1000, "images per shard", min=1)
    shortcut_prob: float = option(0.0, "probability that the largest object has its class's "
                                  "shortcut colour", min=0, max=1)
    workers: int | None = option(None, "render processes (default: up to 2)", runtime=True,
                                 min=1)


def write_shards(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    size: int = 128,
    shard_size: int = 1000,
    shortcut_prob: float = 0.0,
    workers: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write ``n`` images as WebDataset shards ``out_dir/shard-000000.tar, ...`` plus ``dataset.json``.

    Shard ``i`` holds global indices ``[i * shard_size, min(n, (i + 1) * shard_size))`` with
    members ``%08d.png`` (lossless), ``.cls`` (ASCII int) and ``.json`` (``render_sample``'s
    metadata). Each shard is written under a temporary name and renamed when complete; the
    bytes of every shard are the same for any ``workers`` (default ``min(2, n_shards)``
    processes). Returns the shard paths in order.

    With ``workers > 1`` the processes are started with the ``spawn`` method, which re-imports
    the caller's main module: call this from a script under ``if __name__ == "__main__":``.
    ``progress`` shows a tqdm bar with images/s.
    """
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be positive, got n={n}, shard_size={shard_size}")
    _check_args(seed, 0, size, shortcut_prob)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    _check_no_stale_shards(out, n_shards)
    workers = min(2, n_shards) if workers is None else max(1, min(workers, n_shards))
    ranges = [(i * shard_size, min(n, (i + 1) * shard_size)) for i in range(n_shards)]
    jobs = [(out, i, start, stop, seed, size, shortcut_prob) for i, (start, stop) in enumerate(ranges)]

    with tqdm(total=n, unit="img", desc="make-data", disable=not progress) as bar:
        paths = run_jobs(_write_shard, jobs, workers, bar)

    spec = {
        "generator": "pipeline.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "shard_size": shard_size,
        "shortcut_prob": shortcut_prob,
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": {k: list(v) for k, v in COLOURS.items()},
            "textures": list(TEXTURES),
            "backgrounds": list(BACKGROUNDS),
        },
        "class_names": list(CLASS_NAMES),
        "class_rule": "class = index in shapes of the object with the largest visible pixel area",
        "shortcut_colours": dict(zip(CLASS_NAMES, SHORTCUT_COLOURS)),
        "members": {"png": "RGB image, lossless", "cls": "class as ASCII int", "json": "metadata"},
        "mask_format": "RLE {size: [H, W], counts}: alternating False/True run lengths, row-major, False first",
        "shards": [{"name": p.name, "first_index": a, "count": b - a} for p, (a, b) in zip(paths, ranges)],
    }
    tmp = out / ".dataset.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, out / "dataset.json")
    return paths
