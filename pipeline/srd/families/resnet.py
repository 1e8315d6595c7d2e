"""timm ResNet (BasicBlock / Bottleneck; resnet18, resnet50, demo_resnet, ResNet-D shortcuts).

Units are the activation modules: `act1` (stem), `layerK.i.act1`, ... and the block outputs
(`layerK.i` = its last act, `layerK` = its last block). The stem max-pool joins the blocks of
the first stage: main-branch conv1 and projection shortcut are composite pool -> conv blocks
whose sources are the pre-pool PFVs; an identity shortcut after it is a channel-wise selection.

`reference=True` lays the graph out as the authors' ResNet code computes it (docs/method.md §3.7):
tied max-pool taps duplicated, BN shifts without eps, the contrastive mean over the whole batch,
and their layer names (`relu`, `layerK.i.reluJ`, a block `layerK.i` meaning its input).
"""
from __future__ import annotations

from timm.layers import SelectAdaptivePool2d
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from pipeline.srd.families.base import ACTIVATIONS, Claims, graph_of, input_unit
from pipeline.srd.conv import ConvRule, FrozenPool, IdentityRule, PoolRule
from pipeline.srd.errors import UnsupportedModuleError
from pipeline.srd.graph import Block, Graph, Unit
from pipeline.srd.heads import Head, pooled_linear_seed
from pipeline.srd.record import record


def _block_parts(c: Claims, path: str, block: nn.Module) -> list[tuple[str, str, str]]:
    """(conv, bn, act) module paths of a residual block, in order; validates the rest."""
    # se / aa / drop_block are left unclaimed: Claims.finish accepts them only as eval no-ops
    n = 2 if isinstance(block, BasicBlock) else 3
    parts = []
    for i in range(1, n + 1):
        c.get(f"{path}.conv{i}", nn.Conv2d)
        c.get(f"{path}.bn{i}", nn.BatchNorm2d)
        c.get(f"{path}.act{i}", *ACTIVATIONS)
        parts.append((f"{path}.conv{i}", f"{path}.bn{i}", f"{path}.act{i}"))
    return parts


def _shortcut(c: Claims, path: str, block: nn.Module) -> tuple[nn.Module | None, ...]:
    """(avg-pool or None, conv, bn) of a projection shortcut, or (None, None, None) for identity."""
    if block.downsample is None:
        return None, None, None
    ds = c.get(f"{path}.downsample", nn.Sequential)
    mods = list(ds)
    pool = None
    if len(mods) == 3:
        pool = c.get(f"{path}.downsample.0", nn.AvgPool2d, optional=True)
        mods = mods[1:]
    if len(mods) != 2:
        raise UnsupportedModuleError(ds, f"{path}.downsample", "expected [avg-pool,] conv, bn")
    off = len(ds) - 2
    conv = c.get(f"{path}.downsample.{off}", nn.Conv2d)
    return pool, conv, c.get(f"{path}.downsample.{off + 1}", nn.BatchNorm2d)


def build(model: ResNet, images: Tensor, head: str, differentiable: bool = False, *,
          reference: bool = False) -> tuple[Graph, Head]:
    if head != "exact":
        raise ValueError("head='gradcam' is the VGG reference seed; ResNet seeds exactly at the pooled head")
    c = Claims(model)
    conv1, bn1 = c.get("conv1", nn.Conv2d), c.get("bn1", nn.BatchNorm2d)
    c.get("act1", *ACTIVATIONS)
    maxpool = c.get("maxpool", nn.MaxPool2d, optional=True)
    blocks: list[tuple[str, nn.Module]] = []
    for k in range(1, 5):
        for i in range(len(c.get(f"layer{k}", nn.Sequential))):
            blocks.append((f"layer{k}.{i}", c.get(f"layer{k}.{i}", BasicBlock, Bottleneck)))
    pool_mod = c.get("global_pool", SelectAdaptivePool2d)
    if pool_mod.pool_type != "avg" or not pool_mod.flatten:
        raise UnsupportedModuleError(pool_mod, "global_pool", f"pool_type {pool_mod.pool_type!r}: only 'avg'")
    c.claimed.update({"global_pool.pool", "global_pool.flatten"})
    fc = c.get("fc", nn.Linear)
    parts = {p: _block_parts(c, p, b) for p, b in blocks}
    shortcuts = {p: _shortcut(c, p, b) for p, b in blocks}
    c.finish()
    if reference:
        _check_reference(maxpool, blocks, shortcuts)
    eps = not reference

    acts = ["act1"] + [a for p in parts for _, _, a in parts[p]]
    rec = record(model, images, inputs=acts, outputs=acts, differentiable=differentiable)
    units = [input_unit(images)] + [Unit(a, rec.inputs[a], rec.outputs[a]) for a in acts]
    v = {u.name: u.v for u in units}
    z = {u.name: u.z for u in units}
    out = [Block("act1", [ConvRule("input", conv1, bn1, images, z["act1"].shape[2:], path="conv1",
                                   shift_eps=eps)])]
    src = "act1"
    ties = "reference" if reference else "split"
    pool = FrozenPool(maxpool, v["act1"], "maxpool", ties) if maxpool is not None else None
    aliases: dict[str, str] = {}
    for path, _ in blocks:
        prev, prev_pool = src, pool
        for conv, bn, act in parts[path]:
            mods = c.modules
            rules = [ConvRule(prev, mods[conv], mods[bn], v[prev], z[act].shape[2:], prev_pool, conv, eps)]
            if act == parts[path][-1][2]:
                rules.append(_shortcut_rule(shortcuts[path], src, v[src], pool, z[act].shape[2:], path, eps))
            out.append(Block(act, rules))
            prev, prev_pool = act, None
        aliases[path] = prev
        aliases[path.rsplit(".", 1)[0]] = prev  # the stage: its last block
        src, pool = prev, None
    head_seed = Head(src, lambda target: pooled_linear_seed(v[src], fc, target))
    if reference:
        aliases = _reference_names(parts)
    graph = graph_of(units, out, aliases, rec.logits, differentiable)
    graph.batch_contrast = reference
    return graph, head_seed


def _check_reference(maxpool: nn.Module | None, blocks: list[tuple[str, nn.Module]],
                     shortcuts: dict[str, tuple[nn.Module | None, ...]]) -> None:
    """The authors' code runs Bottleneck ResNets with a max-pool stem and conv + BN projection
    shortcuts (resnet50/101/152); its BasicBlock has no path through the stem max-pool."""
    basic = [p for p, b in blocks if not isinstance(b, Bottleneck)]
    avg = [f"{p}.downsample.0" for p, sc in shortcuts.items() if sc[0] is not None]
    if maxpool is None or basic or avg:
        what = ("no stem max-pool" if maxpool is None else f"BasicBlock {basic[0]}" if basic
                else f"avg-pool shortcut {avg[0]}")
        raise ValueError("reference=True reproduces the authors' ResNet code, which runs Bottleneck "
                         f"ResNets with a max-pool stem and conv shortcuts (resnet50/101/152); got {what}")


def _reference_names(parts: dict[str, list[tuple[str, str, str]]]) -> dict[str, str]:
    """The reference code's layer names -> units: its stem ReLU `relu` -> act1, `layerK.i.reluJ`
    -> layerK.i.actJ, and a block `layerK.i`, whose relevance it records at the block's input,
    -> the unit before the block (layer1.0's input is the stem max-pool, part of a block here)."""
    names = {"relu": "act1"}
    prev = None
    for path, acts in parts.items():
        for j, (_, _, act) in enumerate(acts, 1):
            names[f"{path}.relu{j}"] = act
        if prev is not None:
            names[path] = prev
        prev = acts[-1][2]
    return names


def _shortcut_rule(sc, src: str, x: Tensor, stem_pool: FrozenPool | None, out_size, path: str,
                   shift_eps: bool = True):
    """Identity shortcut: x itself, no bias share; projection: its own conv + BN with its own bias
    (docs/method.md §3, residual add), both measured against the full sum after the add."""
    avg, conv, bn = sc
    if conv is None:
        return PoolRule(src, stem_pool) if stem_pool is not None else IdentityRule(src)
    if avg is not None and stem_pool is not None:
        raise UnsupportedModuleError(avg, f"{path}.downsample.0", "two poolings in one shortcut")
    pool = FrozenPool(avg, x, f"{path}.downsample.0") if avg is not None else stem_pool
    return ConvRule(src, conv, bn, x, out_size, pool, f"{path}.downsample", shift_eps)
