"""timm EfficientNet and MobileNetV3 (EfficientNet-Lite0, EfficientNet-B0, MobileNetV3 small /
large: depthwise convs, ReLU6 / SiLU / hard-swish, squeeze-excitation with sigmoid or hard-sigmoid
gates, MobileNetV3's head conv after the global pool).

Units: the BatchNormAct modules that end in an activation (`bn1`, `blocks.i.j.bn1`,
`blocks.i.j.bn2`, `bn2`), or in their place the SE module that scales them (`blocks.i.j.se`),
every block output `blocks.i.j` (stage `blocks.i` = its last block), and MobileNetV3's `act2`.
[choice] A block output is a linear bottleneck: its BN has no activation and its
residual add is not followed by one. We treat it as a PFV layer with an identity nonlinearity,
as the ViT residual stream: the block target is the pre-activation after the add,
z = BN(conv_pwl(v)) + x, with the main branch (its own BN bias shared by norm) and the identity
skip (no share) as sources, and z itself (v = z) is the source of the next block's expansion
conv and skip. The alternative, one affine block through the whole chain of linear residual
adds, would mix PFVs of every block of a stage in one sharing ratio; this keeps each sharing
step between adjacent layers, exactly as in ResNet and ViT.
[choice] Squeeze-excitation: its channel gate s(x) (global pool -> reduce -> act -> expand ->
sigmoid / hard-sigmoid) is frozen at the recorded pass, like attention weights, and joins the
element-wise nonlinearity it scales: the unit `blocks.i.j.se` has z = the BN's pre-activation
and v = s * act(z), so its frozen gate is v/z and R(z) = R(v) (docs/method.md §3.5).
[choice] MobileNetV3's head pools first, then a 1x1 conv with bias and hard-swish (`act2`), then
the classifier: the pool joins the conv's block (an average pool over the whole map followed by
the conv, decomposed over the pre-pool PFVs, as VGG's fc6) and the class seed is that unit's
one-position linear readout, R = w_y . v + b_y = logit_y.
"""
from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d, Linear, SelectAdaptivePool2d
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, InvertedResidual, SqueezeExcite
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import Tensor, nn

from pipeline.srd.conv import ConvRule, FrozenPool, IdentityRule
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.families.base import ACTIVATIONS, Claims, graph_of, input_unit, linear_unit
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, pooled_linear_seed
from pipeline.srd.record import record

Step = tuple[str, str, str]  # (conv path, BN path, unit name: the BN, its SE, or the block for the last)


def _bn(c: Claims, path: str, act: bool) -> str:
    """Claim a BatchNormAct2d; `act`: must it end in an element-wise activation (else none)."""
    bn = c.get(path, BatchNormAct2d)
    has_act = not isinstance(bn.act, nn.Identity)
    if has_act != act:
        where = "ends in one" if act else "is linear (a linear bottleneck)"
        raise UnsupportedModuleError(bn, path, f"activation placement: this BN {where} in the blocks SRD decomposes")
    if has_act:
        c.get(f"{path}.act", *ACTIVATIONS)
    return path


def _se(c: Claims, path: str) -> str | None:
    """Claim a squeeze-excitation module (or its identity); its path when present."""
    if c.get(path, SqueezeExcite, optional=True) is None:
        return None
    for part in ("conv_reduce", "conv_expand"):
        c.get(f"{path}.{part}", nn.Conv2d)
    c.get(f"{path}.act1", *ACTIVATIONS)
    c.get(f"{path}.gate", *ACTIVATIONS)
    return path


def _steps(c: Claims, path: str, blk: nn.Module) -> list[Step]:
    """(conv, bn, unit) of a block in order; the last bn has no activation, except ConvBnAct's."""
    if getattr(blk, "conv_s2d", None) is not None:
        raise UnsupportedModuleError(blk.conv_s2d, f"{path}.conv_s2d", "space-to-depth stem")
    c.get(f"{path}.aa", nn.Identity)  # an anti-aliasing blur would be one more pooling step
    if isinstance(blk, ConvBnAct):
        if blk.has_skip:
            raise UnsupportedModuleError(blk, path, "a skip added after the activation (not element-wise)")
        c.get(f"{path}.conv", nn.Conv2d)
        return [(f"{path}.conv", _bn(c, f"{path}.bn1", act=True), f"{path}.bn1")]
    ds = isinstance(blk, DepthwiseSeparableConv)
    names = ["conv_dw", "conv_pw"] if ds else ["conv_pw", "conv_dw", "conv_pwl"]
    se = _se(c, f"{path}.se")
    steps = []
    for i, conv in enumerate(names, 1):
        c.get(f"{path}.{conv}", nn.Conv2d)
        last = i == len(names)
        bn = _bn(c, f"{path}.bn{i}", act=not last)
        unit = path if last else (se if se is not None and i == len(names) - 1 else bn)
        steps.append((f"{path}.{conv}", bn, unit))
    return steps


def _frozen_se(se: nn.Module, x: Tensor, out: Tensor, path: str) -> None:
    """Check that the recorded SE output is its input scaled per (image, channel): then freezing
    the gate is exact (docs/method.md §3.5)."""
    s = (out * x).sum((2, 3), keepdim=True) / (x * x).sum((2, 3), keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    if not torch.allclose(x * s, out, rtol=1e-5, atol=1e-6 * float(out.detach().abs().max())):
        raise UnsupportedModuleError(se, path, "output is not its input scaled per channel")


def build(model: EfficientNet | MobileNetV3, images: Tensor, head: str,
          differentiable: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; EfficientNet seeds at its pooled head")
    mnv3 = isinstance(model, MobileNetV3)
    c = Claims(model)
    c.get("conv_stem", nn.Conv2d)
    stem_bn = _bn(c, "bn1", act=True)
    blocks: list[tuple[str, nn.Module]] = []
    for i, stage in enumerate(c.get("blocks", nn.Sequential)):
        c.get(f"blocks.{i}", nn.Sequential)
        for j in range(len(stage)):
            p = f"blocks.{i}.{j}"
            blocks.append((p, c.get(p, DepthwiseSeparableConv, InvertedResidual, ConvBnAct)))
    steps = {p: _steps(c, p, b) for p, b in blocks}
    gp = c.get("global_pool", SelectAdaptivePool2d)
    if gp.pool_type != "avg":
        raise UnsupportedModuleError(gp, "global_pool", f"pool_type {gp.pool_type!r}: only 'avg' is linear")
    c.claimed.update({"global_pool.pool", "global_pool.flatten"})
    c.get("conv_head", nn.Conv2d)
    if mnv3:
        c.get("norm_head", nn.Identity)  # MobileNetV4's post-pool norm is refused
        c.get("act2", *ACTIVATIONS)
        c.get("flatten", nn.Flatten, nn.Identity)
    else:
        _bn(c, "bn2", act=True)
    fc = c.get("classifier", nn.Linear, Linear)
    c.finish()

    acts = [stem_bn] + [bn for p in steps for _, bn, _ in steps[p][:-1]]
    acts += [steps[p][-1][1] for p, b in blocks if isinstance(b, ConvBnAct)]
    ses = [u for p in steps for _, _, u in steps[p] if u.endswith(".se")]
    head_act = "act2" if mnv3 else "bn2"
    rec = record(model, images, inputs=[f"{b}.act" for b in acts] + ses + ["act2" if mnv3 else "bn2.act"],
                 outputs=acts + ses + [p for p, _ in blocks] + [head_act], differentiable=differentiable)
    for se in ses:
        _frozen_se(c.modules[se], rec.inputs[se], rec.outputs[se], se)
    units: list[Unit] = [input_unit(images)]
    out: list[Block] = []
    mods = c.modules
    v = {"input": images}

    def add(unit: Unit, rules: list) -> None:
        units.append(unit)
        out.append(Block(unit.name, rules))
        v[unit.name] = unit.v

    def conv_rule(src: str, conv: str, bn: str | None, z: Tensor, pool: FrozenPool | None = None) -> ConvRule:
        return ConvRule(src, mods[conv], None if bn is None else mods[bn], v[src], z.shape[2:], pool, path=conv)

    z = rec.inputs["bn1.act"]
    add(Unit("bn1", z, rec.outputs["bn1"]), [conv_rule("input", "conv_stem", "bn1", z)])
    src = "bn1"
    aliases: dict[str, str] = {}
    for path, blk in blocks:
        prev = src
        for k, (conv, bn, unit) in enumerate(steps[path]):
            if unit == path:  # the linear bottleneck, with the skip when the block has one
                z = rec.outputs[path]
                rules = [conv_rule(prev, conv, bn, z)] + ([IdentityRule(src)] if blk.has_skip else [])
                add(linear_unit(path, z), rules)
            else:  # an activation, with the SE gate that scales it frozen into v
                z = rec.inputs[f"{bn}.act"]
                add(Unit(unit, z, rec.outputs[unit]), [conv_rule(prev, conv, bn, z)])
            prev = unit
        if prev != path:
            aliases[path] = prev
        aliases[path.rsplit(".", 1)[0]] = prev
        src = prev
    if mnv3:  # global pool -> conv_head as one block over the pre-pool PFVs
        z = rec.inputs["act2"]
        pool = FrozenPool(nn.AvgPool2d(tuple(v[src].shape[2:])), v[src], "global_pool")
        add(Unit("act2", z, rec.outputs["act2"]), [conv_rule(src, "conv_head", None, z, pool)])
    else:
        z = rec.inputs["bn2.act"]
        add(Unit("bn2", z, rec.outputs["bn2"]), [conv_rule(src, "conv_head", "bn2", z)])
    v_head = v[head_act]
    return (graph_of(units, out, aliases, rec.logits, differentiable),
            Head(head_act, lambda y: pooled_linear_seed(v_head, fc, y)))
