"""ICAT edge scores between SAE latents of an isolated layer pair (docs/method.md §7).

Layer `la`'s PFVs at the positions its SAE reads are written as `x = dec(a) + err`, with the
latents `a` (Tensor[N, P_a, F], normalised SAE units) the only variables; the other positions
(ViT prefix tokens when the SAE skipped them) stay at their recorded values. `F_ab`
(pipeline.icat.segment) maps x to layer `lb`, where the downstream node is read:

* a latent g of lb's SAE: `g(x) = sum_p m_p * relu(pre_g(y_p))` over lb's SAE positions (or at
  one chosen position), y = F_ab(x). **[choice] frozen selection**: `m_p` = 1 where g is
  selected (TopK / BatchTopK threshold / ReLU) on the recorded input, 0 elsewhere. The TopK
  competition is discontinuous along an IG path (g jumps when it enters or leaves the top k),
  which would break completeness; frozen like the ReLU gates of APOP, `g` is continuous and
  equals the atlas activation at the recorded input.
* a class logit when `lb` is "logits".

Scores per (image, downstream node), one column per upstream latent and a last column for
the layer's **error node** (src_latent = -1):

| method | latent f | error node |
|---|---|---|
| `ig` | `sum_p a_fp int_0^1 dg/da_fp (alpha a) dalpha` | fixed err: `g(dec(0) + err)` (g with every latent removed); scaled err: IG share of err |
| `grad_x_act` | `sum_p a_fp dg/da_fp` at the input | `sum_p <dg/dx_p, err_p>` |
| `grad` | `sum_p [a_fp > 0] dg/da_fp` (sensitivity where f is present) | `sum_p <dg/dx_p, err_p>` |

err is treated as one more latent with activation 1 and direction err_p, hence its gradient
scores. IG is complete: `sum_f ig_f + error = g(x)` with the error held fixed (the default),
`sum_f ig_f + error = g(x) - g(dec(0))` with it scaled (`scale_error=True`), up to the
quadrature error of `steps` (Gauss-Legendre or midpoint Riemann nodes on [0, 1]).

Downstream nodes are batched: each (image, node) pair is one row of the segment's batch and
one backward gives every row's gradient (rows are independent in eval mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.icat.segment import Segment
from pipeline.sae import SAE

METHODS: tuple[str, ...] = ("ig", "grad_x_act", "grad")
RULES: tuple[str, ...] = ("gauss_legendre", "riemann")


@dataclass
class LayerSAE:
    """An SAE on one tapped layer; `positions`: LongTensor[P_s], the positions (tap layout)
    it reads (every position, or the grid without the prefix tokens)."""

    layer: str
    sae: SAE
    positions: Tensor

    def __post_init__(self) -> None:
        # frozen: scores are gradients w.r.t. activations, never w.r.t. the dictionary
        self.sae.requires_grad_(False)

    def encode(self, pfvs: Tensor) -> Tensor:
        """PFVs Tensor[N, P, C] -> activations Tensor[N, P_s, F] at `positions`."""
        return self.sae.encode(pfvs[:, self.positions])

    def pre_acts(self, pfvs: Tensor, latents: Tensor) -> Tensor:
        """Pre-activations of one latent per row: pfvs [Q, P, C], latents [Q] -> [Q, P_s]."""
        sae = self.sae
        x = pfvs[:, self.positions].to(sae.W_enc.dtype) * sae.scale
        w = sae.W_enc[latents]  # [Q, C]
        return torch.einsum("qpc,qc->qp", x - sae.b_dec, w) + sae.b_enc[latents][:, None]


@dataclass
class Decomposed:
    """Layer la of a batch written as dec(a) + err at the SAE positions.

    pfvs: Tensor[N, P, C] recorded PFVs; acts: Tensor[N, P_s, F]; err: Tensor[N, P_s, C].
    """

    up: LayerSAE
    pfvs: Tensor
    acts: Tensor
    err: Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, up: LayerSAE, pfvs: Tensor) -> "Decomposed":
        acts = up.encode(pfvs)
        err = pfvs[:, up.positions] - up.sae.decode(acts).to(pfvs.dtype)
        return cls(up, pfvs, acts, err)

    def at(self, rows: Tensor, alpha: float, error_coeff: float) -> tuple[Tensor, Tensor]:
        """PFVs on the path for images `rows` [Q]: (full PFVs [Q, P, C], the SAE-position
        slice [Q, P_s, C] that requires grad and is a leaf of the graph)."""
        sae = self.up.sae
        x_s = (sae.decode(alpha * self.acts[rows]).to(self.pfvs.dtype)
               + error_coeff * self.err[rows]).detach().requires_grad_(True)
        full = self.pfvs[rows].clone()
        full[:, self.up.positions] = x_s
        return full, x_s

    def latent_grads(self, grad_x: Tensor) -> Tensor:
        """dg/da from dg/dx at the SAE positions: [Q, P_s, C] -> [Q, P_s, F] (dec is linear:
        dx_p/da_fp = W_dec[:, f] / scale)."""
        sae = self.up.sae
        return (grad_x.to(sae.W_dec.dtype) @ sae.W_dec) / sae.scale


@dataclass
class Readout:
    """How the downstream node of each row is read from F_ab's output."""

    down: LayerSAE | None  # None: class logits
    position: int | None = None  # one position of lb's SAE positions instead of the sum

    def __call__(self, y: Tensor, nodes: Tensor, mask: Tensor | None) -> Tensor:
        """y: F_ab output of Q rows; nodes [Q] latent or class; mask [Q, P_s] -> values [Q]."""
        if self.down is None:
            return y.gather(1, nodes[:, None])[:, 0]
        val = mask * torch.relu(self.down.pre_acts(y, nodes))
        return val.sum(1) if self.position is None else val[:, self.position]


@dataclass
class PairScores:
    """Scores of Q (image, downstream node) rows of one layer pair.

    image: LongTensor[Q] (index in the batch); node: LongTensor[Q] (latent or class);
    value: Tensor[Q] g at the input; baseline: Tensor[Q] g at the IG baseline;
    scores: {method: Tensor[Q, F + 1]}, last column = the error node.
    """

    image: Tensor
    node: Tensor
    value: Tensor
    baseline: Tensor
    scores: dict[str, Tensor]


def quadrature(steps: int, rule: str = "gauss_legendre") -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of `steps`-point quadrature on [0, 1] (weights sum to 1)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: expected an int >= 1")
    if rule == "gauss_legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return (x + 1) / 2, w / 2
    if rule == "riemann":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    raise ValueError(f"rule={rule!r}: expected one of {list(RULES)}")


@torch.no_grad()
def downstream_rows(segment: Segment, dec: Decomposed, images: Tensor | None, readout: Readout,
                    nodes: Tensor | None = None, labels: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The rows to score: (image [Q], node [Q], frozen mask [Q, P_s] or None for logits).

    Latents: every latent of lb's SAE that fires on the recorded input (at `readout.position`
    when set), restricted to `nodes` when given. Logits: **[choice]** the predicted class and
    the label when known (labels < 0: unknown), or `nodes` when given.
    """
    y = segment(dec.pfvs, images)
    n = dec.pfvs.shape[0]
    if readout.down is None:
        if nodes is not None:
            cls = nodes.to(y.device).expand(n, -1)
        else:
            cls = torch.stack([y.argmax(1), labels if labels is not None else y.argmax(1)], 1)
            cls = torch.where(cls < 0, cls[:, :1], cls)
        image = torch.arange(n, device=y.device)[:, None].expand_as(cls).reshape(-1)
        pairs = torch.unique(torch.stack([image, cls.reshape(-1)], 1), dim=0)
        return pairs[:, 0], pairs[:, 1], None
    acts = readout.down.encode(y)  # [N, P_s, F_b]
    fired = acts > 0
    active = fired.any(1) if readout.position is None else fired[:, readout.position]
    if nodes is not None:
        keep = torch.zeros_like(active)
        keep[:, nodes] = True
        active &= keep
    image, node = active.nonzero(as_tuple=True)
    return image, node, fired[image, :, node].to(dec.pfvs.dtype)


def attribute(segment: Segment, dec: Decomposed, readout: Readout, image: Tensor, node: Tensor,
              mask: Tensor | None, images: Tensor | None = None, *,
              methods: tuple[str, ...] = METHODS, steps: int = 32, rule: str = "gauss_legendre",
              scale_error: bool = False, batch_size: int = 64) -> PairScores:
    """Score every upstream latent (and the error node) for each (image, node) row.

    segment: F_ab from la to lb; dec: la decomposed for the batch; image/node/mask: rows from
    `downstream_rows`; images: the batch's pixels (only the hook fallback needs them).
    Rows are processed `batch_size` at a time; IG takes `steps` extra forward+backward passes.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods {bad}: gradient methods are {list(METHODS)} ('srd' is "
                         "pipeline.icat.srd_scores)")
    parts = [_attribute_rows(segment, dec, readout, image[i:i + batch_size], node[i:i + batch_size],
                             None if mask is None else mask[i:i + batch_size], images, methods,
                             steps, rule, scale_error)
             for i in range(0, len(image), batch_size)]
    f = dec.acts.shape[-1] + 1
    empty = dec.acts.new_zeros(0)
    if not parts:
        return PairScores(image, node, empty, empty, {m: dec.acts.new_zeros(0, f) for m in methods})
    return PairScores(image, node, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                      {m: torch.cat([p[2][m] for p in parts]) for m in methods})


def _value_and_grad(segment: Segment, dec: Decomposed, readout: Readout, rows: Tensor,
                    node: Tensor, mask: Tensor | None, images: Tensor | None, alpha: float,
                    error_coeff: float) -> tuple[Tensor, Tensor]:
    """g at alpha on the path of each row, and dg/dx at the SAE positions [Q, P_s, C]."""
    with torch.enable_grad():
        full, x_s = dec.at(rows, alpha, error_coeff)
        y = segment(full, None if images is None else images[rows])
        value = readout(y, node, mask)
        (grad,) = torch.autograd.grad(value.sum(), x_s)
    return value.detach(), grad


def _attribute_rows(segment: Segment, dec: Decomposed, readout: Readout, rows: Tensor, node: Tensor,
                    mask: Tensor | None, images: Tensor | None, methods: tuple[str, ...],
                    steps: int, rule: str, scale_error: bool
                    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    acts, err = dec.acts[rows], dec.err[rows]
    value, grad1 = _value_and_grad(segment, dec, readout, rows, node, mask, images, 1.0, 1.0)
    out: dict[str, Tensor] = {}
    if "grad_x_act" in methods or "grad" in methods:
        lat = dec.latent_grads(grad1)  # [Q, P_s, F]
        err_score = (grad1 * err).flatten(1).sum(1)[:, None].to(lat.dtype)
        if "grad_x_act" in methods:
            out["grad_x_act"] = torch.cat([(acts * lat).sum(1), err_score], 1)
        if "grad" in methods:
            out["grad"] = torch.cat([((acts > 0) * lat).sum(1), err_score], 1)
    def error_coeff(alpha: float) -> float:
        return alpha if scale_error else 1.0

    with torch.no_grad():
        full, _ = dec.at(rows, 0.0, error_coeff(0.0))
        baseline = readout(segment(full, None if images is None else images[rows]), node, mask)
    if "ig" in methods:
        alphas, weights = quadrature(steps, rule)
        gbar = torch.zeros_like(grad1)
        for alpha, w in zip(alphas, weights):
            _, g = _value_and_grad(segment, dec, readout, rows, node, mask, images, float(alpha),
                                   error_coeff(float(alpha)))
            gbar += float(w) * g
        lat_ig = (acts * dec.latent_grads(gbar)).sum(1)
        err_ig = ((gbar * err).flatten(1).sum(1) if scale_error else baseline)[:, None]
        out["ig"] = torch.cat([lat_ig, err_ig.to(lat_ig.dtype)], 1)
    return value, baseline, out
