"""The one error SRD raises for anything it cannot decompose exactly (docs/architecture.md,
"Principles": fail loudly)."""
from __future__ import annotations

from torch import nn


class UnsupportedModuleError(TypeError):
    """A module SRD has no exact rule for: names its type and module path, never a silently wrong map."""

    def __init__(self, module: nn.Module | type, path: str, why: str = "no SRD rule for this module") -> None:
        kind = module.__name__ if isinstance(module, type) else type(module).__name__
        self.module_type, self.path = kind, path
        super().__init__(f"SRD cannot decompose {kind} at {path or '<model root>'!r}: {why}")
