"""The atlas browser (pipeline/browser) through Starlette's TestClient, on the tiny build
(`built`: every stage run in process): every page and its JSON twin equal the SQL answer to
the same question, the pictures equal the atlas's own renderers, the static export's links
all resolve, and the safety rules hold (path traversal, oversized and bomb uploads, SQL
writes and file reads, a non-loopback bind, nothing written to the atlas)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import zlib
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the browser needs the `serve` extra")
from starlette.testclient import TestClient  # noqa: E402

from jobs.cli import main  # noqa: E402
from pipeline.atlas import Atlas  # noqa: E402
from pipeline.atlas.regions import cell_box  # noqa: E402
from pipeline.atlas.sheets import exemplar_tile  # noqa: E402
from pipeline.browser import create_app, export_site, host_warning  # noqa: E402
from pipeline.browser.render import MAX_UPLOAD_PIXELS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def atlas(built) -> Atlas:
    return Atlas.open(built)


@pytest.fixture(scope="module")
def client(built, tmp_path_factory) -> TestClient:
    return TestClient(create_app(built, cache=str(tmp_path_factory.mktemp("cache"))))


def sql(atlas: Atlas, query: str) -> list[dict]:
    return atlas.sql(query).to_pylist()


def page_json(client: TestClient, path: str) -> dict:
    r = client.get(path + ("&" if "?" in path else "?") + "format=json")
    assert r.status_code == 200, r.text
    return r.json()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def tree(root: str) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(root).rglob("*") if p.is_file()}


def test_overview_equals_the_atlas_tables(client, atlas) -> None:
    d = page_json(client, "/")
    saes = sql(atlas, "SELECT sae_id, layer, n_latents, fvu, l0, dead_frac, logit_kl FROM saes "
                      "ORDER BY sae_id")
    assert [{k: s[k] for k in saes[0]} for s in d["saes"]] == saes
    assert d["data"]["images"] == sql(atlas, "SELECT count(*) AS n FROM images")[0]["n"] == 24
    parts = {r["stage"]: r["n"] for r in sql(atlas, "SELECT stage, count(*) AS n FROM manifest "
                                                    "GROUP BY stage")}
    assert {s["stage"]: s["parts"] for s in d["stages"]} == parts
    assert [lay["layer"] for lay in d["layers"]] == ["layer2", "layer4"]
    html = client.get("/").text
    for s in saes:  # the SAE table shows each FVU and links its layer page
        assert f'href="/layers/{s["layer"]}"' in html and f"{s['fvu']:.3g}" in html


@pytest.mark.parametrize("sort,desc", [("freq", True), ("max_act", False), ("label_hint", True),
                                       ("cafe_ins_auc", True), ("latent", False)])
def test_layer_table_pages_equal_duckdb_order(client, atlas, sort, desc) -> None:
    sae = sql(atlas, "SELECT sae_id FROM saes WHERE layer = 'layer4'")[0]["sae_id"]
    order = f"{sort} {'DESC' if desc else 'ASC'} NULLS LAST, latent"
    want = [r["latent"] for r in sql(atlas, f"SELECT latent FROM latents WHERE sae_id = '{sae}' "
                                            f"ORDER BY {order}")]
    got = []
    for page in (1, 2, 3):
        d = page_json(client, f"/layers/layer4?sort={sort}&desc={int(desc)}&per=25&page={page}")
        got += [r["latent"] for r in d["rows"]]
        assert d["total"] == 64 and d["pages"] == 3
    assert got == want
    # the HTML table shows the same rows, each latent a link to its page
    html = client.get(f"/layers/layer4?sort={sort}&desc={int(desc)}&per=25").text
    assert re.findall(r'data-latent="(\d+)"', html) == [str(v) for v in want[:25]]
    assert f'href="/latents/layer4/{want[0]}"' in html


def test_layer_filter_and_bad_parameters(client, atlas) -> None:
    hint = sql(atlas, "SELECT label_hint FROM latents WHERE label_hint IS NOT NULL "
                      "AND layer = 'layer2' LIMIT 1")[0]["label_hint"]
    word = hint.split()[-1]
    d = page_json(client, f"/layers/layer2?q={word.upper()}&per=1000")
    want = sql(atlas, f"SELECT count(*) AS n FROM latents WHERE layer = 'layer2' AND "
                      f"contains(lower(label_hint), '{word}')")[0]["n"]
    assert d["total"] == len(d["rows"]) == want > 0
    alive = sql(atlas, "SELECT count(*) AS n FROM latent_stats WHERE layer = 'layer2' "
                       "AND NOT dead")[0]["n"]
    assert page_json(client, "/layers/layer2?alive=1")["total"] == alive
    for bad, message in (("sort=ierf_png", "sort='ierf_png': expected one of latent, freq"),
                         ("per=0", "per=0: expected 1..1000"), ("page=x", "page='x': expected")):
        r = client.get(f"/layers/layer2?{bad}&format=json")
        assert r.status_code == 400 and message in r.json()["error"]


def test_latent_page_equals_the_tables_and_the_indexes(client, atlas) -> None:
    # a latent with ICAT edges both ways (fed by layer2, feeding the logits)
    edge = sql(atlas, "SELECT dst_latent AS latent FROM edges WHERE dst_layer = 'layer4' AND "
                      "method = 'grad_x_act' AND dst_latent IN (SELECT src_latent FROM edges "
                      "WHERE src_layer = 'layer4') ORDER BY weight DESC LIMIT 1")[0]["latent"]
    d = page_json(client, f"/latents/layer4/{edge}?method=grad_x_act")
    sae = d["sae"]["sae_id"]
    assert d["stats"] == {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in
                          sql(atlas, f"SELECT * FROM latents WHERE sae_id = '{sae}' AND "
                                     f"latent = {edge}")[0].items()}
    acts = np.array([r["max_act"] for r in sql(
        atlas, f"SELECT max_act FROM activations WHERE sae_id = '{sae}' AND latent = {edge}")])
    counts, edges = np.histogram(acts, bins=30, range=(0, acts.max()))
    assert d["histogram"]["counts"] == counts.tolist() and d["histogram"]["n"] == len(acts)
    assert np.allclose(d["histogram"]["edges"], edges)
    ex = sql(atlas, f"SELECT kind, rank, image_id, activation FROM exemplars WHERE sae_id = "
                    f"'{sae}' AND latent = {edge} ORDER BY kind DESC, rank")
    assert [{k: e[k] for k in ("kind", "rank", "image_id")} for e in d["exemplars"]] == \
        [{k: e[k] for k in ("kind", "rank", "image_id")} for e in ex]
    fed = sql(atlas, f"SELECT src_latent AS latent, weight FROM edges WHERE method = 'grad_x_act' "
                     f"AND scope = 'all' AND dst_layer = 'layer4' AND dst_latent = {edge} "
                     f"ORDER BY weight DESC LIMIT 8")
    assert [(e["latent"], e["weight"]) for e in d["edges"]["fed_by"]] == \
        [(e["latent"], e["weight"]) for e in fed]
    classes = sql(atlas, f"SELECT dst_latent AS latent FROM edges WHERE method = 'grad_x_act' "
                         f"AND scope = 'all' AND src_layer = 'layer4' AND src_latent = {edge} "
                         f"AND dst_layer = 'logits' ORDER BY weight DESC LIMIT 8")
    assert [e["latent"] for e in d["edges"]["classes"]] == [c["latent"] for c in classes]
    near = atlas.similar("layer4", edge, k=9).to_pylist()
    assert [(r["sae_id"], r["latent"]) for r in d["similar"]["rows"]] == \
        [(r["sae_id"], r["latent"]) for r in near if r["latent"] != edge][:8]
    assert d["cafe"][0]["insertion"] == pytest.approx(d["stats"]["cafe_ins_auc"])
    html = client.get(f"/latents/layer4/{edge}?method=grad_x_act").text
    # the histogram drawn: one bar per bin, its height the bin's share of the tallest
    bars = re.findall(r'<rect x="(\d+)" y="[^"]+" width="11" height="([^"]+)"><title>'
                      r'[^<]*: (\d+) images</title>', html)
    assert [int(c) for _, _, c in bars] == counts.tolist()
    assert [float(h) for _, h, _ in bars] == pytest.approx(100 * counts / counts.max())
    figures = re.findall(r'<figure class="exemplar" data-kind="(\w+)">', html)
    assert figures == [e["kind"] for e in ex]
    shown = f'{d["stats"]["n_top_images"]} / {d["stats"]["n_sources"]}'
    assert f'<dd id="stat-n_sources">{shown}</dd>' in html
    for e in fed:  # every incoming edge links the latent it comes from
        if e["latent"] >= 0:
            assert f'href="/latents/layer2/{e["latent"]}"' in html
    assert page_json(client, f"/latents/layer4/{edge}")["method"] == "grad_x_act"  # first
    r = client.get(f"/latents/layer4/{edge}?method=srd&format=json")
    assert r.status_code == 400 and "has ICAT edges of grad_x_act, ig" in r.json()["error"]


def test_latent_pages_from_kept_rows_equal_per_latent_queries(atlas, monkeypatch) -> None:
    """A latent page slices its exemplars and ICAT edges from rows read once per SAE
    (`KeptRows`), and its decoder neighbours from a search of all the SAE's latents at start;
    an atlas whose tables exceed ROWS_KEPT, or an SAE over NEIGHBOURS_KEPT_PAIRS, is queried
    per latent instead. Both give every latent of both SAEs the same page, with each method's
    edges."""
    from pipeline.browser import content as content_module

    kept = content_module.AtlasContent(atlas)
    monkeypatch.setattr(content_module, "ROWS_KEPT", 0)
    monkeypatch.setattr(content_module, "NEIGHBOURS_KEPT_PAIRS", 0)
    queried = content_module.AtlasContent(atlas)
    sae = next(iter(kept.saes.values()))
    read = (f"{kept._exemplar_selects[0]} WHERE sae_id = '{sae['sae_id']}'", "latent",
            "kind DESC, rank", int(sae["n_latents"]))
    assert kept._kept(*read) is not None and queried._kept(*read) is None
    assert all(kept._neighbours(s) is not None and queried._neighbours(s) is None
               for s in kept.saes)
    pages = 0
    for sae in kept.saes.values():
        for latent in range(int(sae["n_latents"])):
            for method in kept.methods:
                a = kept.latent(sae["sae_id"], latent, method)
                b = queried.latent(sae["sae_id"], latent, method)
                assert a == b, (sae["sae_id"], latent, method)
                pages += bool(a["exemplars"]) and bool(a["edges"]["fed_by"] or a["edges"]["feeds"])
                assert len(a["similar"]["rows"]) == content_module.NEIGHBOURS
    assert pages > 10  # pages with exemplars and edges were compared, not only empty ones


def test_exemplar_pictures_equal_the_atlas_renderers(client, atlas, built) -> None:
    app = client.app
    latent = sql(atlas, "SELECT latent FROM exemplars WHERE layer = 'layer4' AND kind = 'top' "
                        "ORDER BY latent LIMIT 1")[0]["latent"]
    info = atlas.latent("layer4", latent)
    row = info.exemplars.to_pylist()[0]
    image = atlas.images([row["image_id"]])[row["image_id"]]
    layer = atlas.layer_info("layer4")
    cell = cell_box(row["position"], image.shape[:2], (layer["grid_h"], layer["grid_w"]))
    base = f"/render/exemplar/layer4/{latent}/{row['kind']}/{row['rank']}"
    assert np.array_equal(png(client.get(f"{base}/ierf.png").content),
                          exemplar_tile(image, info.ierfs[0], cell))
    assert np.array_equal(png(client.get(f"{base}/plain.png").content),
                          exemplar_tile(image, None, cell))
    act = png(client.get(f"{base}/act.png").content)
    assert act.shape == image.shape and not np.array_equal(act, image)
    # the activation map's peak cell is the exemplar's: its value there is the scan's
    grid = app.state.renderer.activation_grid(image, info.sae["sae_id"], latent)
    assert grid[row["y"], row["x"]] == pytest.approx(row["activation"], rel=2e-2, abs=2e-3)
    assert np.array_equal(png(client.get(f"/render/image/{row['image_id']}.png").content), image)
    # a second request is served from the cache, outside the atlas
    cached = list(Path(app.state.renderer.cache).rglob("*.png"))
    assert cached and not any(str(p).startswith(built) for p in cached)


def test_image_page_top_latents_prediction_and_route(client, atlas) -> None:
    import torch

    image_id = sql(atlas, "SELECT image_id FROM exemplars ORDER BY image_id LIMIT 1")[0]["image_id"]
    d = page_json(client, f"/images/{image_id}")
    x, _ = atlas.input_image(atlas.images([image_id])[image_id])
    with torch.no_grad():
        logits = atlas.model().model(x)[0]
    assert d["predicted"] == int(logits.argmax())
    assert d["top_classes"][0]["logit"] == pytest.approx(float(logits.max()), rel=1e-5)
    top = sql(atlas, f"SELECT sae_id, latent, max_act FROM activations WHERE image_id = "
                     f"{image_id} AND rank < 6 ORDER BY layer, sae_id, rank")
    assert [(r["sae_id"], r["latent"]) for rows in d["latents"].values() for r in rows] == \
        [(r["sae_id"], r["latent"]) for r in top]
    route = atlas.routes(atlas.images([image_id])[image_id], target=d["predicted"], k=3,
                         method="grad_x_act")
    assert [n["id"] for n in d["route"]["nodes"]] == [n.id for n in route.nodes]
    html = client.get(f"/images/{image_id}").text
    for n in route.nodes:  # every latent node of the route links its page
        if n.layer != "logits" and n.latent >= 0:
            assert f'href="/latents/{n.layer}/{n.latent}"' in html
    saliency = client.get(f"/render/saliency/{image_id}/{d['predicted']}.png")
    assert saliency.status_code == 200 and png(saliency.content).shape[:2] == x.shape[-2:]
    r = client.get(f"/images/{image_id}?target=99&format=json")
    assert r.status_code == 400 and "expected a class index 0..4" in r.json()["error"]


def test_search_of_an_atlas_image_and_of_an_upload_equal_atlas_search(client, atlas) -> None:
    image_id = sql(atlas, "SELECT min(image_id) AS i FROM images")[0]["i"]
    pixels = atlas.images([image_id])[image_id]
    want = atlas.search(pixels, box=(8, 8, 32, 24), k=5).to_pylist()
    d = page_json(client, f"/search?image_id={image_id}&run=1&box=8,8,32,24&k=5")
    assert [(r["sae_id"], r["latent"]) for r in d["results"]] == \
        [(r["sae_id"], r["latent"]) for r in want]
    assert [r["similarity"] for r in d["results"]] == pytest.approx([r["similarity"] for r in want])
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    r = client.post("/search", files={"file": ("q.png", buf.getvalue(), "image/png")},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/search?upload=")
    digest = r.headers["location"].split("=", 1)[1]
    d = page_json(client, f"/search?upload={digest}&run=1&box=8,8,32,24&k=5&layer=layer4")
    want4 = atlas.search(pixels, box=(8, 8, 32, 24), k=5, layer="layer4").to_pylist()
    assert [r["latent"] for r in d["results"]] == [r["latent"] for r in want4]
    assert np.array_equal(png(client.get(f"/render/upload/{digest}.png").content), pixels)


def test_sql_console_equals_atlas_sql_and_downloads(client, atlas) -> None:
    q = "SELECT layer, latent, freq, label_hint FROM latents ORDER BY freq DESC, layer, latent"
    want = atlas.sql(q).to_pylist()
    d = page_json(client, f"/sql?q={quote(q)}&max_rows=10")
    assert d["rows"] == want[:10] and d["truncated"] and d["columns"] == list(want[0])
    html = client.get(f"/sql?q={quote(q)}&max_rows=10").text
    assert html.count("<tr>") == 11 and f"{want[0]['freq']:.6g}" in html
    rows = list(csv.DictReader(io.StringIO(client.get(f"/sql?q={quote(q)}&format=csv").text)))
    assert [(r["layer"], int(r["latent"])) for r in rows] == [(w["layer"], w["latent"]) for w in want]
    table = pq.read_table(io.BytesIO(client.get(f"/sql?q={quote(q)}&format=parquet").content))
    assert table.to_pylist() == want


@pytest.mark.parametrize("query,message", [
    ("DROP VIEW latents", "the atlas is read-only: DROP statements are refused"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY statements are refused"),
    ("SELECT 1; SELECT 2", "expected one SELECT statement, got 2"),
    ("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
    ("INSTALL httpfs", "statements are refused"),
    ("ATTACH '/tmp/x.db'", "ATTACH statements are refused"),
])
def test_sql_writes_and_escapes_are_refused(client, query, message) -> None:
    r = client.get(f"/sql?q={quote(query)}&format=json")
    assert r.status_code == 400 and message in r.json()["error"]
    assert "root:" not in r.text


def test_sql_time_limit(built, tmp_path) -> None:
    slow = TestClient(create_app(built, cache=str(tmp_path), sql_timeout=0.2))
    r = slow.get("/sql", params={"q": "SELECT count(*) FROM range(100000000000) a",
                                 "format": "json"})
    assert r.status_code == 400 and "ran past its time limit of 0.2 s" in r.json()["error"]


@pytest.mark.parametrize("path", [
    "/layers/..%2F..%2F..%2Fetc%2Fpasswd", "/latents/layer4/..%2F..%2Fsaes",
    "/latents/..%2Fsaes/1", "/images/..%2F..%2Fetc%2Fpasswd", "/images/-1",
    "/render/image/..%2F..%2Fetc%2Fpasswd.png", "/render/upload/..%2F..%2Fetc%2Fpasswd.png",
    "/render/exemplar/layer4/1/top/0/..%2F..%2Fetc.png", "/static/..%2F..%2F..%2Fcontent.py",
    "/static/../app.py", "/../../etc/passwd", "/render/exemplar/layer4/1/top/99/ierf.png",
])
def test_path_traversal_and_unknown_things_are_404(client, path) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert "root:" not in r.text and "import " not in r.text


def test_404_pages_name_what_exists(client) -> None:
    r = client.get("/layers/layer9?format=json")
    assert r.status_code == 404 and "layers with an SAE: layer2, layer4" in r.json()["error"]
    r = client.get("/latents/layer4/64?format=json")
    assert r.status_code == 404 and "its latents are 0..63" in r.json()["error"]
    r = client.get("/images/5000000?format=json")
    assert r.status_code == 404 and "it has 24 images, ids 0..2000007" in r.json()["error"]
    assert "layers with an SAE: layer2, layer4" in client.get("/layers/layer9").text


def test_oversized_and_bomb_uploads_are_refused(built, tmp_path) -> None:
    small = TestClient(create_app(built, cache=str(tmp_path), max_upload=100_000))
    r = small.post("/search", files={"file": ("big.png", os.urandom(200_000), "image/png")})
    assert r.status_code == 413 and "larger than 100000 bytes" in r.text
    # PNGs that claim 8000^2 and 20000^2 pixels in a few KB: refused from their header, by
    # the browser's limit and by Pillow's own guard (past twice its default) alike
    for side in (8_000, 20_000):
        assert side * side > MAX_UPLOAD_PIXELS
        raw = zlib.compress(b"".join(b"\0" + bytes(side) for _ in range(16)), 9)
        bomb = _png_header(side, side) + _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")
        assert len(bomb) < 100_000
        r = small.post("/search", files={"file": ("bomb.png", bomb, "image/png")},
                       headers={"accept": "application/json"})
        assert r.status_code == 400
        assert f"at most {MAX_UPLOAD_PIXELS} are decoded (a decompression bomb is refused)" in r.text
        assert side != 8_000 or "claims 8000x8000 = 64000000 pixels" in r.text
    r = small.post("/search", files={"file": ("x.png", b"not an image", "image/png")})
    assert r.status_code == 400 and "not an image Pillow can read" in r.text


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (len(data).to_bytes(4, "big") + kind + data
            + zlib.crc32(kind + data).to_bytes(4, "big"))


def _png_header(w: int, h: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big")
                                         + bytes([8, 0, 0, 0, 0]))


def test_nothing_is_written_to_the_atlas(built, client) -> None:
    before = tree(built)
    for path in ("/", "/layers/layer2", "/latents/layer2/0", "/images/0", "/sql?q=SELECT+1",
                 "/render/exemplar/layer2/0/top/0/act.png", "/search?image_id=0&run=1"):
        client.get(path)
    assert tree(built) == before


def test_non_loopback_bind_warns(built, monkeypatch, capsys) -> None:
    assert host_warning("127.0.0.1") is None and host_warning("::1") is None
    assert host_warning("localhost") is None
    assert "anyone who can reach this address" in host_warning("0.0.0.0")
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append(kw))
    assert main(["serve", built, "--host", "0.0.0.0", "--port", "9999"]) == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err and calls == [
        {"host": "0.0.0.0", "port": 9999, "log_level": "warning"}]
    assert main(["serve", built]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "http://127.0.0.1:8765/" in err


def test_workers_serve_the_same_pages_from_several_processes(built, client, tmp_path) -> None:
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil
    with socket.socket() as s:  # a free port on loopback
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = str(Path(sys.executable).with_name("concept-atlas"))
    proc = subprocess.Popen([cli, "serve", built, "--port", str(port), "--workers", "2",
                             "--cache", str(tmp_path / "c")], stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.time() + 120, None
        while body is None:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the server did not answer within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/layers/layer2?format=json",
                                            timeout=5) as r:
                    body = r.read()
            except OSError:
                time.sleep(0.5)
        assert json.loads(body) == page_json(client, "/layers/layer2")
        # uvicorn's supervisor and its two workers, each with the atlas open
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "multiprocessing" in " ".join(c.cmdline()) or c.name().startswith("python")]
        assert len(workers) >= 2, [c.cmdline() for c in workers]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_workers_and_page_threads_must_be_positive(built, capsys) -> None:
    assert main(["serve", built, "--workers", "0"]) == 2
    assert "--workers 0: give 1 or more" in capsys.readouterr().err
    assert main(["serve", built, "--page-threads", "0"]) == 2
    assert "--page-threads 0: give 1 or more" in capsys.readouterr().err
    with pytest.raises(ValueError, match="page_threads=0"):
        create_app(built, page_threads=0)


def test_a_warm_latent_page_is_its_kept_html(atlas, tmp_path, monkeypatch) -> None:
    """A latent page's HTML is kept (HTML_KEPT, oldest out first): asked again it is the same
    bytes without a second build; another query or the JSON twin is built on its own. So is a
    layer table's."""
    from pipeline.browser import app as app_module

    monkeypatch.setattr(app_module, "HTML_KEPT", 2)
    client = TestClient(create_app(atlas, cache=str(tmp_path)))
    content, calls = client.app.state.content, []
    real = content.latent
    monkeypatch.setattr(content, "latent", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = client.get("/latents/layer4/3").text
    assert client.get("/latents/layer4/3").text == first and len(calls) == 1
    assert client.get("/latents/layer4/3?method=ig").text != first and len(calls) == 2
    client.get("/latents/layer4/3?format=json")
    client.get("/latents/layer4/3?format=json")
    assert len(calls) == 4
    client.get("/latents/layer4/4")  # a third page: /latents/layer4/3 is the oldest, dropped
    assert client.get("/latents/layer4/3").text == first and len(calls) == 6
    # a layer table's page likewise, in the same HTML_KEPT
    tables, real_layer = [], content.layer
    monkeypatch.setattr(content, "layer", lambda *a, **k: tables.append(a) or real_layer(*a, **k))
    page = client.get("/layers/layer2?sort=max_act&page=2").text
    assert client.get("/layers/layer2?sort=max_act&page=2").text == page and len(tables) == 1
    assert client.get("/layers/layer2?sort=max_act&page=1").text != page and len(tables) == 2
    client.get("/layers/layer2?sort=max_act&page=2&format=json")
    assert len(tables) == 3


@pytest.mark.parametrize("threads", [1, 3])
def test_latent_pages_are_built_on_their_own_bounded_threads(atlas, tmp_path, monkeypatch,
                                                             threads) -> None:
    """At most `page_threads` latent pages are built at once (PAGE_THREADS: anyio's 40 threads
    spent twice the CPU on the same cold pages), while the SQL console keeps its own threads."""
    import asyncio
    import threading
    import time

    import httpx

    app = create_app(atlas, cache=str(tmp_path), page_threads=threads)
    content = app.state.content
    state, lock, real = {"now": 0, "peak": 0}, threading.Lock(), content.latent

    def slow(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.5)
        with lock:
            state["now"] -= 1
        return real(*args, **kwargs)

    monkeypatch.setattr(content, "latent", slow)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://atlas") as c:
            t = time.perf_counter()

            async def timed(path: str):
                reply = await c.get(path)
                return reply, time.perf_counter() - t

            return await asyncio.gather(
                *(timed(f"/latents/layer4/{i}?format=json") for i in range(6)),
                timed("/sql?q=SELECT+1+AS+one&format=json"))

    *pages, (answer, sql_s) = asyncio.run(go())
    assert [r.status_code for r, _ in pages] == [200] * 6
    assert answer.status_code == 200 and answer.json()["rows"] == [{"one": 1}]
    assert state["peak"] == threads
    # the pages came in waves of `threads`, 0.5 s each; the query did not wait for them: it
    # was answered at least half a wave before the first page (timed from the first page, not
    # the clock's start: the app's first-request work took up to 0.45 s before either when the
    # test process held the whole suite's modules)
    assert max(s for _, s in pages) >= 0.5 * -(-6 // threads) - 0.05
    assert sql_s < min(s for _, s in pages) - 0.25


def test_export_site_links_all_resolve(built, atlas, tmp_path) -> None:
    out = tmp_path / "site"
    assert main(["export-site", built, str(out), "--top", "3", "--cache", str(tmp_path / "c")]) == 0
    pages = sorted(out.rglob("*.html"))
    latents = sql(atlas, "SELECT sae_id, count(*) AS n FROM latent_stats WHERE NOT dead "
                         "GROUP BY sae_id")
    assert len(list(out.glob("latents/*/*.html"))) == sum(min(3, r["n"]) for r in latents)
    assert (out / "index.html").is_file() and (out / "layers" / "layer4.html").is_file()
    missing = []
    for page in pages:
        for link in re.findall(r'(?:href|src|data-act|data-plain|data-ierf)="([^"#]+)"',
                               page.read_text()):
            assert not link.startswith("/"), f"{page}: absolute link {link}"
            if not (page.parent / unquote(link)).is_file():
                missing.append((str(page.relative_to(out)), link))
    assert missing == []
    # an exported layer page lists exactly its exported latents
    html = (out / "layers" / "layer4.html").read_text()
    top = sql(atlas, "SELECT latent FROM latent_stats WHERE layer = 'layer4' AND NOT dead "
                     "ORDER BY freq DESC, latent LIMIT 3")
    assert re.findall(r'data-latent="(\d+)"', html) == [str(r["latent"]) for r in top]
    assert export_site(built, tmp_path / "again", layers=["layer2"], top=1,
                       cache=str(tmp_path / "c"))["pages"] >= 3
