"""timm VGG (vgg11, vgg16, with or without BN).

Units are the activation modules of `features` and of the ConvMlp head (`pre_logits.act1`,
`pre_logits.act2` = fc6, fc7); each max-pool joins the next conv's block (fc6 included: a 7x7
conv over the pooled map, decomposed over the pre-pool PFVs feeding it) and is also a tap
layer of its own (`features.K` of a pool: a channel-wise selection, no bias).
Heads (docs/method.md §3, [choice] both): "exact" seeds GAP + linear at fc7 and decomposes
through the FC layers; "gradcam" seeds the reference code's Grad-CAM at the last conv map.
"""
from __future__ import annotations

from timm.layers import ClassifierHead, SelectAdaptivePool2d
from timm.models.vgg import VGG, ConvMlp
from torch import Tensor, nn

from pipeline.srd.families.base import ACTIVATIONS, Claims, graph_of, input_unit, linear_unit
from pipeline.srd.conv import ConvRule, FrozenPool, PoolRule
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, gradcam_seed, pooled_linear_seed
from pipeline.srd.record import eval_mode, record


def _layout(c: Claims, model: VGG) -> list[tuple[str, str | None, str] | str]:
    """features as [(conv, bn, act) paths] and max-pool paths, in order."""
    mods = list(c.get("features", nn.Sequential))
    items: list[tuple[str, str | None, str] | str] = []
    i = 0
    while i < len(mods):
        path = f"features.{i}"
        if isinstance(mods[i], nn.MaxPool2d):
            c.get(path, nn.MaxPool2d)
            items.append(path)
            i += 1
            continue
        c.get(path, nn.Conv2d)
        bn = f"features.{i + 1}" if isinstance(mods[i + 1], nn.BatchNorm2d) else None
        if bn:
            c.get(bn, nn.BatchNorm2d)
        act = f"features.{i + 2 if bn else i + 1}"
        c.get(act, *ACTIVATIONS)
        items.append((path, bn, act))
        i += 3 if bn else 2
    return items


def build(model: VGG, images: Tensor, head: str, differentiable: bool = False) -> tuple[Graph, Head]:
    c = Claims(model)
    items = _layout(c, model)
    mlp = c.get("pre_logits", ConvMlp)
    fc1, fc2 = c.get("pre_logits.fc1", nn.Conv2d), c.get("pre_logits.fc2", nn.Conv2d)
    c.get("pre_logits.act1", *ACTIVATIONS)
    c.get("pre_logits.act2", *ACTIVATIONS)
    c.get("head", ClassifierHead)
    gp = c.get("head.global_pool", SelectAdaptivePool2d)
    if gp.pool_type != "avg":
        raise UnsupportedModuleError(gp, "head.global_pool", f"pool_type {gp.pool_type!r}: only 'avg' is linear")
    c.claimed.update({"head.global_pool.pool", "head.global_pool.flatten"})
    fc = c.get("head.fc", nn.Linear)
    c.finish()

    acts = [it[2] for it in items if isinstance(it, tuple)] + ["pre_logits.act1", "pre_logits.act2"]
    pools = [it for it in items if isinstance(it, str)]
    rec = record(model, images, inputs=acts + ["pre_logits"], outputs=acts + pools, differentiable=differentiable)
    if min(rec.inputs["pre_logits"].shape[2:]) < mlp.input_kernel_size:
        raise UnsupportedModuleError(mlp, "pre_logits", "input smaller than fc6's kernel (ConvMlp resamples it)")
    units: list[Unit] = [input_unit(images)]
    blocks: list[Block] = []
    src, pool, v = "input", None, {"input": images}

    def conv_block(conv_path: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: str) -> None:
        nonlocal src, pool
        units.append(Unit(act, rec.inputs[act], rec.outputs[act]))
        v[act] = rec.outputs[act]
        blocks.append(Block(act, [ConvRule(src, conv, bn, v[src], rec.inputs[act].shape[2:], pool, conv_path)]))
        src, pool = act, None

    for it in items:
        if isinstance(it, str):  # max pool: pending for the next conv, and a tap layer of its own
            if pool is not None:
                raise UnsupportedModuleError(c.modules[it], it, "two poolings in a row")
            pool = FrozenPool(c.modules[it], v[src], it)
            units.append(linear_unit(it, rec.outputs[it]))
            blocks.append(Block(it, [PoolRule(src, pool)]))
        else:
            conv_block(it[0], c.modules[it[0]], c.modules[it[1]] if it[1] else None, it[2])
    last_conv = src
    conv_block("pre_logits.fc1", fc1, None, "pre_logits.act1")
    conv_block("pre_logits.fc2", fc2, None, "pre_logits.act2")
    graph = graph_of(units, blocks, {"pre_logits": "pre_logits.act2"}, rec.logits, differentiable)
    if head == "gradcam":
        final_pool = c.modules[pools[-1]] if pools and items[-1] == pools[-1] else nn.Identity()

        def tail(a: Tensor) -> Tensor:
            with eval_mode(model):
                return model.forward_head(final_pool(a))

        return graph, Head(last_conv, lambda y: gradcam_seed(v[last_conv], tail, y))
    return graph, Head("pre_logits.act2", lambda y: pooled_linear_seed(v["pre_logits.act2"], fc, y))
