"""The one signature every saliency method has, and the error of a method that cannot explain a
model (kept apart from methods.py so that the library adapters, cams.py and lrp.py, can use them)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

# (images [N, 3, H, W], target [N]) -> maps [N, H, W]
Explainer = Callable[[Tensor, Tensor], Tensor]


class Unsupported(RuntimeError):
    """A method that cannot explain this model; the message says why."""
