"""``/docs`` and ``/redoc`` in a real browser without internet, as on most training clusters: Debian's Chromium,
headless, driven by Playwright (its own browser download is never used), with every request to another host refused.
Each page must render the API's list of operations from assets this server serves, with auth on (the docs need no
key).

Chromium comes from Debian's ``chromium`` package (``make install-test`` installs it when run as root). Without it
these tests fail, unless ``OPTSERVE_SKIP_BROWSER_TESTS=1`` says to skip them; ``OPTSERVE_CHROMIUM`` names another
binary.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from optserve.service.embedded import EmbeddedServer, serve_in_thread
from optserve.service.settings import Settings

pytestmark = pytest.mark.server

CHROMIUM = Path(os.environ.get("OPTSERVE_CHROMIUM", "/usr/bin/chromium"))
# What Chromium needs on these machines (root, no GPU, a closed network); Playwright adds --headless and starts it
# with a new empty profile. The resolver rule is a second fence behind the request filter below: no name but the
# server's resolves, so not even Chromium's own background requests leave the machine.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
RENDER_TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("OPTSERVE_SKIP_BROWSER_TESTS") == "1":
            pytest.skip(f"no Chromium at {CHROMIUM} (OPTSERVE_SKIP_BROWSER_TESTS=1)")
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's package (`apt-get install chromium`; `make install-test` "
            "does it when run as root), point OPTSERVE_CHROMIUM at a binary, or skip with "
            "OPTSERVE_SKIP_BROWSER_TESTS=1",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("docs"), api_key="docs-browser-test-key")
    with serve_in_thread(settings=settings) as server:
        yield server


@dataclass
class OfflinePage:
    """A page whose requests to other hosts are refused, with a record of every attempt."""

    page: Page
    off_host: list[str] = field(default_factory=list)  # requests to another host: refused by the filter
    refused_by_policy: list[str] = field(default_factory=list)  # refused by the page's own CSP, before any request
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page

    def open(self, url: str) -> None:
        """Load ``url`` (its scripts and styles loaded or refused); fail at once if it needed another host."""
        self.page.goto(url)
        self.assert_nothing_left_the_machine()

    def assert_nothing_left_the_machine(self) -> None:
        assert self.off_host == [], f"the page asked other hosts for {self.off_host}"
        assert self.errors == [], f"errors in the page: {self.errors}"


@pytest.fixture
def offline(browser: Browser, docs_server: EmbeddedServer) -> Iterator[OfflinePage]:
    server_host = urlsplit(docs_server.url).hostname
    context = browser.new_context()
    offline = OfflinePage(context.new_page())

    def only_the_server(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == server_host:
            route.continue_()
        else:
            offline.off_host.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", only_the_server)
    offline.page.on("pageerror", lambda error: offline.errors.append(str(error)))
    offline.page.on(
        "console",
        lambda message: offline.refused_by_policy.append(message.text) if "Content Security Policy" in message.text
        else None,
    )  # fmt: skip
    try:
        yield offline
    finally:
        context.close()


def operations(server: EmbeddedServer) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> summary of every operation in the server's OpenAPI document."""
    paths = server.app.openapi()["paths"]
    return {(method.upper(), path): op["summary"] for path, ops in paths.items() for method, op in ops.items()}


def test_swagger_ui_renders_every_operation_without_internet(offline: OfflinePage, docs_server: EmbeddedServer) -> None:
    expected = operations(docs_server)
    page = offline.page
    offline.open(f"{docs_server.url}/docs")
    blocks = page.locator(".opblock")
    expect(blocks.first).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(blocks).to_have_count(len(expected))
    rendered = {
        (block.locator(".opblock-summary-method").inner_text(),
         block.locator(".opblock-summary-path").get_attribute("data-path"))
        for block in blocks.all()
    }  # fmt: skip
    assert rendered == set(expected)
    create = page.locator(".opblock-post:has(.opblock-summary-path[data-path='/v1/sessions'])")
    expect(create.locator(".opblock-summary-description")).to_have_text("Create Session")
    assert offline.refused_by_policy == []
    offline.assert_nothing_left_the_machine()


def test_redoc_renders_every_operation_without_internet(offline: OfflinePage, docs_server: EmbeddedServer) -> None:
    expected = operations(docs_server)
    page = offline.page
    offline.open(f"{docs_server.url}/redoc")
    menu = page.locator("li[data-item-id*='/operation/']")  # the side menu (tags folded): one entry per operation
    expect(menu.first).to_be_attached(timeout=RENDER_TIMEOUT_MS)
    expect(menu).to_have_count(len(expected))
    entries = {
        (item.locator(".operation-type").get_attribute("type").upper(), item.get_attribute("aria-label"))
        for item in menu.all()
    }
    assert entries == {(method, summary) for (method, _), summary in expected.items()}
    headings = page.locator("[data-section-id*='/operation/'] h2")  # the operations themselves
    expect(headings).to_have_count(len(expected))
    expect(headings.filter(has_text="Create Session")).to_be_visible()
    assert set(headings.all_inner_texts()) == set(expected.values())
    # ReDoc's menu footer shows a logo from cdn.redoc.ly whatever its options: the page's policy stops it
    assert all("cdn.redoc.ly" in refusal for refusal in offline.refused_by_policy), offline.refused_by_policy
    offline.assert_nothing_left_the_machine()
