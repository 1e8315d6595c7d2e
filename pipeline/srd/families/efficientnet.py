"""timm EfficientNet family without SE (EfficientNet-Lite0: depthwise convs, ReLU6).

Units: the BatchNormAct modules that end in an activation (`bn1`, `blocks.i.j.bn1`,
`blocks.i.j.bn2`, `bn2`) and every block output `blocks.i.j` (stage `blocks.i` = its last
block). [choice] A block output is a linear bottleneck: its BN has no activation and its
residual add is not followed by one. We treat it as a PFV layer with an identity nonlinearity,
as the ViT residual stream: the block target is the pre-activation after the add,
z = BN(conv_pwl(v)) + x, with the main branch (its own BN bias shared by norm) and the identity
skip (no share) as sources, and z itself (v = z) is the source of the next block's expansion
conv and skip. The alternative, one affine block through the whole chain of linear residual
adds, would mix PFVs of every block of a stage in one sharing ratio; this keeps each sharing
step between adjacent layers, exactly as in ResNet and ViT.
"""
from __future__ import annotations

from timm.layers import BatchNormAct2d, SelectAdaptivePool2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from pipeline.srd.families.base import ACTIVATIONS, Claims, graph_of, input_unit, linear_unit
from pipeline.srd.conv import ConvRule, IdentityRule
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, pooled_linear_seed
from pipeline.srd.record import record


def _bn(c: Claims, path: str, act: bool) -> str:
    """Claim a BatchNormAct2d; `act`: must it end in an element-wise activation (else none)."""
    bn = c.get(path, BatchNormAct2d)
    has_act = not isinstance(bn.act, nn.Identity)
    if has_act != act:
        raise UnsupportedModuleError(bn, path, "activation placement differs from Lite blocks")
    if has_act:
        c.get(f"{path}.act", *ACTIVATIONS)
    return path


def _parts(c: Claims, path: str, blk: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) path pairs of a block in order; the last bn has no activation."""
    if getattr(blk, "conv_s2d", None) is not None:
        raise UnsupportedModuleError(blk.conv_s2d, f"{path}.conv_s2d", "space-to-depth stem")
    ds = isinstance(blk, DepthwiseSeparableConv)
    names = ["conv_dw", "conv_pw"] if ds else ["conv_pw", "conv_dw", "conv_pwl"]
    parts = []
    for i, conv in enumerate(names, 1):
        c.get(f"{path}.{conv}", nn.Conv2d)
        parts.append((f"{path}.{conv}", _bn(c, f"{path}.bn{i}", act=i < len(names))))
    return parts


def build(model: EfficientNet, images: Tensor, head: str, differentiable: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; EfficientNet seeds at its pooled head")
    c = Claims(model)
    c.get("conv_stem", nn.Conv2d)
    stem_bn = _bn(c, "bn1", act=True)
    blocks: list[tuple[str, nn.Module]] = []
    for i, stage in enumerate(c.get("blocks", nn.Sequential)):
        c.get(f"blocks.{i}", nn.Sequential)
        for j in range(len(stage)):
            p = f"blocks.{i}.{j}"
            blocks.append((p, c.get(p, DepthwiseSeparableConv, InvertedResidual)))
    parts = {p: _parts(c, p, b) for p, b in blocks}
    c.get("conv_head", nn.Conv2d)
    head_bn = _bn(c, "bn2", act=True)
    gp = c.get("global_pool", SelectAdaptivePool2d)
    if gp.pool_type != "avg" or not gp.flatten:
        raise UnsupportedModuleError(gp, "global_pool", f"pool_type {gp.pool_type!r}: only 'avg' is linear")
    c.claimed.update({"global_pool.pool", "global_pool.flatten"})
    fc = c.get("classifier", nn.Linear)
    c.finish()

    act_bns = [stem_bn] + [bn for p in parts for _, bn in parts[p][:-1]] + [head_bn]
    rec = record(model, images, inputs=[f"{b}.act" for b in act_bns], outputs=act_bns + [p for p, _ in blocks],
                 differentiable=differentiable)
    units: list[Unit] = [input_unit(images)]
    out: list[Block] = []
    mods = c.modules

    def add(name: str, unit: Unit, rules: list) -> None:
        units.append(unit)
        out.append(Block(name, rules))

    def conv_rule(src: str, conv: str, bn: str, z: Tensor) -> ConvRule:
        return ConvRule(src, mods[conv], mods[bn], units_v[src], z.shape[2:], path=conv)

    units_v = {"input": images}
    z = rec.inputs["bn1.act"]
    add("bn1", Unit("bn1", z, rec.outputs["bn1"]), [conv_rule("input", "conv_stem", "bn1", z)])
    units_v["bn1"] = rec.outputs["bn1"]
    src = "bn1"
    aliases: dict[str, str] = {}
    for path, blk in blocks:
        prev = src
        for conv, bn in parts[path][:-1]:
            z = rec.inputs[f"{bn}.act"]
            add(bn, Unit(bn, z, rec.outputs[bn]), [conv_rule(prev, conv, bn, z)])
            units_v[bn] = rec.outputs[bn]
            prev = bn
        conv, bn = parts[path][-1]
        z = rec.outputs[path]
        rules = [conv_rule(prev, conv, bn, z)] + ([IdentityRule(src)] if blk.has_skip else [])
        add(path, linear_unit(path, z), rules)
        units_v[path] = z
        aliases[path.rsplit(".", 1)[0]] = path
        src = path
    z = rec.inputs["bn2.act"]
    add("bn2", Unit("bn2", z, rec.outputs["bn2"]), [conv_rule(src, "conv_head", "bn2", z)])
    v_head = rec.outputs["bn2"]
    return (graph_of(units, out, aliases, rec.logits, differentiable),
            Head("bn2", lambda y: pooled_linear_seed(v_head, fc, y)))
