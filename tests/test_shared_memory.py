"""Steps through shared memory over the server's Unix socket (``optserve.client.shm``), against real server
processes: the same answers as the bytes over the socket, what the server refuses to map (and that a refusal
changes nothing), and the client's fallback to bytes when the server cannot open its buffers (a server with a
``/dev/shm`` of its own, as in another container)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from procs import ServerProcess, poll, start_server_process, stop_server_process

from optserve.client import Client, wire
from optserve.client.http import _Shared
from optserve.client.shm import SHM_DIR, SHM_MIN, Segments

pytestmark = pytest.mark.server
BIG = {"w": (1 << 18, 2), "b": (1 << 17,), "c": (7,)}  # 2.5 MB of float32: above SHM_MIN


def arrays(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    """A server process with a Unix socket next to its TCP port (in a short folder: Linux's 107-byte limit)."""
    with tempfile.TemporaryDirectory(prefix="os-shm-", dir="/tmp") as d:
        path = Path(d) / "o.sock"
        sp = start_server_process(
            tmp_path / "data", env={"OPTSERVE_UDS": str(path), "OPTSERVE_MAX_BODY_BYTES": "8000000"}
        )
        try:
            yield sp, path
        finally:
            stop_server_process(sp.proc)


def test_large_steps_go_through_shared_memory_and_answer_what_the_socket_answers(
    server: tuple[ServerProcess, Path],
) -> None:
    """Twin sessions, one stepped through shared memory, one with its bytes over the same socket: bit-equal
    parameters at every step (plain, partial, with a bfloat16 answer, a replayed retry); the answers of the shared
    client after the first lie in its own shared memory, and no buffer file outlives the client. A buffer left by
    a client that died is removed when this process first takes shared memory."""
    sp, path = server
    params = arrays(BIG, 0)
    url = f"unix://{path}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    leaked = os.path.join(SHM_DIR, f"optserve-{dead.pid}-{'0' * 16}-1")  # a buffer of a client that died
    with open(leaked, "wb") as f:
        f.write(b"x")
    _Shared.swept = False  # this test process may have swept already
    mine = f"optserve-{os.getpid()}-"

    def my_files() -> set[str]:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(mine)}

    before = my_files()
    with Client(url) as shared, Client(url, shared_memory=False) as plain:
        a = shared.create_session(params, "adamw", hyperparams={"lr": 1e-2, "weight_decay": 0.1})["id"]
        b = plain.create_session(params, "adamw", hyperparams={"lr": 1e-2, "weight_decay": 0.1})["id"]
        assert shared._direct is not None and shared._direct.shared is not None
        assert not os.path.exists(leaked)  # swept when the first client of this process took shared memory
        segments = shared._direct.shared.segments
        steps: list[dict[str, Any]] = [
            {},
            {},
            {"partial": True, "only": ["w", "c"]},
            {"answer_dtype": "bfloat16"},
            {"replay": True},
            {},
        ]
        step = 0
        for i, options in enumerate(steps):
            grads = arrays(BIG, 10 + i)
            if "only" in options:
                grads = {k: grads[k] for k in options["only"]}
            kwargs = {k: v for k, v in options.items() if k in ("partial", "answer_dtype")}
            replay = bool(options.get("replay"))
            key = f"key-{i - 1 if replay else i}"
            at = step - replay
            ra = shared.step(a, grads, idempotency_key=key, if_match=at, **kwargs)
            rb = plain.step(b, grads, idempotency_key=key, if_match=at, **kwargs)
            assert ra.step == rb.step and ra.replayed == rb.replayed == bool(options.get("replay"))
            assert ra.params is not None and rb.params is not None
            for name in params:
                np.testing.assert_array_equal(ra.params[name], rb.params[name])
            assert ra.body is not None
            in_shared = segments.find(ra.body.data) is not None
            # the first step teaches the client that the server takes shared memory, and the answer's size; a
            # bfloat16 answer is converted from the parameters and comes as bytes
            assert in_shared == (i > 0 and "answer_dtype" not in options), (i, options)
            step = ra.step
            ra.release()
            rb.release()
        assert shared.session(a)["step"] == plain.session(b)["step"] == 5
        small = {"s": np.ones(8, np.float32)}
        c = shared.create_session(small, "sgd", hyperparams={"lr": 0.5})["id"]
        for _ in range(2):
            r = shared.step(c, small)
            assert r.body is not None and segments.find(r.body.data) is None  # below 1 MiB: bytes
        np.testing.assert_array_equal(r.params["s"], np.zeros(8, np.float32))  # type: ignore[index]
    assert my_files() <= before  # the client's buffers are removed with it
    # and the server, which mapped them, drops its maps soon after (a map would keep their memory)
    maps = Path(f"/proc/{sp.proc.pid}/maps")
    assert poll(lambda: "/dev/shm/optserve-" not in maps.read_text(), timeout=5.0), maps.read_text()


def raw_step(client: httpx.Client, session_id: str, headers: dict[str, str], content: bytes = b"") -> httpx.Response:
    base = {"content-type": wire.SAFETENSORS, "accept": wire.SAFETENSORS, "if-match": '"0"'}
    return client.post(f"/v1/sessions/{session_id}/step", headers={**base, **headers}, content=content)


def ref(segments: Segments, buffer: np.ndarray, size: int | None = None) -> str:
    found = segments.find(buffer)
    assert found is not None
    return f"{found['name']} {found['offset']} {size if size is not None else found['size']}"


def test_what_the_server_will_not_map_is_refused_and_changes_nothing(server: tuple[ServerProcess, Path]) -> None:
    """Over TCP, shared memory is refused (and never offered); over the socket: names not of optserve's form,
    missing files, links, files of another user, ranges past the buffer, a body sent as well, JSON, a body above
    the limit, a malformed or non-finite body. Each refusal is problem+json with its status, and the session stays
    at step 0 with its parameters. Then the same request, well formed, is applied once, its parameters written
    into the answer buffer and only the header sent."""
    sp, path = server
    params = arrays(BIG, 1)
    grads = arrays(BIG, 2)
    body = wire.encode(grads)
    segments = Segments()

    kept: list[np.ndarray] = []  # a buffer's file is removed when the buffer is freed

    def shared(data: bytes) -> np.ndarray:
        buffer = segments.make(len(data))
        buffer[:] = np.frombuffer(data, np.uint8)
        kept.append(buffer)
        return buffer

    buffer = shared(body)
    answer = segments.make(4 * sum(v.size for v in params.values()))
    good = ref(segments, buffer)
    name = good.split(" ")[0]
    made: list[str] = []

    def alias(kind: str, pid: int | None = None) -> str:
        """Another file of optserve's name form in /dev/shm: a link to the buffer, a copy, a copy owned by nobody
        (named for this process, unless ``pid``)."""
        other = f"optserve-{pid or os.getpid()}-{'f' * 16}-{len(made) + 1}"
        target = os.path.join(SHM_DIR, other)
        if kind == "link":
            os.symlink(os.path.join(SHM_DIR, name), target)
        else:
            shutil.copyfile(os.path.join(SHM_DIR, name), target)
            if kind == "owner":
                os.chown(target, 65534, 65534)
        made.append(target)
        return f"{other} 0 {len(body)}"

    nan = wire.encode({**grads, "c": np.full(7, np.nan, np.float32)})
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({"optserve-shm-body": f"passwd 0 {len(body)}"}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": "three fields only"}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": f"optserve-{os.getpid()}-{'0' * 16}-1 0 8"}, b"", 400, "shared-memory-unavailable"),
        ({"optserve-shm-body": alias("link")}, b"", 400, "shared-memory-unavailable"),
        ({"optserve-shm-body": alias("copy", pid=1)}, b"", 400, "shared-memory-unavailable"),  # not the sender's
        ({"optserve-shm-body": good, "optserve-shm-answer": good}, b"", 400, "malformed-request"),  # overlapping
        ({"optserve-shm-body": f"optserve-{'9' * 5000}-{'0' * 16}-1 0 8"}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": f"{name} {'9' * 5000} 8"}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": ref(segments, buffer, len(body) + 1)}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": good}, b"xy", 400, "malformed-request"),
        ({"optserve-shm-body": good, "content-type": wire.JSON}, b"", 400, "malformed-request"),
        ({"optserve-shm-body": ref(segments, shared(b"\x00" * 8_000_001))}, b"", 413, "payload-too-large"),
        ({"optserve-shm-body": ref(segments, shared(b"\xff" * SHM_MIN))}, b"", 400, "malformed-body"),
        ({"optserve-shm-body": ref(segments, shared(nan))}, b"", 422, "non-finite-gradient"),
    ]
    if os.geteuid() == 0:  # only root can give a file away
        cases.append(({"optserve-shm-body": alias("owner")}, b"", 400, "shared-memory-unavailable"))
    tcp = httpx.Client(base_url=sp.url)
    uds = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://localhost")
    try:
        with Client(sp.url) as client, tcp, uds:
            sid = client.create_session(params, "adamw")["id"]
            twin = client.create_session(params, "adamw")["id"]
            refused = raw_step(tcp, sid, {"optserve-shm-body": good, "optserve-shm-answer": ref(segments, answer)})
            assert refused.status_code == 400, refused.text
            assert refused.json()["type"].endswith(":shared-memory-unavailable")
            plain = raw_step(tcp, twin, {}, body)
            assert plain.status_code == 200 and "optserve-shm" not in plain.headers  # not offered over TCP
            lone = raw_step(uds, sid, {"optserve-shm-answer": ref(segments, answer)}, body)
            assert lone.status_code == 400 and lone.json()["type"].endswith(":malformed-request")
            for headers, content, status, slug in cases:
                answer[:] = 0
                got = raw_step(uds, sid, {"optserve-shm-answer": ref(segments, answer), **headers}, content)
                assert got.status_code == status, (headers, got.text)
                assert got.headers["content-type"] == "application/problem+json"
                assert got.json()["type"].endswith(":" + slug), (headers, got.text)
                assert not answer.any()
            step, now = client.params(sid)
            assert step == 0
            for k in params:
                np.testing.assert_array_equal(now[k], params[k])
            done = raw_step(uds, sid, {"optserve-shm-body": good, "optserve-shm-answer": ref(segments, answer)})
            assert done.status_code == 200 and done.headers["etag"] == '"1"', done.text
            assert done.headers["optserve-shm"] == "available"
            assert done.headers["optserve-shm-answer"] == str(len(answer))
            parsed = wire.parse(done.content, data=answer.data)  # the body is the header alone
            expected = wire.parse(plain.content).tensors()
            for k, v in parsed.tensors().items():
                np.testing.assert_array_equal(v, expected[k])
            assert client.session(sid)["step"] == 1
    finally:
        for target in made:
            os.unlink(target)
        segments.close()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_a_client_sends_bytes_when_the_server_cannot_open_its_shared_memory(tmp_path: Path) -> None:
    """The server in a mount namespace with a /dev/shm of its own (as in another container that shares only the
    socket's folder): it offers shared memory, cannot open the client's buffers, and refuses; the client sends
    the bytes from then on, and its steps equal a twin's over TCP."""
    with tempfile.TemporaryDirectory(prefix="os-shm-", dir="/tmp") as d:
        path = Path(d) / "o.sock"
        own_shm = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "sh"]
        sp = start_server_process(tmp_path / "data", env={"OPTSERVE_UDS": str(path)}, prefix=own_shm)
        try:
            params = arrays(BIG, 4)
            with Client(f"unix://{path}") as near, Client(sp.url) as tcp:
                a = near.create_session(params, "adamw")["id"]
                b = tcp.create_session(params, "adamw")["id"]
                assert near._direct is not None and near._direct.shared is not None
                offered = []
                for i in range(4):
                    grads = arrays(BIG, 20 + i)
                    ra, rb = near.step(a, grads, if_match=i), tcp.step(b, grads, if_match=i)
                    offered.append(near._direct.shared.offered)
                    assert ra.step == rb.step == i + 1 and ra.params is not None and rb.params is not None
                    for k in params:
                        np.testing.assert_array_equal(ra.params[k], rb.params[k])
                # offered by the first answer, refused at the second step (sent again as bytes), then off
                assert offered == [True, False, False, False]
                assert near.session(a)["step"] == 4
        finally:
            stop_server_process(sp.proc)


def test_a_process_cannot_name_the_buffers_of_another(server: tuple[ServerProcess, Path]) -> None:
    """Another process of the same user, on the same socket, names this client's buffers (body and answer) for a
    session of its own: refused as not its buffers (the kernel tells the server who is at the other end), and the
    result this client holds, which lies in its answer buffer, is untouched."""
    _, path = server
    params = arrays(BIG, 5)
    with Client(f"unix://{path}") as client:
        victim = client.create_session(params, "sgd", hyperparams={"lr": 0.1})["id"]
        other = client.create_session(params, "sgd", hyperparams={"lr": 0.1})["id"]
        client.step(victim, arrays(BIG, 6)).release()  # teaches the client the answer's size
        held = client.step(victim, arrays(BIG, 7))
        assert client._direct is not None and client._direct.shared is not None and held.body is not None
        segments = client._direct.shared.segments
        answer = segments.find(held.body.data)
        assert answer is not None
        before = {k: v.copy() for k, v in held.params.items()}  # type: ignore[union-attr]
        body = segments.make(len(wire.encode(params)))
        body[:] = np.frombuffer(wire.encode(arrays(BIG, 8)), np.uint8)
        refs = [ref(segments, body), f"{answer['name']} {answer['offset']} {answer['size']}"]
        script = (
            "import sys, httpx\n"
            "c = httpx.Client(transport=httpx.HTTPTransport(uds=sys.argv[1]), base_url='http://localhost')\n"
            "r = c.post(f'/v1/sessions/{sys.argv[2]}/step', headers={'content-type': sys.argv[5], "
            "'optserve-shm-body': sys.argv[3], 'optserve-shm-answer': sys.argv[4]})\n"
            "print(r.status_code, r.json()['type'])\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script, str(path), other, *refs, wire.SAFETENSORS],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.stdout.split() == ["400", "urn:optserve:problem:shared-memory-unavailable"], run.stderr
        for k, v in before.items():
            np.testing.assert_array_equal(held.params[k], v)  # type: ignore[index]
        assert client.session(other)["step"] == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_the_torch_drop_in_trains_through_shared_memory_as_torch_does(
    server: tuple[ServerProcess, Path], overlap: bool
) -> None:
    """RemoteAdamW over unix:// on a 2.4 MB model, against torch.optim.AdamW stepping the same gradients: its steps
    go through shared memory (after the first) and end at torch's parameters, exact steps and overlapped ones (the
    gradients are then computed at parameters one step old; torch steps with those same gradients)."""
    torch = pytest.importorskip("torch")
    from optserve.client.torch import RemoteAdamW

    _, path = server
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(700, 800), torch.nn.Tanh(), torch.nn.Linear(800, 40))
    twin = [p.detach().clone() for p in model.parameters()]
    remote = RemoteAdamW(model.parameters(), lr=1e-3, weight_decay=0.1, url=f"unix://{path}", overlap=overlap)
    local = torch.optim.AdamW(twin, lr=1e-3, weight_decay=0.1)
    x, y = torch.randn(64, 700), torch.randn(64, 40)
    try:
        for _ in range(6):
            remote.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for p, q in zip(model.parameters(), twin):
                q.grad = p.grad.clone()
            remote.step()
            local.step()
        remote.synchronize()
        for p, q in zip(model.parameters(), twin):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
        shared = remote.client._direct.shared
        assert shared is not None and shared.offered and not shared.refused and shared.answers
        assert len(shared.segments._by_address) >= 2  # a body and an answer buffer: steps went that way
    finally:
        remote.close(delete=True)


def test_a_forked_child_leaves_its_parents_buffers_alone() -> None:
    """A child forked while a buffer exists exits (its finalizers run): the parent's buffer file is still there,
    and removed when the parent frees it."""
    script = (
        "import os, sys\n"
        "from optserve.client.shm import SHM_DIR, SHM_MIN, Segments\n"
        "segments = Segments()\n"
        "buffer = segments.make(SHM_MIN)\n"
        "name = segments.find(buffer)['name']\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    segments.close()\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(os.path.exists(os.path.join(SHM_DIR, name)))\n"
        "del buffer\n"
        "print(os.path.exists(os.path.join(SHM_DIR, name)))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["True", "False"], run.stderr
