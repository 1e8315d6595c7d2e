"""A concept route as a layered graph image: the class logit on top, the tapped layers below.

Plain Pillow (no graphviz binary on the hosts). Each level of the route is one row of node
boxes; an edge is a line from its source (the row below) to its target, its width proportional
to its weight (the largest weight into the same layer gets `MAX_EDGE_WIDTH` pixels). A latent
node shows its id, activation on the route's image, label hint and up to `thumbs` CAFE
exemplars (the image bright on its iERF mask and dimmed elsewhere, the peak cell outlined: the
atlas's own `pipeline.atlas.sheets.exemplar_tile`) when the atlas has an `exemplars` table;
without it the node shows its id alone and the caption says so. Error nodes are grey. The class
node is named from the atlas's class names (`Route.class_names`), "class N" when it has none.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.atlas.api import Atlas
from pipeline.atlas.regions import cell_box
from pipeline.atlas.flip_routes import FlipRoutes
from pipeline.atlas.routes import ERROR, Route, RouteNode, node_id
from pipeline.atlas.sheets import exemplar_tile
from pipeline.icat.segment import LOGITS

TILE = 48  # exemplar thumbnail side, pixels
LINE = 12  # text line height
PAD = 6
MARGIN = 16
H_GAP = 16  # between the nodes of one row
V_GAP = 64  # between rows (the edges run there)
CAPTION = 3 * LINE + PAD
MAX_EDGE_WIDTH = 9
TEXT_LINES = 3  # id, activation, label hint
HIGHLIGHT = (230, 110, 0)  # orange: highlighted nodes and their edges


def node_size(thumbs: int) -> tuple[int, int]:
    """(width, height) of a node box showing up to `thumbs` thumbnails."""
    width = max(thumbs * (TILE + 2) + 2 * PAD, 140)
    height = 2 * PAD + TEXT_LINES * LINE + (TILE + PAD if thumbs else 0)
    return width, height


def canvas_size(route: Route, thumbs: int) -> tuple[int, int]:
    """(width, height) of the rendered route: one row per level, as wide as its widest row."""
    w, h = node_size(thumbs)
    levels = [route.level(layer) for layer in route.layers]
    widest = max(len(level) for level in levels)
    return (2 * MARGIN + widest * w + (widest - 1) * H_GAP,
            2 * MARGIN + len(levels) * h + (len(levels) - 1) * V_GAP + CAPTION)


def exemplar_thumbnails(root: str, route: Route, n: int = 3) -> dict[str, list[np.ndarray]] | None:
    """{node id: up to `n` top exemplars uint8[H, W, 3] with their iERF masks} for the latent
    nodes of `route`, or None when the atlas at `root` has no `exemplars` table (cafe stage)."""
    atlas = Atlas.open(root)
    if not atlas.has("exemplars"):
        return None
    out: dict[str, list[np.ndarray]] = {}
    for node in route.nodes:
        if node.layer not in route.saes or node.latent == ERROR:
            continue
        info = atlas.latent(route.saes[node.layer], node.latent)
        ex = info.exemplars
        top = [i for i, kind in enumerate(ex["kind"].to_pylist()) if kind == "top"][:n] if ex.num_rows else []
        rows = [ex.slice(i, 1).to_pylist()[0] for i in top]
        images = atlas.images([r["image_id"] for r in rows])
        layer = atlas.layer_info(node.layer)
        out[node.id] = [
            exemplar_tile(images[r["image_id"]], info.ierfs[i],
                          cell_box(r["position"], images[r["image_id"]].shape[:2],
                                   (layer["grid_h"], layer["grid_w"]), layer["num_special"]))
            for i, r in zip(top, rows)]
    return out


def node_title(node: RouteNode, class_names: Sequence[str] | None) -> str:
    """The first line of a node's box: its id, and for the class node the class's name from
    `class_names` (the atlas's, `Route.class_names`), "class N" when there is none."""
    if node.layer != LOGITS:
        return node.id
    names = class_names or ()
    name = names[node.latent] if 0 <= node.latent < len(names) else f"class {node.latent}"
    return f"{node.id} ({name})"


def render_route(route: Route, root: str | None = None, out: str | os.PathLike | None = None,
                 thumbs: int = 3, highlight: Collection[str] = (),
                 highlight_note: str = "highlighted",
                 notes: Mapping[str, str] | None = None) -> Image.Image:
    """Draw `route` (see the module docstring); exemplars come from the atlas at `root`
    (None: ids only). Saves a PNG to `out` when given. Returns the RGB image of
    `canvas_size(route, thumbs)`. highlight: node ids drawn in orange, with their outgoing
    edges (the caption says what they are: `highlight_note`), e.g. the latents an attack
    switched on (`pipeline.atlas.flip_routes`). notes: {node id: text} shown on the node's
    label-hint line (after the hint), e.g. its activation on another image."""
    if thumbs < 0:
        raise ValueError(f"thumbs={thumbs}: expected an int >= 0 (exemplars per node)")
    tiles = exemplar_thumbnails(root, route, thumbs) if root is not None and thumbs else None
    size = canvas_size(route, thumbs)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    boxes = _layout(route, size[0], thumbs)
    # widths per level: a logit and a latent are in different units
    wmax: dict[str, float] = {}
    for e in route.edges:
        level = e.dst.split(":")[0]
        wmax[level] = max(wmax.get(level, 0.0), e.weight)
    for e in route.edges:  # under the nodes
        sx0, sy0, sx1, _ = boxes[e.src]
        dx0, _, dx1, dy1 = boxes[e.dst]
        top = wmax[e.dst.split(":")[0]] or 1.0
        width = max(1, round(MAX_EDGE_WIDTH * max(e.weight, 0.0) / top))
        colour = ((150, 150, 150) if e.src.endswith(":err") else
                  HIGHLIGHT if e.src in highlight else (40, 70, 160))
        draw.line([((sx0 + sx1) // 2, sy0), ((dx0 + dx1) // 2, dy1)], fill=colour, width=width)
    for node in route.nodes:
        _draw_node(image, draw, node, boxes[node.id], (tiles or {}).get(node.id, []),
                   route.class_names, node.id in highlight, (notes or {}).get(node.id, ""))
    shown = [n for n in route.nodes if n.id in highlight]
    _draw_caption(draw, route, size, tiles is not None, root is not None,
                  f"; orange: {highlight_note}" if shown else "")
    if out is not None:
        image.save(out, format="PNG")
    return image


def _layout(route: Route, width: int, thumbs: int) -> dict[str, tuple[int, int, int, int]]:
    """Node id -> its box (x0, y0, x1, y1); each row centred."""
    w, h = node_size(thumbs)
    boxes = {}
    for row, layer in enumerate(route.layers):
        level = route.level(layer)
        row_w = len(level) * w + (len(level) - 1) * H_GAP
        x = (width - row_w) // 2
        y = MARGIN + row * (h + V_GAP)
        for node in level:
            boxes[node.id] = (x, y, x + w, y + h)
            x += w + H_GAP
    return boxes


def _draw_node(image: Image.Image, draw: ImageDraw.ImageDraw, node: RouteNode,
               box: tuple[int, int, int, int], tiles: list[np.ndarray],
               class_names: Sequence[str] | None, highlighted: bool = False,
               note: str = "") -> None:
    x0, y0, x1, y1 = box
    fill = (225, 225, 225) if node.latent == ERROR else (255, 228, 196) if highlighted else (255, 255, 255)
    draw.rectangle(box, fill=fill, outline=HIGHLIGHT if highlighted else (0, 0, 0),
                   width=3 if highlighted else 1)
    name = node_title(node, class_names)
    act = "" if node.activation is None else f"act {node.activation:.3f}"
    hint = "; ".join(t for t in (node.label_hint, note) if t)
    for i, text in enumerate((name, act, hint)):
        draw.text((x0 + PAD, y0 + PAD + i * LINE), text[:28], fill=(0, 0, 0))
    ty = y0 + PAD + TEXT_LINES * LINE + PAD // 2
    for j, t in enumerate(tiles):
        im = Image.fromarray(np.asarray(t, np.uint8)).resize((TILE, TILE), Image.BILINEAR)
        image.paste(im, (x0 + PAD + j * (TILE + 2), ty))


def _draw_caption(draw: ImageDraw.ImageDraw, route: Route, size: tuple[int, int],
                  has_exemplars: bool, has_root: bool, note: str = "") -> None:
    y = size[1] - MARGIN - CAPTION + PAD
    lines = [f"route of class {route.target} ({route.source}, {route.method}, k={route.k}); "
             f"edge width ~ weight",
             (f"predicted {route.predicted}, label {route.label}" if route.source == "image"
              else "") + note]
    if has_exemplars:
        lines.append("thumbnails: top exemplars, bright on the iERF mask, peak cell boxed")
    else:
        lines.append("no exemplars table in this atlas (cafe stage not run): node ids only"
                     if has_root else "no atlas given: node ids only")
    for i, text in enumerate(lines):
        draw.text((MARGIN, y + i * LINE), text, fill=(0, 0, 0))


def render_flip(flip: FlipRoutes, clean: np.ndarray, adversarial: np.ndarray,
                root: str | None = None, out: str | os.PathLike | None = None, thumbs: int = 3,
                eps: float | None = None) -> Image.Image:
    """An attack and its routes, stacked (docs/routes.md, "Routes under attack"): a row with
    the clean image, the adversarial image and their difference (grey = unchanged, black and
    white = -eps and +eps; eps defaults to the largest change), then the clean image's route
    into its class (`flip.before`), then the adversarial image's route into its class
    (`flip.after`) with the latents the attack switched on (inactive on the clean image) in
    orange; each latent shows its activation on the other image too ("clean 0.096"). clean / adversarial: the model's input pixels uint8 or float in [0, 1], [H, W, 3].
    Saves a PNG to `out` when given; returns the RGB image."""
    a, b = (np.asarray(im, np.float64) / (255.0 if np.asarray(im).dtype == np.uint8 else 1.0)
            for im in (clean, adversarial))
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"clean and adversarial must be two [H, W, 3] images of one size, got "
                         f"{a.shape} and {b.shape}")
    delta = b - a
    scale = float(eps) if eps else max(float(np.abs(delta).max()), 1e-12)
    panels = [a, b, np.clip(0.5 + 0.5 * delta / scale, 0, 1)]
    names = flip.after.class_names
    title = {True: "adversarial", False: "attacked (not flipped)"}[flip.flipped]
    captions = [f"clean: {node_title(flip.before.nodes[0], names)}",
                f"{title}: {node_title(flip.after.nodes[0], names)}",
                f"difference, +-{scale * 255:.1f}/255"]
    side = 160
    top = Image.new("RGB", (3 * side + 4 * MARGIN, side + 2 * LINE + 2 * MARGIN), (255, 255, 255))
    draw = ImageDraw.Draw(top)
    for i, (p, c) in enumerate(zip(panels, captions)):
        x = MARGIN + i * (side + MARGIN)
        top.paste(Image.fromarray((p * 255).round().astype(np.uint8)).resize((side, side), Image.NEAREST),
                  (x, MARGIN))
        draw.text((x, MARGIN + side + PAD), c[:32], fill=(0, 0, 0))
    new = {node_id(layer, f) for layer, lat in flip.newly_active().items() for f in lat}
    def other(route: Route, acts: dict[str, np.ndarray], name: str) -> dict[str, str]:
        return {n.id: f"{name} {acts[n.layer][n.latent]:.3f}" for n in route.nodes
                if n.layer in acts and n.latent != ERROR}

    clean_acts = other(flip.after, flip.acts_clean, "clean")
    rows = [top, render_route(flip.before, root, thumbs=thumbs,
                              notes=other(flip.before, flip.acts_adv, "adversarial")),
            render_route(flip.after, root, thumbs=thumbs, highlight=new,
                         highlight_note="latents inactive on the clean image", notes=clean_acts)]
    image = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)),
                      (255, 255, 255))
    y = 0
    for r in rows:
        image.paste(r, ((image.width - r.width) // 2, y))
        y += r.height
    if out is not None:
        image.save(out, format="PNG")
    return image
