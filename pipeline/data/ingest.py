"""Your own images as WebDataset shards (`concept-atlas make-shards SRC OUT`); the format is
described in docs/data.md.

Sources, found in a deterministic order (sorted relative paths):
- a folder in the ImageFolder layout (`SRC/CLASS/…/image.jpg`): labels from the first-level
  folder names, sorted, as in torchvision;
- any other folder, or a glob (`photos/**/*.jpg`): every image file, unlabelled;
- a CSV or Parquet table of paths (column `path_column`, relative to the table's folder), with
  an optional label column (integers, or names numbered in sorted order).

Each image is decoded with the project's one rule (`pipeline.data.images`: EXIF orientation,
16-bit grey, transparency), optionally resized (shorter side) and centre-cropped, or cut into
several seeded random crops, and written as `KEY.jpg` (or `.png`), `KEY.cls` when labelled and
`KEY.json` (its source file, crop box and label name). A file that cannot be read is recorded
in `OUT/errors.parquet` (the `errors` table's columns) and left out. Shards are written in
parallel processes, each atomically; a shard whose inputs and options are unchanged since it
was written is kept on a re-run, and `dataset.json`, written last, marks a complete set.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from pipeline.data.errors import ErrorRecord
from pipeline.data.images import ImageDecodeError, decode
from pipeline.data.tars import run_jobs, shard_name, write_shard
from pipeline.stage import Options, option

STAGE = "make-shards"
EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp")
RECORDS = ".make-shards"  # per-shard records of what each shard was made from


@dataclass(frozen=True)
class ShardsOptions(Options):
    """Which images, and how they become shards."""

    section: ClassVar[str] = "data.images"

    src: str = option(help="a folder (ImageFolder layout: labels from sub-folder names), a "
                      "glob, or a .csv / .parquet table of paths", input=True)
    resize: int | None = option(None, "resize the shorter side to this many pixels first "
                                "(default: to --crop, when one is given)", min=8)
    crop: int | None = option(None, "centre-crop a square of this side (after the resize)",
                              min=8)
    crops: int = option(1, "random square crops per image (at least half its shorter side, "
                        "seeded) instead of one centre crop", min=1)
    seed: int = option(0, "seed of the random crops", min=0)
    format: str = option("jpg", "image format inside the shards", choices=("jpg", "png"))
    quality: int = option(90, "JPEG quality", min=1, max=100)
    shard_size: int = option(1000, "images per shard", min=1)
    path_column: str = option("path", "a table's column of image paths")
    label_column: str | None = option(None, "a table's column of labels (ints or names)")
    workers: int | None = option(None, "processes (default: up to 2)", runtime=True, min=1)

    def check(self) -> None:
        if self.crops > 1 and self.crop is None:
            raise ValueError(f"data.images.crops={self.crops}: random crops need a crop size "
                             "(--crop), the side they are resized to")


@dataclass(frozen=True)
class Source:
    """One image file of the input: its path, its path relative to SRC, its label (-1: none)."""

    path: str
    rel: str
    label: int


def find_sources(src: str, path_column: str = "path",
                 label_column: str | None = None) -> tuple[list[Source], list[str] | None]:
    """The image files of `src` in order, and the class names (None when unlabelled).

    Raises FileNotFoundError when `src` names nothing, ValueError for a table without its
    columns or a source without any image.
    """
    if src.lower().endswith((".csv", ".parquet")):
        return _from_table(src, path_column, label_column)
    if any(c in src for c in "*?["):
        paths = sorted(p for p in glob.glob(src, recursive=True) if _is_image(p))
        base = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else "."
        sources = [Source(p, os.path.relpath(p, base), -1) for p in paths]
        names = None
    elif os.path.isdir(src):
        sources, names = _from_folder(src)
    else:
        raise FileNotFoundError(f"{src}: no such folder, table or glob of images")
    if not sources:
        raise ValueError(f"{src}: no image files ({', '.join(EXTENSIONS)})")
    return sources, names


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and path.rsplit(".", 1)[-1].lower() in EXTENSIONS


def _from_folder(src: str) -> tuple[list[Source], list[str] | None]:
    files = sorted(os.path.relpath(os.path.join(d, f), src)
                   for d, _, names in os.walk(src) for f in names
                   if _is_image(os.path.join(d, f)) and not f.startswith("."))
    nested = files and all(os.sep in f for f in files)
    if not nested:
        return [Source(os.path.join(src, f), f, -1) for f in files], None
    names = sorted({f.split(os.sep, 1)[0] for f in files})
    index = {n: i for i, n in enumerate(names)}
    return [Source(os.path.join(src, f), f, index[f.split(os.sep, 1)[0]]) for f in files], names


def _from_table(src: str, path_column: str,
                label_column: str | None) -> tuple[list[Source], list[str] | None]:
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such table")
    table = pq.read_table(src) if src.lower().endswith(".parquet") else pacsv.read_csv(src)
    for column in (path_column, label_column):
        if column is not None and column not in table.column_names:
            raise ValueError(f"{src}: no column {column!r}; columns: {table.column_names}")
    base = os.path.dirname(os.path.abspath(src))
    paths = [p if os.path.isabs(p) else os.path.join(base, p)
             for p in table.column(path_column).to_pylist()]
    labels: list[int] = [-1] * len(paths)
    names = None
    if label_column is not None:
        raw = table.column(label_column).to_pylist()
        if all(isinstance(v, int) or v is None for v in raw):
            labels = [-1 if v is None else int(v) for v in raw]
        else:
            names = sorted({str(v) for v in raw if v is not None})
            index = {n: i for i, n in enumerate(names)}
            labels = [-1 if v is None else index[str(v)] for v in raw]
    sources = [Source(p, os.path.relpath(p, base), lab) for p, lab in zip(paths, labels)]
    return sorted(sources, key=lambda s: s.rel), names


def plan_shards(sources: list[Source], options: ShardsOptions) -> list[list[tuple[Source, int]]]:
    """(source, crop number) pairs per shard: every source `crops` times, in order."""
    items = [(s, c) for s in sources for c in range(options.crops)]
    return [items[i:i + options.shard_size] for i in range(0, len(items), options.shard_size)]


def shard_digest(items: list[tuple[Source, int]], options: ShardsOptions) -> str:
    """What a shard is made of: its sources (paths, sizes, times, labels) and the options."""
    h = hashlib.sha256(json.dumps(options.identity(), sort_keys=True).encode())
    for source, crop in items:
        stat = os.stat(source.path) if os.path.exists(source.path) else None
        h.update(json.dumps([source.rel, source.label, crop,
                             stat and (stat.st_size, stat.st_mtime_ns)]).encode())
    return h.hexdigest()[:16]


def write_one(out: str, shard: int, first: int, items: list[tuple[Source, int]],
              options: ShardsOptions, names: list[str] | None,
              report: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Write shard `shard` (keys `first`, `first` + 1, ...); the error rows of its sources."""
    errors: list[dict[str, Any]] = []

    def samples():
        for i, (source, crop) in enumerate(items):
            try:
                with open(source.path, "rb") as f:
                    image = decode(f.read())
            except (OSError, ImageDecodeError) as exc:
                errors.append(asdict(ErrorRecord(STAGE, shard_name(shard), source.rel,
                                                 f"{source.rel}: {exc}")))
                continue
            image, box = _shape(image, options, source.rel, crop)
            sample = {"__key__": f"{first + i:08d}", options.format: _encode(image, options)}
            if source.label >= 0:
                sample["cls"] = str(source.label).encode("ascii")
            meta = {"source": source.rel, "box": box}
            if names is not None and source.label >= 0:
                meta["label_name"] = names[source.label]
            sample["json"] = json.dumps(meta, separators=(",", ":")).encode()
            yield sample

    write_shard(Path(out) / shard_name(shard), samples(), report)
    return errors


def _shape(image: Image.Image, options: ShardsOptions, rel: str,
           crop: int) -> tuple[Image.Image, list[int]]:
    """Resize, then the centre crop or random crop number `crop`; the crop box in the resized
    image's pixels [x, y, w, h]."""
    # a crop without a resize is taken from the image brought to the crop's scale first (a
    # 224 crop of a 4000-pixel photo would otherwise be a detail of it)
    resize = options.resize if options.resize is not None or options.crops > 1 else options.crop
    if resize is not None:
        w, h = image.size
        scale = resize / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BICUBIC)
    w, h = image.size
    if options.crop is None:
        return image, [0, 0, w, h]
    if options.crops == 1:
        side = min(w, h, options.crop)
        x, y = (w - side) // 2, (h - side) // 2
    else:
        # seeded by the file and crop number: the same crops whatever the order or process
        seed = int.from_bytes(hashlib.sha256(f"{options.seed}:{rel}:{crop}".encode()).digest()[:8],
                              "little")
        rng = np.random.default_rng(seed)
        side = int(rng.integers(math.ceil(min(w, h) / 2), min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    box = [x, y, side, side]
    image = image.crop((x, y, x + side, y + side))
    if side != options.crop:
        image = image.resize((options.crop, options.crop), Image.Resampling.BICUBIC)
    return image, box


def _encode(image: Image.Image, options: ShardsOptions) -> bytes:
    buf = io.BytesIO()
    if options.format == "jpg":
        image.save(buf, "JPEG", quality=options.quality)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()


def make_shards(out: str, options: ShardsOptions, progress: bool = True) -> dict[str, Any]:
    """The make-shards stage into the local folder `out`; a summary (images, shards, errors,
    shards kept from an earlier run)."""
    sources, names = find_sources(options.src, options.path_column, options.label_column)
    shards = plan_shards(sources, options)
    Path(out, RECORDS).mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in Path(out).glob("shard-*.tar")
                   if int(p.name[6:12]) >= len(shards))
    if stale:
        raise FileExistsError(f"{out} holds shards beyond this set's {len(shards)}: "
                              f"{', '.join(stale[:5])}; remove them or use another folder")
    jobs, kept, digests, firsts = [], 0, [], []
    first = 0
    for i, items in enumerate(shards):
        digest = shard_digest(items, options)
        record = Path(out, RECORDS, f"{shard_name(i)}.json")
        if (record.is_file() and Path(out, shard_name(i)).is_file()
                and json.loads(record.read_text())["digest"] == digest):
            kept += 1
        else:
            jobs.append((out, i, first, items, options, names))
        digests.append(digest)
        firsts.append(first)
        first += len(items)
    workers = min(2, max(1, len(jobs))) if options.workers is None else options.workers
    total = sum(len(job[3]) for job in jobs)
    with tqdm(total=total, unit="img", desc=STAGE, disable=not progress or not jobs) as bar:
        results = run_jobs(write_one, jobs, min(workers, max(1, len(jobs))), bar)
    for job, errors in zip(jobs, results):
        Path(out, RECORDS, f"{shard_name(job[1])}.json").write_text(json.dumps(
            {"digest": digests[job[1]], "errors": errors}))
    errors = [e for i in range(len(shards)) for e in json.loads(
        Path(out, RECORDS, f"{shard_name(i)}.json").read_text())["errors"]]
    pq.write_table(pa.Table.from_pylist(errors, schema=_ERRORS), Path(out, "errors.parquet"))
    counts = [len(items) - sum(e["shard"] == shard_name(i) for e in errors)
              for i, items in enumerate(shards)]
    spec = {
        "generator": "concept-atlas make-shards", "source": os.path.abspath(options.src),
        "options": options.identity(), "n": sum(counts), "class_names": names,
        "labelled": any(s.label >= 0 for s in sources), "errors": len(errors),
        "members": {options.format: "RGB image", "cls": "class index as ASCII int (labelled "
                    "images only)", "json": "source file, crop box [x, y, w, h], label name"},
        "shards": [{"name": shard_name(i), "first_index": f, "count": c}
                   for i, (f, c) in enumerate(zip(firsts, counts))],
    }
    tmp = Path(out, ".dataset.json.tmp")
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, Path(out, "dataset.json"))
    return {"images": spec["n"], "shards": len(shards), "kept": kept, "errors": len(errors),
            "classes": len(names) if names else None}


_ERRORS = pa.schema([("stage", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                     ("reason", pa.string())])
