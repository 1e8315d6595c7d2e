"""Concept routes: the top-k ICAT edges into a class logit, followed down the tapped layers.

    route = routes("demo_out", "cat.png")                   # the predicted class, one image
    route = routes("demo_out", image, target="true", label=3)
    finder = RouteFinder("demo_out", steps=16)              # load once, route many images
    route = finder(image, target=None, k=3)
    route = routes_from_edges("demo_out", target_class=3)   # the stored, aggregated edges
    print(route.to_json())

Starting at the class logit, a route takes the `k` incoming edges of largest positive weight
from the SAE latents of the last tapped layer, then for each of those latents the `k` largest
incoming edges from the previous tapped layer, and so on down to the first tapped layer
(docs/method.md §7, "Concept routes"). `routes` computes the edges of one image on the fly
with the pipeline.icat library, attributing at each level only the downstream nodes the route
needs (one batched `attribute` call per level); `routes_from_edges` reads them from the
`edges` table written by the icat stage.

**[choice]** Error nodes: a layer's error node (what its SAE does not reconstruct) competes
with the latents for the top k; when it ranks among them it joins the route *in addition to*
the k latents (as in `aggregate.top_incoming`, it never uses up the latents' budget), so what
the SAE misses stays visible. It is a leaf: nothing below it is attributed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from pipeline.atlas.api import Atlas
from pipeline.atlas.views import literal
from pipeline.data.images import load as load_image
from pipeline.icat.attribution import METHODS, Decomposed, Readout, attribute, downstream_rows
from pipeline.icat.segment import LOGITS
from pipeline.icat.stage import ICATOptions, ShardScorer, plan_icat
from pipeline.models import tap
from pipeline.models.classes import ClassNames
from pipeline.store import AtlasRoot, fs

ERROR = -1  # src_latent of a layer's error node (schemas EDGES)
ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


@dataclass
class RouteNode:
    """A node of a route. `latent`: the SAE latent, ERROR (-1) for the layer's error node, the
    class index on "logits". `activation`: on the route's image, the latent's max over positions
    (the `activations.max_act` of the atlas), the logit for the class node, None for error nodes
    and for routes from stored edges. `label_hint`: the atlas's hint (`latents.label_hint`,
    from the exemplars' ground truth) when it has one."""

    layer: str
    latent: int
    activation: float | None = None
    label_hint: str | None = None

    @property
    def id(self) -> str:
        return node_id(self.layer, self.latent)


@dataclass
class RouteEdge:
    """An edge `src` -> `dst` (node ids) with its ICAT weight (the method's score)."""

    src: str
    dst: str
    weight: float


@dataclass
class Route:
    """A concept route: `layers` from the logits down (["logits", "layer4", "layer2"]),
    `nodes` level by level (the class node first), `edges` from the level below to the level
    above. `source`: "image" or "edges:<scope>". `saes`: {layer: sae_id} of the SAEs used.
    `predicted` / `label`: the image's predicted class and its label (None when unknown).
    `class_names`: the names of the model's classes from the atlas's data (its `dataset.json`,
    `AtlasRoot.class_names`), None when the atlas has none; they name the class node."""

    atlas_id: str
    target: int
    method: str
    k: int
    source: str
    layers: list[str]
    saes: dict[str, str]
    nodes: list[RouteNode]
    edges: list[RouteEdge]
    predicted: int | None = None
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None

    def level(self, layer: str) -> list[RouteNode]:
        """The route's nodes on `layer`, in route order."""
        return [n for n in self.nodes if n.layer == layer]

    def latents(self, layer: str) -> list[int]:
        """The SAE latents (error node excluded) of the route on `layer`."""
        return [n.latent for n in self.level(layer) if n.latent != ERROR]

    def text(self) -> str:
        """The route as indented text, one line per edge, from the class logit down: each node
        with its weight into the node above, its activation and its label hint."""
        into: dict[str, list[RouteEdge]] = {}
        for e in self.edges:
            into.setdefault(e.dst, []).append(e)
        nodes = {n.id: n for n in self.nodes}
        top = self.nodes[0]
        lines = [f"class {top.latent} (logit {top.activation:.3f}) via {self.method}, top-{self.k}"
                 if top.activation is not None else
                 f"class {top.latent} via {self.method}, top-{self.k} ({self.source})"]

        def walk(node_id: str, depth: int) -> None:
            for e in sorted(into.get(node_id, []), key=lambda e: -e.weight):
                n = nodes[e.src]
                act = "" if n.activation is None else f"  act {n.activation:.3f}"
                hint = f"  [{n.label_hint}]" if n.label_hint else ""
                lines.append(f"{'  ' * depth}<- {n.id}  weight {e.weight:+.3f}{act}{hint}")
                walk(e.src, depth + 1)

        walk(top.id, 1)
        return "\n".join(lines)

    def to_json(self) -> str:
        """The route as JSON (node ids included for readers that do not rebuild the objects)."""
        d = asdict(self)
        for n, raw in zip(self.nodes, d["nodes"]):
            raw["id"] = n.id
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Route:
        """The inverse of `to_json` (JSON written before `class_names` existed reads as None)."""
        d = json.loads(text)
        nodes = [RouteNode(**{k: v for k, v in n.items() if k != "id"}) for n in d.pop("nodes")]
        edges = [RouteEdge(**e) for e in d.pop("edges")]
        return cls(nodes=nodes, edges=edges, **d)


def node_id(layer: str, latent: int) -> str:
    """"layer4:17", "layer4:err" (error node), "logits:3"."""
    return f"{layer}:{'err' if latent == ERROR else latent}"


def top_sources(weights: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The route's sources among one node's incoming scores float[F + 1] (last = error node):
    the k latents of largest positive weight, plus the error node if it ranks among the top k of
    all F + 1 ([choice] see the module docstring). [(latent or ERROR, weight)], largest first."""
    lat = weights[:-1]
    order = np.argsort(-lat, kind="stable")[:k]
    chosen = [(int(f), float(lat[f])) for f in order if lat[f] > 0]
    err = float(weights[-1])
    kth = chosen[-1][1] if len(chosen) == k else 0.0
    if err > 0 and err >= kth:
        chosen.append((ERROR, err))
    return sorted(chosen, key=lambda c: -c[1])


class RouteFinder:
    """Routes of single images on one atlas, with the model, SAEs and segments loaded once.

    root: a built atlas (extraction and trained SAEs; with several SAEs per layer, the one of
    lowest held-out FVU is used, as in the icat stage). method: ig, grad_x_act or grad (ICAT
    instantiations, docs/method.md §7); steps: IG quadrature steps. atlas: an open
    `pipeline.atlas.Atlas` of `root` to read label hints from (opened on first need when None).
    `routes` is the one-call form; call a finder for many images.
    """

    def __init__(self, root: str, method: str = "ig", steps: int = 32,
                 device: str | torch.device = "cpu", atlas: Atlas | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}: routes on one image use one of {list(METHODS)} "
                             "(SRD scores are available from the stored edges: routes_from_edges)")
        self.root, self.method, self.steps = root, method, steps
        self.plan = plan_icat(root, ICATOptions(methods=(method,), steps=steps), record=False)
        self.scorer = ShardScorer(self.plan, device)
        self.layers = list(self.plan.saes)  # forward order
        self.class_names = AtlasRoot(root).class_names()  # the model's, or None
        self._atlas = atlas  # the open Atlas for label hints; else opened on first need

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """The model input Tensor[1, 3, H, W] of one image (a tensor is taken as preprocessed)."""
        loaded = self.scorer.loaded
        if isinstance(image, torch.Tensor):
            x = image[None] if image.dim() == 3 else image
            want = tuple(loaded.data_config["input_size"])
            if x.dim() != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != want:
                raise ValueError(f"a tensor image must be one preprocessed image [3, H, W] or "
                                 f"[1, 3, H, W] of size {want}, got {tuple(image.shape)}")
            p = next(loaded.model.parameters())
            return x.to(device=p.device, dtype=p.dtype)
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        return loaded.preprocess(image)

    def activations(self, image: ImageInput) -> dict[str, torch.Tensor]:
        """{layer: Tensor[F]}: each SAE latent's max over positions on one image (the
        `activations.max_act` of the atlas; 0 where the latent does not fire), as route nodes
        carry it."""
        x = self.pixels(image)
        return self._max_acts(tap(self.scorer.loaded.model, x, self.layers))

    def _max_acts(self, taps: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {layer: self.scorer.saes[layer].encode(taps[layer].values)[0].amax(0)
                for layer in self.layers}

    def __call__(self, image: ImageInput, target: int | str | None = None, k: int = 3,
                 depth: int | None = None, label: int | None = None, hints: bool = True) -> Route:
        """The route of one image (see `routes`); `hints=False` skips the atlas's label hints."""
        _check_k(k)
        scorer, layers = self.scorer, self.layers
        if getattr(scorer.loaded.model, "num_classes", None) == 0:
            # its "logits" are features: a route from their argmax would name no class
            raise ValueError(f"{scorer.loaded.name} has no class head (num_classes=0), so an "
                             "image has no class route; its ICAT edges between layers are in "
                             "the `edges` table (`concept-atlas sql ATLAS \"SELECT * FROM "
                             "edges\"`)")
        depth = _check_depth(depth, len(layers))
        x = self.pixels(image)
        taps = tap(scorer.loaded.model, x, layers)
        with torch.no_grad():
            logits = scorer.segments[(layers[-1], LOGITS)](taps[layers[-1]].values, x)[0]
        predicted = int(logits.argmax())
        # names name the logits only when they count the model's classes
        names = self.class_names if self.class_names and len(self.class_names) == len(logits) else None
        cls = _target(target, predicted, label, len(logits), names)

        chain = [LOGITS] + layers[::-1]
        acts = self._max_acts(taps)
        nodes, edges = _descend(
            chain[:depth + 1], RouteNode(LOGITS, cls, float(logits[cls])), k,
            lambda src, dst, frontier: _image_scores(scorer, (src, dst), taps, x, frontier,
                                                     self.method, self.steps),
            lambda layer, f: float(acts[layer][f]))
        route = Route(self.plan.atlas_id, cls, self.method, k, "image", chain[:depth + 1],
                      {layer: row["sae_id"] for layer, row in self.plan.saes.items()}, nodes,
                      edges, predicted=predicted, label=label, meta={"steps": self.steps},
                      class_names=names.names if names else None)
        if not hints:
            return route
        if self._atlas is None:
            self._atlas = _open_atlas(self.root)
        return _with_hints(self._atlas, route)


def routes(root: str, image: ImageInput, target: int | str | None = None, k: int = 3,
           method: str = "ig", steps: int = 32, depth: int | None = None, *,
           label: int | None = None, device: str | torch.device = "cpu") -> Route:
    """The concept route of one image into a class logit, from ICAT edges computed for it.

    root: a built atlas (extraction and trained SAEs; with several SAEs per layer, the one of
    lowest held-out FVU is used, as in the icat stage). image: a path, PIL image, uint8
    [H, W, 3] array (all preprocessed as the model expects) or a preprocessed Tensor[3, H, W].
    target: a class index, a class name of the atlas's data (`AtlasRoot.class_names`: its
    `dataset.json`; only when the atlas has names), None (the predicted class) or "true"
    (`label`). k: sources kept per node. method: ig, grad_x_act or grad (ICAT
    instantiations, docs/method.md §7); steps: IG quadrature steps. depth: how many tapped
    layers to descend (default: all). Nodes carry their activation on the image and, where the
    atlas has exemplars with ground truth, a label hint. For many images, reuse a `RouteFinder`.

    Raises ValueError for an unknown method / target class / bad k or depth, FileNotFoundError
    without an extraction, ValueError when the atlas has no trained SAEs.
    """
    return RouteFinder(root, method, steps, device)(image, target, k, depth, label)


def routes_from_edges(root: str, target_class: int, k: int = 3, method: str = "ig",
                      scope: str = "class", depth: int | None = None) -> Route:
    """The concept route of a class from the stored `edges` table (icat stage), not one image.

    scope: "class" (edges aggregated over the images labelled `target_class`, scope
    "class=C") or "all" (every scored image). Weights are the stored sums over images; the
    stored table keeps only the icat stage's `top_edges` per node, so k should not exceed it.
    Raises FileNotFoundError without an edges table, ValueError for an unknown class, method or
    scope (naming the valid ones).
    """
    _check_k(k)
    if scope not in ("class", "all"):
        raise ValueError(f"scope={scope!r}: expected 'class' (scope class=C) or 'all'")
    parts = fs.listdir(fs.join(root, "edges"), ".parquet")
    if not parts:
        raise FileNotFoundError(f"no edges table under {root}; run the icat stage first "
                                "(`concept-atlas icat ROOT` or an 'icat' section in the build)")
    table = pa.concat_tables([fs.read_parquet(p) for p in parts])
    methods = sorted(set(table["method"].to_pylist()))
    if method not in methods:
        raise ValueError(f"method={method!r} has no stored edges; stored methods: {methods}")
    scope_value = f"class={target_class}" if scope == "class" else "all"
    table = table.filter(pc.and_(pc.equal(table["method"], method),
                                 pc.equal(table["scope"], scope_value)))
    classes = sorted(set(table.filter(pc.equal(table["dst_layer"], LOGITS))["dst_latent"].to_pylist()))
    if int(target_class) not in classes:
        raise ValueError(f"class {target_class} has no stored edges into its logit in scope "
                         f"{scope_value!r}; classes with edges: {classes}")
    chain = _layer_chain(table)
    depth = _check_depth(depth, len(chain) - 1)
    nodes, edges = _descend(chain[:depth + 1], RouteNode(LOGITS, int(target_class)), k,
                            lambda src, dst, frontier: _stored_scores(table, src, dst, frontier),
                            lambda layer, f: None)
    # the SAEs the icat stage connected (recorded in its stage config)
    saes = {layer: v[0] for layer, v in
            fs.read_json(fs.join(root, "stages", "icat.json"))["config"]["saes"].items()}
    route = Route(table["atlas_id"][0].as_py(), int(target_class), method, k,
                  f"edges:{scope_value}", chain[:depth + 1],
                  {layer: saes[layer] for layer in chain[1:depth + 1]}, nodes, edges,
                  class_names=(names := AtlasRoot(root).class_names()) and names.names)
    return _with_hints(_open_atlas(root), route)


# ---- one level -------------------------------------------------------------------------


def _descend(chain: list[str], root: RouteNode, k: int,
             incoming: Callable[[str, str, list[int]], dict[int, np.ndarray]],
             activation: Callable[[str, int], float | None]
             ) -> tuple[list[RouteNode], list[RouteEdge]]:
    """Nodes (`root` first) and edges of a route down `chain` ([root's layer, next layer
    below, ...]). incoming(src, dst, frontier): {dst node: scores float[F + 1]} of the frontier;
    activation(layer, latent): a latent node's activation."""
    nodes, edges = [root], []
    frontier = [root.latent]
    for dst, src in zip(chain, chain[1:]):
        level = _expand(incoming(src, dst, frontier), src, dst, k, edges)
        nodes += [RouteNode(src, f, None if f == ERROR else activation(src, f)) for f in level]
        frontier = [f for f in level if f != ERROR]
        if not frontier:
            break
    return nodes, edges


def _expand(incoming: dict[int, np.ndarray], src: str, dst: str, k: int,
            edges: list[RouteEdge]) -> list[int]:
    """Append the top sources of every downstream node to `edges`; return the new level's
    nodes (first-seen order, each once)."""
    level: dict[int, None] = {}
    for g, weights in incoming.items():
        for f, w in top_sources(weights, k):
            edges.append(RouteEdge(node_id(src, f), node_id(dst, g), w))
            level.setdefault(f, None)
    return list(level)


def _image_scores(scorer: ShardScorer, pair: tuple[str, str], taps: dict[str, Any],
                  x: torch.Tensor, frontier: list[int], method: str, steps: int
                  ) -> dict[int, np.ndarray]:
    """{downstream node: its incoming scores float[F + 1]} for the route's nodes on one image:
    only those nodes are attributed, in one batched call."""
    src, dst = pair
    segment = scorer.segments[pair]
    dec = Decomposed.of(scorer.saes[src], taps[src].values)
    readout = Readout(None if dst == LOGITS else scorer.saes[dst])
    wanted = torch.as_tensor(frontier, device=x.device).long()
    image, node, mask = downstream_rows(segment, dec, x, readout, nodes=wanted)
    scores = attribute(segment, dec, readout, image, node, mask, x, methods=(method,),
                       steps=steps, batch_size=scorer.options.batch_size)
    w = scores.scores[method].detach().double().cpu().numpy()
    return {int(g): w[q] for q, g in enumerate(node.tolist())}


def _stored_scores(table: pa.Table, src: str, dst: str, frontier: list[int]) -> dict[int, np.ndarray]:
    """The stored incoming edges of `frontier` on `dst` as dense rows float[F + 1] (the last
    column is the error node; latents missing from the table score 0)."""
    pair = table.filter(pc.and_(pc.equal(table["src_layer"], src), pc.equal(table["dst_layer"], dst)))
    src_lat = pair["src_latent"].to_numpy()
    dst_lat = pair["dst_latent"].to_numpy()
    weight = pair["weight"].to_numpy()
    width = int(src_lat.max()) + 2 if len(src_lat) else 1
    out = {}
    for g in frontier:
        row = np.zeros(width)
        sel = dst_lat == g
        cols = np.where(src_lat[sel] == ERROR, width - 1, src_lat[sel])
        row[cols] = weight[sel]
        out[g] = row
    return out


# ---- inputs ------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise ValueError(f"k={k}: expected an int >= 1 (sources kept per node)")


def _check_depth(depth: int | None, n_layers: int) -> int:
    if depth is None:
        return n_layers
    if not 1 <= int(depth) <= n_layers:
        raise ValueError(f"depth={depth}: the atlas has {n_layers} tapped layers with SAEs; "
                         f"use 1..{n_layers} or None (all)")
    return int(depth)


def _target(target: int | str | None, predicted: int, label: int | None, n_classes: int,
            class_names: ClassNames | None = None) -> int:
    """The class index a route starts from (see `routes`): an index or a class name of the
    model (`AtlasRoot.class_names`; None: the atlas knows none, and names are refused)."""
    if target is None:
        return predicted
    if target == "true":
        if label is None:
            raise ValueError("target='true' needs the image's label (label=CLASS_INDEX)")
        target = label
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit() and not class_names:
        raise ValueError(f"unknown target class {target!r}: this atlas knows no class names (the "
                         "model's config names none, and no dataset.json beside its shards "
                         f"does); give a class index 0..{n_classes - 1}, None (predicted) or "
                         "'true'")
    if class_names:
        return class_names.index(target, n_classes)
    cls = int(target)
    if not 0 <= cls < n_classes:
        raise ValueError(f"unknown target class {cls}: the model has {n_classes} classes "
                         f"(0..{n_classes - 1})")
    return cls


def _layer_chain(table: pa.Table) -> list[str]:
    """["logits", last layer, ..., first layer] from the pairs present in an edges table."""
    below = {}
    for src, dst in set(zip(table["src_layer"].to_pylist(), table["dst_layer"].to_pylist())):
        below[dst] = src
    chain = [LOGITS]
    while chain[-1] in below and below[chain[-1]] not in chain:
        chain.append(below[chain[-1]])
    return chain


def _open_atlas(root: str) -> Atlas:
    return Atlas.open(root)


def _with_hints(atlas: Atlas, route: Route) -> Route:
    """Fill `label_hint` of the latent nodes from the `latents` view of `atlas` (an open
    pipeline.atlas.Atlas; needs the scan stage, and the hint itself the exemplars' ground
    truth, else it stays None)."""
    latent_nodes = [n for n in route.nodes if n.layer in route.saes and n.latent != ERROR]
    if not latent_nodes or not atlas.has("latent_stats"):
        return route
    pairs = ", ".join(f"({literal(route.saes[n.layer])}, {n.latent})" for n in latent_nodes)
    found = atlas.sql(f"SELECT sae_id, latent, label_hint FROM latents "
                      f"WHERE (sae_id, latent) IN ({pairs})").to_pylist()
    hints = {(r["sae_id"], r["latent"]): r["label_hint"] for r in found}
    for n in latent_nodes:
        n.label_hint = hints.get((route.saes[n.layer], n.latent))
    return route
