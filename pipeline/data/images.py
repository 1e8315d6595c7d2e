"""Any image file as the 8-bit RGB picture a person sees: the one decoding rule of the project.

Pillow's `convert("RGB")` is wrong for several common files: a 16-bit grayscale PNG (mode
`I;16` / `I`) is clipped to 255 and comes out white, a photo's EXIF orientation is ignored,
and transparent pixels take whatever colour they hide. Here:

- EXIF orientation is applied (a phone photo stands the way it was taken);
- 16- and 32-bit integer grayscale is scaled from its bit depth to 8 bits (not clipped), and a
  float image (mode `F`) in [0, 1] is scaled by 255; other float ranges are refused;
- transparency (RGBA, LA, PA and palette images with a transparent index) is composited on
  white ([choice]: cut-out photos read as objects on a plain page);
- CMYK, YCbCr, LAB and the rest go through Pillow's conversion.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """A file that is not an image this module can turn into RGB; the message says why."""


def decode(data: bytes) -> Image.Image:
    """The RGB image of an encoded file's bytes; ImageDecodeError naming the problem."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError:  # its message holds a memory address: keep reasons stable
        raise ImageDecodeError("not a recognised image format") from None
    except ImageDecodeError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged data
        raise ImageDecodeError(f"damaged image data: {exc!r}") from None


def load(path: str | os.PathLike[str]) -> Image.Image:
    """The RGB image of a file (a local path or an fsspec URL); FileNotFoundError when there is
    no such file, ImageDecodeError when it is not an image."""
    import fsspec

    path = os.fspath(path)
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no image file at {path}") from None
    try:
        return decode(data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB, by the rules of the module docstring."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im, dtype=np.float64)
        # the bit depth of the data, not of the container: a 12-bit sensor in a 16-bit file
        # is still scaled as 16 bits (what viewers do), mode "I" by its own maximum range
        top = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**32 - 1
        if values.min(initial=0) < 0:
            raise ImageDecodeError(f"{im.mode} image with negative values")
        return Image.fromarray(np.round(values / top * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and (values.min() < 0 or values.max() > 1):
            raise ImageDecodeError(f"float image with values in [{values.min():g}, "
                                   f"{values.max():g}]; expected [0, 1]")
        return Image.fromarray(np.round(values * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        page = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return im.convert("RGB")


def dhash(im: Image.Image) -> int:
    """64-bit difference hash of `im` as a signed int64: the sign of the brightness step between
    horizontal neighbours of a 9x8 greyscale thumbnail, row by row.

    Equal for an image and its re-encodings, resizes and small colour changes (a JPEG at another
    quality, a thumbnail), different for different pictures; the scan treats equal hashes as one
    source (docs/method.md §5, near-duplicate exemplars).
    """
    grey = np.asarray(im.convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value
