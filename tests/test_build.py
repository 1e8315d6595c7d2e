"""`concept-atlas build`: the demo config, checks of every stage before any work, the stages."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import build
from jobs.build import check_build, load_build_config
from jobs.stages import STAGES
from pipeline.store import Manifest, PartRecord, check_stage_config, fs
from tiny import BUILD as TINY

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, config: dict, name: str = "build.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def with_changes(**sections) -> dict:
    """TINY with some sections replaced (None removes a section)."""
    config = {k: v for k, v in TINY.items()}
    for key, value in sections.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    return config


def test_demo_config_passes_every_check(tmp_path) -> None:
    cfg = load_build_config(REPO / "configs" / "demo.yaml", out=str(tmp_path / "out"))
    cfg.extract = dataclasses.replace(cfg.extract, weights=None)  # no trained weights needed
    checked = check_build(cfg)
    assert [s.name for s in STAGES if s.wanted(cfg)] == ["make-data", "extract", "train-sae",
                                                               "scan", "cafe", "index", "icat"]
    assert {n: s.channels for n, s in checked.specs.items()} == {"layer2": 32, "layer4": 128}
    assert checked.n_shards > cfg.train.holdout_parts
    assert all(r.cfg.k <= 32 for r in checked.runs) and {r.layer for r in checked.runs} == {
        "layer2", "layer4"}
    assert not (tmp_path / "out").exists()


def test_stage_registry_runs_in_order_and_refuses_unknown_stages(tmp_path) -> None:
    assert [s.name for s in STAGES] == ["make-data", "make-shards", "extract", "train-sae", "scan",
                                        "cafe", "index", "icat"]
    with pytest.raises(ValueError, match=r"unknown stages \['cafes'\]; stages: \['make-data'"):
        build.run(write_config(tmp_path, TINY), out=str(tmp_path / "out"), stages=["cafes"])


@pytest.mark.parametrize("changes, named", [
    (dict(extract={"layers": ["layer2", "layer7"]}), "unknown layer 'layer7'"),
    (dict(model={"name": "resnet5O"}), "unknown model 'resnet5O'"),
    (dict(data={"shards": "/nonexistent/shard-{000000..000002}.tar"}),
     "shard files not found: /nonexistent/shard-000000.tar"),
    (dict(train_sae={"sweep": [{"layer": "layer4", "sae": {"n_latents": 16, "k": 32}}]}),
     "k=32: must be <= n_latents=16"),
    (dict(train_sae={"sweep": [{"layer": "layer4", "sae": {"n_latents": 2**25}}]}),
     "n_latents=33554432 x d_in=128 needs"),
    (dict(train_sae={"sweep": [{"layer": "layer3", "sae": {"n_latents": 64}}]}),
     "layer 'layer3' is not extracted"),
    (dict(train_sae={"holdout_parts": 3, "sweep": TINY["train_sae"]["sweep"]}),
     "3 shards cannot hold out train_sae.holdout_parts=3"),
    (dict(extract={"layers": ["layer2"], "positions": 0}), "positions=0"),
    (dict(data={"synthetic": {"n": 24}, "shards": "x"}),
     "exactly one of 'synthetic' or 'images' or 'shards'"),
    (dict(modle={"name": "demo_resnet"}), "unknown keys \\['modle'\\]"),
    (dict(extract={"layers": ["layer2"], "actor": 2}), "extract: unknown keys \\['actor'\\]"),
    (dict(model=None), "missing section 'model'"),
    (dict(scan={"n_top": 0}), "scan.n_top=0: expected an int >= 1"),
    (dict(scan={"ntop": 3}), "scan: unknown keys \\['ntop'\\]"),
    (dict(train_sae=None), "section 'scan' needs section 'train_sae'"),
    (dict(scan=None), "section 'cafe' needs section 'scan'"),
    (dict(index={"exact_below": -1}), "index.exact_below=-1: expected an int >= 0"),
    (dict(cafe={"mask_mass": 1.5}), "mask_mass=1.5: expected a fraction in \\(0, 1\\]"),
    (dict(icat={"methods": ["ig", "lrp"]}), "methods=\\['ig', 'lrp'\\]: expected a non-empty subset"),
    # wrong types and bounds are caught by one typed schema, before any work
    (dict(icat={"steps": "8"}), "icat.steps='8': expected an int >= 1"),
    (dict(icat={"top_edges": 2.5}), "icat.top_edges=2.5: expected an int >= 1"),
    (dict(data={"synthetic": {"n": 24, "shard_size": 100.5}}),
     "data.synthetic.shard_size=100.5: expected an int >= 1"),
    (dict(data={"synthetic": {"n": 24, "shard_size": -1}}),
     "data.synthetic.shard_size=-1: expected an int >= 1"),
    (dict(data={"synthetic": {"n": 24, "size": "128"}}), "data.synthetic.size='128'"),
    (dict(data={"synthetic": {"n": True}}), "data.synthetic.n=True: expected an int"),
    (dict(extract=dict(TINY["extract"], actors=0)), "extract.actors=0: expected an int >= 1"),
    (dict(extract=dict(TINY["extract"], cpus_per_actor=-1)),
     "extract.cpus_per_actor=-1: expected a number > 0"),
])
def test_bad_config_fails_before_any_work(tmp_path, changes, named) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=named):
        build.run(write_config(tmp_path, with_changes(**changes)), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_output_built_with_another_config_is_refused_before_any_work(tmp_path) -> None:
    out = tmp_path / "out"
    check_stage_config(str(out), "extract", {"model": "demo_vit"})
    Manifest(str(out)).commit(PartRecord("extract", "part-000000", "x.tar", "f", "h", rows=1))
    with pytest.raises(ValueError, match="already holds 'extract' outputs built with another"):
        build.run(write_config(tmp_path, TINY), out=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["manifest", "stages"]


def test_a_config_recorded_by_a_run_that_committed_nothing_is_replaced(tmp_path) -> None:
    # a run refused or stopped before its first part binds no config: the corrected one runs
    out = tmp_path / "out"
    check_stage_config(str(out), "extract", {"model": "demo_vit"})
    config = with_changes(extract=dict(TINY["extract"], layers=["layer4"]), train_sae=None,
                          scan=None, cafe=None, index=None, icat=None)
    results = build.run(write_config(tmp_path, config), out=str(out))
    assert results["extract"]["parts_new"] == 3
    assert fs.read_json(str(out / "stages" / "extract.json"))["config"]["layers"] == ["layer4"]


def test_tiny_build_runs_every_stage_and_a_rerun_skips_them(tmp_path) -> None:
    out = str(tmp_path / "out")
    config = write_config(tmp_path, TINY)
    results = build.run(config, out=out)
    assert results["make-data"] == {"images": 24, "reused": False}
    assert results["extract"]["images"] == 24 and results["extract"]["parts_new"] == 3
    saes = {r["sae_id"]: r for r in results["train-sae"]}
    assert sorted(saes) == ["layer2-topk-32-k4", "layer4-topk-64-k8"]
    assert all(r["heldout_images"] == 8 and 0 <= r["fvu"] for r in saes.values())
    assert pq.read_table(Path(out) / "images").num_rows == 24
    assert len(Manifest(out).records("train-sae")) == 2
    # every image keeps min(4, firing) latents; 3 top + 2 quantile picks per latent that fired
    assert results["scan"]["parts_new"] == 6  # 3 shards x 2 SAEs
    acts = pq.read_table(Path(out) / "activations").to_pandas()
    assert acts.groupby(["sae_id", "image_id"]).size().max() == 4
    picks = pq.read_table(Path(out) / "exemplar_picks").to_pandas()
    assert picks.groupby(["sae_id", "latent", "kind"]).size().max() == 3

    # a re-run of a finished build writes nothing (it also works on a read-only copy)
    with pytest.MonkeyPatch.context() as patch:
        def refuse(url, write):
            raise PermissionError(f"read-only file system: {url}")

        patch.setattr(fs, "write_atomic", refuse)
        again = build.run(config, out=out)
    assert again["make-data"]["reused"] and again["extract"]["parts_new"] == 0
    assert again["extract"]["parts_skipped"] == 3 and again["train-sae"] == results["train-sae"]
    assert again["scan"]["parts_new"] == 0 and again["cafe"]["parts_new"] == 0
    # one exemplar row per pick, each with a PNG mask at input resolution
    exemplars = pq.read_table(Path(out) / "exemplars").to_pandas()
    assert len(exemplars) == len(picks) and exemplars.ierf_png.map(len).min() > 0
    # per SAE a decoder index (one vector per latent) and a region index (one per pick)
    built = {(r["kind"], r["sae_id"]): r["n"] for r in results["index"]["indexes"]}
    assert built == {**{("decoder", s): n for s, n in [("layer2-topk-32-k4", 32),
                                                        ("layer4-topk-64-k8", 64)]},
                     **{("regions", s): int((picks.sae_id == s).sum()) for s in saes}}
    # at most 4 incoming edges per (downstream node, method, scope), for both layer pairs
    edges = pq.read_table(Path(out) / "edges").to_pandas()
    assert set(zip(edges.src_layer, edges.dst_layer)) == {("layer2", "layer4"), ("layer4", "logits")}
    assert edges.groupby(["dst_layer", "dst_latent", "method", "scope"]).size().max() <= 4 + 1


def test_tiny_vit_build_runs_every_stage(tmp_path) -> None:
    # the same pipeline on a ViT: token PFVs, SAEs, latent iERF masks, indexes, ICAT by all four
    # methods through the transformer blocks
    layers = ["blocks.1", "blocks.3"]
    config = with_changes(
        model={"name": "demo_vit", "weights": "none"},
        extract=dict(TINY["extract"], layers=layers),
        train_sae=dict(TINY["train_sae"], sweep=[
            {"layer": layer, "sae": {"n_latents": 32, "k": 4, "batch_size": 32}} for layer in layers]),
        icat=dict(TINY["icat"], methods=["ig", "grad_x_act", "grad", "srd"]))
    out = str(tmp_path / "out")
    results = build.run(write_config(tmp_path, config), out=out)
    assert sorted(r["sae_id"] for r in results["train-sae"]) == [
        "blocks.1-topk-32-k4", "blocks.3-topk-32-k4"]
    picks = pq.read_table(Path(out) / "exemplar_picks").to_pandas()
    exemplars = pq.read_table(Path(out) / "exemplars").to_pandas()
    assert set(picks.layer) == set(layers) and len(exemplars) == len(picks)
    assert exemplars.ierf_png.map(len).min() > 0 and exemplars.mask_frac.between(0, 1).all()
    assert len(results["index"]["indexes"]) == 4
    edges = pq.read_table(Path(out) / "edges").to_pandas()
    assert set(zip(edges.src_layer, edges.dst_layer)) == {("blocks.1", "blocks.3"),
                                                          ("blocks.3", "logits")}
    assert set(edges.method) == {"ig", "grad_x_act", "grad", "srd"}


@pytest.mark.ray
def test_tiny_build_on_ray(ray_cluster, tmp_path) -> None:
    extract = {k: v for k, v in TINY["extract"].items() if k != "in_process"}
    train = {k: v for k, v in TINY["train_sae"].items() if k != "in_process"}
    scan = {k: v for k, v in TINY["scan"].items() if k != "in_process"}
    icat = {k: v for k, v in TINY["icat"].items() if k != "in_process"}
    cafe = {k: v for k, v in TINY["cafe"].items() if k != "in_process"}
    results = build.run(write_config(tmp_path, with_changes(extract=extract, train_sae=train,
                                                            scan=scan, cafe=cafe, icat=icat,
                                                            index={})),
                        out=str(tmp_path / "out"))
    assert results["extract"]["images"] == 24
    assert len(results["train-sae"]) == 2
