"""SRD engine vs a slow brute-force reference (explicit per-(p, q) contribution vectors).

The reference knows nothing of the engine: it rebuilds each tiny model's forward pass from the
modules, gets every contribution vector c0(p->q) of an affine branch by evaluating the branch
on the input with only source position p kept (plain loop over p), shares the branch bias
fn(0) by norm, and forms mu(p->q) = <c(p->q), z_q> / ||z_q||^2 by definition (docs/method.md §§2-3).
"""
from __future__ import annotations

from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.layers import HybridEmbed, LayerScale
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem

from pipeline import srd

Branch = tuple[str, torch.Tensor, "torch.Tensor | None"]  # source, C0 [P_s, C, P_t], bias [C, P_t]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, eval, and every parameter redrawn from `seed` (so a test's model does not depend
    on what ran before it): weights N(0, 1/fan_in), random biases, LayerNorm affine and
    embeddings; BN with random running stats and affine and a large eps (so BN is non-trivial
    and the eps in its shift [choice] is visible)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    model = model.double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.eps = 0.1
                mod.running_mean.copy_(0.3 * rand(c))
                mod.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                mod.weight.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
                mod.bias.copy_(0.3 * rand(c))
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                mod.weight.copy_(rand(*mod.weight.shape) / mod.weight[0].numel() ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(0.2 * rand(*mod.bias.shape))
            elif isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(1 + 0.1 * rand(*mod.weight.shape))
                mod.bias.copy_(0.1 * rand(*mod.bias.shape))
            elif isinstance(mod, LayerScale):
                mod.gamma.copy_(mod.init_values + 0.1 * rand(*mod.gamma.shape))
            elif isinstance(getattr(mod, "gamma", None), torch.nn.Parameter):  # ConvNeXt's layer scale
                mod.gamma.copy_(0.5 + 0.1 * rand(*mod.gamma.shape))
        for name in ("cls_token", "reg_token", "pos_embed"):
            p = getattr(model, name, None)
            if isinstance(p, torch.nn.Parameter):
                p.copy_(0.1 * rand(*p.shape))
    return model


def contributions(fn, x: torch.Tensor, share: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C0[p] = fn(x with only position p) - fn(0) for every source position p (in chunks of p)."""
    bias = fn(torch.zeros_like(x)[None])[0]
    flat = x.flatten(1)
    rows = []
    for lo in range(0, flat.shape[1], 256):
        p = torch.arange(lo, min(lo + 256, flat.shape[1]))
        only = torch.zeros(len(p), *flat.shape, dtype=x.dtype)
        only[torch.arange(len(p)), :, p] = flat[:, p].T
        rows.append((fn(only.view(len(p), *x.shape)) - bias).flatten(2))
    c0 = torch.cat(rows)
    if not share:
        assert bias.abs().max() == 0, "a branch without bias share has a bias"
        return c0, None
    return c0, bias.flatten(1)


def brute_block(r_t: torch.Tensor, z: torch.Tensor, branches: list[Branch], const: torch.Tensor | None = None,
                u: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """R(v_p) = sum_q mu(p->q) R(z_q), bias of each branch shared by ||c0(p->q)||: r_t [P_t], z [C, P_t].
    mu(p->q) = <c(p->q), u_q> / <z_q, u_q> with u = z (PFV ratio) or a latent direction u."""
    u = z if u is None else u
    den = (u * z).sum(0)
    constant = float(r_t[den == 0].sum())  # no ratio at a zero denominator: all of R_q is constant
    r_t = torch.where(den == 0, 0.0, r_t)
    den = torch.where(den == 0, 1.0, den)
    out: dict[str, torch.Tensor] = {}
    if const is not None:
        constant += float(((const * u).sum(0) / den * r_t).sum())
    for name, c0, bias in branches:
        norms = c0.square().sum(1).sqrt()  # ||c0(p->q)|| [P_s, P_t]
        total = norms.sum(0)
        rel = torch.zeros(c0.shape[0], dtype=z.dtype)
        for p in range(c0.shape[0]):
            c = c0[p] if bias is None else c0[p] + bias * torch.where(total > 0, norms[p] / total, 0.0)
            rel[p] = ((c * u).sum(0) / den * r_t).sum()
        if bias is not None:
            constant += float(torch.where(total > 0, 0.0, (bias * u).sum(0) / den * r_t).sum())
        out[name] = out.get(name, 0) + rel
    return out, constant


def brute_propagate(blocks: list[tuple[str, torch.Tensor, list[Branch], torch.Tensor | None]],
                    seed_unit: str, seed: torch.Tensor, u: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Blocks in forward order (target, z [C, P], branches, const); returns (R on input, constant).
    u [C, P]: a readout direction on the seed unit's z for the first step only; the seed then
    holds the readout's coefficients alpha_r, and R(z_r) = alpha_r <u_r, z_r> is shared by
    <c(p->r), u_r> / <u_r, z_r>."""
    acc = {seed_unit: seed.flatten()}
    constant = 0.0
    for target, z, branches, const in reversed(blocks):
        if target not in acc:
            continue
        first = u if target == seed_unit else None
        r = acc.pop(target) if first is None else acc.pop(target) * (first * z).sum(0)
        shares, c = brute_block(r, z, branches, const, first)
        constant += c
        for name, rel in shares.items():
            acc[name] = acc.get(name, 0) + rel
    return acc.pop("input"), constant


def brute_propagate_cls_stream(blocks: list, seed_unit: str, u: torch.Tensor, kappa: float,  # noqa: C901
                               mlps: dict) -> tuple[torch.Tensor, float]:
    """A CLS head with the class direction kept along the CLS token's residual stream (docs/method.md
    §3.3): every relevance is an upstream vector G_q on a target's z (ratio positions:
    R_q z_q / ||z_q||^2); a source p gets sum_q <c(p->q) + bias share, G_q>. What reaches token 0
    through a block's skip (branch 0 of `blocks.l`) stays the vector w = G_0 on the token's v below,
    read there as <w, v_0>: its G_0 is w pulled back through the frozen MLP (`mlps`, autograd), and
    <w, v_0> - <G_0, z_0> is constant."""
    acc: dict[str, torch.Tensor] = {}
    carried: dict[str, torch.Tensor] = {}
    constant = kappa
    for target, z, branches, const in reversed(blocks):
        if target == seed_unit:
            g = u  # the class direction on z [D, T], zero but at the CLS token
        elif target in acc or target in carried:
            r = acc.pop(target, torch.zeros(z.shape[1], dtype=z.dtype))
            den = (z * z).sum(0)
            g = torch.where(den > 0, r / torch.where(den > 0, den, 1.0), 0.0) * z
            constant += float(r[den == 0].sum())
            w = carried.pop(target, None)
            if w is not None:
                zz = z.clone().requires_grad_(True)
                with torch.enable_grad():
                    v0 = mlps[target](zz.T)[0] if target in mlps else zz[:, 0]
                    (pulled,) = torch.autograd.grad((w * v0).sum(), zz)
                g = g + pulled
                constant += float((w * v0).sum() - (pulled[:, 0] * z[:, 0]).sum())
        else:
            continue
        if const is not None:
            constant += float((const * g).sum())
        for k, (name, c0, bias) in enumerate(branches):
            norms = c0.square().sum(1).sqrt()
            total = norms.sum(0)
            rel = torch.zeros(c0.shape[0], dtype=z.dtype)
            for p in range(c0.shape[0]):
                c = c0[p] if bias is None else c0[p] + bias * torch.where(total > 0, norms[p] / total, 0.0)
                rel[p] = (c * g).sum()
            if bias is not None:
                constant += float(torch.where(total > 0, 0.0, (bias * g).sum(0)).sum())
            if k == 0 and target.startswith("blocks."):  # the CLS token's own skip: its vector is carried
                rel[0] -= (c0[0, :, 0] * g[:, 0]).sum()
                carried[name] = carried.get(name, 0) + g[:, 0]
            acc[name] = acc.get(name, 0) + rel
    return acc.pop("input"), constant


def frozen_max_pool(pool: torch.nn.MaxPool2d, v: torch.Tensor):
    """The max pool with its argmax frozen at v: a channel-wise gather, linear in its input."""
    _, idx = F.max_pool2d(v[None], pool.kernel_size, pool.stride, pool.padding, return_indices=True)
    return lambda t: t.flatten(2).gather(2, idx.flatten(2).expand(t.shape[0], -1, -1)).view(t.shape[0], *idx.shape[1:])


def same(t: torch.Tensor) -> torch.Tensor:
    return t


def bn_affine(bn: torch.nn.BatchNorm2d):
    """Eval-mode BN without any activation a timm BatchNormAct2d would apply."""
    return lambda t: F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def gap_seed(fc: torch.nn.Linear, v: torch.Tensor, y: int) -> torch.Tensor:
    """R_p = (w_y . v_p + b_y) / n (docs/method.md §3)."""
    return (torch.einsum("c,chw->hw", fc.weight[y], v) + fc.bias[y]) / v[0].numel()


class Chain:
    """Builds reference blocks in forward order; each unit keeps its own v."""

    def __init__(self, x: torch.Tensor) -> None:
        self.blocks: list = []
        self.v = {"input": x}

    def conv(self, name: str, src: str, fn, act=None, skips=(), share_skips: bool = True) -> torch.Tensor:
        """Unit `name`: z = fn(v_src) + sum of skip branches (src, fn); v = act(z) (None: v = z)."""
        x = self.v[src]
        z = fn(x[None])[0]
        branches = [(src, *contributions(fn, x))]
        for s_src, s_fn, share in skips:
            z = z + s_fn(self.v[s_src][None])[0]
            branches.append((s_src, *contributions(s_fn, self.v[s_src], share=share)))
        self.blocks.append((name, z.flatten(1), branches, None))
        self.v[name] = z if act is None else act(z.clone())
        return z


def resnet_reference(model: ResNet, x: torch.Tensor, y: int):
    """Blocks of a timm ResNet for one image x [3, H, W], and the GAP + linear seed of class y."""
    ch = Chain(x)
    ch.conv("act1", "input", lambda t: model.bn1(model.conv1(t)), model.act1)
    src, pool = "act1", frozen_max_pool(model.maxpool, ch.v["act1"])
    for k, stage in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), 1):
        for i, blk in enumerate(stage):
            parts = [(blk.conv1, blk.bn1, blk.act1), (blk.conv2, blk.bn2, blk.act2)]
            if isinstance(blk, Bottleneck):
                parts.append((blk.conv3, blk.bn3, blk.act3))
            prev, cur_pool = src, pool
            for j, (conv, bn, act) in enumerate(parts, 1):
                main = (lambda conv, bn, p: (lambda t: bn(conv(p(t)))))(conv, bn, cur_pool)
                skips = ()
                if j == len(parts):
                    if blk.downsample is not None:
                        skips = [(src, (lambda p, ds: (lambda t: ds(p(t))))(pool, blk.downsample), True)]
                    else:
                        skips = [(src, pool, False)]
                ch.conv(f"layer{k}.{i}.act{j}", prev, main, act, skips)
                prev, cur_pool = f"layer{k}.{i}.act{j}", same
            src, pool = prev, same
    seed = gap_seed(model.fc, ch.v[src], y)
    return ch.blocks, src, seed, float(seed.sum()), None


def vgg_reference(model: VGG, x: torch.Tensor, y: int):
    """Blocks of a timm VGG (pools joined to the next conv, fc6/fc7 as convs), exact GAP seed."""
    ch = Chain(x)
    src, pool, feats, i = "input", same, list(model.features), 0
    while i < len(feats):
        if isinstance(feats[i], torch.nn.MaxPool2d):
            pool, i = frozen_max_pool(feats[i], ch.v[src]), i + 1
            continue
        conv, bn = feats[i], feats[i + 1] if isinstance(feats[i + 1], torch.nn.BatchNorm2d) else same
        act = feats[i + 2] if bn is not same else feats[i + 1]
        name = f"features.{i + 2 if bn is not same else i + 1}"
        ch.conv(name, src, (lambda c, b, p: (lambda t: b(c(p(t)))))(conv, bn, pool), act)
        src, pool, i = name, same, i + (3 if bn is not same else 2)
    mlp = model.pre_logits
    ch.conv("pre_logits.act1", src, lambda t: mlp.fc1(pool(t)), mlp.act1)
    ch.conv("pre_logits.act2", "pre_logits.act1", mlp.fc2, mlp.act2)
    seed = gap_seed(model.head.fc, ch.v["pre_logits.act2"], y)
    return ch.blocks, "pre_logits.act2", seed, float(seed.sum()), None


def vit_reference(model: VisionTransformer, x: torch.Tensor, y: int):
    """Blocks of a timm ViT: patch embedding (pos-embed in its bias, prefix tokens constant), then
    per layer the attention block with explicit c(i->j) = sum_h A^h_ji W_O^h (W_V^h LN1(x_i) + b_V^h)
    (loops over i, j, h), b_O shared by norm, the skip x_j; the MLP passes relevance. A CLS head
    is a readout of the CLS token's z (`cls_readout`); a mean-pool head is split over tokens."""
    prefix = model.num_prefix_tokens
    e = model._pos_embed(model.patch_embed(x[None]))[0].T  # [D, T], before the pre-norm
    x0 = model.norm_pre(e.T[None])[0].T
    ch, src, token_conv = Chain(x), "input", getattr(model.patch_embed, "proj", None)
    if isinstance(model.patch_embed, HybridEmbed):  # a ConvStem: conv + BN + act units, last conv linear
        *layers, last = model.patch_embed.backbone
        for i, layer in enumerate(layers):
            ch.conv(f"patch_embed.backbone.{i}", src, lambda t, l=layer: bn_affine(l.bn)(l.conv(t)), layer.bn.act)
            src = f"patch_embed.backbone.{i}"
        token_conv = last.conv
    patch = lambda t: token_conv(t).flatten(2)  # noqa: E731
    c0, b = contributions(patch, ch.v[src])
    bias = b + e[:, prefix:] - patch(ch.v[src][None])[0]  # conv bias + position embedding
    const = e.clone()
    const[:, prefix:] = 0
    pre_norm = not isinstance(model.norm_pre, torch.nn.Identity)
    first = "pos_embed" if pre_norm else "norm_pre"
    blocks = ch.blocks + [(first, e, [(src, F.pad(c0, (prefix, 0)), F.pad(bias, (prefix, 0)))], const)]
    if pre_norm:  # CLIP: LN token by token, scale frozen
        blocks.append(("norm_pre", x0, [(first, *contributions(frozen_layer_norm(model.norm_pre, e), e))], None))
    v, src, t = x0, "norm_pre", x0.shape[1]
    for l, blk in enumerate(model.blocks):
        attn, h = blk.attn, blk.norm1(v.T)
        heads, d = attn.num_heads, attn.head_dim
        q, k, val = attn.qkv(h).view(t, 3, heads, d).unbind(1)
        gamma = blk.ls1.gamma if isinstance(blk.ls1, LayerScale) else torch.ones(v.shape[0], dtype=v.dtype)
        c_att = torch.zeros(t, v.shape[0], t, dtype=v.dtype)
        for hh in range(heads):
            a = torch.softmax(q[:, hh] @ k[:, hh].T * attn.scale, -1)  # [T_j, T_i]
            o = (val[:, hh] @ attn.proj.weight[:, hh * d:(hh + 1) * d].T) * gamma  # W_O^h v^h_i
            for i in range(t):
                for j in range(t):
                    c_att[i, :, j] += a[j, i] * o[i]
        c_skip = torch.zeros_like(c_att)
        for i in range(t):
            c_skip[i, :, i] = v[:, i]
        b_o = (attn.proj.bias * gamma)[:, None].expand(-1, t)
        z = (v.T + blk.ls1(attn(h[None])[0])).T
        assert torch.allclose(z, c_att.sum(0) + c_skip.sum(0) + b_o, atol=1e-12)
        blocks.append((f"blocks.{l}", z, [(src, c_skip, None), (src, c_att, b_o)], None))
        v, src = blk(v.T[None])[0].T, f"blocks.{l}"
    if model.global_pool == "token":
        seed = torch.zeros(t, dtype=v.dtype)
        seed[0] = 1.0
        u, kappa = cls_readout(model, blocks[-1][1], y)
        zs = {name: z for name, z, *_ in blocks}
        mlps = {f"blocks.{l}": frozen_mlp(blk, zs[f"blocks.{l}"]) for l, blk in enumerate(model.blocks)}
        return blocks, src, seed, float(model.forward_head(model.norm(v.T[None]))[0, y]), (u, kappa, mlps)
    else:
        a = model.norm(v.T)[prefix:]  # [n, D]
        if isinstance(model.fc_norm, torch.nn.LayerNorm):
            m, fn = a.mean(0), model.fc_norm
            a = (a - a.mean(1, keepdim=True)) / torch.sqrt(m.var(unbiased=False) + fn.eps) * fn.weight + fn.bias
        seed = F.pad((a @ model.head.weight[y] + model.head.bias[y]) / a.shape[0], (prefix, 0))
    return blocks, src, seed, float(seed.sum()), None


def frozen_mlp(blk, z: torch.Tensor):
    """y [T, D] -> y + ls2 MLP(LN2(y)) with LN2's scale and the activation ratios frozen at z [D, T]:
    the affine map the engine's MLP pull-back linearises."""
    ln = blk.norm2
    sigma = torch.sqrt(z.T.var(-1, unbiased=False, keepdim=True) + ln.eps)
    pre = blk.mlp.fc1(ln(z.T))
    gate = blk.mlp.act(pre) / pre

    def frozen(yy: torch.Tensor) -> torch.Tensor:
        h = (yy - yy.mean(-1, keepdim=True)) / sigma * ln.weight + ln.bias
        return yy + ls2(blk.mlp.fc2(gate * blk.mlp.fc1(h)))

    ls2 = getattr(blk, "ls2", torch.nn.Identity())  # Swin blocks have no layer scale
    assert torch.allclose(frozen(z.T), z.T + ls2(blk.mlp(ln(z.T))), atol=1e-12)
    return frozen


def frozen_norm(norm: torch.nn.Module, a: torch.Tensor):
    """A LayerNorm with its scale frozen at the vector a [D] (an identity passes)."""
    if isinstance(norm, torch.nn.Identity):
        return lambda t: t
    sigma = torch.sqrt(a.var(unbiased=False) + norm.eps)
    return lambda t: (t - t.mean(-1, keepdim=True)) / sigma * norm.weight + norm.bias


def cls_readout(model: VisionTransformer, z: torch.Tensor, y: int) -> tuple[torch.Tensor, float]:
    """logit_y as an affine function of the last unit's z [D, T] with every scale and gate frozen
    (the last MLP, `norm`, `fc_norm`): its gradient u [D, T] (autograd) and its value at z = 0."""
    mlp = frozen_mlp(model.blocks[-1], z)
    x = mlp(z.T)[0]
    norms = []
    for norm in (model.norm, model.fc_norm):
        norms.append(frozen_norm(norm, x))
        x = norm(x)

    def logit(zz: torch.Tensor) -> torch.Tensor:
        t = mlp(zz.T)[0]
        for fn in norms:
            t = fn(t)
        return t @ model.head.weight[y] + model.head.bias[y]

    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        (u,) = torch.autograd.grad(logit(zz), zz)
    return u, float(logit(torch.zeros_like(z)))


def effnet_reference(model: EfficientNet | MobileNetV3, x: torch.Tensor, y: int):
    """Blocks of a timm EfficientNet / MobileNetV3: depthwise convs, linear bottlenecks as identity
    units, an SE module applied to the activation it scales (the unit's v), MobileNetV3's head as
    global mean -> conv_head -> act2 over the pre-pool PFVs."""
    ch = Chain(x)
    ch.conv("bn1", "input", lambda t: bn_affine(model.bn1)(model.conv_stem(t)), model.bn1.act)
    src = "bn1"
    for i, stage in enumerate(model.blocks):
        for j, blk in enumerate(stage):
            p = f"blocks.{i}.{j}"
            if isinstance(blk, ConvBnAct):
                ch.conv(f"{p}.bn1", src, lambda t, c=blk.conv, b=blk.bn1: bn_affine(b)(c(t)), blk.bn1.act)
                src = f"{p}.bn1"
                continue
            if isinstance(blk, DepthwiseSeparableConv):
                steps, last = [(blk.conv_dw, blk.bn1)], (blk.conv_pw, blk.bn2)
            else:
                steps, last = [(blk.conv_pw, blk.bn1), (blk.conv_dw, blk.bn2)], (blk.conv_pwl, blk.bn3)
            prev = src
            for n, (conv, bn) in enumerate(steps, 1):
                name, act = f"{p}.bn{n}", bn.act
                if n == len(steps) and not isinstance(blk.se, torch.nn.Identity):
                    name, act = f"{p}.se", (lambda t, a=bn.act, se=blk.se: se(a(t)[None])[0])
                ch.conv(name, prev, lambda t, c=conv, b=bn: bn_affine(b)(c(t)), act)
                prev = name
            skips = [(src, same, False)] if blk.has_skip else ()
            ch.conv(p, prev, lambda t, c=last[0], b=last[1]: bn_affine(b)(c(t)), None, skips)
            src = p
    if isinstance(model, MobileNetV3):
        ch.conv("act2", src, lambda t: model.conv_head(t.mean((2, 3), keepdim=True)), model.act2)
        seed = gap_seed(model.classifier, ch.v["act2"], y)
        return ch.blocks, "act2", seed, float(seed.sum()), None
    ch.conv("bn2", src, lambda t: bn_affine(model.bn2)(model.conv_head(t)), model.bn2.act)
    seed = gap_seed(model.classifier, ch.v["bn2"], y)
    return ch.blocks, "bn2", seed, float(seed.sum()), None


def frozen_layer_norm(norm: torch.nn.Module, a: torch.Tensor):
    """A LayerNorm over the channels of a channel-first map a [C, *pos] with each position's scale
    frozen at a: an affine map of [B, C, *pos] that acts on each position alone."""
    sigma = torch.sqrt(a.var(0, unbiased=False, keepdim=True) + norm.eps)
    shape = (-1, *([1] * (a.dim() - 1)))
    return lambda t: (t - t.mean(1, keepdim=True)) / sigma * norm.weight.view(shape) + norm.bias.view(shape)


def channels_last(fn):
    """A Linear over channels applied to a channel-first map [B, C, H, W]."""
    return lambda t: fn(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def convnext_reference(model: ConvNeXt, x: torch.Tensor, y: int):
    """Blocks of a timm ConvNeXt: stem conv, then every LayerNorm (scale frozen), conv and depthwise
    conv as a unit without nonlinearity, LN -> fc1 -> GELU as a unit, gamma * fc2 + skip as the block
    output; the head's LayerNorm frozen at the pooled vector."""
    ch = Chain(x)
    ch.conv("stem.0", "input", model.stem[0])
    ch.conv("stem.1", "stem.0", frozen_layer_norm(model.stem[1], ch.v["stem.0"]))
    src = "stem.1"
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, torch.nn.Identity):
            d = f"stages.{i}.downsample"
            ch.conv(f"{d}.0", src, frozen_layer_norm(stage.downsample[0], ch.v[src]))
            ch.conv(f"{d}.1", f"{d}.0", stage.downsample[1])
            src = f"{d}.1"
        for j, blk in enumerate(stage.blocks):
            b = f"stages.{i}.blocks.{j}"
            ch.conv(f"{b}.conv_dw", src, blk.conv_dw)
            ln = frozen_layer_norm(blk.norm, ch.v[f"{b}.conv_dw"])
            fc1, fc2 = (blk.mlp.fc1, blk.mlp.fc2) if blk.use_conv_mlp else (
                channels_last(blk.mlp.fc1), channels_last(blk.mlp.fc2))
            ch.conv(f"{b}.mlp.act", f"{b}.conv_dw", lambda t, ln=ln, fc1=fc1: fc1(ln(t)), blk.mlp.act)
            gamma = blk.gamma.view(-1, 1, 1)
            ch.conv(b, f"{b}.mlp.act", lambda t, fc2=fc2, g=gamma: fc2(t) * g, None, [(src, same, False)])
            src = b
    v = ch.v[src]
    a = frozen_layer_norm(model.head.norm, v.mean((1, 2), keepdim=True))(v[None])[0]
    seed = gap_seed(model.head.fc, a, y)
    return ch.blocks, src, seed, float(seed.sum()), None


def swin_attention(blk, h: torch.Tensor) -> torch.Tensor:
    """Window attention weights A [heads, T_j, T_i] of one Swin block from h [H, W, C] (norm1's output),
    by definition: j attends to i iff both lie in the same window of the map cyclically shifted by
    the block's shift; logits q_j . k_i * scale + relative position bias (of their slots in the window)
    + the shifted windows' mask (-100 between tokens from different regions of the shifted map)."""
    attn, (hh, ww, c) = blk.attn, h.shape
    ws, sh = blk.window_size[0], blk.shift_size[0]
    q, k, _ = attn.qkv(h.reshape(-1, c)).view(hh * ww, 3, attn.num_heads, -1).unbind(1)
    coords = [((r - sh) % hh, (col - sh) % ww) for r in range(hh) for col in range(ww)]  # shifted position

    def region(x: int, n: int) -> int:
        return 0 if x < n - ws else (1 if x < n - sh else 2)

    a = torch.zeros(attn.num_heads, hh * ww, hh * ww, dtype=h.dtype)
    for j, (rj, cj) in enumerate(coords):
        keys = [i for i, (ri, ci) in enumerate(coords) if (ri // ws, ci // ws) == (rj // ws, cj // ws)]
        for hd in range(attn.num_heads):
            logits = []
            for i in keys:
                ri, ci = coords[i]
                slot_j, slot_i = (rj % ws) * ws + cj % ws, (ri % ws) * ws + ci % ws
                bias = attn.relative_position_bias_table[attn.relative_position_index[slot_j, slot_i], hd]
                same = sh == 0 or (region(rj, hh), region(cj, ww)) == (region(ri, hh), region(ci, ww))
                logits.append(q[j, hd] @ k[i, hd] * attn.scale + bias + (0.0 if same else -100.0))
            a[hd, j, keys] = torch.softmax(torch.stack(logits), 0)
    return a


def swin_reference(model, x: torch.Tensor, y: int):
    """Blocks of a timm Swin: patch conv, its LayerNorm (frozen scale), per block the window attention
    with explicit c(i->j) = sum_h A^h_ji W_O^h v^h_i (loops), b_O shared, the skip; patch merging as
    reduction(frozen LN(2x2 concatenation)); head: per-token LN, mean pool, linear."""
    ch = Chain(x)
    ch.conv("patch_embed.proj", "input", model.patch_embed.proj)
    ch.conv("patch_embed", "patch_embed.proj", frozen_layer_norm(model.patch_embed.norm, ch.v["patch_embed.proj"]))
    src = "patch_embed"
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, torch.nn.Identity):
            d, down = f"layers.{i}.downsample", stage.downsample
            cat = lambda t: torch.cat([t[..., dh::2, dw::2] for dw in (0, 1) for dh in (0, 1)], 1)  # noqa: E731
            ln = frozen_layer_norm(down.norm, cat(ch.v[src][None])[0])
            z = ch.conv(d, src, lambda t, ln=ln, down=down: channels_last(down.reduction)(ln(cat(t))))
            assert torch.allclose(z, down(ch.v[src][None].permute(0, 2, 3, 1))[0].permute(2, 0, 1), atol=1e-12)
            src = d
        for j, blk in enumerate(stage.blocks):
            b, v = f"layers.{i}.blocks.{j}", ch.v[src]
            cdim, hh, ww = v.shape
            t = hh * ww
            h = blk.norm1(v.permute(1, 2, 0))
            a = swin_attention(blk, h)
            val = blk.attn.qkv(h.reshape(t, cdim)).view(t, 3, blk.attn.num_heads, -1)[:, 2]
            d = val.shape[-1]
            c_att = torch.zeros(t, cdim, t, dtype=v.dtype)
            for hd in range(blk.attn.num_heads):
                o = val[:, hd] @ blk.attn.proj.weight[:, hd * d:(hd + 1) * d].T  # W_O^h v^h_i
                for ii in range(t):
                    for jj in range(t):
                        c_att[ii, :, jj] += a[hd, jj, ii] * o[ii]
            c_skip = torch.zeros_like(c_att)
            for ii in range(t):
                c_skip[ii, :, ii] = v.flatten(1)[:, ii]
            b_o = blk.attn.proj.bias[:, None].expand(-1, t)
            z = c_att.sum(0) + c_skip.sum(0) + b_o
            out = blk(v.permute(1, 2, 0)[None])[0]
            assert torch.allclose(z.T, (v.permute(1, 2, 0) + blk._attn(h[None])[0]).reshape(t, cdim), atol=1e-12)
            ch.blocks.append((b, z, [(src, c_skip, None), (src, c_att, b_o)], None))
            ch.v[b] = out.permute(2, 0, 1)
            src = b
    a = model.norm(ch.v[src].permute(1, 2, 0)).permute(2, 0, 1)
    seed = gap_seed(model.head.fc, a, y)
    return ch.blocks, src, seed, float(seed.sum()), None


@torch.no_grad()
def check_against_engine(model, images, reference) -> None:
    maps, const = srd.saliency(model, images, return_constant=True)
    logits = model(images)
    for i in range(images.shape[0]):
        y = int(logits[i].argmax())
        blocks, seed_unit, seed, logit, readout = reference(model, images[i], y)
        assert logit == pytest.approx(float(logits[i, y]), rel=1e-10), "reference forward differs from model"
        if readout is not None and len(readout) == 3:  # a CLS head: its stream keeps the class direction
            ref, ref_const = brute_propagate_cls_stream(blocks, seed_unit, *readout)
        else:
            u, kappa = readout if readout is not None else (None, 0.0)
            ref, ref_const = brute_propagate(blocks, seed_unit, seed, u)
            ref_const += kappa
        ref = ref.view(images.shape[2:])
        err = (maps[i] - ref).abs().max() / ref.abs().max()
        assert err < 1e-6, f"image {i}: engine vs brute force relative error {err:.2e}"
        assert float(const[i]) == pytest.approx(ref_const, rel=1e-6, abs=1e-9 * abs(logit))


def test_resnet_basic_block_matches_brute_force() -> None:
    """conv+BN+bias share, stem max-pool joined to the next conv, identity and projection shortcuts."""
    model = randomize(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 6, 8, 8),
                             stem_width=4, num_classes=3), seed=1)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    check_against_engine(model, images, resnet_reference)


def test_resnet_bottleneck_avg_down_matches_brute_force() -> None:
    """Bottleneck blocks, projection shortcut after the stem max-pool, ResNet-D avg-pool (ceil mode)."""
    model = randomize(ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(2, 2, 3, 3), stem_width=4,
                             num_classes=3, avg_down=True), seed=3)
    images = torch.randn(2, 3, 26, 26, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_against_engine(model, images, resnet_reference)


def test_vgg_exact_head_matches_brute_force() -> None:
    """VGG-BN: pools joined to the next conv, fc6 over the pre-pool PFVs, 2x2 fc maps + GAP head."""
    model = randomize(VGG([4, "M", 6, "M"], num_classes=3, norm_layer=torch.nn.BatchNorm2d, mlp_ratio=1 / 512), seed=5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    check_against_engine(model, images, vgg_reference)


def perturb(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """Larger random weights than timm's ViT init, so attention and biases are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def test_vit_cls_head_registers_layer_scale_match_brute_force() -> None:
    """Patch embedding, pos-embed bias, CLS + register constants, attention, LayerNorm, MLP, layer scale."""
    model = perturb(randomize(VisionTransformer(img_size=24, patch_size=8, embed_dim=8, depth=2, num_heads=2,
                                                num_classes=3, reg_tokens=1, init_values=0.7)), 0.3, 7)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    check_against_engine(model, images, vit_reference)


def test_vit_mean_pool_head_matches_brute_force() -> None:
    """Mean-pool head through fc_norm (frozen scale), split over patch tokens as for ResNet."""
    model = perturb(randomize(VisionTransformer(img_size=24, patch_size=8, embed_dim=8, depth=2, num_heads=2,
                                                num_classes=3, global_pool="avg")), 0.3, 9)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    check_against_engine(model, images, vit_reference)


def test_clip_vit_pre_norm_quick_gelu_matches_brute_force() -> None:
    """CLIP's ViT (timm vit_base_patch16_clip_quickgelu_224, small): pre-norm LayerNorm over the
    embedded tokens, QuickGELU MLPs, no patch-embedding bias, CLS head through the final norm."""
    model = perturb(randomize(timm.create_model("vit_base_patch16_clip_quickgelu_224", img_size=24, patch_size=8,
                                                embed_dim=8, depth=2, num_heads=2, num_classes=3)), 0.3, 18)
    assert model.patch_embed.proj.bias is None and not isinstance(model.norm_pre, torch.nn.Identity)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(19), dtype=torch.float64)
    check_against_engine(model, images, vit_reference)


def test_dinov2_registers_matches_brute_force() -> None:
    """DINOv2 with registers (timm vit_small_patch14_reg4_dinov2, small): patch 14, 4 register tokens
    without position embedding, layer scale in both sub-blocks."""
    model = perturb(randomize(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=8,
                                                depth=2, num_heads=2, num_classes=3)), 0.3, 20)
    assert model.num_prefix_tokens == 5
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    check_against_engine(model, images, vit_reference)


def conv_stem_vit(img_size: int, channels: tuple[int, ...], **kwargs) -> VisionTransformer:
    """A ViT whose tokens come from timm's ConvStem (3x3 convs at stride 2) through HybridEmbed."""
    stem = ConvStem(depth=len(channels), channels=channels, stride=(2,) * len(channels), kernel_size=3, padding=1)
    return VisionTransformer(img_size=img_size, patch_size=1, embed_layer=partial(HybridEmbed, backbone=stem,
                                                                                  proj=False), **kwargs)


def test_conv_stem_vit_matches_brute_force() -> None:
    """A ViT on timm's ConvStem through HybridEmbed (demo_vitc's and vit_base_mci_224's embedding):
    conv + BN + ReLU units at stride 2, the stem's last (linear) conv making the tokens, CLS head."""
    model = perturb(randomize(conv_stem_vit(16, (4, 6, 8), embed_dim=8, depth=2, num_heads=2, num_classes=3)),
                    0.3, 22)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    check_against_engine(model, images, vit_reference)


def tiny_swin():
    """Swin in miniature (timm swin_tiny_patch4_window7_224's layout): 8x8 patch grid, window 4, so the
    second block of the first stage attends in shifted windows with the mask; patch merging to 4x4."""
    return timm.create_model("swin_tiny_patch4_window7_224", num_classes=3, embed_dim=8, depths=(2, 1),
                             num_heads=(2, 2), img_size=32, window_size=4)


def test_swin_shifted_windows_patch_merging_match_brute_force() -> None:
    model = perturb(randomize(tiny_swin()), 0.3, 22)
    assert model.layers[0].blocks[1].shift_size == (2, 2)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    check_against_engine(model, images, swin_reference)


def tiny_lite(**kwargs) -> EfficientNet:
    """An EfficientNet-Lite in miniature: ReLU6, depthwise convs, linear bottlenecks with and
    without residual adds, no SE."""
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r2_k3_s2_e2_c8"], ["ir_r1_k5_s2_e2_c12"]])
    return EfficientNet(arch, num_features=16, stem_size=8, fix_stem=True, act_layer=torch.nn.ReLU6,
                        num_classes=3, **kwargs)


def test_efficientnet_lite_matches_brute_force() -> None:
    model = randomize(tiny_lite(), seed=11)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    check_against_engine(model, images, effnet_reference)


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_convnext_matches_brute_force(conv_mlp: bool) -> None:
    """Patch stem + LayerNorm2d, depthwise 7x7, LN -> fc1 -> GELU -> fc2 (Linear over channels-last,
    or 1x1 convs as convnext_atto), layer scale, downsample LN + 2x2 conv, LN head."""
    model = randomize(ConvNeXt(depths=(1, 1, 1, 1), dims=(4, 6, 6, 8), num_classes=3,
                                conv_mlp=conv_mlp), seed=14)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    check_against_engine(model, images, convnext_reference)


def tiny_b0() -> EfficientNet:
    """EfficientNet-B0 in miniature: SiLU, squeeze-excitation with sigmoid gates in every block."""
    arch = decode_arch_def([["ds_r1_k3_s1_e1_c8_se0.25"], ["ir_r2_k3_s2_e2_c8_se0.25"], ["ir_r1_k5_s2_e2_c12_se0.25"]])
    return EfficientNet(arch, num_features=16, stem_size=8, fix_stem=True, act_layer=torch.nn.SiLU, num_classes=3)


def tiny_mobilenetv3() -> MobileNetV3:
    """MobileNetV3 in miniature: hard-swish and ReLU blocks, SE with hard-sigmoid gates (ReLU inside,
    as timm builds it), a ConvBnAct last stage, the pooled 1x1 conv_head with bias."""
    arch = decode_arch_def([["ds_r1_k3_s2_e1_c8_se0.25_nre"], ["ir_r1_k3_s2_e3_c8_nre"],
                            ["ir_r2_k5_s1_e2_c12_se0.25"], ["cn_r1_k1_s1_c16"]])
    se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=torch.nn.ReLU)
    return MobileNetV3(arch, num_features=24, stem_size=8, fix_stem=True, act_layer=torch.nn.Hardswish,
                       se_layer=se, num_classes=3)


@pytest.mark.parametrize("make", [tiny_b0, tiny_mobilenetv3])
def test_squeeze_excitation_families_match_brute_force(make) -> None:
    model = randomize(make(), seed=16)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    check_against_engine(model, images, effnet_reference)


def ratio_pull(blocks, v: torch.Tensor, unit: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u = w * gate, gate = v/z (0 where z = 0): the frozen element-wise nonlinearity (section 4);
    and the readout <w, v> at z = 0 per position, zero for these nonlinearities (sigma(0) = 0)."""
    z = dict((b[0], b[1]) for b in blocks)[unit]
    v = v.flatten(1)
    return w[:, None] * torch.where(z != 0, v / torch.where(z != 0, z, 1.0), 0.0), z.new_zeros(z.shape[1])


def vit_pull(blk, z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u = w + J^T w through x + ls2 MLP(LN2(x)) with LN2's scale and the GELU ratios frozen (autograd),
    and the readout <w, frozen(0)> per token: the MLP's bias paths, which no contribution carries."""
    frozen = frozen_mlp(blk, z)
    _, u = torch.autograd.functional.vjp(frozen, z.T, w.expand_as(z.T))
    return u.T, (frozen(torch.zeros_like(z.T)) @ w).detach()


def check_ierf(model, images, reference, layer: str, unit: str, pull) -> None:
    """Engine iERFs (one-hot seeds, PFV and latent readouts) vs brute force from `unit`: a latent
    readout <w, v_r> is decomposed along u = w pulled back onto z, its part at z = 0 is constant."""
    graph, _ = srd.build(model, images)
    pos = graph.units[unit].positions
    seeds = torch.tensor([0, pos - 1])
    w = torch.randn(2, graph.units[unit].z.shape[1], generator=torch.Generator().manual_seed(13), dtype=images.dtype)
    maps, const = srd.ierf(model, images, layer, seeds, return_constant=True)
    dmaps, dconst = srd.ierf(model, images, layer, seeds, direction=w, return_constant=True)
    for i in range(images.shape[0]):
        with torch.no_grad():
            blocks, *_ = reference(model, images[i], 0)
        v = graph.units[unit].v[i]
        for s, r in enumerate(seeds.tolist()):
            seed = torch.zeros(pos, dtype=images.dtype)
            seed[r] = 1.0
            u, at_zero = pull(model, blocks, v, unit, w[s])
            for got, got_c, u, extra in ((maps, const, None, 0.0), (dmaps, dconst, u, float(at_zero[r]))):
                with torch.no_grad():
                    ref, ref_c = brute_propagate(blocks, unit, seed, u)
                ref_c += extra
                ref = ref.view(images.shape[2:])
                err = (got[i, s] - ref).abs().max() / ref.abs().max()
                assert err < 1e-6, f"{layer} seed {r} direction={u is not None}: relative error {err:.2e}"
                assert float(got_c[i, s]) == pytest.approx(ref_c, abs=1e-9)


def test_ierf_and_latent_ierf_match_brute_force_cnn() -> None:
    model = randomize(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 6, 8, 8),
                             stem_width=4, num_classes=3), seed=1)
    images = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pull = lambda m, blocks, v, unit, w: ratio_pull(blocks, v, unit, w)  # noqa: E731
    check_ierf(model, images, resnet_reference, "layer2", "layer2.0.act2", pull)
    lite = randomize(tiny_lite(), seed=11)
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    check_ierf(lite, images, effnet_reference, "blocks.1.1.bn2", "blocks.1.1.bn2", pull)
    identity = lambda m, blocks, v, unit, w: (w[:, None].expand(-1, v[0].numel()), v.new_zeros(v[0].numel()))  # noqa: E731
    check_ierf(lite, images, effnet_reference, "blocks.1", "blocks.1.1", identity)
    b0 = randomize(tiny_b0(), seed=16)  # a unit whose v is scaled by its frozen SE gate
    check_ierf(b0, images, effnet_reference, "blocks.1.1.se", "blocks.1.1.se", pull)


def test_ierf_and_latent_ierf_match_brute_force_vit() -> None:
    model = perturb(randomize(VisionTransformer(img_size=24, patch_size=8, embed_dim=8, depth=2, num_heads=2,
                                                num_classes=3, reg_tokens=1, init_values=0.7)), 0.3, 7)
    images = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pull = lambda m, blocks, v, unit, w: vit_pull(m.blocks[1], dict((b[0], b[1]) for b in blocks)[unit], w)  # noqa: E731
    check_ierf(model, images, vit_reference, "blocks.1", "blocks.1", pull)


def test_ierf_and_latent_ierf_match_brute_force_swin() -> None:
    """iERFs on a Swin block in map layout; the latent direction pulled back through its MLP."""
    model = perturb(randomize(tiny_swin()), 0.3, 22)
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    unit = "layers.0.blocks.1"
    pull = lambda m, blocks, v, u, w: vit_pull(m.layers[0].blocks[1], dict((b[0], b[1]) for b in blocks)[u], w)  # noqa: E731
    check_ierf(model, images, swin_reference, unit, unit, pull)
