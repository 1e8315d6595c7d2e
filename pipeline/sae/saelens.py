"""SAEs to and from SAELens's on-disk format: `cfg.json` + `sae_weights.safetensors`.

Written and read here without importing `sae_lens` (the format is two plain files); the tests
load the exports with the installed `sae_lens` (`SAE.load_from_disk`) and compare its
encode/decode with ours on real PFVs (tests/test_saelens.py).

The mapping (our conventions: pipeline/sae/model.py, docs/method.md §5). Ours computes
`pre = W_enc (s x - b_dec) + b_enc` and `x_hat = (W_dec a + b_dec) / s` with the input scale
`s`; SAELens (`apply_b_dec_to_input`, `normalize_activations="none"`) computes
`pre = (x - b_dec') @ W_enc' + b_enc'` and `x_hat = a @ W_dec' + b_dec'`. The scale is folded
into the weights, as SAELens's own `fold_activation_norm_scaling_factor` does:

    W_enc' = s W_encᵀ   [d_in, d_sae]      b_enc' = b_enc
    W_dec' = W_decᵀ / s [d_sae, d_in]      b_dec' = b_dec / s

so both compute the same pre-activations, hence the same activations (in our normalised units)
and the same raw-unit reconstructions. Decoder rows of the export have norm `1 / s`, not 1.

| our variant | SAELens `architecture` | inference |
|---|---|---|
| `topk` | `topk` (`k`, `rescale_acts_by_decoder_norm` false) | top-k pre-activations, then ReLU |
| `relu` | `standard` | ReLU |
| `batchtopk` | `jumprelu`, every threshold θ | `pre · [pre > θ]` (θ ≥ 0, so ReLU is a no-op), as SAELens itself saves a trained BatchTopK SAE |

A BatchTopK SAE whose threshold was never estimated has no inference rule, so it is refused.
Everything SAELens has no field for (our full config, `scale`, the training metrics) goes into
`metadata.concept_atlas`, beside SAELens's own `hook_name` (our layer name) and `model_name`.
The dead-latent counters are not exported (training state); an import starts them at 0.

Import reads any SAELens SAE of architecture `standard`, `topk` or `jumprelu` (the last one
only with one threshold for all latents: our BatchTopK has a single θ). Our decoder columns are
unit-norm in normalised space, so the import picks the scale from `metadata.concept_atlas`
(our own exports: an exact round trip) or, when every decoder row has the same norm n, s = 1/n
(activations then equal SAELens's). Otherwise it folds each latent's decoder norm into its
encoder row (s = 1), exact for ReLU and JumpReLU (their activations get multiplied by the norm)
and for TopK with `rescale_acts_by_decoder_norm` (unchanged); a plain TopK SAE with unequal
decoder norms is refused, since folding would change which k latents win.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.sae.config import DTYPES, SAEConfig
from pipeline.sae.model import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# the SAELens release whose format this writes: cfg.json with `architecture` and `metadata`
SAELENS_VERSION = "6.54.12"
METADATA_KEY = "concept_atlas"
_ARCHITECTURE = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}
_VARIANT = {v: k for k, v in _ARCHITECTURE.items()}
# SAELens applies no input transform at inference for these two (expected_average_only_in's
# factor is folded into the weights when SAELens saves); the others cannot be expressed in ours
_IDENTITY_NORMS = ("none", "expected_average_only_in")
# relative spread of decoder-row norms below which they count as one norm (float32 rounding of
# a unit-norm column is ~1e-7)
_NORM_RTOL = 1e-4


def to_saelens(sae: SAE, hook_name: str, model_name: str | None = None,
               metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SAELens's `cfg.json` dict and state dict of `sae` (see the module docstring).

    `hook_name`: the layer the SAE reads (our layer name); `model_name`: the model's name;
    `metadata`: more keys for `metadata.concept_atlas` (atlas id, sae id, metrics...).
    Raises ValueError for a BatchTopK SAE without an estimated threshold.
    """
    cfg = sae.cfg
    threshold = float(sae.threshold)
    if cfg.variant == "batchtopk" and threshold < 0:
        raise ValueError("this batchtopk SAE has no inference threshold (never trained), so it "
                         "has no inference rule to export; train it first, or export a topk or "
                         "relu SAE")
    with torch.no_grad():
        dtype = sae.W_enc.dtype
        s = sae.scale.to(torch.float64)
        # folded in float64, then stored in the SAE's own dtype
        state = {
            "W_enc": (sae.W_enc.double().t() * s).to(dtype),
            "b_enc": sae.b_enc.detach().clone(),
            "W_dec": (sae.W_dec.double().t() / s).to(dtype),
            "b_dec": (sae.b_dec.double() / s).to(dtype),
        }
        if cfg.variant == "batchtopk":
            state["threshold"] = torch.full((cfg.n_latents,), threshold, dtype=dtype)
    ours = {"format": "concept-atlas-sae", "config": cfg.to_dict(), "scale": float(sae.scale),
            "threshold": threshold if threshold >= 0 else None, **(metadata or {})}
    out: dict[str, Any] = {
        "architecture": _ARCHITECTURE[cfg.variant],
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION,
                     "sae_lens_training_version": SAELENS_VERSION,
                     "model_name": model_name, "hook_name": hook_name, "hook_head_index": None,
                     METADATA_KEY: ours},
    }
    # the activation also under the keys SAELens < 6 read (6.x derives it from `architecture`
    # and ignores them)
    out["activation_fn"] = "topk" if cfg.variant == "topk" else "relu"
    if cfg.variant == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False, activation_fn_kwargs={"k": cfg.k})
    return out, {k: v.detach().cpu().contiguous() for k, v in state.items()}


def export_saelens(sae: SAE, folder: str | os.PathLike[str], hook_name: str,
                   model_name: str | None = None,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write `folder/cfg.json` and `folder/sae_weights.safetensors` (created if missing), the
    folder `sae_lens.SAE.load_from_disk(folder)` reads; returns the folder."""
    cfg, state = to_saelens(sae, hook_name, model_name, metadata)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_FILENAME))
    (folder / CFG_FILENAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def from_saelens(cfg: dict[str, Any], state: dict[str, Tensor]) -> SAE:
    """Our SAE (eval mode, CPU) computing what the SAELens SAE `cfg` + `state` computes (see the
    module docstring for the architectures accepted and the decoder-norm rule).

    Raises ValueError naming the field when the SAE cannot be expressed in ours.
    """
    arch = cfg.get("architecture", "standard")
    if arch not in _VARIANT:
        raise ValueError(f"SAELens architecture {arch!r} has no counterpart here; importable: "
                         f"{', '.join(sorted(_VARIANT))}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in _IDENTITY_NORMS:
        raise ValueError(f"normalize_activations={norm!r} transforms each input at run time, "
                         f"which our SAE cannot express; importable: {', '.join(_IDENTITY_NORMS)}")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"reshape_activations={cfg['reshape_activations']!r}: only 'none' is "
                         "importable (PFVs are flat vectors)")
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(state)) + (
        ["threshold"] if arch == "jumprelu" and "threshold" not in state else [])
    if missing:
        raise ValueError(f"the SAELens weights lack {', '.join(missing)}; "
                         f"they hold {', '.join(sorted(state))}")
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype={cfg.get('dtype')!r}; importable: {', '.join(DTYPES)}")
    f64 = {k: v.detach().to(torch.float64) for k, v in state.items()}
    w_enc, b_enc, w_dec, b_dec = f64["W_enc"], f64["b_enc"], f64["W_dec"], f64["b_dec"]
    d_in, d_sae = w_enc.shape
    if w_dec.shape != (d_sae, d_in):
        raise ValueError(f"W_enc is {tuple(w_enc.shape)} but W_dec {tuple(w_dec.shape)}; "
                         f"expected W_dec of shape {(d_sae, d_in)}")
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ w_enc
    threshold = f64.get("threshold")
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre * ||W_dec_j|| and decodes a / ||W_dec_j||: fold the norms in
        n = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * n, b_enc * n, w_dec / n[:, None]

    ours = ((cfg.get("metadata") or {}).get(METADATA_KEY) or {})
    n = w_dec.norm(dim=1)
    if "scale" in ours:
        scale = float(ours["scale"])
    elif n.max() - n.min() <= _NORM_RTOL * n.max():
        scale = float(1.0 / n.mean())
    else:
        scale = 1.0
    g = scale * n  # what each latent's activation is multiplied by, to make its column unit
    if (g - 1).abs().max() <= _NORM_RTOL:
        g = torch.ones_like(g)  # one norm: no per-latent fold, activations equal SAELens's
    elif arch == "topk":
        raise ValueError("this TopK SAE's decoder rows have unequal norms "
                         f"({n.min().item():.4g}..{n.max().item():.4g}) and it does not rescale "
                         "by them (rescale_acts_by_decoder_norm false): our unit-norm decoder "
                         "would change which k latents win, so it cannot be imported exactly")
    w_enc, b_enc, w_dec = w_enc * g, b_enc * g, w_dec / g[:, None]
    theta = -1.0
    if threshold is not None:
        threshold = threshold * g
        if threshold.max() - threshold.min() > _NORM_RTOL * threshold.abs().max().clamp_min(1e-12):
            raise ValueError("this JumpReLU SAE has per-latent thresholds "
                             f"({threshold.min().item():.4g}..{threshold.max().item():.4g}); "
                             "ours (batchtopk) has one threshold for all latents")
        theta = float(threshold.mean())
        if theta < 0:
            raise ValueError(f"JumpReLU threshold {theta:.4g} < 0: ours applies pre·[pre > θ] "
                             "with θ >= 0 (a ReLU before the jump)")

    variant = _VARIANT[arch]
    base = dict(ours.get("config") or {"normalize": scale != 1.0})
    base.update(d_in=int(d_in), n_latents=int(d_sae), variant=variant, dtype=dtype_name)
    if variant == "topk":
        base["k"] = int(cfg["k"])
    elif "k" not in base or not 1 <= int(base["k"]) <= d_sae:
        base["k"] = 1  # only used in training by batchtopk; ignored by relu
    sae = SAE(SAEConfig.from_dict(base))
    dtype = sae.cfg.torch_dtype
    with torch.no_grad():
        # our pre = W_enc (s x - b_dec) + b_enc: W_enc = W_enc'ᵀ / s, b_dec = s b_dec'
        sae.W_enc.copy_((w_enc.t() / scale).to(dtype))
        sae.b_enc.copy_(b_enc.to(dtype))
        sae.W_dec.copy_((w_dec.t() * scale).to(dtype))
        sae.b_dec.copy_((b_dec * scale).to(dtype))
        sae.scale.fill_(scale)
        sae.threshold.fill_(theta)
    return sae.eval()


def import_saelens(folder: str | os.PathLike[str]) -> tuple[SAE, dict[str, Any]]:
    """Read a SAELens SAE folder (`cfg.json` + `sae_weights.safetensors`): our SAE (see
    `from_saelens`) and the cfg dict. FileNotFoundError naming a missing file."""
    folder = Path(folder)
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a SAELens SAE folder holds "
                                    f"{CFG_FILENAME} and {WEIGHTS_FILENAME}")
    cfg = json.loads((folder / CFG_FILENAME).read_text())
    return from_saelens(cfg, load_file(str(folder / WEIGHTS_FILENAME))), cfg
