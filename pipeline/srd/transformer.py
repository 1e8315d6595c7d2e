"""SRD rules for ViT branches (docs/method.md §3, ViT rules [choice]).

Token layouts are channel-first, [N, D, T], like CNN maps with one position axis (Swin's are
maps [N, D, H, W]: AttentionRule flattens them).
- Self-attention with frozen weights A^h: c(i->j) = sum_h A^h_ji W_O^h (W_V^h LN1(x_i) + b_V^h);
  what travels in a token's value vector (value bias, LayerNorm shift) is that token's; only
  the output-projection bias b_O is shared by norm among the attention contributions. The skip
  x_j is an IdentityRule (no share). Layer-scale factors are folded into W_O and b_O. A ViT's
  A^h is one softmax over all tokens; Swin's windows are placed in one such matrix (families/swin).
- Patch embedding: a P x P stride-P conv (ConvRule) placed on the patch tokens; the position
  embedding is part of its bias, CLS / register tokens are block constants.
- The MLP sub-block x + MLP(LN2(x)) acts per token: relevance passes through it; a latent
  direction is pulled back through its frozen linear part (LN2 scale and GELU ratios frozen).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.srd.conv import ConvRule, sqrt0
from pipeline.srd.errors import UnsupportedModuleError


class AttentionRule:
    """Token mixing with frozen weights: sources x_i of the block input, target z_j.

    a [N, H, T_j, T_i] attention weights, u [N, H, T_i, d] value vectors, proj the output
    projection (Linear, W_O = [W_O^1 .. W_O^H]), scale a layer scale folded into it. Tokens may sit
    on a grid: g and the results are then [N, S, *grid] (a Swin map), else [N, S, T]."""

    def __init__(self, source: str, a: Tensor, u: Tensor, proj: nn.Linear, scale: Tensor | None,
                 grid: tuple[int, ...] | None = None) -> None:
        heads, dh = u.shape[1], u.shape[3]
        w = proj.weight.detach().view(-1, heads, dh)  # W_O^h: [D, H, d]
        b = proj.bias.detach() if proj.bias is not None else None
        if scale is not None:
            w, b = w * scale.reshape(-1, 1, 1), None if b is None else b * scale
        self.source, self.w, self.a, self.u, self.grid = source, w, a, u.contiguous(), grid
        pos = (1,) * (len(grid) if grid else 1)
        self.bias = None if b is None else b.reshape(1, -1, *pos)
        self._norms: Tensor | None = None

    @classmethod
    def of_vit(cls, source: str, h: Tensor, attn: nn.Module, out: Tensor, scale: Tensor | None,
               path: str) -> AttentionRule:
        """One timm ViT `Attention` on its recorded input h [N, T, D] (LN1(x)), checked against its
        recorded output."""
        n, t, _ = h.shape
        q, k, v = attn.qkv(h).view(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [N, H, T, d]
        a = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)  # [N, H, T_j, T_i]
        mine = attn.proj((a @ v).transpose(1, 2).reshape(n, t, -1))
        if not torch.allclose(mine, out, rtol=1e-3, atol=1e-4 * float(out.detach().abs().max())):
            raise UnsupportedModuleError(attn, path, "attention output not reproduced from frozen weights")
        return cls(source, a, v, attn.proj, scale)

    def _tokens(self, r: Tensor) -> Tensor:
        return r.flatten(-len(self.grid)) if self.grid else r

    def _layout(self, r: Tensor) -> Tensor:
        return r.unflatten(-1, self.grid) if self.grid else r

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        """sum_j <c(i->j), g_j> = sum_h <u^h_i, sum_j A^h_ji W_O^h^T g_j>: [N,S,D,T] -> [N,S,T]."""
        gh = torch.einsum("nsdj,dhe->nshje", self._tokens(g), self.w)  # W_O^h^T g_j
        agg = torch.einsum("nhji,nshje->nshie", self.a, gh)  # sum_j A^h_ji W_O^h^T g_j
        return self._layout((agg * self.u.unsqueeze(1)).sum((2, 4)))

    def norms(self) -> Tensor:
        """||c0(i->j)||^2 = sum_{h,h'} A^h_ji A^h'_ji <o^h_i, o^h'_i>, o^h_i = W_O^h u^h_i: [N, T_j, T_i]."""
        if self._norms is None:
            o = torch.einsum("dhe,nhie->nihd", self.w, self.u)
            gram = torch.einsum("nihd,nigd->nihg", o, o)
            mixed = torch.einsum("nihg,ngji->nhji", gram, self.a)  # sum_h' <o^h_i, o^h'_i> A^h'_ji
            sq = (self.a * mixed).sum(1)
            self._norms = sqrt0(sq.clamp(min=0))
        return self._norms

    def norm_total(self) -> Tensor:
        return self._layout(self.norms().sum(2))

    def scatter(self, beta: Tensor) -> Tensor:
        return self._layout(torch.einsum("nji,nsj->nsi", self.norms(), self._tokens(beta)))


class PatchRule:
    """A ConvRule on the patch grid, seen from the token layout [N, D, prefix + gh*gw]."""

    def __init__(self, conv: ConvRule, prefix: int, bias: Tensor) -> None:
        self.conv, self.prefix, self.source = conv, prefix, conv.source
        self.grid = conv.geo.out_size
        self.bias = nn.functional.pad(bias, (prefix, 0))  # [N, D, T], zero on prefix tokens
        conv.bias = bias.unflatten(2, self.grid)

    def _grid(self, r: Tensor) -> Tensor:
        return r[..., self.prefix:].unflatten(-1, self.grid)

    def contribution_relevance(self, g: Tensor, src: Tensor) -> Tensor:
        return self.conv.contribution_relevance(self._grid(g), src)

    def norm_total(self) -> Tensor:
        return nn.functional.pad(self.conv.norm_total().flatten(1), (self.prefix, 0))

    def scatter(self, beta: Tensor) -> Tensor:
        return self.conv.scatter(self._grid(beta))


def mlp_pull(y: Tensor, norm2: nn.Module, mlp: nn.Module, scale: Tensor | None):
    """Pull a direction w on x + ls2 * MLP(LN2(x)) back to x through its frozen linear part:
    u = w + J^T w, J = diag(ls2) W2 diag(act(a)/a) W1 diag(gamma/sigma) (I - 11^T/D) per token,
    with a = fc1(LN2(y)) recomputed from y [N, D, T] when a direction is pulled (not stored)."""

    def pull(w: Tensor) -> Tensor:
        tokens = y.transpose(1, 2)
        sigma = torch.sqrt(tokens.var(2, unbiased=False, keepdim=True) + norm2.eps)  # [N, T, 1]
        ln = (norm2.weight.detach() if norm2.weight is not None else 1.0) / sigma  # [N, T, D]
        pre = mlp.fc1(norm2(tokens))
        nz = pre != 0
        gate = torch.where(nz, mlp.act(pre) / torch.where(nz, pre, torch.ones_like(pre)), 0.0)
        w = w.expand(*w.shape[:3], y.shape[2])
        t = w if scale is None else w * scale.reshape(1, 1, -1, 1)
        t = (t.transpose(2, 3) @ mlp.fc2.weight.detach()) * gate.unsqueeze(1)  # [N, S, T, 4D]
        t = (t @ mlp.fc1.weight.detach()) * ln.unsqueeze(1)  # [N, S, T, D]
        t = t.transpose(2, 3)
        return w + t - t.mean(2, keepdim=True)

    return pull
