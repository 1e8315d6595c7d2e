"""The configuration of one sparse autoencoder and its training run, validated on construction.

Every field is checked in `__post_init__`, so a bad sweep entry fails before any data is read
or any weight is allocated, with a message naming the field, the bad value and what is valid.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

VARIANTS: tuple[str, ...] = ("topk", "batchtopk", "relu")
B_DEC_INITS: tuple[str, ...] = ("geometric_median", "mean")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class SAEConfig:
    """One SAE on PFVs of width `d_in` (METHOD.md section 5).

    Attributes:
        d_in: PFV width (channels of a CNN tap, embedding width of a ViT tap).
        n_latents: dictionary size.
        variant: "topk" (k largest per row), "batchtopk" (k·B largest per batch in training, a
            learned threshold at inference) or "relu" (ReLU with a decoder-norm-weighted L1).
        k: active latents per PFV for topk / batchtopk (ignored by relu).
        l1_coeff: weight of the L1 penalty of the relu variant (ignored by the others).
        aux_k: dead latents used by the AuxK loss (Gao et al. 2024); 0 disables it.
        aux_coeff: weight α of the AuxK loss; Gao et al. use 1/32.
        dead_tokens: a latent that has not fired on the last `dead_tokens` training PFVs is
            dead. Gao et al. use 10M LM tokens; PFV sets are smaller, hence 1M.
        threshold_momentum: EMA momentum of the BatchTopK inference threshold.
        lr: Adam learning rate.
        batch_size: PFVs per optimiser step (per worker under DDP).
        seed: seeds the weight initialisation.
        b_dec_init: "geometric_median" (robust to outlier PFVs) or "mean" of an init sample.
        normalize: scale inputs to unit mean squared norm inside the SAE.
        dtype: parameter dtype, one of DTYPES.
    """

    d_in: int
    n_latents: int
    variant: str = "topk"
    k: int = 32
    l1_coeff: float = 1e-3
    aux_k: int = 512
    aux_coeff: float = 1.0 / 32.0
    dead_tokens: int = 1_000_000
    threshold_momentum: float = 0.999
    lr: float = 2e-4
    batch_size: int = 4096
    seed: int = 0
    b_dec_init: str = "geometric_median"
    normalize: bool = True
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_int(self, "d_in", low=1)
        _check_int(self, "n_latents", low=1)
        _check_choice(self, "variant", VARIANTS)
        if self.variant in ("topk", "batchtopk"):
            _check_int(self, "k", low=1, high=self.n_latents, high_name="n_latents")
        _check_float(self, "l1_coeff", low=0.0)
        _check_int(self, "aux_k", low=0)
        _check_float(self, "aux_coeff", low=0.0)
        _check_int(self, "dead_tokens", low=1)
        _check_float(self, "threshold_momentum", low=0.0, below=1.0)
        _check_float(self, "lr", low=0.0, strict=True)
        _check_int(self, "batch_size", low=1)
        _check_int(self, "seed", low=0)
        _check_choice(self, "b_dec_init", B_DEC_INITS)
        if not isinstance(self.normalize, bool):
            raise ValueError(f"SAEConfig.normalize={self.normalize!r}: expected True or False")
        _check_choice(self, "dtype", tuple(DTYPES))

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


def _check_int(
    cfg: SAEConfig, name: str, low: int, high: int | None = None, high_name: str = ""
) -> None:
    value = getattr(cfg, name)
    # bool is an int subclass; True as a width is always a mistake
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"SAEConfig.{name}={value!r}: expected an integer >= {low}")
    if value < low:
        raise ValueError(f"SAEConfig.{name}={value}: must be >= {low}")
    if high is not None and value > high:
        raise ValueError(
            f"SAEConfig.{name}={value}: must be <= {high_name}={high} (valid: {low}..{high})"
        )


def _check_float(
    cfg: SAEConfig, name: str, low: float, below: float | None = None, strict: bool = False
) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"SAEConfig.{name}={value!r}: expected a finite number")
    if (value <= low) if strict else (value < low):
        raise ValueError(f"SAEConfig.{name}={value}: must be {'>' if strict else '>='} {low}")
    if below is not None and value >= below:
        raise ValueError(f"SAEConfig.{name}={value}: must be < {below}")


def _check_choice(cfg: SAEConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"SAEConfig.{name}={value!r}: expected one of {list(choices)}")
