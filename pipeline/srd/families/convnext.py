"""timm ConvNeXt (convnext_atto ... convnext_tiny and up: patch stem, LayerNorm2d / channels-last
LayerNorm, depthwise 7x7 convs, layer scale, GELU MLP as 1x1 convs or Linear over channels-last).

Units, in forward order (each a layer name = that module's output):
- `stem.0` (patch conv), `stem.1` (its LayerNorm; alias `stem`);
- `stages.i.downsample.0` (LayerNorm), `stages.i.downsample.1` (the 2x2 stride-2 conv);
- per block `stages.i.blocks.j.conv_dw` (the depthwise conv), `stages.i.blocks.j.mlp.act` (the
  GELU: z = fc1(LN(conv_dw)), v = GELU(z)) and the block output `stages.i.blocks.j`
  (z = x + gamma * fc2(v_act)); `stages.i` and `stages.i.blocks` = the stage's last unit.
[choice] (docs/method.md §3.5, ConvNeXt) Only the element-wise GELU is a nonlinearity; the
convolutions' outputs, the LayerNorms and the residual stream are units with identity
nonlinearity (as EfficientNet's linear bottlenecks and the ViT stream), so every sharing step
is between adjacent layers. A LayerNorm, with its scale frozen at the recorded PFV, and the
Linear / 1x1 fc layers act on each position alone (`PositionwiseRule`): a target has one source,
which keeps its whole relevance, the LN shift booked as that PFV's own (as LN1's in a ViT). The
head (global average pool, LayerNorm, linear) seeds as a ViT's mean-pool `fc_norm` head.
"""
from __future__ import annotations

from timm.layers import LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead, SelectAdaptivePool2d
from timm.models.convnext import ConvNeXt, ConvNeXtBlock, ConvNeXtStage
from torch import Tensor, nn

from pipeline.srd.conv import ConvRule, IdentityRule, PositionwiseRule, norm_shift
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
from pipeline.srd.heads import Head, pooled_norm_seed
from pipeline.srd.record import record

NORMS = (nn.LayerNorm, LayerNorm, LayerNorm2d)


def _validate(c: Claims, model: ConvNeXt) -> Stages:
    """Claim every module SRD decomposes; per stage (path, has a downsample, block paths)."""
    c.get("stem", nn.Sequential)
    if len(model.stem) != 2:
        raise UnsupportedModuleError(model.stem, "stem", "expected the patch stem [conv, LayerNorm2d]")
    c.get("stem.0", nn.Conv2d)
    c.get("stem.1", *NORMS)
    stages = []
    for i, stage in enumerate(c.get("stages", nn.Sequential)):
        p = f"stages.{i}"
        c.get(p, ConvNeXtStage)
        down = not isinstance(stage.downsample, nn.Identity)
        if down:
            c.get(f"{p}.downsample", nn.Sequential)
            c.get(f"{p}.downsample.0", *NORMS)
            c.get(f"{p}.downsample.1", nn.Conv2d)
        else:
            c.get(f"{p}.downsample", nn.Identity)
        c.get(f"{p}.blocks", nn.Sequential)
        paths = []
        for j in range(len(stage.blocks)):
            b = f"{p}.blocks.{j}"
            c.get(b, ConvNeXtBlock)
            c.get(f"{b}.conv_dw", nn.Conv2d)
            c.get(f"{b}.norm", *NORMS)
            c.get(f"{b}.mlp", Mlp)  # GlobalResponseNormMlp (ConvNeXt-V2) mixes positions: refused
            c.get(f"{b}.mlp.fc1", nn.Linear, nn.Conv2d)
            c.get(f"{b}.mlp.act", *ACTIVATIONS)
            c.get(f"{b}.mlp.norm", nn.Identity)
            c.get(f"{b}.mlp.fc2", nn.Linear, nn.Conv2d)
            c.get(f"{b}.shortcut", nn.Identity)
            paths.append(b)
        stages.append((p, down, paths))
    c.get("norm_pre", nn.Identity)
    c.get("head", NormMlpClassifierHead)
    gp = c.get("head.global_pool", SelectAdaptivePool2d)
    if gp.pool_type != "avg":
        raise UnsupportedModuleError(gp, "head.global_pool", f"pool_type {gp.pool_type!r}: only 'avg' is linear")
    c.claimed.update({"head.global_pool.pool", "head.global_pool.flatten", "head.flatten"})
    c.get("head.norm", *NORMS)
    c.get("head.pre_logits", nn.Identity)  # a hidden pre-logits layer (head_hidden_size) is refused
    c.get("head.fc", nn.Linear)
    return stages


def build(model: ConvNeXt, images: Tensor, head: str, differentiable: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; ConvNeXt seeds exactly at its pooled head")
    c, stages, blocks, downs = claim_stages(model, _validate)
    outs = ["stem.0", "stem.1"] + [f"{d}.{k}" for d in downs for k in (0, 1)]
    outs += [f"{b}.{m}" for b in blocks for m in ("conv_dw", "mlp.act")] + blocks
    rec = record(model, images, inputs=[f"{b}.mlp.act" for b in blocks], outputs=outs,
                 differentiable=differentiable)
    mods = c.modules
    units: list[Unit] = [input_unit(images)]
    out: list[Block] = []
    v = {"input": images}

    def add(unit: Unit, rules: list) -> None:
        units.append(unit)
        out.append(Block(unit.name, rules))
        v[unit.name] = unit.v

    def conv(src: str, path: str) -> None:  # a conv output: a unit with identity nonlinearity
        z = rec.outputs[path]
        add(linear_unit(path, z), [ConvRule(src, mods[path], None, v[src], z.shape[2:], path=path)])

    def norm(src: str, path: str) -> None:  # a LayerNorm, scale frozen: positionwise
        z = rec.outputs[path]
        add(linear_unit(path, z), [PositionwiseRule(src, z, norm_shift(mods[path]))])

    conv("input", "stem.0")
    norm("stem.0", "stem.1")
    src, aliases = "stem.1", {"stem": "stem.1"}
    for p, down, paths in stages:
        if down:
            norm(src, f"{p}.downsample.0")
            conv(f"{p}.downsample.0", f"{p}.downsample.1")
            src = f"{p}.downsample.1"
        for b in paths:
            blk = mods[b]
            conv(src, f"{b}.conv_dw")
            z = rec.inputs[f"{b}.mlp.act"]
            a = rec.outputs[f"{b}.mlp.act"]
            if not blk.use_conv_mlp:  # channels-last [N, H, W, 4C]
                z, a = z.permute(0, 3, 1, 2), a.permute(0, 3, 1, 2)
            # LN -> fc1 with LN's scale frozen: one source per target, bias W1 beta + b1
            add(Unit(f"{b}.mlp.act", z, a), [PositionwiseRule(f"{b}.conv_dw", z, norm_shift(blk.norm, blk.mlp.fc1))])
            x = rec.outputs[b]
            fc2 = blk.mlp.fc2
            bias = None if fc2.bias is None else fc2.bias.detach()
            if blk.gamma is not None and bias is not None:
                bias = bias * blk.gamma.detach()  # layer scale folded into fc2's bias
            # the branch gamma * fc2(v_act) is the block output less the identity shortcut
            add(linear_unit(b, x), [IdentityRule(src), PositionwiseRule(f"{b}.mlp.act", x - v[src], bias)])
            src = b
        aliases[p] = aliases[f"{p}.blocks"] = src
    hd = model.head
    last = v[src]
    return (graph_of(units, out, aliases, rec.logits, differentiable),
            Head(src, lambda y: pooled_norm_seed(last, hd.norm, hd.fc, y)))
