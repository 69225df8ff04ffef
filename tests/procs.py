"""Server processes for end-to-end tests: ``optserve serve`` started on free loopback ports and stopped by pid.

Imported by the tests as ``procs`` (not from ``conftest``: two conftest modules share that name)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from optserve.service.embedded import free_port, wait_healthy


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
    prefix: list[str] | None = None,
) -> ServerProcess:
    """``optserve serve`` as its own process (the console script of this environment) on ``port`` (a free one by
    default); its output goes to ``log`` when given (and is shown if the server does not come up). ``prefix`` is a
    command that runs it (and execs it, so that the process id is the server's)."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("optserve")
    cmd = [
        *(prefix or []),
        str(exe),
        "serve",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
    ]
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


@dataclass
class Server:
    """A server process started by :func:`launch`, with its log file."""

    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):\d+$")


def listening(pids: set[int]) -> list[str]:
    """The listening TCP sockets of ``pids`` (lines of ``ss -ltnpH``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]


def with_environment(marker: str) -> set[int]:
    """The processes whose environment holds ``marker`` (``NAME=value``): a Ray's processes, by its RAY_TMPDIR."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read().split(b"\0"):
                        pids.add(int(entry))
            except OSError:
                continue
    return pids
