"""Our insertion / deletion, pointing game and Gini against Quantus's on a tiny CNN
(benchmarks/quantus_crosscheck.py runs the same comparison on the demo models)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.extras
pytest.importorskip("quantus", reason="quantus is in the `bench` extra: `make test-extras` runs this")

from benchmarks.quantus_crosscheck import compare  # noqa: E402  (namespace package at the repo root)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_quantus_agrees_to_rounding_where_steps_are_whole_pixels_and_maps_have_no_ties() -> None:
    torch.manual_seed(1)
    # 12 x 12 = 144 pixels = 3 x 48: K = 12 steps move 12 whole pixels (36 entries) each
    x, target = torch.randn(3, 3, 12, 12), torch.tensor([0, 3, 1])
    maps = torch.randn(3, 12, 12)  # continuous: no tied values
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[:, 2:7, 3:9] = True
    maps[0, 4, 5] = 9.0  # image 0 peaks in its mask, the others where chance puts them
    res = compare(_tiny(), x, target, masks, maps, steps=12)
    assert res["whole_pixels_per_step"] and max(res["share_of_pixels_with_tied_values"]) == 0.0
    for mode in ("deletion", "insertion"):
        assert res[mode]["curve_max_abs_diff"] < 1e-6, res[mode]
        assert res[mode]["auc_max_abs_diff"] < 1e-6, res[mode]
    # Quantus's own "mean" fill is one grey, not the image's mean colour: a measurable difference
    assert res["deletion"]["auc_diff_grey_vs_colour_fill"] > 1e-4
    assert res["pointing"]["ours"] == res["pointing"]["quantus"] and res["pointing"]["ours"][0] == 1.0
    # Quantus adds 1e-7 to |map| / max |map| before its Gini: exactly that difference remains
    assert res["gini"]["max_abs_diff_after_shift_correction"] < 1e-12 < res["gini"]["max_abs_diff"]


def test_tied_map_values_make_the_curves_differ() -> None:
    torch.manual_seed(2)
    x, target = torch.randn(2, 3, 12, 12), torch.tensor([2, 0])
    maps = torch.zeros(2, 12, 12)
    maps[:, :3] = torch.rand(2, 3, 12)  # a plateau of zeros over 3/4 of the pixels, as a ReLU'd CAM
    res = compare(_tiny(), x, target, torch.ones(2, 12, 12, dtype=torch.bool), maps, steps=12)
    assert min(res["share_of_pixels_with_tied_values"]) == pytest.approx(0.75)
    # Quantus orders the plateau by argsort, ours by a seeded shuffle: the curves part there
    assert res["deletion"]["curve_max_abs_diff"] > 1e-4
