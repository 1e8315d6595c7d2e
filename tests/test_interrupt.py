"""Ctrl-C in a build: one SIGINT stops it (exit 130) in any stage, before or after train-sae has
run on Ray Train (whose own SIGINT handler once stayed installed and swallowed it), and the next
run resumes: the SAE from its checkpoint, the stage from its committed parts."""
from __future__ import annotations

import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cli_run import CliRun

pytestmark = pytest.mark.ray


CONFIG = {
    "atlas_id": "ctrl-c",
    "data": {"synthetic": {"n": 96, "seed": 3, "size": 64, "shard_size": 8}},
    "model": {"name": "demo_resnet", "weights": "none"},
    "extract": {"layers": ["layer2"], "positions": 8, "batch_size": 24, "in_process": True},
    # on Ray Train; long enough to be interrupted after a few checkpoints
    "train_sae": {"steps": 1500, "checkpoint_every": 50, "fidelity_images": 8, "sweep": [
        {"layer": "layer2", "sae": {"n_latents": 32, "k": 4, "batch_size": 32}}]},
    "scan": {"top_per_image": 4, "n_top": 30, "n_quantile": 10, "in_process": True},
    "cafe": {"faithfulness_per_latent": 4, "steps": 16, "patch": 16, "actors": 1,
             "cpus_per_actor": 1},
}


def build(config: Path, out: Path) -> CliRun:
    return CliRun("build", str(config), "--out", str(out))


def test_one_ctrl_c_stops_a_build_in_train_sae_and_after_it_and_each_rerun_resumes(
        tmp_path) -> None:
    config, out = tmp_path / "build.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(CONFIG))

    # 1. Ctrl-C while Ray Train trains the SAE, past a few checkpoints
    first = build(config, out)
    first.wait_for(r"layer2-topk-32-k4 step (1[5-9]\d|[2-9]\d\d)/1500")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(timeout=90) == 130, first.output[-3000:]
    assert "[build] interrupted in train-sae" in first.output
    assert not (out / "saes").exists()  # nothing committed for the unfinished SAE

    # 2. the re-run resumes the SAE from its checkpoint (not from step 0), finishes train-sae
    # and scan; a Ctrl-C in cafe, once Ray Train has run in this process, stops it too
    second = build(config, out)
    resumed = int(second.wait_for(r"resumed from its checkpoint at step (\d+)/1500").group(1))
    assert resumed >= 100
    second.wait_for(r"^\[cafe\] \d+ picks in 12 image parts")
    second.proc.send_signal(signal.SIGINT)
    assert second.finish(timeout=60) == 130, second.output[-3000:]
    assert "[build] interrupted in cafe" in second.output

    # 3. the third run finishes: every pick has its exemplar, once
    third = build(config, out)
    assert third.finish(timeout=600) == 0, third.output[-3000:]
    assert "[train-sae] 1 SAEs under" in third.output and "1 done, 0 to train" in third.output
    picks = pq.read_table(out / "exemplar_picks").to_pandas()
    exemplars = pq.read_table(out / "exemplars").to_pandas()
    keys = ["sae_id", "latent", "kind", "rank"]
    assert len(exemplars) == len(picks) and not exemplars.duplicated(keys).any()
