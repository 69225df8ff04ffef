"""A Ray started on this machine listens on loopback only: Ray's ports take no credentials, so a Ray bound to the
machine's address would run anyone's code. Both Rays this project starts on its own are checked with ``ss -ltnp``:
the test process's (the Ray-store suite runs on it) and the one ``optserve serve`` starts with the ray store and no
address to join."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from procs import LOOPBACK, listening, poll, start_server_process, stop_server_process, with_environment

from optserve.client import Client

pytestmark = pytest.mark.server


def assert_loopback_only(pids: set[int]) -> None:
    ours = listening(pids)
    assert ours, "no listening socket of Ray's processes found"
    for line in ours:
        assert LOOPBACK.match(line.split()[3]), line


def test_the_test_process_ray_listens_on_loopback_only(ray_cluster: None) -> None:
    import ray

    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process up, with its own ports
    assert_loopback_only(with_environment(f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}") | {os.getpid()})


def test_a_fronts_own_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    ray_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths are length-limited
    marker = f"RAY_TMPDIR={ray_dir}"
    env = {"OPTSERVE_STORE": "ray", "RAY_TMPDIR": ray_dir, "OPTSERVE_RAY_ADDRESS": "", "RAY_ADDRESS": ""}
    server = start_server_process(tmp_path / "data", env=env, timeout=120)
    try:
        with Client(server.url) as client:  # the Ray store serving: its session host actors are up
            sid = client.create_session({"w": np.ones(4, np.float32)}, "adamw")["id"]
            client.step(sid, {"w": np.ones(4, np.float32)})
        assert_loopback_only(with_environment(marker))
    finally:
        stop_server_process(server.proc)
        for pid in with_environment(marker):  # whatever the front's Ray left behind, by process id
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert poll(lambda: not with_environment(marker), timeout=30)
