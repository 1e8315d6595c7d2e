"""Routes under attack: which latents and edges carry a flipped prediction (docs/routes.md,
"Routes under attack"; the attack itself is `pipeline.evaluation.adversarial.pgd`).

    finder = RouteFinder("ATLAS", steps=16)
    flip = flip_routes(finder, clean, adversarial, k=3)   # images or preprocessed Tensor[3, H, W]
    flip.new_share()        # {layer: share of the new class's route mass from latents inactive before}
    flip.newly_active()     # {layer: latents active on the adversarial image, not on the clean one}
    flip.summary()          # JSON-ready numbers

Three routes, all from `RouteFinder` (the ICAT library's edges on one image): `before`, the clean
image into its predicted class; `after`, the adversarial image into its predicted class (the
new one when the attack flipped it); `clean_new`, the clean image into the class of `after`:
the same target, so its edges and `after`'s compare one to one.

**Route mass.** The mass of a route on layer L is the sum of the weights of its edges whose
source is on L (route edges are positive, `top_sources`). **[choice]** Per layer, never summed
over layers: edges into the logit are in logit units, deeper ones in the units of the latent
above (docs/method.md §7).

- `new_share()[L]`: of `after`'s mass on L, the share on edges from latents whose activation
  (max over positions, `RouteFinder.activations`) is 0 on the clean image. **[choice]** The
  error node counts in the denominator, never in the numerator: it is there on every image, so
  it is never "newly active".
- `new_edge_share()[L]`: of `after`'s mass on L, the share on edges that `clean_new` does not
  have (edges are (source, target) pairs; a newly active latent's edges are all new).
- Chance levels for `new_share`: `active_new_frac()[L]`, the share of the latents active on the
  adversarial image that were inactive on the clean one, and `act_new_frac()[L]`, their share
  of the summed activations: a route that picked its latents without regard to the flip would
  show about these.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.atlas.routes import ERROR, ImageInput, Route, RouteEdge, RouteFinder


@dataclass
class FlipRoutes:
    """The routes of a clean image and its adversarial version (see the module docstring).
    acts_clean / acts_adv: {layer: float[F]}, each latent's max over positions on each image."""

    before: Route
    after: Route
    clean_new: Route
    acts_clean: dict[str, np.ndarray]
    acts_adv: dict[str, np.ndarray]

    @property
    def flipped(self) -> bool:
        """The adversarial image's predicted class differs from the clean image's."""
        return self.after.target != self.before.target

    @property
    def layers(self) -> list[str]:
        """The tapped layers of the routes, from the last one down."""
        return self.after.layers[1:]

    def newly_active(self) -> dict[str, list[int]]:
        """{layer: latents active on the adversarial image and inactive on the clean one}."""
        return {layer: np.flatnonzero((self.acts_adv[layer] > 0) & (self.acts_clean[layer] <= 0)).tolist()
                for layer in self.layers}

    def deactivated(self) -> dict[str, list[int]]:
        """{layer: latents active on the clean image and inactive on the adversarial one}."""
        return {layer: np.flatnonzero((self.acts_clean[layer] > 0) & (self.acts_adv[layer] <= 0)).tolist()
                for layer in self.layers}

    def _inactive_before(self, node: str) -> bool:
        layer, latent = _split(node)
        return latent != ERROR and self.acts_clean[layer][latent] <= 0

    def flip_edges(self) -> list[RouteEdge]:
        """The edges of `after` whose source was inactive on the clean image, largest first."""
        return sorted((e for e in self.after.edges if self._inactive_before(e.src)),
                      key=lambda e: -e.weight)

    def new_share(self) -> dict[str, float]:
        """{layer: share of `after`'s route mass on the layer from latents inactive before}."""
        return _shares(self.after, self.layers, self._inactive_before)

    def new_edge_share(self) -> dict[str, float]:
        """{layer: share of `after`'s route mass on the layer on edges `clean_new` lacks}."""
        old = {(e.src, e.dst) for e in self.clean_new.edges}
        return _shares(self.after, self.layers, lambda src, dst: (src, dst) not in old, both=True)

    def active_new_frac(self) -> dict[str, float]:
        """{layer: share of the latents active on the adversarial image that were not before}."""
        new = self.newly_active()
        return {layer: len(new[layer]) / max(int((self.acts_adv[layer] > 0).sum()), 1)
                for layer in self.layers}

    def act_new_frac(self) -> dict[str, float]:
        """{layer: share of the adversarial image's summed latent activations on latents that
        were inactive before}."""
        out = {}
        for layer in self.layers:
            adv = np.clip(self.acts_adv[layer], 0, None)
            total = float(adv.sum())
            out[layer] = float(adv[self.acts_clean[layer] <= 0].sum()) / total if total > 0 else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        """The numbers of this flip, JSON-ready: classes, and per layer the route latents (with
        the `after` route's activations on both images), the shares above, the newly active and
        deactivated latent counts, and the flip edges."""
        new, gone = self.newly_active(), self.deactivated()
        share, edge_share = self.new_share(), self.new_edge_share()
        chance, act_chance = self.active_new_frac(), self.act_new_frac()
        layers = {}
        for layer in self.layers:
            after, fresh = self.after.latents(layer), set(new[layer])
            layers[layer] = {
                "route_before": self.before.latents(layer), "route_after": after,
                "route_clean_new": self.clean_new.latents(layer),
                "route_after_newly_active": [f for f in after if f in fresh],
                "route_after_act_clean": [float(self.acts_clean[layer][f]) for f in after],
                "route_after_act_adv": [float(self.acts_adv[layer][f]) for f in after],
                "new_share": share[layer], "new_edge_share": edge_share[layer],
                "active_new_frac": chance[layer], "act_new_frac": act_chance[layer],
                "active_clean": int((self.acts_clean[layer] > 0).sum()),
                "active_adv": int((self.acts_adv[layer] > 0).sum()),
                "newly_active": len(new[layer]), "deactivated": len(gone[layer]),
            }
        return {"clean_class": self.before.target, "adv_class": self.after.target,
                "label": self.before.label, "flipped": self.flipped,
                "clean_logit": self.before.nodes[0].activation,
                "adv_logit": self.after.nodes[0].activation, "layers": layers,
                "flip_edges": [[e.src, e.dst, e.weight] for e in self.flip_edges()]}


    def to_json(self) -> str:
        """`summary()` and the three routes (as `Route.to_json` writes them) in one JSON object."""
        return json.dumps({"summary": self.summary(),
                           **{name: json.loads(getattr(self, name).to_json())
                              for name in ("before", "after", "clean_new")}}, indent=1)


def flip_routes(finder: RouteFinder, clean: ImageInput, adversarial: ImageInput, k: int = 3,
                label: int | None = None, hints: bool = True) -> FlipRoutes:
    """The routes before and after an attack (see the module docstring) on `finder`'s atlas.

    clean / adversarial: the two images, as `RouteFinder` takes them (a preprocessed Tensor
    keeps an attack's float pixels exactly; an 8-bit image would round them). k: sources kept
    per node. label: the clean image's label, recorded on the routes. hints: fill the atlas's
    label hints.
    """
    before = finder(clean, None, k, label=label, hints=hints)
    after = finder(adversarial, None, k, label=label, hints=hints)
    clean_new = finder(clean, after.target, k, label=label, hints=hints)
    acts = [{layer: a.detach().double().cpu().numpy() for layer, a in finder.activations(im).items()}
            for im in (clean, adversarial)]
    return FlipRoutes(before, after, clean_new, *acts)


def _split(node: str) -> tuple[str, int]:
    """"layer4:17" -> ("layer4", 17); "layer4:err" -> ("layer4", ERROR)."""
    layer, _, latent = node.rpartition(":")
    return layer, ERROR if latent == "err" else int(latent)


def _shares(route: Route, layers: list[str], picked: Callable[..., bool],
            both: bool = False) -> dict[str, float]:
    """{layer: sum of the weights of `route`'s edges from the layer that `picked` selects /
    sum of all of its edges from the layer} (0 where the route has none). picked(src), or
    picked(src, dst) when `both`."""
    out = {}
    for layer in layers:
        edges = [e for e in route.edges if _split(e.src)[0] == layer]
        total = sum(e.weight for e in edges)
        chosen = sum(e.weight for e in edges if (picked(e.src, e.dst) if both else picked(e.src)))
        out[layer] = chosen / total if total > 0 else 0.0
    return out
