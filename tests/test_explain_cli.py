"""`concept-atlas explain`: one image -> input | SRD map | overlay, conserving the logit."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from jobs.cli import main
from pipeline.data.synthetic import render_sample
from pipeline.viz import signed_heatmap


def test_explain_writes_three_panels_and_its_map_sums_to_the_logit(tmp_path, capsys):
    img, meta = render_sample(3, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "explain.png"
    assert main(["explain", "--model", "demo_resnet", "--image", str(tmp_path / "in.png"),
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["target"] == meta["class"]  # the demo model gets this image right
    assert abs(report["pixel_sum"] + report["constant_share"] - report["logit"]) < 1e-3 * abs(report["logit"])
    panels = np.asarray(Image.open(out))
    assert panels.shape == (128, 3 * 128 + 2 * 4, 3)
    heat = panels[:, 132:260]
    assert heat.std() > 1.0  # the map panel is not blank


def test_signed_heatmap_is_red_for_positive_blue_for_negative_white_at_zero():
    rgb = signed_heatmap(np.array([[1.0, -1.0, 0.0]]))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert rgb[0, 2].tolist() == [255, 255, 255]
