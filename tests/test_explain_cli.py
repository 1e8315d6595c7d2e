"""`concept-atlas explain`: one image -> input | SRD map | overlay, conserving the logit."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.data.concepts import CLASS_NAMES
from pipeline.data.synthetic import render_sample
from pipeline.viz import signed_heatmap, smooth_for_display


def test_explain_writes_three_panels_and_its_map_sums_to_the_logit(tmp_path, capsys):
    img, meta = render_sample(3, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "explain.png"
    assert main(["explain", "--model", "demo_resnet", "--image", str(tmp_path / "in.png"),
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["target"] == meta["class"]  # the demo model gets this image right
    assert abs(report["pixel_sum"] + report["constant_share"] - report["logit"]) < 1e-3 * abs(report["logit"])
    assert report["class_name"] == CLASS_NAMES[meta["class"]]
    panels = np.asarray(Image.open(out))
    # a caption band (2 lines), then input | map | overlay at 2x (256 px) and the colour key
    assert panels.shape == (2 * 14 + 4 + 256, 3 * 256 + 3 * 4 + 14 + 44, 3)
    heat = panels[32:, 260:516]
    assert heat.std() > 1.0  # the map panel is not blank


def test_the_target_is_a_class_index_or_name_with_a_did_you_mean(tmp_path, capsys):
    img, _ = render_sample(3, 0)
    Image.fromarray(img).save(tmp_path / "in.png")
    args = ["explain", "--model", "demo_resnet", "--image", str(tmp_path / "in.png"),
            "--out", str(tmp_path / "x.png"), "--target"]
    assert main([*args, "Star"]) == 0
    by_name = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "3"]) == 0
    by_index = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert by_name == by_index and by_name["target"] == 3 and by_name["class_name"] == "star"
    assert main([*args, "stra"]) == 2
    assert "did you mean 'star'" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("disc\nbox\nwedge\nasterisk, star shape\nplus\n")
    assert main([*args, "star shape", "--class-names", str(names)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class_name"] == "asterisk"


def test_signed_heatmap_is_red_for_positive_blue_for_negative_white_at_zero():
    rgb = signed_heatmap(np.array([[1.0, -1.0, 0.0]]))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[0, 1].tolist() == [0, 0, 255]
    assert rgb[0, 2].tolist() == [255, 255, 255]


def test_display_smoothing_removes_a_stride_two_lattice_and_keeps_the_sum() -> None:
    smooth = np.outer(np.linspace(1, 2, 64), np.linspace(1, 3, 64))  # a slowly varying map
    lattice = smooth * np.where((np.add.outer(np.arange(64), np.arange(64)) % 2) == 1, 2.0, 1.0)

    def phase_ratio(m: np.ndarray) -> float:
        means = [np.abs(m[8:-8, 8:-8])[i::2, j::2].mean() for i in (0, 1) for j in (0, 1)]
        return max(means) / min(means)

    shown = smooth_for_display(lattice, 1.0)
    assert phase_ratio(lattice) > 1.9 and phase_ratio(shown) < 1.05
    assert shown.sum() == pytest.approx(lattice.sum(), rel=1e-9)  # mirrored edges lose nothing
    assert smooth_for_display(lattice, 0.0) is lattice  # off: the map itself


def test_explain_smooth_flag_says_so_in_the_caption(tmp_path, capsys) -> None:
    Image.fromarray(render_sample(0, 1, 128)[0]).save(tmp_path / "img.png")
    assert main(["explain", "--model", "demo_resnet", "--image", str(tmp_path / "img.png"),
                 "--smooth", "1", "--out", str(tmp_path / "e.png")]) == 0
    assert Image.open(tmp_path / "e.png").size[0] > 3 * 256
