"""``optserve serve --uds PATH`` against real server processes: the Unix socket next to the TCP port, the clients
that take ``unix:///PATH``, and what happens to the socket file at start and at shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from procs import start_server_process, stop_server_process

from optserve.client import AsyncClient, Client, RemoteOptimizer
from optserve.service.embedded import free_port

pytestmark = pytest.mark.server
OPTSERVE = str(Path(sys.executable).with_name("optserve"))


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder for the socket (Linux takes at most 107 bytes of path; pytest's tmp_path can be longer)."""
    with tempfile.TemporaryDirectory(prefix="os-uds-", dir="/tmp") as d:
        yield Path(d)


def grads_for(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}


def test_steps_over_the_socket_equal_steps_over_tcp(tmp_path: Path, sock_dir: Path) -> None:
    """Twin sessions stepped with the same gradients, one over TCP, one over the Unix socket (small and 4 MB
    steps): the same parameters bit for bit; the socket is owner-only, and gone after SIGTERM."""
    path = sock_dir / "o.sock"
    sp = start_server_process(tmp_path / "data", env={"OPTSERVE_UDS": str(path)})
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for shapes in ({"w": (30, 20), "b": (20,)}, {"big": (1 << 20,)}):
            params = {k: np.random.default_rng(1).standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            with Client(sp.url) as tcp, Client(f"unix://{path}") as uds:
                a = tcp.create_session(params, "adamw", hyperparams={"lr": 1e-2})["id"]
                b = uds.create_session(params, "adamw", hyperparams={"lr": 1e-2})["id"]
                assert b in [s["id"] for s in tcp.list_sessions()]  # one server behind both
                for i in range(3):
                    grads = grads_for(params, i)
                    ra, rb = tcp.step(a, grads, if_match=i), uds.step(b, grads, if_match=i)
                    assert ra.step == rb.step == i + 1
                    assert ra.params is not None and rb.params is not None
                    for name in params:
                        np.testing.assert_array_equal(ra.params[name], rb.params[name])
                assert uds.session(b)["step"] == 3
    finally:
        stop_server_process(sp.proc)
    assert sp.proc.returncode is not None
    assert not path.exists()


def test_clients_and_optimizers_take_unix_urls(tmp_path: Path, sock_dir: Path) -> None:
    """AsyncClient and RemoteOptimizer over unix://; the optimizer's anonymous session is deleted over the socket
    when it closes; an error answer crosses as over TCP."""
    path = sock_dir / "o.sock"
    sp = start_server_process(tmp_path / "data", env={"OPTSERVE_UDS": str(path)})
    url = f"unix://{path}"
    try:
        params = {"w": np.ones(8, np.float32)}

        async def run() -> int:
            async with AsyncClient(url) as client:
                sid = (await client.create_session(params, "sgd", hyperparams={"lr": 0.5}))["id"]
                result = await client.step(sid, {"w": np.ones(8, np.float32)})
                assert result.params is not None
                np.testing.assert_array_equal(result.params["w"], np.full(8, 0.5, np.float32))
                return result.step

        assert asyncio.run(run()) == 1
        opt = RemoteOptimizer({"w": np.zeros(4, np.float32)}, url=url, optimizer="sgd", lr=1.0)
        opt.step({"w": np.ones(4, np.float32)})
        np.testing.assert_array_equal(opt.params["w"], -np.ones(4, np.float32))
        sid = opt.session_id
        with Client(sp.url) as tcp:
            assert tcp.session(sid)["step"] == 1
            opt.close()
            assert sid not in [s["id"] for s in tcp.list_sessions()]
        with Client(url) as uds, pytest.raises(Exception) as refused:
            uds.session("no-such-session")
        assert getattr(refused.value, "status", None) == 404
    finally:
        stop_server_process(sp.proc)


def test_a_stale_socket_file_is_replaced_and_anything_else_is_kept(tmp_path: Path, sock_dir: Path) -> None:
    """A socket file nobody listens on (a server that was killed) is replaced; a regular file at the path, or a
    socket a server listens on, stops the new server with a clear message and is left as it was."""
    stale = sock_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens
    sp = start_server_process(tmp_path / "a", env={"OPTSERVE_UDS": str(stale)})
    try:
        with Client(f"unix://{stale}") as client:
            assert client.list_sessions() == []
        busy = run_serve(tmp_path / "b", stale)
        assert busy.returncode != 0 and "already listens" in busy.stderr
        with Client(f"unix://{stale}") as client:  # the first server's socket still works
            assert client.list_sessions() == []
    finally:
        stop_server_process(sp.proc)
    regular = sock_dir / "file"
    regular.write_text("keep me")
    taken = run_serve(tmp_path / "c", regular)
    assert taken.returncode != 0 and "is not a socket" in taken.stderr
    assert regular.read_text() == "keep me"


def run_serve(data_dir: Path, uds: Path) -> subprocess.CompletedProcess[str]:
    """``optserve serve --uds`` expected to stop at once (bounded by a timeout)."""
    cmd = [OPTSERVE, "serve", "--port", str(free_port()), "--uds", str(uds), "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_a_unix_url_without_a_path_is_refused() -> None:
    with pytest.raises(ValueError, match="names no socket"):
        Client("unix://")


def test_the_direct_step_sends_the_clients_default_headers(tmp_path: Path) -> None:
    """Steps skip httpx's request objects on the client's own transport; the request is still the one httpx
    would send: a bearer token given as a default header opens the session (401 without it)."""
    key = "k" * 32
    sp = start_server_process(tmp_path / "data", env={"OPTSERVE_API_KEY": key})
    try:
        params = {"w": np.zeros(3, np.float32)}
        with Client(sp.url, headers={"Authorization": f"Bearer {key}"}) as client:
            sid = client.create_session(params, "sgd", hyperparams={"lr": 1.0})["id"]
            result = client.step(sid, {"w": np.ones(3, np.float32)})
            assert result.step == 1
        with Client(sp.url) as anonymous, pytest.raises(Exception) as refused:
            anonymous.step(sid, {"w": np.ones(3, np.float32)})
        assert getattr(refused.value, "status", None) == 401
        with httpx.Client(base_url=sp.url, headers={"Authorization": f"Bearer {key}"}) as raw:
            assert raw.get(f"/v1/sessions/{sid}").json()["step"] == 1  # the refused step changed nothing
    finally:
        stop_server_process(sp.proc)
