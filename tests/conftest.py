"""Shared fixtures: a real uvicorn server in a thread (for tests that also look inside it) and a real
``optserve serve`` process (for end-to-end tests), both on free loopback ports."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from optserve.service.embedded import EmbeddedServer, free_port, serve_in_thread, wait_healthy


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local single-node Ray cluster for this test process (the driver): every Ray process on 127.0.0.1, its
    files under a short temporary folder (socket paths are length-limited), stopped at the end."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: else it binds the machine's IP
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="r", dir="/tmp"))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A real uvicorn server running the app in a background thread of this process."""
    with serve_in_thread(tmp_path_factory.mktemp("data")) as embedded:
        yield embedded


@pytest.fixture
def http(server: EmbeddedServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path


def start_server_process(
    data_dir: Path,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    log_level: str = "warning",
    port: int | None = None,
    timeout: float = 60.0,
) -> ServerProcess:
    """``optserve serve`` as its own process (the console script of this environment) on ``port`` (a free one by
    default); its output goes to ``log`` when given (and is shown if the server does not come up)."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("optserve")
    cmd = [str(exe), "serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", log_level]
    with open(log, "wb") if log is not None else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=timeout, alive=lambda: proc.poll() is None)
    except Exception as e:
        stop_server_process(proc)
        if log is not None:
            raise AssertionError(f"server did not come up: {e}\n{log.read_text(errors='replace')}") from e
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
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off: pooled buffers must come back through reference counts alone."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class Server:
    """A server process started by :func:`launch`, with its log file."""

    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``optserve serve`` on a free port with its output in a log file; every process started is stopped (by
    pid) at the end of the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        data_dir: Path, env: dict[str, str] | None = None, log_level: str = "warning", port: int | None = None
    ) -> Server:
        log = tmp_path / f"server-{next(_log_numbers)}.log"
        sp = start_server_process(data_dir, env, log=log, log_level=log_level, port=port, timeout=180)
        procs.append(sp.proc)
        return Server(sp.url, sp.proc, data_dir, log)

    try:
        yield start
    finally:
        for proc in procs:
            stop_server_process(proc)


_log_numbers = itertools.count()


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = start_server_process(tmp_path / "data")
    yield sp
    stop_server_process(sp.proc)
