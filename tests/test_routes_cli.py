"""`concept-atlas routes` and `Atlas.routes`: thin wrappers that must equal the library."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.atlas import Atlas
from pipeline.atlas.routes import Route, routes
from jobs.cli import main
from pipeline.data.synthetic import render_sample


def test_cli_and_atlas_routes_equal_the_library(atlas, tmp_path, capsys) -> None:
    png = tmp_path / "img.png"
    Image.fromarray(render_sample(5, 3, 64)[0]).save(png)
    out, js = tmp_path / "route.png", tmp_path / "route.json"
    assert main(["routes", atlas, "--image", str(png), "-k", "2", "--steps", "4",
                 "--json", str(js), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    from_cli = Route.from_json(js.read_text())
    expected = routes(atlas, str(png), k=2, steps=4)
    assert json.loads(from_cli.to_json()) == json.loads(expected.to_json())
    assert json.loads(Atlas.open(atlas).routes(str(png), k=2, steps=4).to_json()) == \
        json.loads(expected.to_json())
    # the text form: the class line, then one line per edge
    assert len(printed) == 1 + len(expected.edges)
    assert printed[0].startswith(f"class {expected.target} ")
    with Image.open(out) as im:
        assert im.width > 100 and im.height > 100


def test_atlas_routes_loads_the_model_once_per_method(atlas, tmp_path, monkeypatch) -> None:
    import pipeline.atlas.routes as routes_module

    built = []
    real = routes_module.ShardScorer
    monkeypatch.setattr(routes_module, "ShardScorer", lambda *a: built.append(1) or real(*a))
    pngs = []
    for i in range(2):
        pngs.append(tmp_path / f"img{i}.png")
        Image.fromarray(render_sample(5, i, 64)[0]).save(pngs[-1])
    opened = Atlas.open(atlas)
    got = [opened.routes(str(p), k=2, steps=4) for p in pngs]
    assert len(built) == 1
    opened.routes(str(pngs[0]), k=2, method="grad")
    assert len(built) == 2
    for p, route in zip(pngs, got):  # the cached finder answers as a fresh one does
        assert json.loads(route.to_json()) == json.loads(routes(atlas, str(p), k=2, steps=4).to_json())


def test_cli_routes_names_a_bad_target(atlas, tmp_path, capsys) -> None:
    png = tmp_path / "img.png"
    Image.fromarray(render_sample(5, 3, 64)[0]).save(png)
    assert main(["routes", atlas, "--image", str(png), "--target", "hexagon", "--steps", "2"]) == 2
    assert "hexagon" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["scan", "cafe", "icat"])
def test_stage_commands_hand_their_arguments_to_the_job(stage, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
