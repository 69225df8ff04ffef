"""A real optserve server on a background thread of this process: for examples, notebooks and tests.

    with serve_in_thread() as url:
        opt = RemoteOptimizer(params, url=url)

It is the same app and the same uvicorn as ``optserve serve``, bound to a free loopback port.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from .app import create_app
from .bodies import HTTP_PROTOCOL
from .settings import Settings
from .store import MemoryStore


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 30.0, alive: object = None) -> None:
    """Poll ``/healthz`` until it answers 200; ``alive`` (a callable) stops the wait early when it returns False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise RuntimeError(f"the server for {url} stopped before it was healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@dataclass
class EmbeddedServer:
    url: str
    app: FastAPI
    store: MemoryStore


@contextmanager
def serve_in_thread(
    data_dir: str | Path | None = None,
    port: int = 0,
    settings: Settings | None = None,
    start_timeout: float = 30.0,
    **uvicorn_options: Any,
) -> Iterator[EmbeddedServer]:
    """Run a server on 127.0.0.1 (a free port unless ``port``) until the block exits.

    Without ``settings`` the sessions live in memory only; with them (``data_dir`` then comes from the settings)
    the app is exactly what ``optserve serve`` runs, snapshots included. ``uvicorn_options`` override the
    uvicorn configuration (``log_level``, ``access_log``, ``log_config``).
    """
    with tempfile.TemporaryDirectory(prefix="optserve-") as tmp:
        if settings is None:
            store = MemoryStore()
            app = create_app(Settings(data_dir=Path(data_dir or tmp)), store=store)
        else:
            app = create_app(settings)
            store = app.state.service.store
        port = port or free_port()
        options = {"log_level": "warning", "access_log": False, **uvicorn_options}
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=HTTP_PROTOCOL, **options))
        thread = threading.Thread(target=server.run, name="optserve-embedded", daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, timeout=start_timeout, alive=thread.is_alive)
            yield EmbeddedServer(url, app, store)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
