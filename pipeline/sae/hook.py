"""A forward hook that replaces a tapped module's output PFVs with their SAE reconstruction.

Used for downstream fidelity: run the model once plainly and once with the hook registered on
the tapped module, then compare logits with `metrics.logit_fidelity`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae.model import SAE

ForwardHook = Callable[[nn.Module, Any, Any], Tensor]


def reconstruct_hook(sae: SAE, keep_prefix_tokens: int = 0) -> ForwardHook:
    """A hook for `module.register_forward_hook` that returns the reconstructed output.

    Output layouts (one PFV per CNN position or ViT token):
        Tensor[N, C, H, W]: a CNN map, C = d_in.
        Tensor[N, T, C]: ViT tokens; the first `keep_prefix_tokens` (class / register tokens)
            pass through unchanged, for an SAE trained on patch tokens only.
        Tensor[N, C]: pooled features.

    The SAE runs in its current mode under no_grad; put it in eval mode (BatchTopK then uses
    its threshold, so each PFV is reconstructed independently of the batch).
    """
    if keep_prefix_tokens < 0:
        raise ValueError(f"keep_prefix_tokens={keep_prefix_tokens}: must be >= 0")

    @torch.no_grad()
    def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"reconstruct_hook on {type(module).__name__}: output is {type(output).__name__}, "
                "expected a Tensor[N, C, H, W], [N, T, C] or [N, C]"
            )
        if output.ndim == 4:
            pfvs = output.permute(0, 2, 3, 1)  # channels last: one PFV per (y, x)
            return _reconstruct(sae, pfvs).permute(0, 3, 1, 2).contiguous()
        if output.ndim == 3:
            prefix, tokens = output[:, :keep_prefix_tokens], output[:, keep_prefix_tokens:]
            return torch.cat([prefix, _reconstruct(sae, tokens)], dim=1)
        if output.ndim == 2:
            return _reconstruct(sae, output)
        raise ValueError(
            f"reconstruct_hook on {type(module).__name__}: output shape {tuple(output.shape)} "
            "is not [N, C, H, W], [N, T, C] or [N, C]"
        )

    return hook


def _reconstruct(sae: SAE, pfvs: Tensor) -> Tensor:
    """Tensor[..., d_in] -> its reconstruction, same shape and dtype."""
    return sae.decode(sae.encode(pfvs)).to(pfvs.dtype)
