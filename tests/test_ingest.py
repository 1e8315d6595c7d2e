"""make-shards: your images as shards, deterministic, resumable, with labels, class names and
the unreadable files recorded; a build reads them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.build import run as build
from jobs.cli import main
from pipeline.data.errors import ErrorLog
from pipeline.data.ingest import ShardsOptions, find_sources
from pipeline.data.shards import expand_shards, iter_samples


def photo(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30),
          mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257))
    elif mode != "RGB":
        im = im.convert(mode)
    im.save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An ImageFolder tree: cats (3 photos, one of them 16-bit grey), dogs (2), one broken."""
    root = tmp_path / "photos"
    photo(root / "cats" / "a.jpg", (200, 30, 30))
    photo(root / "cats" / "b.png", (120, 120, 120), mode="I;16")
    photo(root / "cats" / "sub" / "c.jpg", (210, 40, 40), size=(30, 60))
    photo(root / "dogs" / "d.jpg", (30, 30, 200))
    photo(root / "dogs" / "e.png", (40, 40, 210), mode="P")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def read(out: Path) -> list[dict]:
    errors = ErrorLog()
    samples = list(iter_samples(expand_shards(str(out)), errors))
    assert not list(errors)
    return [{"key": s.key, "cls": s.cls, "meta": s.meta, "size": s.image.size,
             "mean": np.asarray(s.image).reshape(-1, 3).mean(0).round(0).tolist()}
            for s in samples]


def digest(out: Path) -> list[str]:
    return [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))]


def test_an_image_folder_becomes_labelled_shards(folder, tmp_path, capsys) -> None:
    out = tmp_path / "shards"
    assert main(["make-shards", str(folder), str(out), "--crop", "24", "--shard-size", "2",
                 "--format", "png", "--no-progress"]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["class_names"] == ["cats", "dogs"] and spec["n"] == 5 and spec["errors"] == 1
    samples = read(out)
    assert [s["cls"] for s in samples] == [0, 0, 0, 1, 1]
    assert [s["meta"]["source"] for s in samples] == [
        "cats/a.jpg", "cats/b.png", os.path.join("cats", "sub", "c.jpg"), "dogs/d.jpg",
        "dogs/e.png"]
    assert all(s["size"] == (24, 24) for s in samples)
    assert samples[1]["mean"] == [120, 120, 120]  # the 16-bit grey photo, not white
    assert samples[3]["meta"]["label_name"] == "dogs"
    [error] = pq.read_table(out / "errors.parquet").to_pylist()
    assert error["key"] == "dogs/broken.jpg" and "not a recognised image format" in error["reason"]
    assert "5 images in 3 shards (0 kept), 2 classes, 1 unreadable" in capsys.readouterr().out


def test_shards_are_the_same_bytes_whatever_the_workers_and_a_rerun_keeps_them(folder,
                                                                             tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["make-shards", str(folder), str(one), "--crop", "16", "--shard-size", "2",
                 "--workers", "1", "--no-progress"]) == 0
    assert main(["make-shards", str(folder), str(two), "--crop", "16", "--shard-size", "2",
                 "--workers", "2", "--no-progress"]) == 0
    assert digest(one) == digest(two) and len(digest(one)) == 3
    stamps = [p.stat().st_mtime_ns for p in sorted(one.glob("shard-*.tar"))]
    photo(folder / "dogs" / "d.jpg", (0, 0, 120))  # one input changes: its shard only
    assert main(["make-shards", str(folder), str(one), "--crop", "16", "--shard-size", "2",
                 "--no-progress"]) == 0
    after = [p.stat().st_mtime_ns for p in sorted(one.glob("shard-*.tar"))]
    assert after[:2] == stamps[:2] and after[2] != stamps[2]  # d.jpg is in the third


def test_a_table_of_paths_with_label_names_and_random_crops(folder, tmp_path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("path,label\nphotos/cats/a.jpg,red\nphotos/dogs/d.jpg,blue\n")
    out = tmp_path / "shards"
    assert main(["make-shards", str(table), str(out), "--label-column", "label", "--crop", "12",
                 "--crops", "3", "--no-progress"]) == 0
    samples = read(out)
    assert json.loads((out / "dataset.json").read_text())["class_names"] == ["blue", "red"]
    assert [s["cls"] for s in samples] == [1, 1, 1, 0, 0, 0]
    boxes = [tuple(s["meta"]["box"]) for s in samples[:3]]
    assert len(set(boxes)) == 3 and all(b[2] == b[3] >= 6 for b in boxes)  # >= half the side


def test_a_glob_is_unlabelled_and_a_bad_source_is_named(folder, tmp_path) -> None:
    sources, names = find_sources(str(folder / "**" / "*.jpg"))
    assert names is None and {s.label for s in sources} == {-1} and len(sources) == 4
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_sources(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="crops=3: random crops need a crop size"):
        ShardsOptions(src="x", crops=3)


def test_a_build_reads_your_images(folder, tmp_path) -> None:
    config = {"atlas_id": "mine", "data": {"images": {"src": str(folder), "crop": 32,
                                                      "crops": 2, "shard_size": 3}},
              "model": {"name": "demo_resnet", "weights": "none"},
              "extract": {"layers": ["layer4"], "positions": 2, "in_process": True}}
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    results = build(str(path), out=str(tmp_path / "atlas"), progress=False)
    assert results["make-shards"]["images"] == 10 and results["extract"]["images"] == 10
    images = pq.read_table(tmp_path / "atlas" / "images").to_pydict()
    assert sorted(images["label"]) == [0] * 6 + [1] * 4
    # both crops of a photo name it as their source (the scan's dedup groups them)
    assert sorted(images["source"]) == sorted(2 * ["cats/a.jpg", "cats/b.png", "cats/sub/c.jpg",
                                                   "dogs/d.jpg", "dogs/e.png"])
    assert None not in images["phash"]
