"""Shared fixtures: a real uvicorn server in a thread (for tests that also look inside it) and a real
``optserve serve`` process (for end-to-end tests), both on free loopback ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from optserve.service.app import create_app
from optserve.service.settings import Settings
from optserve.service.store import MemoryStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


@dataclass
class InProcessServer:
    url: str
    app: FastAPI
    store: MemoryStore


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A real uvicorn server running the app in a background thread of this process."""
    store = MemoryStore()
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")), store=store)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield InProcessServer(url, app, store)
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def http(server: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path


def start_server_process(data_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """``optserve serve`` as its own process (the console script of this environment)."""
    port = free_port()
    exe = Path(sys.executable).with_name("optserve")
    cmd = [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc)
    except Exception:
        stop_server_process(proc)
        raise
    return ServerProcess(url, proc, data_dir)


def stop_server_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop by process id: SIGTERM, then SIGKILL if it does not exit within 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = start_server_process(tmp_path / "data")
    yield sp
    stop_server_process(sp.proc)
