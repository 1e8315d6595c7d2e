"""Sparse autoencoders on PFVs: config, model, training, checkpoints, metrics (docs/method.md §5)."""
from pipeline.sae.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_sae,
    read_sae_info,
    save_checkpoint,
    save_sae,
)
from pipeline.sae.config import SAEConfig
from pipeline.sae.geometric_median import geometric_median
from pipeline.sae.hook import reconstruct_hook
from pipeline.sae.metrics import (
    DENSE_THRESHOLD,
    dead_fraction,
    dense_fraction,
    evaluate_sae,
    fvu,
    logit_fidelity,
    mean_l0,
)
from pipeline.sae.model import SAE, SAEOutput
from pipeline.sae.train import make_optimizer, train_sae, train_step, unwrap

__all__ = [
    "DENSE_THRESHOLD",
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "TrainState",
    "dead_fraction",
    "dense_fraction",
    "evaluate_sae",
    "fvu",
    "geometric_median",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sae",
    "logit_fidelity",
    "make_optimizer",
    "mean_l0",
    "read_sae_info",
    "reconstruct_hook",
    "save_checkpoint",
    "save_sae",
    "train_sae",
    "train_step",
    "unwrap",
]
