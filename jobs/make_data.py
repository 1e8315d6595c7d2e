"""The data stages: `make-data` (the synthetic concept dataset) and `make-shards` (your own
images) as WebDataset shards.

The shards themselves come from `pipeline.data.synthetic.write_shards` and
`pipeline.data.ingest.make_shards`; `make-data` adds what a build needs around it: keeping an
identical dataset that is already there, refusing another, and writing to a remote folder
(fsspec URL) through a local one.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.data.ingest import ShardsOptions, make_shards
from pipeline.data.synthetic import SyntheticOptions, write_shards
from pipeline.store import fs


def synthetic_mismatch(out: str, options: SyntheticOptions) -> str:
    """'' when `out` holds no dataset or the one `options` describe, else the differences."""
    url = fs.join(out, "dataset.json")
    if not fs.exists(url):
        return ""
    spec = fs.read_json(url)
    wanted = options.identity()
    return ", ".join(f"{k}: {spec.get(k)!r} -> {v!r}" for k, v in wanted.items()
                     if spec.get(k) != v)


def run(out: str, options: SyntheticOptions, *, progress: bool = True) -> dict[str, Any]:
    """The make-data stage: write the dataset into `out` (a local folder or an fsspec URL), or
    keep the identical one already there; {"images", "reused"}.

    A remote `out` gets the shards written locally, then uploaded one object each with
    `dataset.json` last (it marks a complete dataset). Raises ValueError when `out` holds
    another synthetic dataset.
    """
    differs = synthetic_mismatch(out, options)
    if differs:
        raise ValueError(f"{out} holds another synthetic dataset ({differs}); delete it or use "
                         "another output folder")
    if fs.exists(fs.join(out, "dataset.json")):
        print(f"[make-data] reusing {options.n} synthetic images in {out}", flush=True)
        return {"images": options.n, "reused": True}
    t = time.time()
    local = fs.local_path(out)
    with tempfile.TemporaryDirectory(prefix="make-data-") as tmp:
        paths = write_shards(local or tmp, n=options.n, seed=options.seed, size=options.size,
                             shard_size=options.shard_size, shortcut_prob=options.shortcut_prob,
                             workers=options.workers, progress=progress)
        if local is None:
            for path in [*paths, Path(tmp) / "dataset.json"]:
                data = path.read_bytes()
                fs.write_atomic(fs.join(out, path.name), lambda f, d=data: f.write(d))
    print(f"[make-data] wrote {options.n} images to {out} in {time.time() - t:.1f}s", flush=True)
    return {"images": options.n, "reused": False}


def shards(out: str, options: ShardsOptions, *, progress: bool = True) -> dict[str, Any]:
    """The make-shards stage: the images of `options.src` as shards in the local folder `out`
    (shards whose inputs are unchanged are kept); its summary, also printed."""
    local = fs.local_path(out)
    if local is None:
        raise ValueError(f"make-shards writes to a local folder, not {out}: write locally, then "
                         "copy the folder to your bucket")
    t = time.time()
    summary = make_shards(local, options, progress)
    classes = f", {summary['classes']} classes" if summary["classes"] else ", unlabelled"
    print(f"[make-shards] {summary['images']} images in {summary['shards']} shards "
          f"({summary['kept']} kept){classes}, {summary['errors']} unreadable files "
          f"(errors.parquet) -> {out} in {time.time() - t:.1f}s", flush=True)
    return summary
