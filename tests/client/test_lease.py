"""Sessions that clean up after themselves (optserve.client.lease): a session an optimizer created without a name is
deleted when the optimizer is closed, garbage collected or the interpreter exits normally; kept with ``keep=True``,
a ``name=``, or when attached; never deleted by a forked child or a process that dies; and the server deletes the
sessions of crashed clients after OPTSERVE_SESSION_EXPIRE_SECONDS."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
import torch

from optserve.client import Client, RemoteOptimizer
from optserve.client.torch import RemoteAdamW


def params() -> dict[str, np.ndarray]:
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def grads() -> dict[str, np.ndarray]:
    return {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)}


def exists(url: str, sid: str) -> bool:
    return httpx.get(f"{url}/v1/sessions/{sid}", timeout=10).status_code == 200


def test_an_anonymous_session_is_deleted_on_close_and_a_kept_or_named_one_is_not(server) -> None:
    opt = RemoteOptimizer(params(), url=server.url, lr=0.1)
    opt.step(grads())
    sid = opt.session_id
    opt.close()
    assert not exists(server.url, sid)
    with RemoteOptimizer(params(), url=server.url, lr=0.1, keep=True) as kept:
        kept.step(grads())
    assert exists(server.url, kept.session_id)
    with RemoteOptimizer(params(), url=server.url, lr=0.1, name="named-run") as named:
        assert named.session_id == "named-run"
    assert exists(server.url, "named-run")
    with RemoteOptimizer(params(), url=server.url, session_id="named-run") as attached:
        attached.step(grads())
    assert exists(server.url, "named-run")  # attached: not ours to delete
    with RemoteOptimizer(params(), url=server.url, session_id="named-run") as attached:
        attached.close(delete=True)
    assert not exists(server.url, "named-run")
    opt = RemoteOptimizer(params(), url=server.url, lr=0.1)
    opt.close(delete=False)
    assert exists(server.url, opt.session_id)
    Client(server.url).delete_session(opt.session_id)
    Client(server.url).delete_session(kept.session_id)


def test_an_anonymous_session_is_deleted_when_its_optimizer_is_collected(server) -> None:
    opt = RemoteOptimizer(params(), url=server.url, lr=0.1)
    sid = opt.session_id
    del opt
    gc.collect()
    assert not exists(server.url, sid)
    model = torch.nn.Linear(3, 2)
    remote = RemoteAdamW(model.parameters(), url=server.url)
    scheduler = torch.optim.lr_scheduler.StepLR(remote, 1)  # a scheduler holds the optimizer: a cycle
    sid = remote.session_id
    twin = copy.deepcopy(remote)  # its own session
    twin_sid = twin.session_id
    del remote, scheduler, twin
    gc.collect()
    assert not exists(server.url, sid) and not exists(server.url, twin_sid)


SCRIPT = textwrap.dedent(
    """
    import os, sys, numpy as np, torch
    from optserve.client import RemoteOptimizer
    from optserve.client.torch import RemoteSGD
    url, how = sys.argv[1], sys.argv[2]
    opt = RemoteOptimizer({"w": np.zeros(2, np.float32)}, url=url, lr=0.1)
    drop_in = RemoteSGD(torch.nn.Linear(2, 1).parameters(), url=url, lr=0.1)
    print(opt.session_id, drop_in.session_id, flush=True)
    if how == "fork":
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a child exiting normally (a data loader worker): must not delete its parent's sessions
        os.waitpid(pid, 0)
        print("forked", flush=True)
        sys.stdin.readline()  # the parent waits here while the test checks
    elif how == "crash":
        os._exit(3)  # no normal exit: nothing can be deleted (the server's expiry will)
    """
)


@pytest.mark.parametrize("how", ["exit", "crash", "fork"])
def test_sessions_and_interpreter_exit(server, how: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, server.url, how], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        sids = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert len(sids) == 2
        if how == "fork":
            assert proc.stdout.readline().strip() == "forked"  # type: ignore[union-attr]
            assert all(exists(server.url, sid) for sid in sids), "a forked child deleted its parent's session"
            proc.stdin.write("\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    if how == "crash":
        assert all(exists(server.url, sid) for sid in sids)
        for sid in sids:
            Client(server.url).delete_session(sid)
    else:
        assert not any(exists(server.url, sid) for sid in sids), f"left behind after a normal exit ({how})"


def test_the_server_deletes_sessions_idle_for_the_expiry(tmp_path, launch) -> None:  # type: ignore[no-untyped-def]
    server = launch(
        tmp_path / "data", {"OPTSERVE_SESSION_EXPIRE_SECONDS": "1.5", "OPTSERVE_SESSION_TTL_SECONDS": "0.3"}
    )
    client = Client(server.url)
    busy = client.create_session(params(), "sgd", hyperparams={"lr": 0.1})["id"]
    idle = client.create_session(params(), "sgd", hyperparams={"lr": 0.1})["id"]  # evicted to disk, then expired
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        client.step(busy, grads())
        time.sleep(0.2)
    listed = [s["id"] for s in client.list_sessions()]
    assert busy in listed and idle not in listed
    assert not (tmp_path / "data" / "sessions" / f"{idle}.safetensors").exists()
    assert httpx.get(f"{server.url}/v1/sessions/{idle}").status_code == 404
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "optserve_sessions_expired_total 1.0" in metrics
    assert "optserve_session_evictions_total" in metrics
