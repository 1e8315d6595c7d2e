"""SRD engine vs a slow brute-force reference (explicit per-(p, q) contribution vectors).

The reference knows nothing of the engine: it rebuilds each tiny model's forward pass from the
modules, gets every contribution vector c0(p->q) of an affine branch by evaluating the branch
on the input with only source position p kept (plain loop over p), shares the branch bias
fn(0) by norm, and forms mu(p->q) = <c(p->q), z_q> / ||z_q||^2 by definition (METHOD.md 2-3).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from pipeline import srd

Branch = tuple[str, torch.Tensor, "torch.Tensor | None"]  # source, C0 [P_s, C, P_t], bias [C, P_t]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64, eval, random BN running stats and affine (so BN is non-trivial), random biases."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.eps = 0.1  # large, so the eps in the BN shift [choice] is visible
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen, dtype=torch.float64) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen, dtype=torch.float64) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=gen, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=gen, dtype=torch.float64) - 0.5)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=gen, dtype=torch.float64))
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


def brute_block(r_t: torch.Tensor, z: torch.Tensor, branches: list[Branch],
                const: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """R(v_p) = sum_q mu(p->q) R(z_q), bias of each branch shared by ||c0(p->q)||: r_t [P_t], z [C, P_t]."""
    den = (z * z).sum(0)
    out: dict[str, torch.Tensor] = {}
    constant = 0.0 if const is None else float(((const * z).sum(0) / den * r_t).sum())
    for name, c0, bias in branches:
        norms = c0.square().sum(1).sqrt()  # ||c0(p->q)|| [P_s, P_t]
        total = norms.sum(0)
        rel = torch.zeros(c0.shape[0], dtype=z.dtype)
        for p in range(c0.shape[0]):
            c = c0[p] if bias is None else c0[p] + bias * torch.where(total > 0, norms[p] / total, 0.0)
            rel[p] = ((c * z).sum(0) / den * r_t).sum()
        if bias is not None:
            constant += float(torch.where(total > 0, 0.0, (bias * z).sum(0) / den * r_t).sum())
        out[name] = out.get(name, 0) + rel
    return out, constant


def brute_propagate(blocks: list[tuple[str, torch.Tensor, list[Branch], torch.Tensor | None]],
                    seed_unit: str, seed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Blocks in forward order (target, z [C, P], branches, const); returns (R on input, constant)."""
    acc = {seed_unit: seed.flatten()}
    constant = 0.0
    for target, z, branches, const in reversed(blocks):
        if target not in acc:
            continue
        shares, c = brute_block(acc.pop(target), z, branches, const)
        constant += c
        for name, rel in shares.items():
            acc[name] = acc.get(name, 0) + rel
    return acc.pop("input"), constant


def frozen_max_pool(pool: torch.nn.MaxPool2d, v: torch.Tensor):
    """The max pool with its argmax frozen at v: a channel-wise gather, linear in its input."""
    _, idx = F.max_pool2d(v[None], pool.kernel_size, pool.stride, pool.padding, return_indices=True)
    return lambda t: t.flatten(2).gather(2, idx.flatten(2).expand(t.shape[0], -1, -1)).view(t.shape[0], *idx.shape[1:])


def resnet_reference(model: ResNet, x: torch.Tensor, y: int):
    """Blocks of a timm ResNet for one image x [3, H, W], and the GAP + linear seed of class y."""
    blocks = []
    stem = lambda t: model.bn1(model.conv1(t))  # noqa: E731
    z = stem(x[None])[0]
    blocks.append(("act1", z.flatten(1), [("input", *contributions(stem, x))], None))
    src, v = "act1", model.act1(z.clone())
    pool = frozen_max_pool(model.maxpool, v)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            parts = [(blk.conv1, blk.bn1, blk.act1), (blk.conv2, blk.bn2, blk.act2)]
            if isinstance(blk, Bottleneck):
                parts.append((blk.conv3, blk.bn3, blk.act3))
            name = f"{src}/{id(blk)}"
            cur, cur_v, cur_pool = src, v, pool
            for k, (conv, bn, act) in enumerate(parts):
                main = (lambda conv, bn, p: (lambda t: bn(conv(p(t)))))(conv, bn, cur_pool)
                branches = [(cur, *contributions(main, cur_v))]
                z = main(cur_v[None])[0]
                if k == len(parts) - 1:
                    if blk.downsample is not None:
                        short = (lambda p: (lambda t: blk.downsample(p(t))))(pool)
                        branches.append((src, *contributions(short, v)))
                    else:
                        short = pool
                        branches.append((src, *contributions(short, v, share=False)))
                    z = z + short(v[None])[0]
                target = f"{name}.{k}"
                blocks.append((target, z.flatten(1), branches, None))
                cur, cur_v, cur_pool = target, act(z.clone()), (lambda t: t)
            src, v, pool = cur, cur_v, (lambda t: t)
    w, b = model.fc.weight[y], model.fc.bias[y]
    seed = (torch.einsum("c,chw->hw", w, v) + b) / v[0].numel()
    logit = float(seed.sum())
    return blocks, src, seed, logit


@torch.no_grad()
def check_against_engine(model, images, reference) -> None:
    maps, const = srd.saliency(model, images, return_constant=True)
    logits = model(images)
    for i in range(images.shape[0]):
        y = int(logits[i].argmax())
        blocks, seed_unit, seed, logit = reference(model, images[i], y)
        assert logit == pytest.approx(float(logits[i, y]), rel=1e-10), "reference forward differs from model"
        ref, ref_const = brute_propagate(blocks, seed_unit, seed)
        ref = ref.view(images.shape[2:])
        err = (maps[i] - ref).abs().max() / ref.abs().max()
        assert err < 1e-6, f"image {i}: engine vs brute force relative error {err:.2e}"
        assert float(const[i]) == pytest.approx(ref_const, rel=1e-6, abs=1e-9 * abs(logit))


def test_resnet_basic_block_matches_brute_force() -> None:
    """conv+BN+bias share, stem max-pool joined to the next conv, identity and projection shortcuts."""
    model = randomize(ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(4, 6, 8, 8),
                             stem_width=4, num_classes=3), seed=1)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    check_against_engine(model, images, resnet_reference)


def test_resnet_bottleneck_avg_down_matches_brute_force() -> None:
    """Bottleneck blocks, projection shortcut after the stem max-pool, ResNet-D avg-pool (ceil mode)."""
    model = randomize(ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(2, 2, 3, 3), stem_width=4,
                             num_classes=3, avg_down=True), seed=3)
    images = torch.randn(2, 3, 26, 26, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_against_engine(model, images, resnet_reference)
