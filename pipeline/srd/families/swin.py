"""timm SwinTransformer (swin_tiny_patch4_window7_224 and its family: shifted windows, relative
position bias, patch merging).

Units are channel-first maps [N, C, H, W] of the residual stream (tap layout row-major):
`patch_embed.proj` (the patch conv), `patch_embed` (its LayerNorm, positionwise),
`layers.i.downsample` (patch merging) and `layers.i.blocks.j` (z = x + window attention, the
input of norm2; v = the block output, the per-token MLP sub-block its "nonlinearity", as a ViT's);
`layers.i` = the stage's last unit. [choice] (docs/method.md §3.6, Swin) Window attention is the
ViT rule with one frozen attention matrix per image over all tokens: each window's weights
(relative position bias and the shifted windows' mask inside the softmax) placed at its tokens'
rows and columns after the cyclic shift, zero elsewhere. Patch merging (2x2 space-to-depth,
LayerNorm over the 4C concatenation, linear reduction) is one block: with the target's LN scale
sigma_q frozen, c0(p->q) = (1/sigma_q) W_red diag(gamma) (I - 11^T/4C) E_p x_p, a 2x2 stride-2 conv
scaled per target (`TargetScaledRule`), bias W_red beta shared by norm. Head: per-token LayerNorm,
average pool, linear, split as a mean-pooled ViT's.
"""
from __future__ import annotations

import torch
from timm.layers import ClassifierHead, LayerNorm, Mlp, PatchEmbed, SelectAdaptivePool2d
from timm.models.swin_transformer import (PatchMerging, SwinTransformer, SwinTransformerBlock,
                                          SwinTransformerStage, WindowAttention, window_partition)
from torch import Tensor, nn

from pipeline.srd.conv import ConvRule, IdentityRule, PositionwiseRule, TargetScaledRule, norm_shift
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.families.base import (
    ACTIVATIONS,
    Claims,
    Stages,
    claim_stages,
    graph_of,
    input_unit,
    linear_unit,
)
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, pooled_linear_seed
from pipeline.srd.record import record
from pipeline.srd.transformer import AttentionRule, mlp_pull

NORMS = (nn.LayerNorm, LayerNorm)


def _validate(c: Claims, model: SwinTransformer) -> Stages:
    c.get("patch_embed", PatchEmbed)
    c.get("patch_embed.proj", nn.Conv2d)
    c.get("patch_embed.norm", *NORMS)
    if getattr(model, "absolute_pos_embed", None) is not None:
        raise UnsupportedModuleError(model, "", "absolute position embedding")
    stages = []
    for i, stage in enumerate(c.get("layers", nn.Sequential)):
        p = f"layers.{i}"
        c.get(p, SwinTransformerStage)
        down = not isinstance(stage.downsample, nn.Identity)
        if down:
            c.get(f"{p}.downsample", PatchMerging)
            c.get(f"{p}.downsample.norm", *NORMS)
            c.get(f"{p}.downsample.reduction", nn.Linear)
        c.get(f"{p}.blocks", nn.Sequential)
        paths = []
        for j in range(len(stage.blocks)):
            b = f"{p}.blocks.{j}"
            c.get(b, SwinTransformerBlock)
            c.get(f"{b}.norm1", *NORMS)
            c.get(f"{b}.attn", WindowAttention)
            for part in ("qkv", "proj"):
                c.get(f"{b}.attn.{part}", nn.Linear)
            c.get(f"{b}.attn.softmax", nn.Softmax)
            c.get(f"{b}.norm2", *NORMS)
            c.get(f"{b}.mlp", Mlp)
            c.get(f"{b}.mlp.fc1", nn.Linear)
            c.get(f"{b}.mlp.act", *ACTIVATIONS)
            c.get(f"{b}.mlp.norm", nn.Identity)
            c.get(f"{b}.mlp.fc2", nn.Linear)
            paths.append(b)
        stages.append((p, down, paths))
    c.get("norm", *NORMS)
    c.get("head", ClassifierHead)
    gp = c.get("head.global_pool", SelectAdaptivePool2d)
    if gp.pool_type != "avg":
        raise UnsupportedModuleError(gp, "head.global_pool", f"pool_type {gp.pool_type!r}: only 'avg' is linear")
    c.claimed.update({"head.global_pool.pool", "head.global_pool.flatten", "head.flatten"})
    c.get("head.fc", nn.Linear)
    return stages


def _window_attention(blk: SwinTransformerBlock, h: Tensor, path: str) -> tuple[Tensor, Tensor]:
    """Frozen attention of one block over all tokens: h [N, H, W, C] (norm1's output) ->
    (a [N, heads, T, T] with each shifted window's weights at its tokens, u [N, heads, T, d])."""
    attn = blk.attn
    n, hh, ww, c = h.shape
    ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
    if hh % ws[0] or ww % ws[1]:
        raise UnsupportedModuleError(blk, path, f"grid {hh}x{ww} not divisible by window {ws} (padded windows)")
    t, area, heads = hh * ww, ws[0] * ws[1], attn.num_heads
    idx = torch.arange(t, device=h.device).view(1, hh, ww, 1)
    shifted = h
    if any(shift):
        shifted = torch.roll(h, (-shift[0], -shift[1]), (1, 2))
        idx = torch.roll(idx, (-shift[0], -shift[1]), (1, 2))
    win = window_partition(shifted, ws).reshape(-1, area, c)  # [N*nW, A, C]
    tok = window_partition(idx, ws).reshape(-1, area)  # [nW, A] token index of each window slot
    q, k, _ = attn.qkv(win).reshape(win.shape[0], area, 3, heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._get_rel_pos_bias()  # [N*nW, heads, A, A]
    mask = blk.get_attn_mask(shifted) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    nw = tok.shape[0]
    logits = logits.view(n, nw, heads, area, area)
    if mask is not None:
        logits = logits + mask.view(1, nw, 1, area, area)
    a_win = torch.softmax(logits, -1)
    pair = (tok[:, :, None] * t + tok[:, None, :]).reshape(1, 1, -1).expand(n, heads, -1)
    a = h.new_zeros(n, heads, t * t).scatter(2, pair, a_win.permute(0, 2, 1, 3, 4).reshape(n, heads, -1))
    _, _, u = attn.qkv(h.reshape(n, t, c)).view(n, t, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return a.view(n, heads, t, t), u


def _merging(down: PatchMerging, src: str, x: Tensor, out: Tensor, path: str) -> TargetScaledRule:
    """Patch merging as a 2x2 stride-2 conv (space-to-depth, LN centring and gamma, reduction)
    scaled per target by 1/sigma_q; checked against the recorded output out [N, 2C, H/2, W/2]."""
    n, c, hh, ww = x.shape
    if hh % 2 or ww % 2:
        raise UnsupportedModuleError(down, path, f"odd grid {hh}x{ww} (padded merging)")
    eye = torch.eye(c, dtype=x.dtype, device=x.device)
    e = x.new_zeros(4 * c, c, 2, 2)  # slot 2*dw + dh of the concatenation holds tap (dh, dw)
    for dh in range(2):
        for dw in range(2):
            e[(2 * dw + dh) * c:(2 * dw + dh + 1) * c, :, dh, dw] = eye
    cat = nn.functional.conv2d(x, e, stride=2)  # [N, 4C, H/2, W/2]: what the LayerNorm sees
    norm, red = down.norm, down.reduction
    sigma = torch.sqrt(cat.var(1, unbiased=False) + norm.eps)  # [N, H/2, W/2]
    m = red.weight.detach() * (norm.weight.detach() if norm.weight is not None else 1.0)
    m = m - m.mean(1, keepdim=True)  # W_red diag(gamma) (I - 11^T / 4C)
    conv = nn.Conv2d(c, m.shape[0], 2, 2, bias=False).to(x.device, x.dtype)
    conv.weight.data = (m @ e.flatten(1)).view(m.shape[0], c, 2, 2)
    bias = norm_shift(norm, red)
    rule = TargetScaledRule(ConvRule(src, conv, None, x, out.shape[2:], path=f"{path}.reduction"),
                            1.0 / sigma, None if bias is None else bias.reshape(1, -1, 1, 1))
    mine = nn.functional.conv2d(x, conv.weight, stride=2) / sigma.unsqueeze(1)
    if bias is not None:
        mine = mine + rule.bias
    if not torch.allclose(mine, out, rtol=1e-4, atol=1e-5 * float(out.detach().abs().max())):
        raise UnsupportedModuleError(down, path, "patch merging not reproduced as a scaled 2x2 conv")
    return rule


def build(model: SwinTransformer, images: Tensor, head: str, differentiable: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; Swin seeds exactly at its pooled head")
    c, stages, blocks, downs = claim_stages(model, _validate)
    rec = record(model, images, inputs=[f"{b}.norm2" for b in blocks],
                 outputs=["patch_embed.proj", "patch_embed"] + downs + blocks + [f"{b}.norm1" for b in blocks],
                 differentiable=differentiable)
    cf = lambda t: t.permute(0, 3, 1, 2).contiguous()  # noqa: E731  NHWC -> NCHW
    mods = c.modules
    z = rec.outputs["patch_embed.proj"]
    units: list[Unit] = [input_unit(images), linear_unit("patch_embed.proj", z)]
    out = [Block("patch_embed.proj", [ConvRule("input", mods["patch_embed.proj"], None, images, z.shape[2:],
                                               path="patch_embed.proj")])]
    x = cf(rec.outputs["patch_embed"])
    units.append(linear_unit("patch_embed", x))
    out.append(Block("patch_embed", [PositionwiseRule("patch_embed.proj", x, norm_shift(mods["patch_embed.norm"]))]))
    src, v, aliases = "patch_embed", x, {}
    for p, down, paths in stages:
        if down:
            d = f"{p}.downsample"
            z = cf(rec.outputs[d])
            units.append(linear_unit(d, z))
            out.append(Block(d, [_merging(mods[d], src, v, z, d)]))
            src, v = d, z
        for b in paths:
            blk = mods[b]
            grid = tuple(v.shape[2:])
            a, u = _window_attention(blk, rec.outputs[f"{b}.norm1"], b)
            y = rec.inputs[f"{b}.norm2"].transpose(1, 2)  # [N, C, T]
            attn = AttentionRule(src, a, u, blk.attn.proj, None, grid)
            mine = v.flatten(2) + blk.attn.proj((a @ u).transpose(1, 2).flatten(2)).transpose(1, 2)
            if not torch.allclose(mine, y, rtol=1e-4, atol=1e-5 * float(y.detach().abs().max())):
                raise UnsupportedModuleError(blk.attn, f"{b}.attn", "window attention not reproduced from frozen weights")
            pull = mlp_pull(y, blk.norm2, blk.mlp, None)
            units.append(Unit(b, y.unflatten(2, grid), cf(rec.outputs[b]),
                              pull=lambda w, pull=pull, grid=grid: pull(w.flatten(3) if w.dim() > 3 else w).unflatten(3, grid)))
            out.append(Block(b, [IdentityRule(src), attn]))
            src, v = b, units[-1].v
        aliases[p] = aliases[f"{p}.blocks"] = src
    # the head: per-token LayerNorm (runs under adapters.build's grad mode), then mean pool + linear
    normed = cf(model.norm(v.permute(0, 2, 3, 1)))
    fc = model.head.fc
    return (graph_of(units, out, aliases, rec.logits, differentiable),
            Head(src, lambda y: pooled_linear_seed(normed, fc, y)))
