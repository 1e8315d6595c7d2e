"""The pictures of the atlas browser, rendered on the server and cached on disk.

Every picture is a PNG named by the sha256 of (atlas fingerprint, what it shows): a rebuilt
atlas has another fingerprint (`AtlasContent.fingerprint`), so no stale picture is served, and
the cache lives outside the atlas (the browser never writes to an atlas). The drawing reuses
the atlas's own helpers: `sheets.exemplar_tile` (bright on the iERF mask, peak cell boxed),
`viz.signed_heatmap` / `overlay` (SRD saliency, red for the class), and the CAFE stage's
`masks.upsample` for activation maps (docs/method.md §6).
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atlas.regions import cell_box
from pipeline.atlas.sheets import exemplar_tile
from pipeline.browser.content import EXEMPLAR_KINDS, AtlasContent, NotFound
from pipeline.store import fs
from pipeline.viz import draw_box, overlay, signed_heatmap

MODES = ("plain", "ierf", "act")  # an exemplar shown as is, bright on its iERF, under its act map
# uploads: bytes accepted, and pixels decoded (a PNG of a few KB can claim 100k x 100k pixels)
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/concept-atlas/browser` (~/.cache when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "concept-atlas" / "browser"


class Renderer:
    """Cached PNGs of one atlas (see the module docstring); `cache`: the cache folder."""

    def __init__(self, content: AtlasContent, cache: str | os.PathLike | None = None) -> None:
        self.content = content
        self.cache = Path(cache) if cache is not None else default_cache_dir()

    def cached(self, key: str, make: Callable[[], bytes]) -> bytes:
        """The bytes stored under `key` for this atlas, made (and stored) when missing."""
        digest = hashlib.sha256(f"{self.content.fingerprint}\0{key}".encode()).hexdigest()
        path = self.cache / self.content.fingerprint / digest[:2] / f"{digest}.png"
        if path.is_file():
            return path.read_bytes()
        data = make()
        # write then rename: a reader in another thread or process never sees half a file
        fs.write_atomic(str(path), lambda f: f.write(data))
        return data

    # ---- the pictures --------------------------------------------------------------------

    def image(self, image_id: str) -> bytes:
        """An atlas image as the model saw it."""
        row = self.content.check_image(image_id)
        return self.cached(f"image/{row['image_id']}",
                           lambda: png(self.content.pixels(int(row["image_id"]))))

    def exemplar(self, layer: str, latent: str, kind: str, rank: str, mode: str) -> bytes:
        """Exemplar (`kind`, `rank`) of a latent, peak cell boxed: `plain`, bright on its iERF
        mask (`ierf`), or under the latent's activation map (`act`)."""
        sae, lat = self.content.check_latent(layer, latent)
        if kind not in EXEMPLAR_KINDS or mode not in MODES or not rank.isdigit():
            raise NotFound(f"no exemplar {kind}/{rank}/{mode}: kinds are "
                           f"{', '.join(EXEMPLAR_KINDS)}, ranks 0.., modes {', '.join(MODES)}")
        info = self.content.latent_info(sae["sae_id"], lat)
        rows = info.exemplars.select(["kind", "rank", "image_id", "position"]).to_pylist()
        found = [i for i, r in enumerate(rows) if (r["kind"], r["rank"]) == (kind, int(rank))]
        if not found:
            have = ", ".join(f"{r['kind']}/{r['rank']}" for r in rows) or "none"
            raise NotFound(f"latent {lat} of {sae['sae_id']} has no {kind} exemplar of rank "
                           f"{rank}: it has {have}")
        i = found[0]
        r = rows[i]

        def make() -> bytes:
            pixels = self.content.pixels(r["image_id"])
            cell = self._cell(sae["layer"], r["position"], pixels.shape[:2])
            if mode == "ierf":
                return png(exemplar_tile(pixels, info.ierfs[i], cell))
            if mode == "act":
                return png(exemplar_tile(self._act_overlay(pixels, sae["sae_id"], lat), None, cell))
            return png(exemplar_tile(pixels, None, cell))

        return self.cached(f"exemplar/{sae['sae_id']}/{lat}/{kind}/{rank}/{mode}", make)

    def fire(self, image_id: str, layer: str, latent: str) -> bytes:
        """Where a latent fires on an atlas image: its activation map over the image."""
        row = self.content.check_image(image_id)
        sae, lat = self.content.check_latent(layer, latent)
        return self.cached(f"fire/{row['image_id']}/{sae['sae_id']}/{lat}", lambda: png(
            self._act_overlay(self.content.pixels(int(row["image_id"])), sae["sae_id"], lat)))

    def region(self, image_id: str, layer: str, position: str) -> bytes:
        """An atlas image with the grid cell `position` of a layer outlined."""
        row = self.content.check_image(image_id)
        sae = self.content.sae_of(layer)
        info = self.content.layers[sae["layer"]]
        n = info["num_special"] + info["grid_h"] * info["grid_w"]
        if not position.isdigit() or int(position) >= n:
            raise NotFound(f"no position {position!r} in layer {sae['layer']}: 0..{n - 1}")

        def make() -> bytes:
            pixels = self.content.pixels(int(row["image_id"]))
            cell = self._cell(sae["layer"], int(position), pixels.shape[:2])
            return png(draw_box(pixels, cell) if cell else pixels)

        return self.cached(f"region/{row['image_id']}/{sae['layer']}/{position}", make)

    def saliency(self, image_id: str, target: str) -> bytes:
        """The SRD saliency of class `target` on an atlas image, over the image (red: for the
        class, blue: against; docs/method.md §3)."""
        from pipeline import srd

        row = self.content.check_image(image_id)
        n_classes = len(self.content.logits(int(row["image_id"])))
        if not target.isdigit() or int(target) >= n_classes:
            raise NotFound(f"no class {target!r}: the model has classes 0..{n_classes - 1}")

        def make() -> bytes:
            with self.content.lock:
                pixels = self.content.pixels(int(row["image_id"]))
                x, shown = self.content.atlas.input_image(pixels)
                res = srd.explain(self.content.atlas.model().model, x, int(target))
                relevance = res.pixels[0, 0].detach().numpy()
            return png(overlay(shown, signed_heatmap(relevance)))

        return self.cached(f"saliency/{row['image_id']}/{target}", make)

    def upload(self, digest: str) -> bytes:
        """A search query image stored by `store_upload` (model input resolution)."""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise NotFound(f"no upload {digest!r}: uploads are named by their sha256 (64 hex)")
        path = self.cache / "uploads" / f"{digest}.png"
        if not path.is_file():
            raise NotFound(f"no upload {digest}: it was never uploaded or the cache was cleared; "
                           f"upload the image again on /search")
        return path.read_bytes()

    def store_upload(self, data: bytes) -> str:
        """An uploaded image, decoded with the size guards of `decode_upload`, preprocessed as the
        model's input and stored in the cache; returns its name (sha256 of the stored PNG)."""
        image = decode_upload(data)
        with self.content.lock:
            _, pixels = self.content.atlas.input_image(image)
        stored = png(pixels)
        digest = hashlib.sha256(stored).hexdigest()
        fs.write_atomic(str(self.cache / "uploads" / f"{digest}.png"), lambda f: f.write(stored))
        return digest

    def upload_pixels(self, digest: str) -> np.ndarray:
        """A stored upload as uint8[H, W, 3]."""
        return np.asarray(Image.open(io.BytesIO(self.upload(digest))).convert("RGB"))

    # ---- helpers -------------------------------------------------------------------------

    def _cell(self, layer: str, position: int, hw: tuple[int, int]
              ) -> tuple[int, int, int, int] | None:
        info = self.content.layers[layer]
        return cell_box(position, hw, (info["grid_h"], info["grid_w"]), info["num_special"])

    def _act_overlay(self, pixels: np.ndarray, sae_id: str, latent: int) -> np.ndarray:
        """`pixels` under the latent's activation map (red, scaled to its max on the image),
        upsampled to the input as the CAFE stage does (`masks.upsample`: bilinear, a cell's
        value at its centre)."""
        import torch

        from pipeline.cafe.masks import upsample

        grid = torch.from_numpy(self.activation_grid(pixels, sae_id, latent))[None]
        act = upsample(grid, tuple(pixels.shape[:2]))[0].numpy()
        return overlay(pixels, signed_heatmap(act, 100.0), alpha=0.55)

    def activation_grid(self, pixels: np.ndarray, sae_id: str, latent: int) -> np.ndarray:
        """A latent's SAE activation on every grid cell of an image (model input uint8[H, W, 3]):
        float[grid_h, grid_w]."""
        import torch

        from pipeline.models import tap

        sae = self.content.saes[sae_id]
        info = self.content.layers[sae["layer"]]
        with self.content.lock, torch.no_grad():
            x, _ = self.content.atlas.input_image(pixels)
            values = tap(self.content.atlas.model().model, x, [sae["layer"]])[sae["layer"]].values
            grid = values[0, info["num_special"]:].float()
            acts = self.content.atlas.sae(sae_id).encode(grid)[:, latent]
        return acts.reshape(info["grid_h"], info["grid_w"]).numpy()


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded image, refused (ValueError naming the limit) when it has more than
    MAX_UPLOAD_BYTES bytes or claims more than MAX_UPLOAD_PIXELS pixels: the header's size is
    read before any pixel is decoded, so a decompression bomb is never expanded."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload has {len(data)} bytes; at most {MAX_UPLOAD_BYTES} are "
                         f"accepted")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past 2x its default
        raise ValueError(f"the upload claims too many pixels ({exc}); at most "
                         f"{MAX_UPLOAD_PIXELS} are decoded (a decompression bomb is refused)"
                         ) from None
    except Exception as exc:  # Pillow raises several kinds for bytes that are not an image
        raise ValueError(f"the upload is not an image Pillow can read ({exc})") from None
    w, h = image.size
    if w * h > MAX_UPLOAD_PIXELS:
        raise ValueError(f"the upload claims {w}x{h} = {w * h} pixels; at most "
                         f"{MAX_UPLOAD_PIXELS} are decoded (a decompression bomb is refused)")
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"the upload cannot be decoded ({exc})") from None
    return image.convert("RGB")


def png(pixels: np.ndarray) -> bytes:
    """uint8[H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
