"""The sparse autoencoder on PFVs: TopK, BatchTopK and ReLU+L1 variants (docs/method.md §5).

Conventions (all documented here once):

* Normalisation. Parameters live in a normalised space where the training PFVs have unit mean
  squared norm: `x_n = scale · x`, with `scale = 1 / sqrt(mean ||x||²)` estimated from a sample
  by `initialize_from_sample` and stored as the buffer `scale` (1 when `cfg.normalize` is
  False). `encode` takes raw PFVs and returns activations in normalised units; `decode` returns
  raw PFVs (it divides by `scale`). So `decode(encode(x)) ≈ x` in the caller's units, and one
  SAE config works for layers whose PFV norms differ by orders of magnitude.
* Encoder `pre = W_enc (x_n − b_dec) + b_enc`; decoder `x̂_n = W_dec a + b_dec`.
  `W_enc: Tensor[n_latents, d_in]`, `W_dec: Tensor[d_in, n_latents]` whose column j is the
  unit-norm direction of latent j (`decoder_directions` gives them as rows).
* Unit-norm decoder. The trainer calls `project_decoder_grad_` before the optimiser step (drops
  the gradient component along each column, the part that would only change its norm) and
  `normalize_decoder_` after it (Adam's per-coordinate scaling still moves the norm a little).
  Without the constraint the sparsity penalty / TopK can be gamed by shrinking activations and
  growing decoder norms, and activations would not be comparable across latents.
* Dead latents. `tokens_since_fired[j]` counts training PFVs since latent j last fired; the
  latent is dead once it reaches `cfg.dead_tokens`. The AuxK loss (Gao et al. 2024, A.2)
  reconstructs the main reconstruction's residual with the top-`aux_k` dead pre-activations.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.sae.config import SAEConfig
from pipeline.sae.geometric_median import geometric_median

# BatchTopK threshold not yet estimated; real thresholds are >= 0 (they are kept ReLU values)
_UNSET_THRESHOLD = -1.0
# guards divisions by a variance or norm that can be zero on degenerate batches
_EPS = 1e-12


class SAEOutput(NamedTuple):
    """What one forward pass returns (a NamedTuple so DDP and pytree treat it natively).

    recon: Tensor[B, d_in], the reconstruction in raw PFV units.
    acts: Tensor[B, n_latents], sparse activations in normalised units.
    loss: scalar, the training objective mse + l1 + aux_coeff · aux.
    mse: scalar, mean over rows of ||x_n − x̂_n||² (normalised space).
    l1: scalar, the decoder-norm-weighted L1 penalty (zero unless variant is "relu").
    aux: scalar, the unweighted AuxK loss (zero outside training or with no dead latent).
    """

    recon: Tensor
    acts: Tensor
    loss: Tensor
    mse: Tensor
    l1: Tensor
    aux: Tensor


class SAE(nn.Module):
    """A sparse autoencoder of `cfg.d_in`-wide PFVs with `cfg.n_latents` latents."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        # drawn in float32 whatever cfg.dtype, so the same seed gives the same dictionary
        w_dec = torch.randn(cfg.d_in, cfg.n_latents, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=0, keepdim=True).clamp_min(_EPS)
        dtype = cfg.torch_dtype
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        # W_enc = W_decᵀ at init: each latent starts as a matched filter of its own atom, which
        # Gao et al. found keeps most latents alive
        self.W_enc = nn.Parameter(w_dec.t().contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("threshold", torch.full((), _UNSET_THRESHOLD, dtype=torch.float32))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_latents, dtype=torch.int64))

    # ---- initialisation from data -------------------------------------------------------

    @torch.no_grad()
    def initialize_from_sample(self, sample: Tensor) -> None:
        """Set the input scale and b_dec from a sample of raw PFVs.

        Args:
            sample: Tensor[N, d_in] of raw PFVs (a few thousand rows are plenty).
        """
        self._check_width(sample)
        x = sample.detach().to(device=self.scale.device, dtype=torch.float32)
        if self.cfg.normalize:
            mean_sq = x.pow(2).sum(dim=1).mean()
            if not torch.isfinite(mean_sq) or mean_sq <= 0:
                raise ValueError(
                    f"cannot normalise: mean squared norm of the sample is {mean_sq.item()}"
                )
            self.scale.fill_(mean_sq.rsqrt().item())
        x = x * self.scale
        centre = geometric_median(x) if self.cfg.b_dec_init == "geometric_median" else x.mean(dim=0)
        self.b_dec.copy_(centre.to(self.b_dec.dtype))

    # ---- forward ------------------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Sparse activations of raw PFVs: Tensor[..., d_in] -> Tensor[..., n_latents].

        In training mode BatchTopK selects across the batch (the leading dims flattened); in
        eval mode it applies the learned threshold, so each row is encoded independently.
        """
        self._check_width(x)
        lead = x.shape[:-1]
        pre = self._pre_acts(self._normalise(x.reshape(-1, self.cfg.d_in)))
        return self._activate(pre).reshape(*lead, self.cfg.n_latents)

    def decode(self, acts: Tensor) -> Tensor:
        """Raw-unit reconstruction: Tensor[..., n_latents] -> Tensor[..., d_in]."""
        return self._decode_normalised(acts) / self.scale.to(acts.dtype)

    def forward(self, x: Tensor) -> SAEOutput:
        """Encode, decode and compute the losses of a batch of raw PFVs Tensor[B, d_in]."""
        self._check_width(x)
        if x.ndim != 2:
            raise ValueError(f"SAE.forward expects Tensor[B, d_in], got shape {tuple(x.shape)}")
        x_n = self._normalise(x)
        pre = self._pre_acts(x_n)
        acts = self._activate(pre)
        recon_n = self._decode_normalised(acts)
        mse = (x_n - recon_n).pow(2).sum(dim=-1).mean()
        zero = mse.new_zeros(())
        l1 = self._l1(acts) if self.cfg.variant == "relu" else zero
        aux = self._aux_loss(x_n - recon_n, pre) if self.training else zero
        loss = mse + l1 + self.cfg.aux_coeff * aux
        return SAEOutput(recon_n / self.scale.to(recon_n.dtype), acts, loss, mse, l1, aux)

    # ---- the constraint and the running statistics, called by the trainer ---------------

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from W_dec.grad its component along each (unit) column."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g.sub_(w * (w * g).sum(dim=0, keepdim=True))

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder column to unit L2 norm."""
        self.W_dec.div_(self.W_dec.norm(dim=0, keepdim=True).clamp_min(_EPS))

    @torch.no_grad()
    def update_stats_(self, fired: Tensor, n_tokens: int | Tensor, min_active: Tensor) -> None:
        """Advance the dead-latent counters and the BatchTopK threshold after a training step.

        Args:
            fired: Tensor[n_latents] bool, latents that fired on at least one PFV of the step
                (on any worker, under DDP).
            n_tokens: PFVs seen in the step (summed over workers).
            min_active: scalar, the smallest positive activation of the step (+inf if none);
                its running mean is the inference threshold θ of BatchTopK (Bussmann et al.).
        """
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired.to(torch.bool), 0)
        if self.cfg.variant != "batchtopk":
            return
        m = self.cfg.threshold_momentum
        sample = min_active.to(self.threshold)
        # the first finite sample seeds the EMA; a step with no activation leaves θ alone
        ema = torch.where(self.threshold < 0, sample, m * self.threshold + (1 - m) * sample)
        self.threshold.copy_(torch.where(torch.isfinite(sample), ema, self.threshold))

    @property
    def dead_mask(self) -> Tensor:
        """Tensor[n_latents] bool: latents silent for at least `cfg.dead_tokens` training PFVs."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @property
    def decoder_directions(self) -> Tensor:
        """Tensor[n_latents, d_in]: unit decoder direction of each latent (normalised space)."""
        return self.W_dec.t()

    @torch.no_grad()
    def readout(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Each latent's pre-activation as a linear readout of a raw PFV x,
        pre_f(x) = <w, x> + offset with w = scale * W_enc[f] and offset = b_enc[f] - W_enc[f] . b_dec:
        (w Tensor[S, d_in], offset Tensor[S]) for latents LongTensor[S]. The latent iERF
        decomposes <w, x> over pixels and books the offset as constant (docs/method.md §4)."""
        idx = latents.to(self.W_enc.device).long()
        w_enc = self.W_enc[idx]
        return w_enc * self.scale.to(w_enc.dtype), self.b_enc[idx] - w_enc @ self.b_dec

    # ---- internals ----------------------------------------------------------------------

    def _check_width(self, x: Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"expected PFVs of width d_in={self.cfg.d_in}, got shape {tuple(x.shape)}"
            )

    def _normalise(self, x: Tensor) -> Tensor:
        return x.to(self.W_enc.dtype) * self.scale.to(self.W_enc.dtype)

    def _pre_acts(self, x_n: Tensor) -> Tensor:
        return (x_n - self.b_dec) @ self.W_enc.t() + self.b_enc

    def _decode_normalised(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec.t() + self.b_dec

    def _activate(self, pre: Tensor) -> Tensor:
        """Tensor[B, n_latents] pre-activations -> sparse non-negative activations."""
        variant = self.cfg.variant
        if variant == "relu":
            return torch.relu(pre)
        if variant == "topk" or self.training:
            # topk: k per row; batchtopk in training: k·B over the flattened batch
            rows = pre if variant == "topk" else pre.reshape(1, -1)
            k = self.cfg.k * (1 if variant == "topk" else pre.shape[0])
            vals, idx = rows.topk(min(k, rows.shape[-1]), dim=-1, sorted=False)
            acts = torch.zeros_like(rows).scatter(-1, idx, torch.relu(vals))
            return acts.reshape(pre.shape)
        if self.threshold.item() < 0:
            raise RuntimeError(
                "BatchTopK inference threshold was never estimated: train the SAE "
                "(train_step updates it) before encoding in eval mode"
            )
        return pre * (pre > self.threshold.to(pre.dtype))

    def _l1(self, acts: Tensor) -> Tensor:
        # weighting by decoder norms makes the penalty invariant to moving scale between a
        # latent and its column; the norms are 1 after each step, but the term stays exact
        # for a decoder under optimisation
        return self.cfg.l1_coeff * (acts * self.W_dec.norm(dim=0)).sum(dim=-1).mean()

    def _aux_loss(self, residual: Tensor, pre: Tensor) -> Tensor:
        """AuxK loss: normalised MSE of the residual reconstructed by the top-aux_k dead latents.

        Args:
            residual: Tensor[B, d_in], x_n − x̂_n (detached here: AuxK must not pull the main
                reconstruction towards its own error).
            pre: Tensor[B, n_latents] pre-activations.
        """
        if self.cfg.aux_k == 0 or self.cfg.aux_coeff == 0:
            return pre.new_zeros(())
        dead = self.dead_mask
        # a fixed k (no host sync on the number of dead latents); slots beyond the dead count
        # pick -inf entries and are zeroed. ReLU as in the main path: with raw negative values
        # a dead latent learns to fit the residual with a negative sign, which pushes its
        # pre-activations further down and left more latents dead in our synthetic runs
        k_aux = min(self.cfg.aux_k, self.cfg.n_latents)
        vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        vals = torch.relu(torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals)))
        aux_acts = torch.zeros_like(pre).scatter(-1, idx, vals)
        target = residual.detach()
        err = (target - aux_acts @ self.W_dec.t()).pow(2).sum()
        var = (target - target.mean(dim=0)).pow(2).sum().clamp_min(_EPS)
        # no dead latent: the loss is exactly zero rather than a constant 1
        return (err / var) * dead.any().to(err.dtype)
