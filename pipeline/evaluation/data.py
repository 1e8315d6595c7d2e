"""Evaluation images: synthetic scenes with ground-truth masks, and bundled real photos."""
from __future__ import annotations

import numpy as np

from pipeline.data.synthetic import SHAPES, render_sample, render_without, rle_decode

# scikit-image's bundled photos of ImageNet-like objects (grey ones are repeated to RGB) and
# scikit-learn's two sample photos; no download needed for any of them
SKIMAGE_PHOTOS: tuple[str, ...] = ("astronaut", "chelsea", "coffee", "rocket", "camera", "clock",
                                   "coins", "stereo_motorcycle")
SKLEARN_PHOTOS: tuple[str, ...] = ("china.jpg", "flower.jpg")


def synthetic_set(n: int, seed: int, size: int = 128) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`n` synthetic images of dataset `seed`: (images uint8 [H, W, 3] each, labels int[n],
    masks bool[n, H, W]). The mask is the visible pixels of the largest object, whose shape is
    the class: the evidence a faithful map of the true class should point at."""
    images, labels, masks = [], [], []
    for index in range(n):
        img, meta = render_sample(seed, index, size)
        largest = max(meta["objects"], key=lambda o: o["area"])
        images.append(img)
        labels.append(meta["class"])
        masks.append(rle_decode(largest["mask"]))
    return images, np.asarray(labels), np.stack(masks)


def multi_object_set(n: int, seed: int, size: int = 128,
                     max_index: int = 10_000) -> tuple[list[np.ndarray], list[list[tuple[int, np.ndarray]]]]:
    """The first `n` synthetic scenes of dataset `seed` that hold objects of two or more
    shapes, for the class-switch pointing game: (images uint8 [H, W, 3] each, per image its
    (class, mask bool [H, W]) pairs, one per shape present, the class being the shape's index
    and the mask the visible pixels of all objects of that shape). The scenes' dataset indices
    are `multi_object_indices(n, seed, size, max_index)`."""
    images, objects = [], []
    for index in multi_object_indices(n, seed, size, max_index):
        img, meta = render_sample(seed, index, size)
        by_shape: dict[int, np.ndarray] = {}
        for obj in meta["objects"]:
            c = SHAPES.index(obj["shape"])
            by_shape[c] = by_shape.get(c, False) | rle_decode(obj["mask"])
        images.append(img)
        objects.append(sorted(by_shape.items()))
    return images, objects


def multi_object_indices(n: int, seed: int, size: int = 128, max_index: int = 10_000) -> list[int]:
    """Dataset indices of the first `n` scenes of dataset `seed` (at `size` px: the layout's
    acceptance depends on it) that hold two or more shapes."""
    found = []
    for index in range(max_index):
        if len(found) == n:
            return found
        _, meta = render_sample(seed, index, size)
        if len({obj["shape"] for obj in meta["objects"]}) >= 2:
            found.append(index)
    if len(found) == n:
        return found
    raise ValueError(f"only {len(found)} of the first {max_index} scenes of seed {seed} hold two shapes; "
                     f"asked for {n}")


def without_each_shape(n: int, seed: int, size: int = 128, max_index: int = 10_000) -> list[list[np.ndarray]]:
    """Per scene of `multi_object_set(n, seed, size)` and per class it holds (in its order), the
    scene with every object of that shape left out (`synthetic.render_without`): the occlusion
    counterfactual that says whether a model's logit for a class rises with that class's objects."""
    return [[render_without(seed, index, shape, size)
             for shape in sorted({o["shape"] for o in render_sample(seed, index, size)[1]["objects"]},
                                 key=SHAPES.index)]
            for index in multi_object_indices(n, seed, size, max_index)]


def real_photos() -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """The bundled real photos as (name, uint8 [H, W, 3]) and notes on any that are missing
    (scikit-learn is optional)."""
    import skimage.data

    photos, notes = [], []
    for name in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if name == "stereo_motorcycle" else img  # (left, right, disparity)
        photos.append((name, np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]))
    try:
        from sklearn.datasets import load_sample_image
    except ImportError as e:
        notes.append(f"skipped {', '.join(SKLEARN_PHOTOS)}: scikit-learn not importable ({e})")
    else:
        photos += [(name.split(".")[0], load_sample_image(name)) for name in SKLEARN_PHOTOS]
    return photos, notes
