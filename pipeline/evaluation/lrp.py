"""LRP baselines from the field's libraries: zennit's composites for the CNNs that zennit has a
canonizer for, and lxt's AttnLRP for timm Vision Transformers.

**zennit** (`zennit_lrp`) applies its rules through module hooks; an operation done inside a
module's `forward` (a residual `+`, a squeeze-excitation product) is invisible to them, so autograd
passes relevance through it as if it were a gradient: a sum then hands its full relevance to
*each* summand instead of splitting it, and conservation is lost. zennit's canonizers rewrite the
modules it knows so that every such sum is a hooked `zennit.layer.Sum`: `ResNetCanonizer` for
torchvision's ResNet blocks, `VGGCanonizer` / `SequentialMergeBatchNorm` for plain sequential
nets. Nothing in zennit matches timm's blocks (`timm.models.resnet.BasicBlock` and the
EfficientNet blocks add their shortcut with a functional `+`; timm's `BatchNormAct2d` folds an
activation into the norm), so for those models `zennit_lrp` raises `Unsupported` with the reason
rather than return a map that does not conserve relevance.

**lxt** (`attn_lrp`) is AttnLRP (Achtibat et al., ICML 2024) in lxt's Gradient x Input form:
the model's forward is changed so that plain autograd computes LRP, relevance = input x gradient.
lxt 2.1 ships this for torchvision's ViT and Hugging Face language models, not for timm's
classes; `attn_lrp` applies lxt's own rule functions to a copy of a timm ViT, following lxt's ViT
recipe (`lxt.efficient.models.vit_torch.cp_LRP` plus its `examples/vit_torch.py`): the identity
rule on element-wise activations (`non_linear_forward`) and on LayerNorm (`layer_norm_forward`,
the std held constant), CP-LRP inside attention (no relevance through the softmax: q and k held
constant with lxt's `stop_gradient`), and zennit's Gamma rule on Linear / Conv2d layers through
`monkey_patch_zennit`. Residual sums and matrix products with a constant need no rule in this
form. **[choice]** gamma 0.25 on Conv2d (the patch embedding) and 0.05 on Linear layers, from the
middle of the grid lxt's ViT example shows; no tuning on our data. A convolutional stem (timm's
`ConvStem` in a `HybridEmbed`, demo_vitc) is canonised as zennit canonises a plain CNN: each
BatchNorm is merged into the conv before it (`fold_bn`, the exact eval-mode affine map) and its
activation keeps the identity rule, so the stem's convs take the Gamma rule like the patch conv.

lxt's `monkey_patch_zennit` rewrites zennit's `BasicHook` class for the whole process, which would
turn every later zennit LRP into nonsense; here it is applied only around each AttnLRP call and
undone after (`_lxt_zennit_hooks`). Every patch of a ViT's modules is made on a deep copy, never
on the classes, so SRD and the other methods see the unmodified model.
"""
from __future__ import annotations

import copy
import types
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from pipeline.evaluation.explainer import Explainer, Unsupported
from pipeline.srd.conv import fold_bn

# why zennit cannot explain a timm family (module classes that no zennit canonizer matches)
ZENNIT_GAPS: dict[str, str] = {
    "ResNet": "timm's ResNet blocks (timm.models.resnet.BasicBlock / Bottleneck) add their shortcut with a "
              "functional `+=` inside forward; zennit's ResNetCanonizer matches only torchvision's "
              "BasicBlock / Bottleneck, so zennit's rules would not see the residual sums",
    "EfficientNet": "timm's EfficientNet blocks (DepthwiseSeparableConv, InvertedResidual) add their shortcut with "
                    "a functional `+` and use BatchNormAct2d (norm and activation in one module); zennit has no "
                    "canonizer for either",
    "VisionTransformer": "zennit has no rules for attention or LayerNorm; use AttnLRP (lxt) for ViTs",
}
# leaves of a plain sequential net whose BatchNorms zennit's SequentialMergeBatchNorm can merge
_PLAIN_LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def _zennit_canonizers(model: nn.Module) -> list:
    """The zennit canonizers that make `model`'s every sum visible to zennit's rules; raises
    Unsupported (with the reason) for a model that no zennit canonizer covers."""
    import torchvision
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    if isinstance(model, torchvision.models.ResNet):
        return [ResNetCanonizer()]
    if isinstance(model, torchvision.models.VGG):
        return [VGGCanonizer()]
    leaves = [m for m in model.modules() if not list(m.children())]
    if isinstance(model, nn.Sequential) and all(isinstance(m, _PLAIN_LEAVES) for m in leaves):
        return [SequentialMergeBatchNorm()]
    family = type(model).__name__
    reason = ZENNIT_GAPS.get(family, "zennit has canonizers for torchvision's ResNet and VGG and for plain "
                                     "nn.Sequential conv nets only")
    raise Unsupported(f"zennit LRP on {type(model).__module__}.{family}: {reason}")


def zennit_lrp(model: nn.Module, epsilon: float = 1e-6) -> Explainer:
    """zennit's EpsilonPlusFlat composite (Flat rule on the first layer, z+ on the other
    convolutions, epsilon on dense layers, BatchNorm merged by the canonizer) with the model's
    canonizer: (images [N, 3, H, W], target [N]) -> relevance summed over channels [N, H, W].
    Raises Unsupported at once for a model that no zennit canonizer covers (`ZENNIT_GAPS`)."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    canonizers = _zennit_canonizers(model)
    # canonizers merge BatchNorm into the weights while registered: work on a copy
    lrp_model = copy.deepcopy(model).eval()
    composite = EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers)

    def run(x: Tensor, t: Tensor) -> Tensor:
        # the target's logit is the relevance to distribute (Bach et al.), as SRD's seed; zennit's
        # examples start from 1, which would flip the map's sign for a negative logit
        def logit_relevance(out: Tensor) -> Tensor:
            return torch.zeros_like(out).scatter_(1, t[:, None], out.gather(1, t[:, None]))

        with Gradient(model=lrp_model, composite=composite) as attributor:
            _, relevance = attributor(x, logit_relevance)
        return relevance.sum(1).detach()

    return run


class _StopGradient(nn.Module):
    """lxt's `stop_gradient` as a module, appended after a timm Attention's q_norm / k_norm: CP-LRP
    sends no relevance through the attention weights."""

    def forward(self, x: Tensor) -> Tensor:
        from lxt.efficient.rules import stop_gradient

        return stop_gradient(x)


def _attn_lrp_types() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(containers whose forward needs no rule, element-wise activations, other leaves that are
    linear in their input) of a timm ViT that attn_lrp can handle."""
    from timm.layers import BatchNormAct2d, ConvNormAct, HybridEmbed, Mlp, PatchEmbed
    from timm.layers.activations import GELU, GELUTanh, QuickGELU
    from timm.models.vision_transformer import Attention, Block, LayerScale, VisionTransformer
    from timm.models.vision_transformer_hybrid import ConvStem

    containers = (VisionTransformer, PatchEmbed, HybridEmbed, ConvStem, ConvNormAct, Block, Attention, Mlp,
                  nn.Sequential, nn.ModuleList)
    activations = (nn.GELU, nn.SiLU, nn.ReLU, GELU, GELUTanh, QuickGELU)
    # BatchNormAct2d: merged into its ConvNormAct's conv on the copy (`_merge_stem_norms`)
    linear = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Identity, nn.Dropout, LayerScale, BatchNormAct2d)
    return containers, activations, linear


def _merge_stem_norms(model: nn.Module) -> None:
    """In place: each ConvNormAct's BatchNormAct2d merged into its conv (weights and a bias), the
    module's norm replaced by the norm's activation alone; raises Unsupported for a BatchNormAct2d
    anywhere else (no conv to merge it into)."""
    from timm.layers import BatchNormAct2d, ConvNormAct

    merged = set()
    for module in model.modules():
        if isinstance(module, ConvNormAct) and isinstance(module.bn, BatchNormAct2d):
            w, b = fold_bn(module.conv, module.bn)
            conv = module.conv
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=w.dtype, device=w.device))
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            merged.add(id(module.bn))
            module.bn = module.bn.act
    loose = [name for name, m in model.named_modules() if isinstance(m, BatchNormAct2d) and id(m) not in merged]
    if loose:
        raise Unsupported(f"AttnLRP (lxt): a BatchNormAct2d outside a ConvNormAct ({loose[0]}) has no conv to merge into")


def _check_attn_lrp(model: nn.Module) -> None:
    """Raise Unsupported unless every module of `model` is one that attn_lrp gives a rule (or
    needs none): a timm VisionTransformer without attention pooling or gated attention."""
    from timm.models.vision_transformer import Attention, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise Unsupported(f"AttnLRP (lxt) explains timm VisionTransformers; got {type(model).__name__}")
    containers, activations, linear = _attn_lrp_types()
    unknown = sorted({type(m).__name__ for m in model.modules()
                      if not isinstance(m, containers + activations + linear)})
    if unknown:
        raise Unsupported(f"AttnLRP (lxt): no rule here for the module types {', '.join(unknown)}")
    gated = [name for name, m in model.named_modules() if isinstance(m, Attention) and m.gate is not None]
    if gated:
        raise Unsupported(f"AttnLRP (lxt): gated attention ({gated[0]}) has no rule here")


@contextmanager
def _lxt_zennit_hooks() -> Iterator[None]:
    """lxt's Gradient x Input form of zennit's BasicHook, for the duration of the block only."""
    from lxt.efficient import monkey_patch_zennit
    from zennit.core import BasicHook

    saved = {name: BasicHook.__dict__[name] for name in ("forward", "backward")}
    monkey_patch_zennit()
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(BasicHook, name, fn)


def attn_lrp_of(model: nn.Module, conv_gamma: float = 0.25, linear_gamma: float = 0.05
                ) -> Callable[[Tensor, Callable[[nn.Module, Tensor], Tensor]], Tensor]:
    """AttnLRP of any scalar read from a timm ViT with lxt's rules (see the module docstring):
    returns run(images [N, 3, H, W], output) -> input x LRP-gradient summed over channels
    [N, H, W], where output(lrp_model, images) -> Tensor[N] is the value explained (a class
    logit, an SAE latent on a block's tokens), computed on the rule-patched copy `lrp_model`.
    gamma 0 makes a layer's rule LRP-0. Raises Unsupported at once for a model with a module it
    has no rule for, or when lxt (the `bench` extra) is not installed."""
    from timm.models.vision_transformer import Attention
    from zennit.composites import LayerMapComposite
    from zennit.rules import Gamma

    if conv_gamma < 0 or linear_gamma < 0:
        raise ValueError(f"gammas must be >= 0, got conv_gamma={conv_gamma}, linear_gamma={linear_gamma}")
    _check_attn_lrp(model)
    try:
        from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method
    except ImportError as e:  # an optional library: the benchmark reports the row and goes on
        raise Unsupported(f"AttnLRP needs lxt (pip install -e '.[bench]'): {e}") from e
    _, activations, _ = _attn_lrp_types()
    lrp_model = copy.deepcopy(model).eval()
    _merge_stem_norms(lrp_model)
    for module in list(lrp_model.modules()):
        # bound to the instance: lxt's own patch targets classes, which would change every model
        if isinstance(module, nn.LayerNorm):
            patch_method(types.MethodType(layer_norm_forward, module), module)
        elif isinstance(module, activations):
            patch_method(types.MethodType(non_linear_forward, module), module, keep_original=True)
        elif isinstance(module, Attention):
            module.q_norm = nn.Sequential(module.q_norm, _StopGradient())
            module.k_norm = nn.Sequential(module.k_norm, _StopGradient())
    composite = LayerMapComposite([(nn.Conv2d, Gamma(conv_gamma)), (nn.Linear, Gamma(linear_gamma))])

    def run(x: Tensor, output: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
        x = x.detach().requires_grad_(True)
        with _lxt_zennit_hooks(), composite.context(lrp_model) as hooked:
            (grad,) = torch.autograd.grad(output(hooked, x).sum(), x)
        return (x * grad).sum(1).detach()

    return run


def attn_lrp(model: nn.Module, conv_gamma: float = 0.25, linear_gamma: float = 0.05) -> Explainer:
    """AttnLRP of a timm ViT's class logits (`attn_lrp_of`): (images [N, 3, H, W], target [N])
    -> relevance [N, H, W]."""
    run = attn_lrp_of(model, conv_gamma, linear_gamma)
    return lambda x, t: run(x, lambda m, images: m(images).gather(1, t[:, None])[:, 0])
