"""docs/architecture.md's example stage, run as written: one registry entry gives a build
config section and a command."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import stages
from jobs.build import run
from jobs.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def example_stage(monkeypatch) -> types.ModuleType:
    """The example of docs/architecture.md ("Adding a stage") as a module, its entry appended
    to a copy of the registry."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Adding a stage"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(stages, "STAGES", list(stages.STAGES))
    module = types.ModuleType("example_stage")
    monkeypatch.setitem(sys.modules, "example_stage", module)
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    return module


def test_the_example_stage_runs_through_build_and_the_command_line(example_stage, tmp_path,
                                                                    capsys) -> None:
    assert stages.STAGES[-1].name == "label-counts"
    config = {
        "atlas_id": "t", "data": {"synthetic": {"n": 12, "size": 32, "shard_size": 6}},
        "model": {"name": "demo_resnet", "weights": "none"},
        "extract": {"layers": ["layer2"], "positions": 2, "in_process": True},
        "label_counts": {"min_images": 1},
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    results = run(str(path), out=str(out), progress=False)
    counts = pq.read_table(out / "label_counts").to_pylist()
    labels = pq.read_table(out / "images").column("label").to_pylist()
    assert results["label-counts"] == {"labels": len(set(labels))}
    assert {r["label"]: r["images"] for r in counts} == {x: labels.count(x) for x in set(labels)}
    # the same entry is a command, with its options as flags
    most = max(labels.count(x) for x in set(labels))
    assert main(["label-counts", str(out), "--min-images", str(most)]) == 0
    assert all(r["images"] >= most for r in pq.read_table(out / "label_counts").to_pylist())
    assert main(["label-counts", str(out), "--min-images", "0"]) == 2
    assert "label_counts.min_images=0: expected an int >= 1" in capsys.readouterr().err
