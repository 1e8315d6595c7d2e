"""compare_atlases: two builds of the same atlas are equal but for the columns named as varying;
any other difference is found and named."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tiny import copy_of

from jobs.cli import main
from pipeline.atlas.compare import VARYING, compare_atlases


def test_a_copy_whose_times_and_workers_differ_is_equal(atlas, tmp_path) -> None:
    copy = Path(copy_of(atlas, tmp_path / "copy"))
    for record in (copy / "manifest").rglob("*.json"):  # another run: other times and workers
        doc = json.loads(record.read_text())
        doc.update(started=doc["started"] + 100, finished=doc["finished"] + 100, worker="x:1")
        record.write_text(json.dumps(doc))
    result = compare_atlases(atlas, str(copy))
    assert result.equal and result.same > 10, result.text()
    assert {"started", "finished", "worker"} <= VARYING


def test_a_changed_value_an_extra_file_and_changed_weights_are_named(atlas, tmp_path) -> None:
    copy = Path(copy_of(atlas, tmp_path / "copy"))
    images = copy / "images" / "part-000001.parquet"
    table = pq.read_table(images)
    labels = table.column("label").to_pylist()
    labels[3] = (labels[3] or 0) + 1
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array(labels, pa.int32())), images)
    (copy / "extra.txt").write_text("x")
    pfv = next((copy / "pfv" / "layer=layer2").glob("*.npy"))
    values = np.load(pfv)
    values[0, 0] += 1
    np.save(pfv, values)
    result = compare_atlases(atlas, str(copy))
    assert not result.equal and result.only_b == ["extra.txt"]
    assert "column 'label': 1 rows differ" in result.differ["images/part-000001.parquet"]
    assert result.differ[str(pfv.relative_to(copy))] == f"1 of {values.size} values differ"
    assert main(["compare", atlas, str(copy), "--skip", "extra.txt", "images/", "pfv/"]) == 0
    assert main(["compare", atlas, str(copy)]) == 1
