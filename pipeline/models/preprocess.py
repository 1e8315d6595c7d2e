"""Preprocessing from a model's pretrained config: images in, normalised batch tensor out."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.data.images import to_rgb

ImageLike = Union[Image.Image, np.ndarray]
Transform = Callable[[Image.Image], Tensor]


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model expects by default.

    A ViT's patch embedding fixes its input size at build time (`img_size=`), which may differ
    from the `input_size` of the pretrained config it was registered with; the module wins.
    """
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return int(img_size[0]), int(img_size[1])
    _, h, w = timm.data.resolve_data_config(model=model)["input_size"]
    return int(h), int(w)


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of `model`."""
    cfg = timm.data.resolve_data_config(model=model)
    cfg["input_size"] = (cfg["input_size"][0], *model_input_size(model))
    return cfg


def make_transform(cfg: dict[str, Any]) -> Transform:
    """Eval transform for a data config: resize, centre crop, to tensor, normalise.

    Returns a callable PIL image -> Tensor[3, H, W] (float32, normalised).
    """
    return timm.data.create_transform(**cfg, is_training=False)


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)  # EXIF orientation, 16-bit grey, transparency (data.images)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
                image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"numpy images must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; "
                f"got dtype {image.dtype} shape {image.shape}")
        return Image.fromarray(image.squeeze(2) if image.ndim == 3 and image.shape[2] == 1
                               else image).convert("RGB")
    raise TypeError(f"expected a PIL image or a numpy uint8 array, got {type(image).__name__}")


def to_batch(images: ImageLike | Sequence[ImageLike], transform: Transform,
             device: torch.device | str = "cpu") -> Tensor:
    """Turn one image, a list of images or a numpy batch into a normalised batch.

    `images`: a PIL image, a numpy uint8 array [H, W, 3] (or gray / RGBA), a numpy batch
    [N, H, W, 3], or a sequence of those single images (sizes may differ: each is resized and
    cropped by `transform`). Returns Tensor[N, 3, H', W'] on `device`.
    """
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    if len(images) == 0:
        raise ValueError("no images given")
    return torch.stack([transform(_to_pil(im)) for im in images]).to(device)
