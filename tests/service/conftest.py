"""The HTTP suite runs against every store: the ``server`` fixture here is parametrized over ``memory`` (sessions in
the server's process) and ``ray`` (sessions on session-host actors of a local Ray cluster, behind the same HTTP
front), so every test of this folder that uses it, directly or through ``http``, runs on both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from stores import ray_settings

from optserve.service.embedded import EmbeddedServer, serve_in_thread

STORES = ["memory", "ray"]


@pytest.fixture(scope="session", params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def server(
    request: pytest.FixtureRequest, store_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    """A real uvicorn server in a thread of this process, on the store of ``store_kind``."""
    data_dir = tmp_path_factory.mktemp("data")
    if store_kind == "memory":
        with serve_in_thread(data_dir) as embedded:
            yield embedded
        return
    with serve_in_thread(settings=ray_settings(request, data_dir), start_timeout=300) as embedded:
        try:
            yield embedded
        finally:
            embedded.store.destroy()  # type: ignore[attr-defined]
