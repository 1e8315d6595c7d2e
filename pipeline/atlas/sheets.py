"""Contact sheets of an atlas: a latent's exemplars with their iERF masks, search results."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.atlas.api import Atlas, LatentInfo
from pipeline.atlas.regions import cell_box, cells_extent
from pipeline.cafe.masks import MASK_LEVEL
from pipeline.viz import contact_sheet, draw_box, highlight, outline, reference_crop

COLUMNS = 8


def exemplar_tile(image: np.ndarray, ierf: np.ndarray | None,
                  cell: tuple[int, int, int, int] | None) -> np.ndarray:
    """One exemplar uint8[H, W, 3]: bright on its iERF mask, dimmed elsewhere (by the PNG's
    grey level, a heat map of the positive relevance), the mask outlined (visible on dark
    images too), its peak grid cell boxed."""
    out = image
    if ierf is not None:
        out = outline(highlight(image, ierf), ierf >= MASK_LEVEL)
    return draw_box(out, cell) if cell is not None else out


def latent_sheet(atlas: Atlas, info: LatentInfo, columns: int = COLUMNS) -> Image.Image:
    """The exemplars of one latent (top picks first), each as the whole image (iERF mask
    outlined, peak cell boxed) and a close-up of its mask's box (as CRP's reference crops),
    `columns` tiles per row; the title names the latent's label hint and its evidence."""
    ex = info.exemplars
    if ex.num_rows == 0:
        raise ValueError(f"latent {info.latent} of {info.sae['sae_id']} has no exemplars in "
                         f"this atlas; run the scan stage (and cafe for iERF masks)")
    layer = atlas.layer_info(info.sae["layer"])
    images = atlas.images(ex["image_id"].to_pylist())
    tiles, captions = [], []
    for i, r in enumerate(ex.to_pylist()):
        image = images[r["image_id"]]
        cell = cell_box(r["position"], image.shape[:2], (layer["grid_h"], layer["grid_w"]),
                        layer["num_special"])
        tiles += [exemplar_tile(image, info.ierfs[i], cell),
                  reference_crop(image, r.get("bbox") or cell)]
        captions.append(f"{r['kind']} {r['rank']}: {r['activation']:.2f}")
    per_row = max(1, columns // 2)
    rows = [tiles[i:i + 2 * per_row] for i in range(0, len(tiles), 2 * per_row)]
    # one caption per row (a tile is too narrow for its own): kind, rank and activation
    labels = [" | ".join(captions[i:i + per_row]) for i in range(0, len(captions), per_row)]
    stats = info.stats or {}
    hint = stats.get("label_hint")
    title = (f"{info.sae['sae_id']} latent {info.latent}  "
             + (f"label {hint} ({stats.get('label_source')})  " if hint else "no label  ")
             + f"freq {stats.get('freq', float('nan')):.4f}  sources "
             f"{stats.get('n_sources', '-')}  (each: image with iERF mask outlined and peak "
             "cell boxed | close-up)")
    evidence = stats.get("label_evidence")
    return contact_sheet(rows, labels, tile=160,
                         title=title + (f"\n{evidence}" if evidence else ""))


def search_sheet(atlas: Atlas, query: np.ndarray, box: Sequence[int] | None,
                 results: pa.Table, per_row: int = COLUMNS - 1) -> Image.Image:
    """The query (box outlined) and, per layer searched, the whole grid cells the box covers
    there; then one row per result: the best-matching exemplar region (outlined), then the
    latent's top exemplars."""
    shown = query if box is None else draw_box(query, (box[0], box[1], box[0] + box[2],
                                                       box[1] + box[3]))
    first, labels_first = [shown], ["query" + ("" if box is None else f" box {tuple(box)}")]
    for layer_name in dict.fromkeys(results["layer"].to_pylist()):
        layer = atlas.layer_info(layer_name)
        first.append(draw_box(query, cells_extent(box, query.shape[:2],
                                                  (layer["grid_h"], layer["grid_w"]))))
        labels_first.append(f"cells of {layer_name}")
    rows: list[list[np.ndarray]] = [first]
    labels = ["  |  ".join(labels_first)]
    hits = results.to_pylist()
    wanted = {i for r in hits for i in [r["match_image_id"], *r["exemplar_image_ids"][:per_row]]}
    images = atlas.images(sorted(wanted))
    for r in hits:
        layer = atlas.layer_info(r["layer"])
        match = images[r["match_image_id"]]
        cell = cell_box(r["match_position"], match.shape[:2], (layer["grid_h"], layer["grid_w"]),
                        layer["num_special"])
        rows.append([exemplar_tile(match, None, cell)] +
                    [images[i] for i in r["exemplar_image_ids"][:per_row] if i in images])
        labels.append(f"{r['sae_id']} latent {r['latent']}: sim {r['similarity']:.3f} "
                      f"act {r['activation']:.2f} {r['label_hint'] or ''}  (first: best match)")
    return contact_sheet(rows, labels, tile=96)
