"""Shared fixtures: a real uvicorn server in a thread (for tests that also look inside it) and a real
``optserve serve`` process (for end-to-end tests), both on free loopback ports."""

from __future__ import annotations

import gc
import itertools
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from procs import Server, ServerProcess, start_server_process, stop_server_process

from optserve.service.embedded import EmbeddedServer, serve_in_thread

# Before any test module imports Ray (one does at collection): else Ray binds the machine's address, not 127.0.0.1
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local single-node Ray cluster for this test process (the driver): every Ray process on 127.0.0.1, its
    files under a short temporary folder (socket paths are length-limited), stopped at the end."""
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="r", dir="/tmp"))
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
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


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    sp = start_server_process(tmp_path / "data")
    yield sp
    stop_server_process(sp.proc)
