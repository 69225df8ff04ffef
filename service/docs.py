"""The interactive API docs, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with every asset served by this server.

FastAPI's own pages load their JavaScript, CSS and favicon from CDNs (and ReDoc its fonts from Google), so they
are blank on a machine without internet, as most training clusters are. Here the pages are FastAPI's, pointed at
the copies of Swagger UI and ReDoc that the ``fastapi-offline`` package ships (MIT; it updates them with each
release), read from the installed package rather than copied into this repository.

The asset URLs carry that package's version (``/docs/assets/1.7.7/swagger-ui-bundle.js``), so browsers may keep
them for good: a new version is a new URL. Like the OpenAPI document, the pages and assets need no key.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

ASSETS_PACKAGE = "fastapi_offline"
ASSETS_VERSION = version("fastapi-offline")
ASSETS_PATH = "/docs/assets"
# The files served, with their media types: anything else under ASSETS_PATH is a 404.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
CACHE_FOREVER = "public, max-age=31536000, immutable"  # the URL changes with the package's version
# The pages may load from this server only: ReDoc's menu shows a logo from cdn.redoc.ly whatever its options, and
# an offline browser should not even try.
SAME_ORIGIN_ONLY = {"Content-Security-Policy": "default-src 'self' 'unsafe-inline' data: blob:"}

router = APIRouter(include_in_schema=False)


def under_root(request: Request, path: str) -> str:
    """``path`` as the browser must ask for it (behind a proxy that mounts the app under a prefix, as FastAPI's)."""
    return f"{request.scope.get('root_path', '').rstrip('/')}{path}"


def asset_url(request: Request, name: str) -> str:
    return under_root(request, f"{ASSETS_PATH}/{ASSETS_VERSION}/{name}")


@functools.cache
def asset_bytes(name: str) -> bytes:
    """One asset's content, read from the installed package once (2.8 MB for all four)."""
    return files(ASSETS_PACKAGE).joinpath("static", name).read_bytes()


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=under_root(request, request.app.openapi_url),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=asset_url(request, "swagger-ui-bundle.js"),
        swagger_css_url=asset_url(request, "swagger-ui.css"),
        swagger_favicon_url=asset_url(request, "favicon.png"),
        oauth2_redirect_url=under_root(request, request.app.swagger_ui_oauth2_redirect_url),
        swagger_ui_parameters=request.app.swagger_ui_parameters,
    )
    page.headers.update(SAME_ORIGIN_ONLY)
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=under_root(request, request.app.openapi_url),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=asset_url(request, "redoc.standalone.js"),
        redoc_favicon_url=asset_url(request, "favicon.png"),
        with_google_fonts=False,
    )
    page.headers.update(SAME_ORIGIN_ONLY)
    return page


@router.get(ASSETS_PATH + "/{version}/{name}")
async def asset(version: str, name: str) -> Response:
    """A file of Swagger UI or ReDoc; 404 for any other name, or another version than the installed one."""
    if version != ASSETS_VERSION or name not in ASSETS:
        raise HTTPException(404, f"no docs asset {name!r} of version {version!r}")
    return Response(asset_bytes(name), media_type=ASSETS[name], headers={"Cache-Control": CACHE_FOREVER})
