"""Every stage command: `--help` with examples, the atlas root first, one clean line and exit 2
for a bad value, exit 1 when a part (or the stage) failed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny import copy_of

from jobs.cli import main
from jobs.stages import STAGES

NAMES = [s.name for s in STAGES]
# per stage: flags with one value its options refuse, and the start of the refusal
BAD = {
    "make-data": (["--n", "0"], "data.synthetic.n=0: expected an int >= 1"),
    "make-shards": (["--crop", "4"], "data.images.crop=4: expected None or an int >= 8"),
    "extract": (["--shards", "x.tar", "--model", "demo_resnet", "--layers", "layer2",
                 "--actors", "0"], "extract.actors=0: expected an int >= 1"),
    "train-sae": (["--layers", "layer2", "--steps", "0"], "train_sae.steps=0: expected an int"),
    "scan": (["--n-top", "0"], "scan.n_top=0: expected an int >= 1"),
    "cafe": (["--mask-mass", "1.5"], "cafe.mask_mass=1.5: expected a fraction in (0, 1]"),
    "index": (["--exact-below", "-1"], "index.exact_below=-1: expected an int >= 0"),
    "icat": (["--top-edges", "0"], "icat.top_edges=0: expected an int >= 1"),
}


@pytest.mark.parametrize("name", NAMES)
def test_help_lists_examples_and_the_atlas_root_first(name, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    usage, examples = out.split("examples:")
    assert usage.rstrip().splitlines()[0].startswith(f"usage: concept-atlas {name}")
    assert ("[OUT]" if name.startswith("make-") else "[ATLAS]") in usage
    assert "--no-progress" in usage
    assert examples.count(f"concept-atlas {name} ") >= 1


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_value_is_one_line_and_exit_2_before_any_work(name, tmp_path, capsys) -> None:
    flags, refusal = BAD[name]
    root = tmp_path / "atlas"
    source = [str(tmp_path / "photos")] if name == "make-shards" else []  # `make-shards SRC OUT`
    assert main([name, *source, str(root), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"concept-atlas {name}: error: {refusal}"), err
    assert not root.exists()


def test_the_old_out_flag_still_names_the_root_with_a_deprecation_line(tmp_path, capsys) -> None:
    assert main(["make-data", "--out", str(tmp_path / "data"), "--n", "3", "--size", "32",
                 "--no-progress"]) == 0
    assert "--out is deprecated" in capsys.readouterr().err
    assert (tmp_path / "data" / "dataset.json").is_file()
    assert main(["scan", "--no-progress"]) == 2  # no root at all: named
    assert "give the atlas root" in capsys.readouterr().err


def failing(*_args, **_kwargs):
    raise RuntimeError("the part broke")


@pytest.mark.parametrize("name, target", [
    ("extract", "pipeline.pfv.extract.ShardExtractor.run"),
    ("scan", "jobs.scan.scan_task"),
    ("cafe", "pipeline.cafe.stage.CafeWorker.run"),
    ("icat", "pipeline.icat.stage.ShardScorer.run"),
])
def test_a_failed_part_is_recorded_and_exits_1(name, target, atlas, tmp_path, monkeypatch,
                                                capsys) -> None:
    root = copy_of(atlas, tmp_path / "atlas")
    if name == "extract":  # a fresh output from the tiny atlas's shards
        shards = sorted(str(p) for p in Path(atlas).parent.parent.glob("**/data/shard-*.tar"))
        shutil.rmtree(root)
        flags = ["--shards", *shards[:2], "--model", "demo_resnet", "--weights", "none",
                 "--layers", "layer2", "--positions", "2", "--atlas-id", "t"]
    elif name == "cafe":  # picks to explain first
        assert main(["scan", root, "--in-process", "--no-progress", "--n-top", "1",
                     "--n-quantile", "1", "--sample-size", "2"]) == 0
        flags = ["--faithfulness-per-latent", "0"]
    else:
        flags = ["--images-per-shard", "1", "--steps", "2"] if name == "icat" else []
    monkeypatch.setattr(target, failing)
    assert main([name, root, *flags, "--in-process", "--no-progress"]) == 1
    assert "the part broke" in capsys.readouterr().err
    stage = "icat-map" if name == "icat" else name
    errors = [row for f in Path(root, "errors", f"stage={stage}").glob("*.parquet")
              for row in pq.read_table(f).to_pylist()]
    assert errors and {e["reason"] for e in errors} == {"RuntimeError: the part broke"}


@pytest.mark.parametrize("name, target", [
    ("train-sae", "pipeline.sae.stage.train_run"),
    ("index", "pipeline.atlas.index.build_index"),
])
def test_a_failed_stage_exits_1_with_its_reason(name, target, atlas, tmp_path, monkeypatch,
                                                capsys) -> None:
    root = copy_of(atlas, tmp_path / "atlas")
    flags = ["--layers", "layer2", "--n-latents", "16", "--k", "2", "--steps", "2",
             "--in-process"] if name == "train-sae" else []
    monkeypatch.setattr(target, failing)
    assert main([name, root, *flags, "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"concept-atlas {name}: failed: RuntimeError: the part broke")


def test_layers_are_listed_in_model_order_and_filtered(capsys) -> None:
    assert main(["layers", "--model", "demo_resnet", "--weights", "none", "--depth", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines[1:-1]]
    assert names == ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert lines[5].split()[:2] == ["layer1", "*"]  # a feature stage is marked
    assert main(["layers", "--model", "demo_resnet", "--weights", "none", "--kind", "batchnorm",
                 "--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert "bn1" in out and "conv1" not in out and "1 of" in out.splitlines()[-1]
    assert main(["layers", "--model", "demo_resnet", "--weights", "none", "--kind", "lstm"]) == 2
