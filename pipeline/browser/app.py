"""The atlas browser: a read-only Starlette app over one atlas (`concept-atlas serve`).

Pages, each with a JSON twin (`?format=json`): `/` (overview), `/layers/{layer}` (the latent
table), `/latents/{layer}/{latent}`, `/images/{image_id}`, `/search`, `/sql`. Pictures under
`/render/...` are drawn on the server (`pipeline.browser.render`, cached on disk); scripts and
styles under `/static/` come from the package (no CDN: a page needs no internet connection).

Safety (docs/architecture.md, "The atlas browser"): no endpoint writes to the atlas; every
path parameter is checked against what the atlas has (a layer, latent or image it lacks is a
404 naming what exists), and no file path ever comes from a request (static files go through
Starlette's StaticFiles, which refuses paths outside its folder); uploads are cut at
`max_upload` bytes by `BodyLimit` before they are read and decoded with a decompression-bomb
guard (`render.decode_upload`); SQL runs through `Atlas.sql`, the sandbox of `concept-atlas sql`
(one SELECT, no file access outside the atlas, no extensions, a time and a row limit).

The same app renders the static site (`pipeline.browser.export`): given an `ExportPlan`, links
become relative file paths, and links to pages the export leaves out are not drawn.
"""
from __future__ import annotations

import asyncio
import functools
import io
import ipaddress
import json
import math
import posixpath
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote, unquote, urlencode
from weakref import WeakKeyDictionary

import anyio
import anyio.to_thread
import jinja2
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.atlas.api import Atlas
from pipeline.atlas.regions import parse_box
from pipeline.browser.content import LAYER_COLUMNS, AtlasContent, LayerQuery, NotFound
from pipeline.browser.render import MAX_UPLOAD_BYTES, Renderer

SQL_ROWS_SHOWN = 1000  # rows of a result drawn as an HTML table (downloads take more)
SQL_ROWS_MAX = 100_000
SQL_TIMEOUT_MAX = 30.0
SEARCH_K_MAX = 50
EXAMPLE_QUERIES = (
    "SELECT layer, sae_id, n_latents, fvu, l0, dead_frac FROM saes",
    "SELECT layer, latent, label_hint, freq, cafe_ins_auc FROM latents WHERE NOT dead "
    "ORDER BY max_act DESC LIMIT 20",
    "SELECT dst_latent AS class, src_layer, src_latent, weight FROM edges "
    "WHERE dst_layer = 'logits' ORDER BY weight DESC LIMIT 10",
)


@dataclass
class ExportPlan:
    """The pages a static export writes (canonical paths such as `/latents/layer4/17`), and
    the pictures and static files its pages refer to (filled while they are rendered)."""

    pages: set[str]
    assets: set[str] = field(default_factory=set)


def page_file(path: str) -> str:
    """The file of a canonical path in a static export: `/` -> `index.html`, a page ->
    `PATH.html`, a picture or static file -> its path."""
    if path == "/":
        return "index.html"
    if path.startswith(("/render/", "/static/")):
        return path.lstrip("/")
    return path.lstrip("/") + ".html"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to bind) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_warning(host: str) -> str | None:
    """The warning printed when the server binds beyond loopback, None on loopback."""
    if is_loopback(host):
        return None
    return (f"warning: serving on {host}: anyone who can reach this address can read the whole "
            f"atlas and run read-only SQL on it (no authentication); bind 127.0.0.1 (the "
            f"default) and use an SSH tunnel to share it")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app reads it
    (by its Content-Length, or by counting the chunks of a body sent without one)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(self.limit, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, _too_large_text(self.limit))
            return message

        await self.app(scope, counted, send)


class ServerTiming:
    """ASGI middleware: each response says how long the server spent on it, from the request's
    arrival to the response's start (`Server-Timing: app;dur=MS`; benchmarks/browser_load.py
    reads it), waiting for the atlas lock included."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed(message: dict) -> None:
            if message["type"] == "http.response.start":
                ms = 1000 * (time.perf_counter() - start)
                message = dict(message, headers=[*message.get("headers", []),
                                                 (b"server-timing", f"app;dur={ms:.2f}".encode())])
            await send(message)

        await self.app(scope, receive, timed)


def _too_large_text(limit: int) -> str:
    return f"the request body is larger than {limit} bytes, the upload limit (--max-upload)"


async def _too_large(limit: int, send: Callable) -> None:
    body = _too_large_text(limit).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# [choice] the overview, layer and latent pages (Python work over kept rows, under one GIL) run on
# this many threads of their own; everything else (SQL, search, pictures, image pages: mostly
# DuckDB, torch and PNG codecs, which release the GIL, or slow) keeps anyio's 40. On the 16k-latent
# atlas under 50 clients, 100 cold latent pages had p95 318-360 ms on 2 threads, 355-440 ms on
# 1, 4 or 8 and 735-900 ms on 40, where the threads spent the same pages' CPU twice over taking
# turns (docs/browser.md "Speed")
PAGE_THREADS = 2
# latent and layer pages kept as rendered HTML (20-50 kB each): a warm page then skips its
# Jinja2 render, most of its 3 ms (a layer table's 6 ms)
HTML_KEPT = 512

# `concept-atlas serve --workers N`: the settings each worker process builds its app from
SERVE_ENV = "CONCEPT_ATLAS_SERVE"


def app_from_env() -> Starlette:
    """The app of one worker process of `concept-atlas serve --workers N` (uvicorn's factory):
    `create_app`'s keyword arguments as JSON in the environment variable SERVE_ENV, which the
    command sets before uvicorn starts the workers. Each worker opens the atlas on its own (its
    own DuckDB connection and preloaded tables); the picture cache on disk is shared (files are
    written whole, then renamed)."""
    import os

    raw = os.environ.get(SERVE_ENV)
    if not raw:
        raise RuntimeError(f"{SERVE_ENV} is not set: this factory is for `concept-atlas serve "
                           "--workers N`; call create_app(atlas) yourself otherwise")
    return serving_app(**json.loads(raw))


def serving_app(**settings: Any) -> Starlette:
    """`create_app(**settings)` for `concept-atlas serve`, with what the first pages would
    otherwise load while a user waits loaded now: the class names, which import the model
    stack (torch, timm; about a second)."""
    app = create_app(**settings)
    app.state.content.class_names()
    return app


def create_app(atlas: str | Atlas, cache: str | None = None, export: ExportPlan | None = None,
               max_upload: int = MAX_UPLOAD_BYTES, sql_timeout: float = 10.0,
               page_threads: int = PAGE_THREADS) -> Starlette:
    """The browser app of an atlas (a path or URL, or an opened `Atlas`); `cache`: the folder
    of rendered pictures (default `render.default_cache_dir()`); `export`: render for a static
    export (see the module docstring); `max_upload`: bytes of an upload; `sql_timeout`:
    seconds a console query may run (at most SQL_TIMEOUT_MAX); `page_threads`: the overview,
    layer and latent pages built at once (the others wait their turn; PAGE_THREADS)."""
    if page_threads < 1:
        raise ValueError(f"page_threads={page_threads}: give 1 or more threads")
    opened = atlas if isinstance(atlas, Atlas) else Atlas.open(atlas)
    content = AtlasContent(opened)
    renderer = Renderer(content, cache)
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.browser", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = _num
    env.globals.update(quote=quote, len=len, max=max, min=min, enumerate=enumerate,
                       latent_link=latent_link, thumb=thumb)
    views = _Views(content, renderer, env, export, min(sql_timeout, SQL_TIMEOUT_MAX), page_threads)
    static = str(resources.files("pipeline.browser").joinpath("static"))
    routes = [
        Route("/", views.paged(views.overview)),
        Route("/layers/{layer}", views.paged(views.kept_html(views.layer))),
        Route("/latents/{layer}/{latent}", views.paged(views.kept_html(views.latent))),
        Route("/images/{image_id}", views.image),
        Route("/search", views.search, methods=["GET"]),
        Route("/search", views.upload, methods=["POST"]),
        Route("/sql", views.sql),
        Route("/render/image/{image_id}.png", views.png(renderer.image)),
        Route("/render/exemplar/{layer}/{latent}/{kind}/{rank}/{mode}.png",
              views.png(renderer.exemplar)),
        Route("/render/fire/{image_id}/{layer}/{latent}.png", views.png(renderer.fire)),
        Route("/render/region/{image_id}/{layer}/{position}.png", views.png(renderer.region)),
        Route("/render/saliency/{image_id}/{target}.png", views.png(renderer.saliency)),
        Route("/render/upload/{digest}.png", views.png(renderer.upload)),
        Mount("/static", StaticFiles(directory=static), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        NotFound: views.error, ValueError: views.error, HTTPException: views.error})
    app.state.content, app.state.renderer = content, renderer
    app.add_middleware(BodyLimit, limit=max_upload)
    app.add_middleware(ServerTiming)
    return app


class _Views:
    """The endpoints of `create_app` (one instance per app)."""

    def __init__(self, content: AtlasContent, renderer: Renderer, env: jinja2.Environment,
                 export: ExportPlan | None, sql_timeout: float, page_threads: int) -> None:
        self.content, self.renderer, self.env = content, renderer, env
        self.export, self.sql_timeout = export, sql_timeout
        self.page_threads = page_threads
        self._html: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._html_lock = threading.Lock()
        # one limiter per event loop (a limiter belongs to the loop it was made in; uvicorn runs
        # one loop per process, Starlette's TestClient one per client)
        self._limiters: WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
            WeakKeyDictionary())

    def paged(self, endpoint: Callable[[Request], Response]
              ) -> Callable[[Request], Awaitable[Response]]:
        """`endpoint` run on at most `page_threads` threads at once (see PAGE_THREADS)."""
        async def run(request: Request) -> Response:
            loop = asyncio.get_running_loop()
            limiter = self._limiters.get(loop)
            if limiter is None:
                limiter = self._limiters[loop] = anyio.CapacityLimiter(self.page_threads)
            return await anyio.to_thread.run_sync(endpoint, request, limiter=limiter)
        return run

    # ---- responses -----------------------------------------------------------------------

    def link(self, current: str, path: str, **query: Any) -> str | None:
        """The href of canonical `path` (with `query`) on page `current`: the path itself when
        serving; in an export a relative file path, or None for a page the export lacks."""
        if self.export is None:
            kept = {k: v for k, v in query.items() if v not in (None, "", False)}
            return path + ("?" + urlencode(kept) if kept else "")
        if query or not (path.startswith(("/render/", "/static/")) or path in self.export.pages):
            return None
        if path.startswith(("/render/", "/static/")):
            self.export.assets.add(path)
        here = posixpath.dirname(page_file(current))
        return quote(posixpath.relpath(page_file(unquote(path)), here or "."))

    def page(self, request: Request, template: str, data: dict[str, Any],
             status: int = 200) -> Response:
        """`data` as JSON (`?format=json`) or rendered into `template`."""
        if request.query_params.get("format") == "json":
            return Response(json.dumps(_plain(data), default=str), status,
                            media_type="application/json")
        current = request.url.path
        url = functools.partial(self.link, current)
        html = self.env.get_template(template).render(
            d=data, url=url, here=current, atlas_id=self.content.atlas.atlas_id,
            static=self.export is not None, params=request.query_params,
            layers=self.content.layer_names())
        return HTMLResponse(html, status)

    async def error(self, request: Request, exc: Exception) -> Response:
        """NotFound -> 404, a bad value -> 400, Starlette's own (unknown path, 413) as they are;
        each a page (or JSON) with the message."""
        if isinstance(exc, HTTPException):
            status, message = exc.status_code, str(exc.detail)
            if status == 404:
                message = (f"no page {request.url.path}; pages: /, /layers/LAYER, "
                           f"/latents/LAYER/LATENT, /images/IMAGE_ID, /search, /sql")
        else:
            status, message = (404 if isinstance(exc, NotFound) else 400), str(exc)
        return self.page(request, "error.html", {"status": status, "error": message}, status)

    def png(self, draw: Callable[..., bytes]) -> Callable[[Request], Response]:
        """An endpoint serving `draw(**path params)` as a PNG (cacheable: its URL names it)."""
        def endpoint(request: Request) -> Response:
            return Response(draw(**request.path_params), media_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})
        return endpoint

    # ---- pages ---------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        return self.page(request, "overview.html", self.content.overview())

    def layer(self, request: Request) -> Response:
        p = request.query_params
        if self.export is not None:  # one page, the exported latents, in the plan's order
            query = LayerQuery(per=1000)
        else:
            query = LayerQuery(sort=p.get("sort", "freq"), desc=p.get("desc", "1") != "0",
                               q=p.get("q", ""), alive=p.get("alive") == "1",
                               page=_int(p, "page", 1), per=_int(p, "per", 100))
        data = dict(self.content.layer(request.path_params["layer"], query))  # a kept page
        if self.export is not None:
            prefix = f"/latents/{data['slug']}/"
            data["rows"] = [r for r in data["rows"]
                            if f"{prefix}{r['latent']}" in self.export.pages]
            data["total"], data["pages"] = len(data["rows"]), 1
        data["sortable"] = list(LAYER_COLUMNS)
        if request.query_params.get("format") != "json":
            data["body"] = self.table_body(request.url.path, data)
        return self.page(request, "layer.html", data)

    def table_body(self, current: str, data: dict[str, Any]) -> Markup:
        """The rows of a layer table as HTML, formatted here: a 100-row page is 1,400 cells,
        and Jinja2 spends ten times longer on them cell by cell."""
        out = []
        prefix = f"/latents/{quote(data['slug'])}/"
        for r in data["rows"]:
            cells = []
            for c in data["columns"]:
                text = escape(_num(r[c]))
                if c == "latent":
                    href = self.link(current, f"{prefix}{r['latent']}")
                    text = f'<a href="{escape(href)}">{text}</a>' if href else text
                cells.append(f'<td class="c-{c}">{text}</td>')
            out.append(f'<tr data-latent="{r["latent"]}">{"".join(cells)}</tr>')
        return Markup("\n".join(out))

    def exemplar_figures(self, current: str, data: dict[str, Any]) -> Markup:
        """A latent page's exemplar grid as HTML, formatted here (like `table_body`: Jinja2
        took about 1.5 ms of a 7 ms cold page on it)."""
        out = []
        for e in data["exemplars"]:
            base = (f"/render/exemplar/{quote(data['slug'])}/{data['latent']}/{e['kind']}/"
                    f"{e['rank']}/")
            image = self.link(current, f"/images/{e['image_id']}")
            src = {m: escape(self.link(current, f"{base}{m}.png")) for m in ("ierf", "act", "plain")}
            shape = (f"<br>{escape(e['gt_colour'])} {escape(e['gt_texture'])} "
                     f"{escape(e['gt_shape'])}" if e.get("gt_shape") else "")
            out.append(
                f'\n<figure class="exemplar" data-kind="{escape(e["kind"])}">\n'
                + (f'<a href="{escape(image)}">' if image else "")
                + f'<img class="overlay" width="128" height="128" alt="{escape(e["kind"])} '
                f'exemplar {e["rank"]}: image {e["image_id"]}"\n src="{src["ierf"]}" '
                f'data-ierf="{src["ierf"]}" data-act="{src["act"]}" data-plain="{src["plain"]}">'
                + ("</a>" if image else "")
                + f'\n<figcaption>{escape(e["kind"])} {e["rank"]} · act <span class="act">'
                f'{escape(_num(e["activation"]))}</span>{shape}</figcaption>\n</figure>')
        return Markup("".join(out))

    def latent(self, request: Request) -> Response:
        method = request.query_params.get("method") or None
        data = self.content.latent(request.path_params["layer"], request.path_params["latent"],
                                   method)
        if request.query_params.get("format") != "json":  # the content's dict is kept: a copy
            data = dict(data, hist_svg=histogram_svg(data["histogram"]),
                        figures=self.exemplar_figures(request.url.path, data))
        return self.page(request, "latent.html", data)

    def kept_html(self, view: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """`view` with its HTML pages kept as bytes, the last HTML_KEPT of them: such a page
        depends on its path and query alone (the atlas does not change while it is served).
        Not in an export, which renders each page once and records the pictures it links;
        the JSON twins are built each time."""
        def endpoint(request: Request) -> Response:
            key = (request.url.path, request.url.query)
            kept = request.query_params.get("format") != "json" and self.export is None
            if kept:
                with self._html_lock:
                    body = self._html.get(key)
                    if body is not None:
                        self._html.move_to_end(key)
                        return HTMLResponse(body)
            response = view(request)
            if kept:
                with self._html_lock:
                    self._html[key] = bytes(response.body)
                    while len(self._html) > HTML_KEPT:
                        self._html.popitem(last=False)
            return response
        return endpoint

    def image(self, request: Request) -> Response:
        p = request.query_params
        data = dict(self.content.image(request.path_params["image_id"], p.get("target"),
                                       p.get("route", "grad_x_act")))  # a kept page
        data["route_svg"] = route_layout(data["route"])
        return self.page(request, "image.html", data)

    def search(self, request: Request) -> Response:
        p = request.query_params
        image_id, upload = p.get("image_id"), p.get("upload")
        data: dict[str, Any] = {"image_id": image_id, "upload": upload, "results": None,
                                "box": p.get("box", ""), "layer": p.get("layer", ""),
                                "k": _int(p, "k", 10), "source": None,
                                "saes": self.content.layer_names()}
        if not 1 <= data["k"] <= SEARCH_K_MAX:
            raise ValueError(f"k={data['k']}: expected 1..{SEARCH_K_MAX} results")
        if image_id:
            self.content.check_image(image_id)
            data["source"] = f"/render/image/{int(image_id)}.png"
        elif upload:
            self.renderer.upload(upload)  # NotFound for an unknown digest
            data["source"] = f"/render/upload/{upload}.png"
        if data["source"] and p.get("run"):
            pixels = (self.content.pixels(int(image_id)) if image_id
                      else self.renderer.upload_pixels(upload))
            box = parse_box(data["box"]) if data["box"] else None
            data["results"] = self.content.search(pixels, box, data["layer"] or None, data["k"])
        return self.page(request, "search.html", data)

    async def upload(self, request: Request) -> Response:
        """A query image for /search (multipart field `file`): stored at model input
        resolution, then the search page for it."""
        async with request.form(max_files=1, max_fields=8) as form:
            file = form.get("file")
            if file is None or isinstance(file, str):
                raise ValueError("no image in the upload: send it as the multipart field `file`")
            data = await file.read()
        digest = self.renderer.store_upload(data)
        return RedirectResponse(f"/search?upload={digest}", status_code=303)

    def sql(self, request: Request) -> Response:
        p = request.query_params
        query, fmt = p.get("q", ""), p.get("format", "html")
        max_rows = _int(p, "max_rows", SQL_ROWS_SHOWN)
        if not 1 <= max_rows <= SQL_ROWS_MAX:
            raise ValueError(f"max_rows={max_rows}: expected 1..{SQL_ROWS_MAX}")
        data: dict[str, Any] = {"q": query, "examples": EXAMPLE_QUERIES, "columns": [],
                                "rows": [], "truncated": False, "max_rows": max_rows,
                                "timeout": self.sql_timeout}
        if not query:
            return self.page(request, "sql.html", data)
        table = self.content.sql(query, max_rows, self.sql_timeout)
        truncated = bool((table.schema.metadata or {}).get(b"truncated"))
        if fmt in ("csv", "parquet"):
            return _download(table, fmt)
        data.update(columns=table.column_names, rows=table.to_pylist(), truncated=truncated)
        if fmt != "json":
            data["rows"] = [[_cell(v) for v in r.values()] for r in data["rows"][:SQL_ROWS_SHOWN]]
        return self.page(request, "sql.html", data)


def route_layout(route: dict[str, Any], width: int = 960) -> dict[str, Any] | None:
    """SVG coordinates of a route: one row per layer (the class on top), nodes spread evenly
    in a row, edge widths proportional to the weight (per destination layer, as
    `route_render.render_route` does)."""
    if not route.get("nodes"):
        return None
    node_w, node_h, gap = 150, 86, 70
    rows = [[n for n in route["nodes"] if n["layer"] == layer] for layer in route["layers"]]
    pos = {}
    for i, row in enumerate(rows):
        step = width / len(row)
        for j, n in enumerate(row):
            pos[n["id"]] = (step * (j + 0.5) - node_w / 2, 10 + i * (node_h + gap))
    top: dict[str, float] = {}
    for e in route["edges"]:
        level = e["dst"].split(":")[0]
        top[level] = max(top.get(level, 0.0), e["weight"])
    edges = []
    for e in route["edges"]:
        (sx, sy), (dx, dy) = pos[e["src"]], pos[e["dst"]]
        scale = top[e["dst"].split(":")[0]] or 1.0
        edges.append({"x1": sx + node_w / 2, "y1": sy, "x2": dx + node_w / 2, "y2": dy + node_h,
                      "width": max(1.0, 8 * max(e["weight"], 0.0) / scale), "weight": e["weight"],
                      "src": e["src"], "dst": e["dst"]})
    nodes = [dict(n, x=pos[n["id"]][0], y=pos[n["id"]][1]) for n in route["nodes"]]
    return {"width": width, "height": len(rows) * (node_h + gap) - gap + 20, "node_w": node_w,
            "node_h": node_h, "nodes": nodes, "edges": edges}


def _int(params: Any, name: str, default: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    if not str(value).lstrip("-").isdigit():
        raise ValueError(f"{name}={value!r}: expected an integer")
    return int(value)


def histogram_svg(h: dict[str, Any]) -> Markup:
    """A latent's activation histogram (`content.histogram`) as an SVG bar chart, one bar per
    bin with its range and count as a tooltip ('' without activations), formatted here
    (Jinja2 took about 1.5 ms of a 7 ms cold latent page on its 30 bars)."""
    if not h["n"]:
        return Markup("")
    counts, edges = h["counts"], h["edges"]
    top, width = max(counts), 12 * len(counts)
    bars = "".join(
        f'<rect x="{12 * i}" y="{100 - 100 * c / top}" width="11" height="{100 * c / top}">'
        f'<title>{escape(_num(edges[i]))}–{escape(_num(edges[i + 1]))}: {c} images</title></rect>'
        for i, c in enumerate(counts))
    return Markup(
        f'\n<svg class="hist" viewBox="0 0 {width} 110" role="img" aria-label="histogram of the '
        f'per-image max activation over {h["n"]} images">\n{bars}\n<text x="0" y="109">0</text>'
        f'<text x="{width}" y="109" text-anchor="end">{escape(_num(edges[-1]))}</text>\n</svg>')


def latent_link(url: Callable[..., str | None], slug: str | None, latent: int,
                text: str | None = None) -> Markup:
    """A link to a latent's page, `text` (default SLUG:LATENT) without a page (no single SAE
    of the layer, or an export without it). A Python function, not a Jinja2 macro: a latent
    page draws 16 links and thumbnails, and a macro call cost about 40 µs."""
    label = text or f"{slug}:{latent}"
    href = url(f"/latents/{quote(slug)}/{latent}") if slug else None
    return Markup(f'<a href="{escape(href)}">{escape(label)}</a>') if href else escape(label)


def thumb(url: Callable[..., str | None], e: dict[str, Any], size: int = 48) -> Markup:
    """The top exemplar's iERF mask of latent `e` (a row with slug, latent and thumb: whether
    it has one) as a thumbnail, '' without one."""
    if not (e["thumb"] and e["slug"]):
        return Markup("")
    src = url(f"/render/exemplar/{quote(e['slug'])}/{e['latent']}/top/0/ierf.png")
    return Markup(f'<img class="thumb" loading="lazy" width="{size}" height="{size}" '
                  f'alt="top exemplar of {escape(e["slug"])}:{escape(e["latent"])}" '
                  f'src="{escape(src)}">')


def _num(value: Any, digits: int = 3) -> str:
    """A number for a table cell: floats to `digits` significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _cell(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    return _num(value, 6) if isinstance(value, (float, bool)) or value is None else str(value)


def _plain(obj: Any) -> Any:
    """`obj` with NaN and infinities as null and bytes as their size (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return f"<{len(obj)} bytes>"
    return obj


def _download(table: Any, fmt: str) -> Response:
    """A query result as a CSV or Parquet file (the `sql` command's writers)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.atlas.tabular import csv_ready

    buf = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(csv_ready(table), buf)
        media = "text/csv"
    else:
        pq.write_table(table, buf, compression="zstd")
        media = "application/vnd.apache.parquet"
    return Response(buf.getvalue(), media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="query.{fmt}"'})
