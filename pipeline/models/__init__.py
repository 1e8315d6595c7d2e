"""timm models with named PFV taps: loading with weights, preprocessing, layer taps."""
from pipeline.models.loading import (
    LoadedModel,
    checked_device,
    load_model,
    load_reproducible,
    model_fingerprint,
)
from pipeline.models.preprocess import data_config, make_transform, model_input_size, to_batch
from pipeline.models.taps import LayerSpec, PFVs, feature_stages, list_layers, tap

__all__ = [
    "LayerSpec", "LoadedModel", "PFVs", "checked_device", "data_config", "feature_stages", "list_layers",
    "load_model", "load_reproducible", "make_transform", "model_fingerprint", "model_input_size", "tap", "to_batch",
]
