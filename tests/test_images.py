"""Decoding every common image file to the RGB a person sees (pipeline.data.images), through the
shard reader: 16-bit grayscale, 8-bit grayscale, CMYK, palette with transparency, EXIF rotation."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.data.errors import ErrorLog
from pipeline.data.images import ImageDecodeError, decode, dhash
from pipeline.data.shards import iter_samples
from pipeline.latents.groups import source_groups


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gray16() -> tuple[bytes, np.ndarray]:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    return encoded(Image.fromarray(values), "PNG"), values


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    data, values = gray16()
    rgb = np.asarray(decode(data))
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_array_equal(rgb[..., 0], np.round(values / 65535 * 255).astype(np.uint8))
    # what Pillow's plain conversion gives: almost everything white
    with Image.open(io.BytesIO(data)) as im:
        assert (np.asarray(im.convert("RGB"))[..., 0] == 255).mean() > 0.9


def test_gray_cmyk_and_palette_with_transparency() -> None:
    gray = np.asarray(decode(encoded(Image.new("L", (4, 4), 77), "PNG")))
    assert gray.shape == (4, 4, 3) and (gray == 77).all()
    cmyk = np.asarray(decode(encoded(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG")))
    assert cmyk[..., 0].min() > 230 and cmyk[..., 1:].max() < 25  # red ink on paper
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (green) is see-through: white page shows
    rgb = np.asarray(decode(encoded(palette, "PNG", transparency=1)))
    assert (rgb == 255).all()
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    half = np.asarray(decode(encoded(rgba, "PNG")))
    assert tuple(half[0, 0]) == (255, 127, 127)


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees when taken
    rotated = decode(encoded(im, "JPEG", exif=exif))
    assert rotated.size == (2, 6)


def test_unreadable_data_is_named() -> None:
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode(b"definitely not an image")
    with pytest.raises(ImageDecodeError, match="expected \\[0, 1\\]"):
        decode(encoded(Image.fromarray(np.full((2, 2), 7.5, np.float32)), "TIFF"))


def test_the_shard_reader_decodes_a_16_bit_png_right(tmp_path: Path) -> None:
    data, values = gray16()
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("a.png", data), ("a.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    errors = ErrorLog()
    [sample] = list(iter_samples([str(shard)], errors))
    assert not list(errors) and sample.cls == 3
    np.testing.assert_array_equal(np.asarray(sample.image)[..., 1],
                                  np.round(values / 65535 * 255).astype(np.uint8))


def test_re_encoded_and_resized_copies_of_a_photo_are_one_source_group() -> None:
    from skimage import data

    cat, coffee = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    again = decode(encoded(cat, "JPEG", quality=40))
    smaller = cat.resize((cat.width // 3, cat.height // 3), Image.Resampling.LANCZOS)
    groups = source_groups(pa.table({"image_id": [1, 2, 3, 4], "source": [None] * 4,
                                     "phash": [dhash(cat), dhash(again), dhash(smaller),
                                               dhash(coffee)]}))
    assert groups == {1: 1, 2: 1, 3: 1, 4: 4}  # the copies are one source, the coffee another
    differ = bin((dhash(cat) ^ dhash(coffee)) & (2**64 - 1)).count("1")
    assert differ > 16  # of 64 bits
