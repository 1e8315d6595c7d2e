"""The real photos that pip-installable packages bundle, written as an ImageFolder for the
real-photo demo (`concept-atlas demo --real`).

scikit-image, scikit-learn and matplotlib ship a few public-domain / permissively licensed
photographs with their wheels (no download). Each is written under a coarse category folder so
that `make-shards` reads a label per image and the atlas's label hints have names to show. The
categories are this project's description of the pictures, not ImageNet classes.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        return image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import sklearn.datasets

        return np.asarray(Image.open(Path(sklearn.datasets.__file__).parent / "images" / name))
    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib

        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name))
    return load


# (category, file stem) -> loader; photographs only (no rendered logos, text or test patterns)
BUNDLED: dict[tuple[str, str], Callable[[], np.ndarray]] = {
    ("animal", "chelsea"): _skimage("chelsea"),
    ("drink", "coffee"): _skimage("coffee"),
    ("person", "astronaut"): _skimage("astronaut"),
    ("person", "camera"): _skimage("camera"),
    ("person", "grace_hopper"): _matplotlib("grace_hopper.jpg"),
    ("texture", "brick"): _skimage("brick"),
    ("texture", "grass"): _skimage("grass"),
    ("texture", "gravel"): _skimage("gravel"),
    ("object", "clock"): _skimage("clock"),
    ("object", "coins"): _skimage("coins"),
    ("vehicle", "rocket"): _skimage("rocket"),
    ("vehicle", "motorcycle"): _skimage("stereo_motorcycle"),
    ("sky", "hubble_deep_field"): _skimage("hubble_deep_field"),
    ("sky", "moon"): _skimage("moon"),
    ("microscopy", "immunohistochemistry"): _skimage("immunohistochemistry"),
    ("microscopy", "retina"): _skimage("retina"),
    ("building", "china"): _sklearn("china.jpg"),
    ("plant", "flower"): _sklearn("flower.jpg"),
}


def write_bundled_photos(out: str | os.PathLike[str]) -> list[Path]:
    """Write every bundled photo as `out/CATEGORY/STEM.png` (RGB); returns the paths.

    A photo whose package is missing is skipped with a message; none at all raises
    ModuleNotFoundError naming the packages (the `dev` extra installs them).
    """
    out = Path(out)
    written, missing = [], set()
    for (category, stem), load in BUNDLED.items():
        path = out / category / f"{stem}.png"
        if not path.exists():
            try:
                pixels = load()
            except ModuleNotFoundError as exc:
                missing.add(exc.name)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{stem}.tmp"  # not an image name: make-shards never lists it
            Image.fromarray(np.asarray(pixels)).convert("RGB").save(tmp, format="PNG")
            os.replace(tmp, path)
        written.append(path)
    if missing:
        print(f"[photos] skipped the photos of {', '.join(sorted(missing))} (not installed)")
    if not written:
        raise ModuleNotFoundError("no bundled photos: install scikit-image, scikit-learn or "
                                  "matplotlib (pip install -e '.[dev]')")
    return written
