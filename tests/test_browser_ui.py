"""The atlas browser in a real headless browser (Debian's chromium + chromedriver, Selenium):
every page type opens, a layer-table row click opens its latent, the overlay toggle swaps the
exemplar pictures, an ICAT edge leads to the next latent, a drawn box runs a search, a SQL
query runs, and the static export opens from disk with every picture loaded. What is on
screen is compared with the SQL (or `Atlas`) answer to the same question.

On the tiny build by default; `BROWSER_ATLAS=demo_out` runs them on another atlas (the demo),
and `BROWSER_SCREENSHOTS=docs/browser` keeps the screenshots of docs/browser.md there.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the browser needs the `serve` extra")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER and HAVE_SELENIUM),
                       reason="no headless browser: needs Debian's chromium and chromium-driver "
                              "and `pip install selenium` (.ci/run installs them)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

from pipeline.atlas import Atlas  # noqa: E402
from pipeline.browser import create_app, export_site  # noqa: E402


@pytest.fixture(scope="module")
def root(request) -> str:
    return os.environ.get("BROWSER_ATLAS") or request.getfixturevalue("built")


@pytest.fixture(scope="module")
def atlas(root) -> Atlas:
    return Atlas.open(root)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("BROWSER_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(root, tmp_path_factory) -> str:
    """The browser app served by uvicorn on a free loopback port, in a thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(root, cache=str(tmp_path_factory.mktemp("cache")))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-color-profile=srgb"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
    browser.set_page_load_timeout(300)
    yield browser
    browser.quit()


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def wait_for(driver, condition, timeout: float = 120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def images_loaded(driver) -> list[str]:
    """The src of every <img> on the page that did not load (naturalWidth 0); lazy pictures
    below the fold are loaded first."""
    driver.execute_script("document.querySelectorAll('img[loading=lazy]')"
                          ".forEach(i => { i.loading = 'eager'; })")
    wait_for(driver, lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete)"))
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !i.naturalWidth).map(i => i.src)")


def full_page(driver, path: Path) -> None:
    """A screenshot of the whole page, 1280 px wide (Chrome's device metrics set to the
    page's height for the shot, then cleared)."""
    height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": int(min(height, 6000)), "deviceScaleFactor": 1,
        "mobile": False})
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def sql(atlas: Atlas, query: str) -> list[dict]:
    return atlas.sql(query).to_pylist()


def test_overview_shows_the_saes(driver, server, atlas, shots) -> None:
    driver.get(server + "/")
    saes = sql(atlas, "SELECT sae_id, fvu FROM saes ORDER BY sae_id")
    rows = by_css(driver, "#saes tbody tr")
    assert [r.find_element("css selector", "td").text for r in rows] == [s["sae_id"] for s in saes]
    assert [r.find_element("css selector", "td.fvu").text for r in rows] == \
        [f"{s['fvu']:.3g}" for s in saes]
    n = sql(atlas, "SELECT count(*) AS n FROM images")[0]["n"]
    assert by_css(driver, "#n-images")[0].text == str(n)
    full_page(driver, shots / "overview.png")


def test_layer_row_click_opens_the_latent_and_the_overlay_toggles(driver, server, atlas,
                                                                   shots) -> None:
    sae = sql(atlas, "SELECT sae_id, layer FROM saes ORDER BY d_in DESC, sae_id LIMIT 1")[0]
    driver.get(f"{server}/layers/{sae['layer']}?sort=max_act")
    first = sql(atlas, f"SELECT latent FROM latents WHERE sae_id = '{sae['sae_id']}' "
                       f"ORDER BY max_act DESC NULLS LAST, latent LIMIT 1")[0]["latent"]
    row = by_css(driver, "#latents tbody tr")[0]
    assert row.get_attribute("data-latent") == str(first)
    row.find_element("css selector", "td.c-freq").click()  # the row, not its link
    wait_for(driver, lambda d: d.current_url.endswith(f"/latents/{sae['layer']}/{first}"))
    stats = sql(atlas, f"SELECT freq, max_act FROM latents WHERE sae_id = '{sae['sae_id']}' "
                       f"AND latent = {first}")[0]
    assert by_css(driver, "#latent-id")[0].text == str(first)
    assert by_css(driver, "#stat-max_act")[0].text == f"{stats['max_act']:.4g}"
    assert by_css(driver, "#stat-freq")[0].text == f"{stats['freq']:.4g}"
    n_ex = sql(atlas, f"SELECT count(*) AS n FROM exemplars WHERE sae_id = '{sae['sae_id']}' "
                      f"AND latent = {first}")[0]["n"]
    pictures = by_css(driver, "#exemplars img.overlay")
    assert len(pictures) == n_ex > 0
    assert images_loaded(driver) == []
    assert all(p.get_attribute("src").endswith("/ierf.png") for p in pictures)
    full_page(driver, shots / "latent.png")
    for mode in ("act", "plain", "ierf"):
        by_css(driver, f"#overlay-toggle input[value={mode}]")[0].click()
        wait_for(driver, lambda d: all(p.get_attribute("src").endswith(f"/{mode}.png")
                                       for p in by_css(d, "#exemplars img.overlay")))
        assert images_loaded(driver) == []
        if mode == "act":
            by_css(driver, "#exemplars")[0].screenshot(str(shots / "latent_activation.png"))


def test_follow_an_icat_edge_to_the_next_latent(driver, server, atlas) -> None:
    method = sql(atlas, "SELECT min(method) AS m FROM edges")[0]["m"]
    edge = sql(atlas, f"SELECT src_layer, src_latent, dst_layer, dst_latent FROM edges "
                      f"WHERE method = '{method}' AND scope = 'all' AND dst_layer <> 'logits' "
                      f"AND src_latent >= 0 ORDER BY weight DESC LIMIT 1")[0]
    driver.get(f"{server}/latents/{edge['src_layer']}/{edge['src_latent']}")
    feeds = sql(atlas, f"SELECT dst_latent FROM edges WHERE method = '{method}' AND scope = 'all'"
                       f" AND src_layer = '{edge['src_layer']}' AND src_latent = "
                       f"{edge['src_latent']} AND dst_layer <> 'logits' ORDER BY weight DESC "
                       f"LIMIT 8")
    links = by_css(driver, "#feeds a")
    assert [a.text for a in links] == [f"{edge['dst_layer']}:{r['dst_latent']}" for r in feeds]
    links[0].click()
    wait_for(driver, lambda d: d.current_url.endswith(
        f"/latents/{edge['dst_layer']}/{feeds[0]['dst_latent']}"))
    # and back along the edge: the source is among the latents that feed this one
    assert f"{edge['src_layer']}:{edge['src_latent']}" in [a.text for a in by_css(driver, "#fed-by a")]


def test_image_page_and_its_route(driver, server, atlas, shots) -> None:
    image_id = sql(atlas, "SELECT image_id FROM exemplars WHERE kind = 'top' "
                          "ORDER BY activation DESC LIMIT 1")[0]["image_id"]
    driver.get(f"{server}/images/{image_id}")
    assert images_loaded(driver) == []
    nodes = by_css(driver, "svg#route a.node-link")
    assert nodes, "the route has latent nodes"
    full_page(driver, shots / "image.png")
    href = driver.execute_script("return arguments[0].getAttribute('href')", nodes[0])
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                          nodes[0])
    wait_for(driver, lambda d: "/latents/" in d.current_url)
    assert d_path(driver.current_url) == d_path(href)


def d_path(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1] if "://" in url else url


def test_search_with_a_drawn_box(driver, server, atlas, shots) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    image_id = sql(atlas, "SELECT min(image_id) AS i FROM images")[0]["i"]
    driver.get(f"{server}/search?image_id={image_id}")
    picture = by_css(driver, "#query-image")[0]
    wait_for(driver, lambda d: d.execute_script("return arguments[0].naturalWidth", picture) > 0)
    size = picture.size
    (ActionChains(driver).move_to_element_with_offset(picture, -size["width"] // 4,
                                                      -size["height"] // 4)
     .click_and_hold().move_by_offset(size["width"] // 3, size["height"] // 4).release()
     .perform())
    box = by_css(driver, "#box")[0].get_attribute("value")
    x, y, w, h = map(int, box.split(","))
    natural = driver.execute_script("return arguments[0].naturalWidth", picture)
    scale = natural / size["width"]
    assert (w, h) == pytest.approx((size["width"] // 3 * scale, size["height"] // 4 * scale),
                                   abs=2 * scale + 1)
    by_css(driver, "input[name=k]")[0].clear()
    by_css(driver, "input[name=k]")[0].send_keys("5")
    by_css(driver, "#search-button")[0].click()
    wait_for(driver, lambda d: by_css(d, "#results tbody tr"))
    want = atlas.search(atlas.images([image_id])[image_id], box=(x, y, w, h), k=5).to_pylist()
    rows = by_css(driver, "#results tbody tr")
    assert [(r.get_attribute("data-sae"), int(r.get_attribute("data-latent"))) for r in rows] == \
        [(r["sae_id"], r["latent"]) for r in want]
    assert images_loaded(driver) == []
    full_page(driver, shots / "search.png")


def test_sql_console(driver, server, atlas) -> None:
    query = "SELECT layer, count(*) AS n, max(max_act) AS top FROM latents GROUP BY layer ORDER BY layer"
    driver.get(server + "/sql")
    box = by_css(driver, "#q")[0]
    box.clear()
    box.send_keys(query)
    by_css(driver, "#run-sql")[0].click()
    wait_for(driver, lambda d: by_css(d, "#sql-result tbody tr"))
    cells = [[td.text for td in tr.find_elements("css selector", "td")]
             for tr in by_css(driver, "#sql-result tbody tr")]
    assert cells == [[r["layer"], str(r["n"]), f"{r['top']:.6g}"] for r in sql(atlas, query)]
    by_css(driver, "#q")[0].clear()
    by_css(driver, "#q")[0].send_keys("DELETE FROM saes")
    by_css(driver, "#run-sql")[0].click()
    wait_for(driver, lambda d: by_css(d, "p.error"))
    assert "DELETE statements are refused" in by_css(driver, "p.error")[0].text


def test_static_export_opens_from_disk(driver, root, atlas, tmp_path) -> None:
    out = tmp_path / "site"
    export_site(root, out, top=2, cache=str(tmp_path / "cache"))
    driver.get((out / "index.html").as_uri())
    layer = sql(atlas, "SELECT layer FROM saes ORDER BY sae_id LIMIT 1")[0]["layer"]
    [link] = [a for a in by_css(driver, "nav a") if a.text == layer]
    link.click()
    wait_for(driver, lambda d: d.current_url.endswith(f"/layers/{layer}.html"))
    rows = by_css(driver, "#latents tbody tr")
    assert len(rows) == 2
    rows[0].find_element("css selector", "td.c-freq").click()
    wait_for(driver, lambda d: "/latents/" in d.current_url)
    assert images_loaded(driver) == []
    by_css(driver, "#overlay-toggle input[value=act]")[0].click()
    assert images_loaded(driver) == []
    by_css(driver, "#exemplars a")[0].click()
    wait_for(driver, lambda d: "/images/" in d.current_url)
    assert images_loaded(driver) == []
