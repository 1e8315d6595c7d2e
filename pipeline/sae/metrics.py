"""Quality metrics stored with every SAE (docs/method.md §5).

* FVU: fraction of variance unexplained, Σ||x − x̂||² / Σ||x − mean(x)||² over a set
  (0 for a perfect reconstruction, 1 for predicting the set mean).
* mean L0: active latents per PFV.
* dead fraction: latents that never fire on the N evaluated PFVs ("the last N tokens").
* dense fraction: latents firing on more than DENSE_THRESHOLD (10%) of PFVs; a latent that
  fires that often explains little, since a concept should be present on few positions.
* logit fidelity: top-1 agreement and KL(original ‖ reconstructed) of a model's logits when
  the tapped layer is replaced by its reconstruction (see `hook.reconstruct_hook`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.model import SAE

DENSE_THRESHOLD = 0.1


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained of Tensor[N, D] by Tensor[N, D] (float64 sums)."""
    if x.shape != x_hat.shape or x.ndim != 2:
        raise ValueError(
            f"fvu expects two Tensor[N, D] of one shape, "
            f"got {tuple(x.shape)} and {tuple(x_hat.shape)}"
        )
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total)


def mean_l0(acts: Tensor) -> float:
    """Mean number of non-zero latents per row of Tensor[N, n_latents]."""
    return float((acts != 0).sum(dim=-1).double().mean())


def dead_fraction(fire_counts: Tensor) -> float:
    """Fraction of latents with zero firings in Tensor[n_latents] counts over a window."""
    return float((fire_counts == 0).double().mean())


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of latents firing on more than `threshold` of the `n_tokens` PFVs counted."""
    return float((fire_counts.double() / max(n_tokens, 1) > threshold).double().mean())


def logit_fidelity(logits_orig: Tensor, logits_recon: Tensor) -> dict[str, float]:
    """Downstream fidelity of Tensor[N, K] logits with the layer replaced vs the original.

    Returns:
        top1_agreement: fraction of rows with the same argmax.
        kl: mean over rows of KL(softmax(orig) ‖ softmax(recon)), in nats.
    """
    if logits_orig.shape != logits_recon.shape or logits_orig.ndim != 2:
        raise ValueError(
            f"logit_fidelity expects two Tensor[N, K] of one shape, got "
            f"{tuple(logits_orig.shape)} and {tuple(logits_recon.shape)}"
        )
    log_p = F.log_softmax(logits_orig.double(), dim=-1)
    log_q = F.log_softmax(logits_recon.double(), dim=-1)
    agreement = (logits_orig.argmax(dim=-1) == logits_recon.argmax(dim=-1)).double().mean()
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    return {"top1_agreement": float(agreement), "kl": float(kl)}


@torch.no_grad()
def evaluate_sae(
    sae: SAE, batches: Iterable[Tensor], dense_threshold: float = DENSE_THRESHOLD
) -> dict[str, float]:
    """FVU, mean L0, dead and dense fractions of `sae` (in eval mode) over held-out batches.

    Args:
        sae: the SAE; BatchTopK uses its inference threshold.
        batches: Tensor[B, d_in] raw PFVs; all of them form the window N of the dead fraction.

    Returns:
        fvu, l0, dead_frac, dense_frac and n_tokens. FVU is computed in raw units from running
        float64 sums (Σ||x||², Σx, Σ||x − x̂||²), so the set need not fit in memory.
    """
    was_training = sae.training
    sae.eval()
    device = sae.W_dec.device
    n = 0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    sum_err = torch.zeros((), dtype=torch.float64, device=device)
    l0_sum = torch.zeros((), dtype=torch.float64, device=device)
    fire_counts = torch.zeros(sae.cfg.n_latents, dtype=torch.int64, device=device)
    for batch in batches:
        x = batch.to(device)
        acts = sae.encode(x)
        x_hat = sae.decode(acts)
        xd = x.double()
        n += x.shape[0]
        sum_x += xd.sum(dim=0)
        sum_sq += xd.pow(2).sum()
        sum_err += (xd - x_hat.double()).pow(2).sum()
        active = acts > 0
        l0_sum += active.sum()
        fire_counts += active.sum(dim=0)
    sae.train(was_training)
    if n == 0:
        raise ValueError("evaluate_sae got no batches")
    # Σ||x − x̄||² = Σ||x||² − N·||x̄||²
    total_var = sum_sq - sum_x.pow(2).sum() / n
    return {
        "fvu": float(sum_err / total_var),
        "l0": float(l0_sum / n),
        "dead_frac": dead_fraction(fire_counts),
        "dense_frac": dense_fraction(fire_counts, n, dense_threshold),
        "n_tokens": n,
    }
