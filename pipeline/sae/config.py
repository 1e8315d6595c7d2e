"""The configuration of one sparse autoencoder and its training run, validated on construction.

Every field is checked when the config is built (`pipeline.stage.Options`), so a bad sweep entry
fails before any data is read or any weight is allocated, with a message naming the field, the
bad value and what is valid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pipeline.stage import Options, option

VARIANTS: tuple[str, ...] = ("topk", "batchtopk", "relu")
B_DEC_INITS: tuple[str, ...] = ("geometric_median", "mean")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class SAEConfig(Options):
    """One SAE on PFVs of width `d_in` (docs/method.md §5), and its optimisation settings."""

    section: ClassVar[str] = "SAEConfig"

    d_in: int = option(help="PFV width (channels of a CNN tap, embedding width of a ViT tap)",
                       min=1, cli=False)
    n_latents: int = option(help="dictionary size", min=1)
    variant: str = option("topk", "topk (k largest per row), batchtopk (k*B largest per batch "
                          "in training, a learned threshold at inference) or relu (ReLU with a "
                          "decoder-norm-weighted L1)", choices=VARIANTS)
    k: int = option(32, "active latents per PFV for topk / batchtopk (ignored by relu)")
    l1_coeff: float = option(1e-3, "weight of the L1 penalty of the relu variant", min=0,
                             cli=False)
    aux_k: int = option(512, "dead latents used by the AuxK loss (Gao et al. 2024); 0 disables "
                        "it", min=0, cli=False)
    aux_coeff: float = option(1.0 / 32.0, "weight of the AuxK loss (Gao et al. use 1/32)", min=0,
                              cli=False)
    # Gao et al. use 10M LM tokens; PFV sets are smaller, hence 1M
    dead_tokens: int = option(1_000_000, "a latent that has not fired on the last dead_tokens "
                              "training PFVs is dead", min=1, cli=False)
    threshold_momentum: float = option(0.999, "EMA momentum of the BatchTopK inference "
                                       "threshold", min=0, lt=1, cli=False)
    lr: float = option(2e-4, "Adam learning rate", gt=0)
    batch_size: int = option(4096, "PFVs per optimiser step (per worker under DDP)", min=1)
    seed: int = option(0, "seeds the weight initialisation", min=0)
    b_dec_init: str = option("geometric_median", "geometric_median (robust to outlier PFVs) or "
                             "mean of an init sample", choices=B_DEC_INITS, cli=False)
    normalize: bool = option(True, "scale inputs to unit mean squared norm inside the SAE",
                             cli=False)
    dtype: str = option("float32", "parameter dtype", choices=tuple(DTYPES), cli=False)

    def check(self) -> None:
        if self.variant in ("topk", "batchtopk") and not 1 <= self.k <= self.n_latents:
            raise ValueError(f"SAEConfig.k={self.k!r}: must be <= n_latents={self.n_latents} "
                             f"(valid: 1..{self.n_latents})" if isinstance(self.k, int) and
                             self.k > self.n_latents else
                             f"SAEConfig.k={self.k!r}: expected an int >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them and the known fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)
