"""The docs pages and their assets, in-process: everything they load comes from this server, with no key needed.

That they render in a browser with no internet is tests/test_docs_browser.py's part.
"""

from __future__ import annotations

import asyncio
import re
from importlib.resources import files
from pathlib import Path

import httpx

from optserve.service import docs
from optserve.service.app import create_app
from optserve.service.observability import DOCS_ASSETS, route_of
from optserve.service.settings import Settings
from optserve.service.store import MemoryStore

PAGES = ["/docs", "/redoc"]


def get(data_dir: Path, paths: list[str], api_key: str | None = None, root_path: str = "") -> list[httpx.Response]:
    app = create_app(Settings(data_dir=data_dir, api_key=api_key), store=MemoryStore())

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://optserve") as c:
            return [await c.get(p) for p in paths]

    return asyncio.run(run())


def loaded_urls(html: str) -> list[str]:
    """What a page loads: its src/href attributes and the spec URLs in its scripts."""
    return re.findall(r'(?:src|href|spec-url)="([^"]*)"', html) + re.findall(r"url: '([^']*)'", html)


def test_the_pages_load_only_from_this_server_and_forbid_other_hosts(tmp_path: Path) -> None:
    for page in get(tmp_path, PAGES):
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        urls = loaded_urls(page.text)
        assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
        assert any(u.startswith(f"/docs/assets/{docs.ASSETS_VERSION}/") for u in urls)
        assert "googleapis" not in page.text and "cdn." not in page.text
        assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_assets_are_the_packages_files_cached_for_good_and_nothing_else(tmp_path: Path) -> None:
    names = list(docs.ASSETS)
    answers = get(tmp_path, [f"/docs/assets/{docs.ASSETS_VERSION}/{n}" for n in names])
    for name, r in zip(names, answers):
        assert r.status_code == 200, name
        assert r.content == files("fastapi_offline").joinpath("static", name).read_bytes()
        assert r.headers["content-type"] == docs.ASSETS[name]
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    others = get(
        tmp_path,
        ["/docs/assets/0.0.1/swagger-ui.css", f"/docs/assets/{docs.ASSETS_VERSION}/core.py",
         f"/docs/assets/{docs.ASSETS_VERSION}/..%2F__init__.py", "/docs/assets/swagger-ui.css"]
    )  # fmt: skip
    assert [r.status_code for r in others] == [404] * 4
    assert all(r.headers["content-type"] == "application/problem+json" for r in others)


def test_with_auth_on_the_docs_and_the_openapi_document_need_no_key(tmp_path: Path) -> None:
    paths = [*PAGES, "/docs/oauth2-redirect", "/openapi.json"]
    paths += [f"/docs/assets/{docs.ASSETS_VERSION}/{n}" for n in docs.ASSETS]
    answers = get(tmp_path, [*paths, "/v1/sessions"], api_key="admin-secret")
    assert [r.status_code for r in answers] == [200] * len(paths) + [401]


def test_behind_a_path_prefix_the_pages_ask_under_it(tmp_path: Path) -> None:
    for page in get(tmp_path, PAGES, root_path="/optserve"):
        urls = loaded_urls(page.text)
        assert urls and all(u.startswith("/optserve/") for u in urls), urls


def test_the_docs_routes_stay_out_of_the_openapi_document_and_share_one_metrics_label(tmp_path: Path) -> None:
    (document,) = get(tmp_path, ["/openapi.json"])
    assert not [p for p in document.json()["paths"] if p.startswith(("/docs", "/redoc"))]
    assert route_of(f"/docs/assets/{docs.ASSETS_VERSION}/swagger-ui-bundle.js") == DOCS_ASSETS
    assert route_of("/docs/assets/" + "x/" * 50) == DOCS_ASSETS
    assert route_of("/docs") == "/docs" and route_of("/redoc") == "/redoc"
