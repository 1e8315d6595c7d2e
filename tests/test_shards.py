"""Shard lists, rank splits, and reading that records every failure and loses nothing else."""
from __future__ import annotations

import io
import shutil
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.data import synthetic as syn
from pipeline.data.errors import ErrorLog, ErrorRecord
from pipeline.data.shards import Sample, expand_shards, iter_samples, split_shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 shards of 10 images (32 px): keys 00000000..00000049."""
    out = tmp_path_factory.mktemp("shards")
    syn.write_shards(out, n=50, seed=4, size=32, shard_size=10, workers=1, progress=False)
    return out


def _members(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _data_offset(shard: Path, name: str) -> int:
    with tarfile.open(shard) as tf:
        return tf.getmember(name).offset_data


def _read(shards: list[str | Path], **kw) -> tuple[list[Sample], ErrorLog]:
    errors = ErrorLog()
    return list(iter_samples([str(s) for s in shards], errors, **kw)), errors


# --- expand_shards -------------------------------------------------------------------------


def test_brace_pattern_expands_in_order(dataset: Path):
    shards = expand_shards(str(dataset / "shard-{000000..000002}.tar"))
    assert shards == [str(dataset / f"shard-00000{i}.tar") for i in range(3)]


def test_directory_expands_to_its_tars_sorted(dataset: Path):
    assert expand_shards(dataset) == [str(dataset / f"shard-00000{i}.tar") for i in range(5)]


def test_list_keeps_order_and_drops_duplicates(dataset: Path):
    a, b = str(dataset / "shard-000003.tar"), str(dataset / "shard-000001.tar")
    assert expand_shards([a, b, a]) == [a, b]


def test_glob_and_file_url_expand(dataset: Path):
    assert expand_shards(str(dataset / "shard-00000[13].tar")) == [
        str(dataset / "shard-000001.tar"),
        str(dataset / "shard-000003.tar"),
    ]
    urls = expand_shards(f"file://{dataset}/shard-*.tar")
    assert len(urls) == 5 and all(u.startswith("file://") for u in urls)


def test_memory_url_glob_and_directory_expand_and_read(dataset: Path):
    root = f"/atlas-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(f"{root}/shard-00000{i}.tar", (dataset / f"shard-00000{i}.tar").read_bytes())
    try:
        by_glob = expand_shards(f"memory://{root}/*.tar")
        assert by_glob == [f"memory://{root}/shard-000000.tar", f"memory://{root}/shard-000001.tar"]
        assert expand_shards(f"memory://{root}") == by_glob
        samples, errors = _read(by_glob)
        assert len(samples) == 20 and len(errors) == 0
        assert samples[0].shard == by_glob[0]
    finally:
        fs.rm(root, recursive=True)


def test_missing_local_shards_are_named(dataset: Path):
    with pytest.raises(FileNotFoundError) as info:
        expand_shards(str(dataset / "shard-{000000..000006}.tar"))
    message = str(info.value)
    assert "shard-000005.tar" in message and "shard-000006.tar" in message
    assert "shard-000004.tar" not in message


def test_empty_expansion_names_the_spec(tmp_path: Path):
    with pytest.raises(ValueError, match="nothing-here"):
        expand_shards(str(tmp_path / "nothing-here-*.tar"))
    with pytest.raises(ValueError, match=str(tmp_path)):
        expand_shards(tmp_path)


# --- split_shards --------------------------------------------------------------------------


def test_split_gives_every_shard_to_exactly_one_rank():
    shards = [f"s{i}" for i in range(7)]
    for world_size in range(1, 10):
        parts = [split_shards(shards, r, world_size) for r in range(world_size)]
        assert sorted(s for part in parts for s in part) == sorted(shards)
        assert sum(len(p) for p in parts) == len(shards)
    assert split_shards(shards, 1, 3) == ["s1", "s4"]
    assert split_shards(shards, 1, 3) == split_shards(shards, 1, 3)


def test_split_rejects_bad_rank_or_world_size():
    with pytest.raises(ValueError, match="rank"):
        split_shards(["a"], 2, 2)
    with pytest.raises(ValueError, match="rank"):
        split_shards(["a"], -1, 2)
    with pytest.raises(ValueError, match="world_size"):
        split_shards(["a"], 0, 0)


# --- iter_samples --------------------------------------------------------------------------


def test_good_shards_read_back_exactly(dataset: Path):
    samples, errors = _read(expand_shards(dataset))
    assert len(errors) == 0
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(50)]
    for s in samples[:5] + samples[-2:]:
        img, meta = syn.render_sample(4, int(s.key), size=32)
        assert s.image.mode == "RGB" and np.array_equal(np.asarray(s.image), img)
        assert s.cls == meta["class"] and s.meta["objects"][0]["mask"] == meta["objects"][0]["mask"]
    skipped, _ = _read([dataset / "shard-000000.tar"], decode_image=False)
    assert len(skipped) == 10 and all(s.image is None and s.cls is not None for s in skipped)


def test_bad_shards_are_recorded_and_the_rest_is_read(dataset: Path, tmp_path: Path):
    """3 good shards + 1 truncated inside sample 35 + 1 with a garbage png for sample 42."""
    for i in range(3):
        shutil.copy(dataset / f"shard-00000{i}.tar", tmp_path)
    src = dataset / "shard-000003.tar"
    cut = _data_offset(src, "00000035.png") + 100
    truncated = tmp_path / "shard-000003.tar"
    truncated.write_bytes(src.read_bytes()[:cut])
    members = [(n, b"\x89PNG garbage" if n == "00000042.png" else d) for n, d in _members(dataset / "shard-000004.tar")]
    garbage = _write_tar(tmp_path / "shard-000004.tar", members)

    samples, errors = _read(expand_shards(tmp_path), stage="extract")

    assert len(samples) == 30 + 5 + 9
    keys = [s.key for s in samples]
    assert keys[30:35] == [f"{i:08d}" for i in range(30, 35)]
    assert "00000035" not in keys and "00000042" not in keys and keys[-1] == "00000049"
    assert len(errors) == 2
    first, second = list(errors)
    assert (first.stage, first.shard, first.key) == ("extract", str(truncated), "00000035")
    assert "00000035" in first.reason and "unexpected end of data" in first.reason
    assert (second.stage, second.shard, second.key) == ("extract", str(garbage), "00000042")
    assert second.reason == "undecodable image 00000042.png: not a recognised image format"
    assert errors.to_rows()[1] == {"stage": "extract", "shard": str(garbage), "key": "00000042", "reason": second.reason}


def test_truncation_between_samples_keeps_the_last_complete_sample(dataset: Path, tmp_path: Path):
    src = dataset / "shard-000001.tar"
    with tarfile.open(src) as tf:
        cut = tf.getmember("00000016.png").offset  # the header of the 7th sample's first member
    shard = tmp_path / "cut.tar"
    shard.write_bytes(src.read_bytes()[:cut])
    samples, errors = _read([shard])
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(10, 16)]
    assert len(errors) == 1 and errors.records[0].key == "" and errors.records[0].shard == str(shard)
    assert "end-of-archive" in errors.records[0].reason


def test_garbage_header_mid_archive_is_not_a_silent_end(dataset: Path, tmp_path: Path):
    data = bytearray((dataset / "shard-000002.tar").read_bytes())
    with tarfile.open(dataset / "shard-000002.tar") as tf:
        header = tf.getmember("00000024.json").offset
    data[header : header + 512] = bytes(range(256)) * 2
    shard = tmp_path / "garbage-header.tar"
    shard.write_bytes(bytes(data))
    samples, errors = _read([shard])
    assert [s.key for s in samples] == [f"{i:08d}" for i in range(20, 24)]
    assert [(e.shard, e.key) for e in errors] == [(str(shard), "00000024")]


def test_non_tar_and_missing_shards_are_recorded_and_reading_goes_on(dataset: Path, tmp_path: Path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    gone = tmp_path / "gone.tar"
    samples, errors = _read([junk, gone, dataset / "shard-000000.tar"])
    assert len(samples) == 10
    assert [(e.shard, e.key) for e in errors] == [(str(junk), ""), (str(gone), "")]
    assert "FileNotFoundError" in errors.records[1].reason


def test_bad_label_bad_json_and_missing_image_are_recorded_per_sample(dataset: Path, tmp_path: Path):
    members = _members(dataset / "shard-000000.tar")
    replace = {"00000001.cls": b"not-an-int", "00000002.json": b"{broken", "00000003.json": b"[1, 2]"}
    edited = [(n, replace.get(n, d)) for n, d in members if n != "00000004.png"]
    shard = _write_tar(tmp_path / "edited.tar", edited)
    samples, errors = _read([shard])
    assert [s.key for s in samples] == ["00000000"] + [f"{i:08d}" for i in range(5, 10)]
    reasons = {e.key: e.reason for e in errors}
    assert list(reasons) == ["00000001", "00000002", "00000003", "00000004"]
    assert "bad class label 00000001.cls" in reasons["00000001"]
    assert "bad metadata 00000002.json" in reasons["00000002"]
    assert "expected a JSON object" in reasons["00000003"]
    assert "no image member" in reasons["00000004"]


def test_a_truncated_png_is_an_undecodable_image(dataset: Path, tmp_path: Path):
    members = [(n, d[: len(d) // 2] if n == "00000007.png" else d) for n, d in _members(dataset / "shard-000000.tar")]
    samples, errors = _read([_write_tar(tmp_path / "half-png.tar", members)])
    assert len(samples) == 9
    assert [e.key for e in errors] == ["00000007"] and "undecodable image 00000007.png" in errors.records[0].reason


def test_a_single_path_string_is_refused_with_a_hint(dataset: Path):
    with pytest.raises(TypeError, match="expand_shards"):
        iter_samples(str(dataset / "shard-000000.tar"), ErrorLog())


def test_error_log_collects_records_in_order():
    log = ErrorLog()
    log.append(ErrorRecord("read", "a.tar", "", "x"))
    log.append(ErrorRecord("read", "b.tar", "k", "y"))
    assert len(log) == 2 and [r.shard for r in log] == ["a.tar", "b.tar"]
    assert log.to_rows() == [
        {"stage": "read", "shard": "a.tar", "key": "", "reason": "x"},
        {"stage": "read", "shard": "b.tar", "key": "k", "reason": "y"},
    ]
