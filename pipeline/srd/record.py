"""Recording the forward pass of an unmodified model: module inputs and outputs by module path.

The frozen pattern (docs/method.md §1) is read from this one recorded pass: pre-activations
are the inputs of activation modules, taken by a pre-hook and cloned because timm runs most
activations (and ResNet's residual add) in place. By default the pass runs without autograd and
the recording is detached; `differentiable=True` keeps the recorded tensors on the autograd
graph of the images (the parameters stay whatever they are: SRD's rules read them detached).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn


@dataclass
class Recording:
    """Tensors of one forward pass: `inputs[path]` (first positional input), `outputs[path]`."""

    images: Tensor
    logits: Tensor
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BN running stats, no dropout: the deterministic affine maps SRD decomposes),
    restoring the model's own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def record(model: nn.Module, images: Tensor, inputs: Iterable[str] = (),
           outputs: Iterable[str] = (), differentiable: bool = False) -> Recording:
    """Run `model(images)` once in eval mode and record the named modules' inputs / outputs;
    with `differentiable`, under autograd and not detached (clones still: in-place ops)."""
    modules = dict(model.named_modules())
    rec = Recording(images, images, {}, {})
    handles = []

    def keep(store: dict[str, Tensor], path: str, t: Tensor) -> None:
        if path in store:
            raise RuntimeError(f"module {path!r} ran twice in one forward: SRD needs one call per module")
        store[path] = t.clone() if differentiable else t.detach().clone()

    for path in inputs:
        handles.append(modules[path].register_forward_pre_hook(
            lambda m, args, p=path: keep(rec.inputs, p, args[0])))
    for path in outputs:
        handles.append(modules[path].register_forward_hook(
            lambda m, args, out, p=path: keep(rec.outputs, p, out)))
    try:
        with torch.set_grad_enabled(differentiable), eval_mode(model):
            rec.logits = model(images)
    finally:
        for h in handles:
            h.remove()
    return rec
