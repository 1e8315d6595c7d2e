"""The atlas browser: a read-only web app over a built atlas and its static export.

    from pipeline.browser import create_app, export_site
    app = create_app("demo_out")              # an ASGI app (`concept-atlas serve demo_out`)
    export_site("demo_out", "site", top=16)   # static HTML + PNGs (`concept-atlas export-site`)

Needs the `serve` extra (Starlette, Jinja2, uvicorn, python-multipart).
"""
from pipeline.browser.app import create_app, host_warning, is_loopback
from pipeline.browser.export import export_site

__all__ = ["create_app", "export_site", "host_warning", "is_loopback"]
