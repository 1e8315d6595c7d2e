"""`concept-atlas export-site`: the browser's pages as static HTML + PNGs that open from disk.

The export renders its pages with the browser app itself (`create_app` with an `ExportPlan`),
so a static page is the served page with relative links: the overview, a page per layer
listing its exported latents, the `top` latents of each layer (by frequency, dead ones left
out), and the image page of every exemplar of those latents. A link to a page the export
leaves out (a latent past the top N, the search page, the SQL console) is not drawn, so a
crawl of the export finds no missing file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from pipeline.atlas.api import Atlas
from pipeline.browser.app import ExportPlan, create_app, page_file
from pipeline.browser.content import AtlasContent
from pipeline.store import fs


def plan_pages(content: AtlasContent, layers: Sequence[str] | None, top: int) -> set[str]:
    """The canonical paths of the pages an export writes (see the module docstring)."""
    if top < 1:
        raise ValueError(f"top={top}: expected an int >= 1 (latents exported per layer)")
    names = list(layers) if layers else content.layer_names()
    saes = [content.sae_of(n) for n in names]  # NotFound names the layers that exist
    pages = {"/"}
    atlas = content.atlas
    for sae in saes:
        slug = content.slug(sae["sae_id"])
        pages.add(f"/layers/{quote(slug)}")
        if not atlas.has("latent_stats"):
            continue
        latents = atlas.sql(f"SELECT latent FROM latent_stats WHERE sae_id = "
                            f"'{sae['sae_id']}' AND NOT dead ORDER BY freq DESC, latent "
                            f"LIMIT {int(top)}")["latent"].to_pylist()
        pages.update(f"/latents/{quote(slug)}/{lat}" for lat in latents)
        for lat in latents:
            info = content.latent_info(sae["sae_id"], lat)
            if info.exemplars.num_rows:
                pages.update(f"/images/{i}" for i in info.exemplars["image_id"].to_pylist())
    return pages


def export_site(atlas: str | os.PathLike, out: str | os.PathLike,
                layers: Sequence[str] | None = None, top: int = 16,
                cache: str | None = None) -> dict[str, Any]:
    """Write the static site of `atlas` into folder `out` (see the module docstring); `layers`:
    layers or sae_ids (default all), `top`: latents per layer. Returns counts of what it wrote."""
    from starlette.testclient import TestClient

    opened = Atlas.open(atlas)
    out = Path(out)
    if fs.local_path(str(out)) is None:
        raise ValueError(f"out={out}: export-site writes to a local folder")
    plan = ExportPlan(pages=plan_pages(AtlasContent(opened), layers, top))
    app = create_app(opened, cache=cache, export=plan)
    written = {"pages": 0, "assets": 0, "bytes": 0}
    with TestClient(app, raise_server_exceptions=True) as client:
        # pages first: rendering them fills plan.assets with the pictures they show
        for path in sorted(plan.pages):
            _write(out, page_file(unquote(path)), _get(client, path), written, "pages")
        for path in sorted(plan.assets):
            _write(out, page_file(unquote(path)), _get(client, path), written, "assets")
    return written


def _get(client: Any, path: str) -> bytes:
    response = client.get(path)
    if response.status_code != 200:
        raise ValueError(f"export: {path} answered {response.status_code}: "
                         f"{response.text[:300]}")
    return response.content


def _write(out: Path, name: str, data: bytes, written: dict[str, int], kind: str) -> None:
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    written[kind] += 1
    written["bytes"] += len(data)
