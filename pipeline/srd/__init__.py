"""SRD: Sharing Ratio Decomposition of timm vision models (METHOD.md sections 1-4).

`saliency` (class maps), `relevance` (hidden-layer maps), `ierf` (instance-specific effective
receptive fields, incl. latent directions), `explain` (everything, with the constant share).
"""
from pipeline.srd.adapters import build
from pipeline.srd.api import SRDResult, explain, ierf, relevance, saliency
from pipeline.srd.errors import UnsupportedModuleError

__all__ = ["SRDResult", "UnsupportedModuleError", "build", "explain", "ierf", "relevance", "saliency"]
