"""The tiny atlas many tests share: its extraction, SAE sweep and ICAT options, made without
Ray in tests/conftest.py (`extracted`, `atlas`, `straight`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.icat.stage import ICATOptions
from pipeline.pfv.extract import ExtractOptions
from pipeline.sae.stage import TrainOptions

# demo_resnet with seeded random weights: the tests never depend on the shipped weights
EXTRACT = ExtractOptions(model="demo_resnet", weights=None, layers=("layer2", "layer4"),
                         positions=16, batch_size=36, atlas_id="t")
SWEEP = [
    {"layer": "layer2", "sae": {"n_latents": 64, "k": 4, "batch_size": 64, "lr": 1e-3}},
    {"layer": "layer4", "name": "small", "sae": {"n_latents": 96, "k": 8, "batch_size": 48,
                                                 "lr": 1e-3, "dead_tokens": 2000}},
]
TRAIN = TrainOptions(steps=40, checkpoint_every=10, fidelity_images=12, eval_pfvs=5000)
CHANNELS = {"layer2": 32, "layer4": 128}
ICAT = ICATOptions(steps=4, images_per_shard=2, top_edges=4, image_batch=2, in_process=True)

# a whole build config run in this process (every stage, no Ray): tests/test_build.py, the browser
BUILD = {
    "atlas_id": "tiny",
    "data": {"synthetic": {"n": 24, "seed": 3, "size": 64, "shard_size": 8}},
    "model": {"name": "demo_resnet", "weights": "none"},
    "extract": {"layers": ["layer2", "layer4"], "positions": 8, "batch_size": 24,
                "in_process": True},
    "train_sae": {"steps": 20, "checkpoint_every": 10, "fidelity_images": 8,
                  "in_process": True, "sweep": [
                      {"layer": "layer2", "sae": {"n_latents": 32, "k": 4, "batch_size": 32}},
                      {"layer": "layer4", "sae": {"n_latents": 64, "k": 8, "batch_size": 32}}]},
    "scan": {"top_per_image": 4, "n_top": 3, "n_quantile": 2, "in_process": True},
    "cafe": {"faithfulness_per_latent": 1, "steps": 4, "patch": 16, "in_process": True},
    "index": {},
    "icat": {"methods": ["ig", "grad_x_act"], "steps": 4, "images_per_shard": 2, "top_edges": 4,
             "in_process": True, "reduce_memory": "256MB"},
}


def copy_of(root: str, dest: Path) -> str:
    """A copy of the atlas at `root` to change without touching the shared one."""
    shutil.copytree(root, dest)
    return str(dest)
