"""Large request and response bodies without copies (:mod:`optserve.service.bodies`).

Over real HTTP against the in-process uvicorn server (which runs :class:`LargeBodyProtocol`): large steps, large
creates, chunked uploads, truncated uploads, ``Expect: 100-continue``, and request bodies and answers whose buffers
come from ``POOL`` and are reused once nothing references them. Expected parameters come from
:mod:`optserve.service.reference` and must agree bit for bit. ``BufferPool`` (shared with the client) and
``BufferResponse`` (with a fake ASGI ``send``) are also tested on their own.

Sizes: 600_000 float32 (2.4 MB) is above the 1 MiB threshold of the large-body path and quick to step.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import numpy as np
import pytest

from optserve.client import Client, RemoteOptimizer, wire
from optserve.client.buffers import BufferPool
from optserve.service import bodies, reference
from optserve.service.bodies import POOL, BufferResponse
from optserve.service.embedded import EmbeddedServer
from optserve.service.hyperparams import make_hyperparams
from optserve.service.session import Session, SessionConfig
from optserve.service.store import MemoryStore

ST = wire.SAFETENSORS
N = 600_000  # 2.4 MB of float32: the large-body path (>= 1 MiB) without slowing the tests down
HP = {"lr": 1e-2, "weight_decay": 0.05}
STEPS = 20


# --- helpers -------------------------------------------------------------------------------------------------------


def make_params(seed: int, n: int = N) -> dict[str, np.ndarray]:
    """Two tensors, deliberately not in alphabetical order; ``w`` is the large one."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal((3, 5)).astype(np.float32)}


def make_grads(params: Mapping[str, np.ndarray], seed: int, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, k])
    return {name: rng.standard_normal(p.shape).astype(np.float32) for name, p in params.items()}


class Reference:
    """The oracle: ``reference.step`` applied tensor by tensor (one parameter group)."""

    def __init__(self, params: Mapping[str, np.ndarray], optimizer: str = "adamw", hyperparams: Any = None) -> None:
        self.optimizer = optimizer
        self.hp = make_hyperparams(optimizer, HP if hyperparams is None else hyperparams)
        self.params = {n: p.copy() for n, p in params.items()}
        self.state = {n: {s: np.zeros_like(p) for s in self.hp.state_names()} for n, p in params.items()}
        self.t = 0

    def step(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.t += 1
        for n, p in self.params.items():
            self.params[n], self.state[n] = reference.step(self.optimizer, p, grads[n], self.state[n], self.t, self.hp)
        return {n: p.copy() for n, p in self.params.items()}


def assert_equal_tensors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], what: str = "") -> None:
    assert list(got) == list(want), (what, list(got), list(want))
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == np.float32 and g.shape == w.shape, (what, name, g.dtype, g.shape)
        if not np.array_equal(g, w):
            bad = np.flatnonzero(g.reshape(-1) != w.reshape(-1))
            raise AssertionError(
                f"{what} {name}: {bad.size} of {w.size} values differ (indices {bad[0]}..{bad[-1]}; "
                f"got {g.reshape(-1)[bad[0]]!r}, want {w.reshape(-1)[bad[0]]!r})"
            )


def create_st(http: httpx.Client, params: Mapping[str, np.ndarray], optimizer: str = "adamw") -> str:
    """Create a session with a safetensors body (config in the metadata); returns its id."""
    config = {"optimizer": optimizer, "hyperparams": HP, "id": f"b-{uuid.uuid4().hex[:12]}"}
    body = wire.encode(params, {"config": json.dumps(config)})
    r = http.post("/v1/sessions", content=body, headers={"Content-Type": ST})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def step_http(http: httpx.Client, sid: str, grads: Mapping[str, np.ndarray]) -> httpx.Response:
    """A step with a ``bytes`` body (httpx sends it with its Content-Length)."""
    return http.post(f"/v1/sessions/{sid}/step", content=wire.encode(grads), headers={"Content-Type": ST})


def session_step(http: httpx.Client, sid: str) -> int:
    r = http.get(f"/v1/sessions/{sid}")
    assert r.status_code == 200, r.text
    return int(r.json()["step"])


def host_port(server: EmbeddedServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def step_head(sid: str, length: int, extra: str = "") -> bytes:
    return (
        f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: test\r\nContent-Type: {ST}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body from a raw socket (interim 1xx answers are returned too)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed before a complete head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if 100 <= status < 200:
        return status, headers, rest  # the caller goes on reading the final answer from ``rest``
    size = int(headers["content-length"])
    buf = bytearray(rest)
    while len(buf) < size:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(buf)} of {size} body bytes"
        buf += chunk
    return status, headers, bytes(buf[:size])


@pytest.fixture
def direct_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The Content-Length of every request the server received through the large-body path during the test."""
    sizes: list[int] = []
    original = bodies._DirectBody.__dict__["attach"].__func__

    def attach(cls: type, protocol: Any, cycle: Any, size: int) -> None:
        sizes.append(size)
        original(cls, protocol, cycle, size)

    monkeypatch.setattr(bodies._DirectBody, "attach", classmethod(attach))
    return sizes


# --- 1. large bodies through the server ----------------------------------------------------------------------------


def test_remote_optimizer_large_steps_match_reference(server: EmbeddedServer, direct_sizes: list[int]) -> None:
    params = make_params(1)
    ref = Reference(params)
    mine = {n: p.copy() for n, p in params.items()}
    with RemoteOptimizer(mine, url=server.url, optimizer="adamw", **HP) as opt:
        create_size = direct_sizes[-1]
        for k in range(1, STEPS + 1):
            grads = make_grads(params, 1, k)
            opt.step(grads)  # copies the answer into ``mine`` and releases the receive buffer
            assert_equal_tensors(mine, ref.step(grads), f"step {k}")
            assert opt.step_count == k
    step_size = len(wire.encode(make_grads(params, 1, 1)))
    assert create_size >= 1 << 20
    assert direct_sizes.count(step_size) == STEPS  # every step body took the large-body path


def test_raw_httpx_large_steps_match_reference(http: httpx.Client, direct_sizes: list[int]) -> None:
    params = make_params(2)
    ref = Reference(params)
    sid = create_st(http, params)
    for k in range(1, STEPS + 1):
        grads = make_grads(params, 2, k)
        r = step_http(http, sid, grads)
        assert r.status_code == 200, r.text
        assert r.headers["etag"] == f'"{k}"'
        # BufferResponse: one Content-Length body, not chunked, parts in order
        assert "transfer-encoding" not in r.headers
        assert int(r.headers["content-length"]) == len(r.content)
        tensors, metadata = wire.decode(r.content)
        assert metadata["step"] == str(k)
        assert_equal_tensors(tensors, ref.step(grads), f"step {k}")
    assert direct_sizes.count(len(wire.encode(make_grads(params, 2, 1)))) == STEPS
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert_equal_tensors(wire.decode(r.content)[0], ref.params, "GET params")


def test_the_rest_of_a_large_body_is_received_straight_into_its_buffer(
    http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the route reads a large body, the connection's protocol is the sink (recv_into the body's buffer) until
    the body's last byte, then the HTTP parser again: steps on one keep-alive connection, each body mostly taken by
    the sink, all answered as the reference computes them, and a small request after them parsed as usual."""
    received: list[int] = []
    original = bodies._BodySink.buffer_updated

    def counted(self: Any, nbytes: int) -> None:
        received.append(nbytes)
        original(self, nbytes)

    monkeypatch.setattr(bodies._BodySink, "buffer_updated", counted)
    params = make_params(4)
    ref = Reference(params)
    sid = create_st(http, params)
    for k in range(1, 6):
        grads = make_grads(params, 4, k)
        before = sum(received)
        r = step_http(http, sid, grads)
        assert r.status_code == 200, r.text
        assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), f"step {k}")
        assert sum(received) - before > len(wire.encode(grads)) // 2  # most of it went through the sink
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 5


def test_large_json_create_body(http: httpx.Client, direct_sizes: list[int]) -> None:
    params = {"w": np.random.default_rng(3).standard_normal(150_000).astype(np.float32)}
    body = json.dumps(
        {
            "optimizer": "adamw",
            "hyperparams": HP,
            "params": {"w": {"dtype": "float32", "shape": [150_000], "data": params["w"].tolist()}},
        }
    ).encode()
    assert len(body) >= 1 << 20
    r = http.post("/v1/sessions", content=body, headers={"Content-Type": wire.JSON})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert len(body) in direct_sizes
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert_equal_tensors(wire.decode(r.content)[0], params, "created")
    grads = make_grads(params, 3, 1)
    r = step_http(http, sid, grads)
    assert r.status_code == 200, r.text
    assert_equal_tensors(wire.decode(r.content)[0], Reference(params).step(grads), "step 1")


def test_large_chunked_step_body_takes_the_normal_path(http: httpx.Client, direct_sizes: list[int]) -> None:
    params = make_params(4)
    ref = Reference(params)
    sid = create_st(http, params)
    for k in (1, 2):
        grads = make_grads(params, 4, k)
        body = wire.encode(grads)

        def pieces(data: bytes = body) -> Iterator[bytes]:
            for i in range(0, len(data), 100_000):
                yield data[i : i + 100_000]

        request = http.build_request("POST", f"/v1/sessions/{sid}/step", content=pieces(), headers={"Content-Type": ST})
        assert request.headers["transfer-encoding"] == "chunked" and "content-length" not in request.headers
        r = http.send(request)
        assert r.status_code == 200, r.text
        assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), f"chunked step {k}")
    assert len(body) not in direct_sizes


@pytest.mark.parametrize("sent", ["head only", "half", "all but one byte"])
def test_truncated_large_body_then_close_changes_nothing(
    server: EmbeddedServer, http: httpx.Client, direct_sizes: list[int], sent: str
) -> None:
    params = make_params(5)
    ref = Reference(params)
    sid = create_st(http, params)
    grads = make_grads(params, 5, 1)
    body = wire.encode(grads)
    cut = {"head only": 0, "half": len(body) // 2, "all but one byte": len(body) - 1}[sent]
    with socket.create_connection(host_port(server), timeout=10) as sock:
        sock.sendall(step_head(sid, len(body)) + body[:cut])
        # wait until the server is receiving this body (the large-body path was chosen for it)
        deadline = time.monotonic() + 10
        while len(body) not in direct_sizes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(body) in direct_sizes
    time.sleep(0.2)  # the server sees the disconnect
    assert http.get("/healthz").status_code == 200
    assert session_step(http, sid) == 0
    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
    assert_equal_tensors(wire.decode(r.content)[0], params, "after the truncated upload")
    # the same step, sent whole, is applied as if nothing had happened
    r = step_http(http, sid, grads)
    assert r.status_code == 200, r.text
    assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), "step 1")
    assert session_step(http, sid) == 1


def test_pending_large_upload_does_not_block_other_requests(server: EmbeddedServer, http: httpx.Client) -> None:
    params = make_params(6)
    ref = Reference(params)
    sid = create_st(http, params)
    body = wire.encode(make_grads(params, 6, 99))
    with socket.create_connection(host_port(server), timeout=10) as sock:
        sock.sendall(step_head(sid, len(body)) + body[: len(body) // 3])
        grads = make_grads(params, 6, 1)
        r = step_http(http, sid, grads)  # another connection steps the same session meanwhile
        assert r.status_code == 200, r.text
        assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), "step 1")
    time.sleep(0.1)
    assert session_step(http, sid) == 1


def test_expect_100_continue_on_the_large_path(
    server: EmbeddedServer, http: httpx.Client, direct_sizes: list[int]
) -> None:
    params = make_params(7)
    sid = create_st(http, params)
    grads = make_grads(params, 7, 1)
    body = wire.encode(grads)
    with socket.create_connection(host_port(server), timeout=10) as sock:
        sock.sendall(step_head(sid, len(body), "Expect: 100-continue\r\n"))
        status, _, rest = read_response(sock)
        assert status == 100 and rest == b""
        sock.sendall(body)
        status, headers, answer = read_response(sock)
    assert status == 200, answer[:300]
    assert len(body) in direct_sizes
    assert_equal_tensors(wire.decode(answer)[0], Reference(params).step(grads), "step 1")


@pytest.mark.parametrize("refusal", ["unknown session", "wrong media type"])
def test_refused_large_body_keeps_the_connection_usable(
    http: httpx.Client, direct_sizes: list[int], refusal: str
) -> None:
    params = make_params(8)
    sid = create_st(http, params)
    body = wire.encode(make_grads(params, 8, 1))
    path, ctype, status = {
        "unknown session": ("/v1/sessions/no-such-session/step", ST, 404),
        "wrong media type": (f"/v1/sessions/{sid}/step", "text/plain", 415),
    }[refusal]
    for _ in range(2):  # the unread rest of the body must not be taken for the next request
        r = http.post(path, content=body, headers={"Content-Type": ctype})
        assert r.status_code == status, r.text
        assert http.get("/healthz").json() == {"status": "ok"}
    grads = make_grads(params, 8, 2)
    r = step_http(http, sid, grads)
    assert r.status_code == 200, r.text
    assert_equal_tensors(wire.decode(r.content)[0], Reference(params).step(grads), "step 1")


# --- 2. reused buffers never corrupt answers -----------------------------------------------------------------------


def test_kept_raw_answers_stay_valid(http: httpx.Client) -> None:
    params = make_params(9)
    ref = Reference(params)
    sid = create_st(http, params)
    kept: dict[int, bytes] = {}
    expected: dict[int, dict[str, np.ndarray]] = {}
    for k in range(1, 9):
        grads = make_grads(params, 9, k)
        r = step_http(http, sid, grads)
        assert r.status_code == 200, r.text
        kept[k] = r.content
        expected[k] = ref.step(grads)
    for k in (1, 2, 3):  # each followed by at least five more steps
        assert_equal_tensors(wire.decode(kept[k])[0], expected[k], f"kept answer of step {k}")


def test_unreleased_client_results_stay_valid(server: EmbeddedServer) -> None:
    params = make_params(10)
    ref = Reference(params)
    results = []
    expected = []
    with Client(server.url, timeout=30.0) as client:
        sid = client.create_session(params, "adamw", hyperparams=HP)["id"]
        for k in range(1, 8):
            grads = make_grads(params, 10, k)
            results.append(client.step(sid, grads, if_match=k - 1))  # never released: its buffer is never reused
            expected.append(ref.step(grads))
    for k, (result, want) in enumerate(zip(results, expected), start=1):
        assert result.step == k
        assert result.params is not None
        assert_equal_tensors(result.params, want, f"result of step {k}")


def test_two_same_size_sessions_stepped_concurrently(server: EmbeddedServer) -> None:
    errors: list[BaseException] = []
    finals: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}

    def run(seed: int, use_remote_optimizer: bool) -> None:
        try:
            params = make_params(seed)
            ref = Reference(params)
            if use_remote_optimizer:
                mine = {n: p.copy() for n, p in params.items()}
                with RemoteOptimizer(mine, url=server.url, optimizer="adamw", **HP) as opt:
                    for k in range(1, 13):
                        grads = make_grads(params, seed, k)
                        opt.step(grads)
                        assert_equal_tensors(mine, ref.step(grads), f"session {seed} step {k}")
                finals[seed] = (mine, ref.params)
            else:
                with httpx.Client(base_url=server.url, timeout=30.0) as http:
                    sid = create_st(http, params)
                    for k in range(1, 13):
                        grads = make_grads(params, seed, k)
                        r = step_http(http, sid, grads)
                        assert r.status_code == 200, r.text
                        assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), f"session {seed} step {k}")
                    r = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": ST})
                    finals[seed] = (wire.decode(r.content)[0], ref.params)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    for pair in ([(11, True), (12, True)], [(13, False), (14, False)], [(15, True), (16, False)]):
        threads = [threading.Thread(target=run, args=args) for args in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a stepping thread did not finish"
        if errors:
            raise errors[0]
    assert sorted(finals) == [11, 12, 13, 14, 15, 16]
    for seed, (got, want) in finals.items():
        assert_equal_tensors(got, want, f"final params of session {seed}")


def test_answer_still_being_sent_to_a_slow_reader_is_not_overwritten(
    server: EmbeddedServer, http: httpx.Client
) -> None:
    """An answer larger than the kernel's socket buffers is still partly queued in the server after the app has
    sent it. Steps of another session of the same size meanwhile must not reach it (their request bodies come from
    the same pool; on a Ray front, so do the answers)."""
    n = 2_000_000  # 8 MB: more than a loopback socket takes at once (tcp_wmem max is 4 MiB by default)
    pa, pb = make_params(17, n), make_params(18, n)
    a, b = create_st(http, pa), create_st(http, pb)
    grads_a = make_grads(pa, 17, 1)
    body = wire.encode(grads_a)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.settimeout(20)
        sock.connect(host_port(server))
        sock.sendall(step_head(a, len(body)) + body)
        deadline = time.monotonic() + 20
        while session_step(http, a) != 1 and time.monotonic() < deadline:  # applied: its answer is being sent
            time.sleep(0.01)
        time.sleep(0.2)
        for k in range(1, 4):  # meanwhile, steps of another session of the same size
            r = step_http(http, b, make_grads(pb, 18, k))
            assert r.status_code == 200, r.text
        status, _, answer = read_response(sock)
    assert status == 200
    assert_equal_tensors(wire.decode(answer)[0], Reference(pa).step(grads_a), "slow reader's answer")


def test_an_answer_still_being_sent_keeps_its_step_while_its_session_steps(
    server: EmbeddedServer, http: httpx.Client
) -> None:
    """An answer is sent from the session's own parameters (no copy). A reader that stops halfway through its 8 MB
    answer while two more steps of the same session land still receives its own step, bit for bit: those steps
    wrote into a copy (copy on write)."""
    n = 2_000_000
    params = make_params(20, n)
    ref = Reference(params)
    sid = create_st(http, params)
    grads = [make_grads(params, 20, k) for k in range(1, 4)]
    want = ref.step(grads[0])
    body = wire.encode(grads[0])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.settimeout(20)
        sock.connect(host_port(server))
        sock.sendall(step_head(sid, len(body)) + body)
        first = sock.recv(1 << 16)  # the answer has started: the rest waits in the server's transport
        for g in grads[1:]:
            r = step_http(http, sid, g)
            assert r.status_code == 200, r.text
        assert session_step(http, sid) == 3
        status, headers, answer = read_response(Prefixed(first, sock))  # type: ignore[arg-type]
    assert status == 200 and headers["etag"] == '"1"'
    assert_equal_tensors(wire.decode(answer)[0], want, "slow reader's answer")
    if isinstance(server.store, MemoryStore):  # (a Ray host copies a same-node answer into the front's memory)
        assert server.store.get(sid).lent_copies >= 1


class Prefixed:
    """A socket whose first ``recv`` returns bytes already read from it."""

    def __init__(self, first: bytes, sock: socket.socket) -> None:
        self.first: bytes | None = first
        self.sock = sock

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def recv(self, n: int) -> bytes:
        if self.first is None:
            return self.sock.recv(n)
        data, self.first = self.first, None
        return data


def test_http_steps_are_taken_in_place(server: EmbeddedServer, http: httpx.Client) -> None:
    """Stepped answer after answer, a session never copies its parameters: each answer has left before the next
    step arrives, so nothing holds it any more."""
    if not isinstance(server.store, MemoryStore):
        pytest.skip("the session lives in a Ray host's process")
    params = make_params(21)
    sid = create_st(http, params)
    session = server.store.get(sid)
    address = session.params.ctypes.data
    for k in range(1, 6):
        r = step_http(http, sid, make_grads(params, 21, k))
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.concatenate([t.ravel() for t in wire.decode(r.content)[0].values()]),
                                      session.params)  # fmt: skip
    assert session.lent_copies == 0 and session.params.ctypes.data == address


def test_a_held_result_keeps_its_step() -> None:
    """A caller that keeps a step's result sees that step's parameters after later steps, which write into a
    copy; the result is read-only; once nothing holds an answer, steps are taken in place again."""
    rng = np.random.default_rng(1)
    session = Session("s", SessionConfig(optimizer="adamw"), {"w": rng.standard_normal(1000).astype(np.float32)})
    first = session.step({"w": rng.standard_normal(1000).astype(np.float32)})
    assert first.params is not None
    kept = first.params.copy()
    with pytest.raises(ValueError):
        first.params[0] = 0.0
    second = session.step({"w": rng.standard_normal(1000).astype(np.float32)})
    assert session.lent_copies == 1
    np.testing.assert_array_equal(first.params, kept)
    assert second.params is not None and not np.array_equal(second.params, kept)
    np.testing.assert_array_equal(second.params, session.params)
    del first, second
    address = session.params.ctypes.data
    for _ in range(3):
        session.step({"w": rng.standard_normal(1000).astype(np.float32)}).params = None
    assert session.lent_copies == 1 and session.params.ctypes.data == address


def test_steady_steps_reuse_pooled_buffers(
    http: httpx.Client, direct_sizes: list[int], monkeypatch: pytest.MonkeyPatch, no_gc: None
) -> None:
    """Once a session has stepped, further steps of the same size take their request body from the buffers the
    previous steps left (no fresh memory), without waiting for the garbage collector; answers are sent from the
    session's own parameters."""
    params = make_params(19)
    ref = Reference(params)
    sid = create_st(http, params)
    made: list[int] = []
    make = POOL.make

    def counted(n: int) -> np.ndarray:
        made.append(n)
        return make(n)

    monkeypatch.setattr(POOL, "make", counted)
    for k in range(1, 13):
        if k == 3:  # after two warm-up steps: nothing new from here on
            made.clear()
        grads = make_grads(params, 19, k)
        r = step_http(http, sid, grads)
        assert r.status_code == 200, r.text
        assert_equal_tensors(wire.decode(r.content)[0], ref.step(grads), f"step {k}")
    assert direct_sizes.count(len(wire.encode(make_grads(params, 19, 1)))) == 12
    assert made == [], f"steps 3-12 allocated fresh pooled buffers of sizes {made}"


# --- 3. BufferPool -------------------------------------------------------------------------------------------------

U = 1 << 16  # the unit of the pool tests' sizes (and their min_bytes): small and quick


def np_buffer(n: int) -> np.ndarray:
    return np.empty(n, dtype=np.uint8)  # what POOL makes


def counting_pool(
    max_bytes: int = 64 * U, min_bytes: int = U, make: Callable[[int], Any] = np_buffer
) -> tuple[BufferPool[Any], list[int]]:
    """A pool and the sizes of the buffers it has made (a take that reuses a buffer makes none)."""
    made: list[int] = []

    def counted(n: int) -> Any:
        made.append(n)
        return make(n)

    return BufferPool(counted, max_bytes, min_bytes), made


def test_pool_as_configured_for_the_server() -> None:
    assert POOL.max_bytes == int(os.environ.get("OPTSERVE_IO_POOL_BYTES", 512 << 20))
    assert POOL.min_bytes == 1 << 20
    buf = POOL.make(12_345)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.shape == (12_345,)
    code = "from optserve.service.bodies import POOL; print(POOL.max_bytes)"
    env = {**os.environ, "OPTSERVE_IO_POOL_BYTES": str(3 << 20)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(3 << 20)


@pytest.mark.parametrize("make", [np_buffer, bytearray], ids=["numpy", "bytearray"])
def test_pool_take_returns_exactly_the_size(make: Callable[[int], Any]) -> None:
    pool, _ = counting_pool(make=make)
    for size in (0, 1, 1000, U - 1, U, 3 * U + 7, U):
        buf = pool.take(size)
        assert type(buf) is type(make(0)) and len(buf) == size
        assert memoryview(buf).nbytes == size and memoryview(buf).c_contiguous and not memoryview(buf).readonly
        if isinstance(buf, np.ndarray):
            assert buf.dtype == np.uint8 and buf.shape == (size,)


def test_pool_dropped_buffer_comes_back_for_the_same_size() -> None:
    pool, made = counting_pool()
    a = pool.take(2 * U)
    b = pool.take(2 * U)
    assert a is not b  # a is still held
    a_ref = weakref.ref(a)
    del a
    c = pool.take(3 * U)  # matched by exact size only
    assert c is not a_ref() and made == [2 * U, 2 * U, 3 * U]
    again = pool.take(2 * U)
    assert again is a_ref() and made == [2 * U, 2 * U, 3 * U]  # the same object, no fresh buffer
    assert pool.take(2 * U) is not again  # lent once only while it is held (that one is dropped at once)
    assert made == [2 * U, 2 * U, 3 * U, 2 * U] and pool.kept_bytes == 9 * U
    c_ref = weakref.ref(c)
    del again, b, c
    x, y = pool.take(2 * U), pool.take(2 * U)
    assert x is not y and len(made) == 4  # both from the dropped 2 U buffers
    assert pool.take(3 * U) is c_ref() and len(made) == 4
    assert pool.kept_bytes == 9 * U


@pytest.mark.parametrize("make", [np_buffer, bytearray], ids=["numpy", "bytearray"])
def test_pool_reuse_by_identity(make: Callable[[int], Any]) -> None:
    """By ``id`` (bytearrays have no weak references): safe because a lent buffer is alive in the pool."""
    pool, made = counting_pool(make=make)
    first = pool.take(4 * U)
    first_id = id(first)
    second = pool.take(4 * U)  # first still held: another buffer
    assert second is not first and len(made) == 2
    del first
    third = pool.take(4 * U)
    assert id(third) == first_id and len(made) == 2
    del second, third


# Each builds, from a pooled uint8 buffer, something a reader keeps: it must keep the buffer from being reused.
DEPENDENTS: dict[str, Callable[[np.ndarray], object]] = {
    "numpy view": lambda b: b[4096:],
    "float32 view (an answer copy)": lambda b: b.view(np.float32),
    "memoryview slice": lambda b: memoryview(b)[4096:],
    "np.frombuffer of a cast memoryview": lambda b: np.frombuffer(memoryview(b.view(np.float32)).cast("B"), np.float32),
    "cast memoryview (what uvloop queues)": lambda b: memoryview(memoryview(b)).cast("b"),
    "buffer export": pickle.PickleBuffer,
}


def fill(buffers: list[np.ndarray], value: int) -> None:
    """(A helper, so that no loop variable is left holding one of the buffers.)"""
    for buf in buffers:
        buf[:] = value


def all_bytes(obj: object) -> np.ndarray:
    return np.frombuffer(memoryview(obj).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", list(DEPENDENTS))
def test_pool_does_not_reuse_a_buffer_still_referenced(kind: str) -> None:
    pool, made = counting_pool()
    buf = pool.take(8 * U)
    buf[:] = 7
    buf_ref = weakref.ref(buf)
    dependent = DEPENDENTS[kind](buf)
    del buf  # only the dependent keeps it now
    others = [pool.take(8 * U) for _ in range(3)]  # further takes of the same size
    assert buf_ref() is not None
    assert all(o is not buf_ref() for o in others), f"a buffer still referenced by a {kind} was reused"
    fill(others, 0)
    assert (all_bytes(dependent) == 7).all(), f"the data behind a live {kind} was overwritten"
    assert made == [8 * U] * 4
    del dependent, others
    reused = [pool.take(8 * U) for _ in range(4)]
    assert any(r is buf_ref() for r in reused) and made == [8 * U] * 4  # free once the dependent is gone


def test_pool_answer_copy_survives_further_takes_and_steps(http: httpx.Client) -> None:
    """The server's own pool: a float32 view of a pooled buffer (as ``_params_copy`` makes) stays intact while
    other steps of the same size take and fill buffers."""
    params = make_params(20)
    size = (N + 15) * 4  # the session's answer copy: all its float32 parameters
    copy = POOL.take(size).view(np.float32)
    copy[:] = 1.5
    sid = create_st(http, params)
    for k in range(1, 4):
        r = step_http(http, sid, make_grads(params, 20, k))
        assert r.status_code == 200, r.text
        POOL.take(size)[:] = 0
    assert (copy == 1.5).all()


def test_pool_min_bytes_threshold() -> None:
    pool, made = counting_pool(min_bytes=U)
    small = pool.take(U - 1)
    del small
    other = pool.take(U - 1)  # not tracked: never reused (the old one was simply freed)
    assert len(made) == 2 and pool.kept_bytes == 0
    del other
    big = pool.take(U)  # the threshold itself is tracked
    assert pool.kept_bytes == U
    del big
    pool.take(U)
    assert len(made) == 3 and pool.kept_bytes == U
    low, _ = counting_pool(min_bytes=1000)
    low.take(1000)
    assert low.kept_bytes == 1000


def test_pool_max_bytes_cap_does_not_track_a_buffer_over_it() -> None:
    pool, made = counting_pool(max_bytes=10 * U)
    a = pool.take(6 * U)
    assert pool.kept_bytes == 6 * U
    b = pool.take(5 * U)  # 11 U would exceed the cap while a is lent: not tracked
    assert pool.kept_bytes == 6 * U
    del b
    b2 = pool.take(5 * U)
    assert len(made) == 3 and pool.kept_bytes == 6 * U
    del a, b2
    huge = pool.take(11 * U)  # larger than the cap itself
    assert pool.kept_bytes <= 10 * U
    del huge
    pool.take(11 * U)
    assert made[-2:] == [11 * U, 11 * U]


def test_pool_evicts_the_least_recently_freed_sizes_first() -> None:
    pool, made = counting_pool(max_bytes=10 * U)
    a, c = pool.take(2 * U), pool.take(4 * U)  # made in this order ...
    c_ref = weakref.ref(c)
    a_ref = weakref.ref(a)
    del c  # ... but c is freed first
    x = pool.take(1 * U)  # reclaims c
    del a
    y = pool.take(1 * U)  # reclaims a (x is still held: y is another buffer)
    assert x is not y and pool.kept_bytes == 8 * U and len(made) == 4
    big = pool.take(5 * U)  # 13 U > 10 U: c (freed first) is evicted, which makes room
    assert pool.kept_bytes == 9 * U
    assert c_ref() is None, "the least recently freed buffer was kept"
    assert pool.take(2 * U) is a_ref() and len(made) == 5  # a was kept
    pool.take(4 * U)
    assert len(made) == 6
    del x, y, big


def test_pool_evicts_only_as_much_as_needed() -> None:
    pool, made = counting_pool(max_bytes=10 * U)
    held = pool.take(3 * U)
    a, b, c = pool.take(2 * U), pool.take(1 * U), pool.take(4 * U)  # 10 U in all, every one tracked
    assert pool.kept_bytes == 10 * U
    refs = [weakref.ref(o) for o in (a, b, c)]
    del a, b, c
    pool.take(U + U // 2)  # reclaims a, b, c (freed in that order); 11.5 U > 10 U: only a has to go
    assert [r() is None for r in refs] == [True, False, False]
    assert pool.kept_bytes == 3 * U + 1 * U + 4 * U + U + U // 2
    assert pool.take(1 * U) is refs[1]() and pool.take(4 * U) is refs[2]() and len(made) == 5
    del held


@pytest.mark.parametrize("case", ["larger than the cap", "cannot fit beside the lent buffers"])
def test_pool_keeps_free_buffers_when_eviction_would_not_make_room(case: str) -> None:
    """Evicting free buffers only pays when the new buffer then fits: otherwise it is not tracked anyway, and the
    evicted sizes would have to be allocated afresh (page faults) the next time they are used."""
    pool, made = counting_pool(max_bytes=10 * U)
    lent = pool.take(6 * U)
    free = pool.take(3 * U)
    free_ref = weakref.ref(free)
    del free
    pool.take(U)  # reclaims the 3 U buffer: free, waiting for its size to come again
    size = 11 * U if case == "larger than the cap" else 5 * U  # 6 U lent + 5 U > 10 U even with nothing free
    pool.take(size)
    assert free_ref() is not None, f"a buffer {case} evicted the free buffers without being tracked itself"
    assert pool.take(3 * U) is free_ref()
    del lent


@pytest.mark.parametrize("make", [np_buffer, bytearray], ids=["numpy", "bytearray"])
@pytest.mark.parametrize("max_bytes", [1 << 30, 8 * U], ids=["roomy", "tight cap"])
def test_pool_threads_taking_and_dropping(make: Callable[[int], Any], max_bytes: int) -> None:
    """Several threads take, fill, hold a few and drop buffers of a few sizes at once: what a thread wrote stays
    intact while it holds the buffer, and the pool's accounting stays within its cap."""
    pool, made = counting_pool(max_bytes=max_bytes, make=make)
    sizes = (U, 2 * U, 3 * U, U // 2)
    threads_n, rounds = 8, 150
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n, timeout=10)

    def work(tid: int) -> None:
        try:
            rng = np.random.default_rng(tid)
            held: list[tuple[Any, int]] = []
            start.wait()
            for i in range(rounds):
                size = sizes[rng.integers(len(sizes))]
                buf = pool.take(size)
                assert len(buf) == size
                value = (tid * 37 + i) % 251 + 1
                view = memoryview(buf)
                view[:] = bytes([value]) * size
                del view
                held.append((buf, value))
                del buf
                if len(held) > int(rng.integers(1, 4)):
                    kept, want = held.pop(int(rng.integers(len(held))))
                    assert bytes(kept) == bytes([want]) * len(kept), f"thread {tid}: a held buffer was reused"
                    del kept
                if i % 10 == 0:
                    time.sleep(0)
            for kept, want in held:
                assert bytes(kept) == bytes([want]) * len(kept), f"thread {tid}: a held buffer was reused"
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a pool thread did not finish"
    if errors:
        raise errors[0]
    assert 0 <= pool.kept_bytes <= max_bytes
    assert len(made) < threads_n * rounds or max_bytes < 4 * U  # some buffers were reused
    # accounting: what the pool counts is what it holds (white box: its lent and free lists)
    pool.take(U)
    held_bytes = sum(len(b) for b in pool._lent) + sum(len(b) for bs in pool._free.values() for b in bs)
    assert pool.kept_bytes == held_bytes


# --- 4. BufferResponse ---------------------------------------------------------------------------------------------


def run_response(response: BufferResponse, send: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
    """Call the response with a fake ASGI send that copies what it is given (as a transport writes it)."""
    messages: list[dict[str, Any]] = []

    async def fake_send(message: Any) -> None:
        copied = dict(message)
        if "body" in copied:
            copied["body"] = bytes(copied["body"])
        messages.append(copied)
        if send is not None:
            send(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    asyncio.run(response({"type": "http", "method": "POST"}, receive, fake_send))
    return messages


def test_buffer_response_sends_the_parts_in_order_without_joining() -> None:
    floats = np.arange(1000, dtype=np.float32)
    parts = [b"head", memoryview(floats), memoryview(bytearray(b"tail")), np.arange(5, dtype=np.int64), b""]
    expected = b"head" + floats.tobytes() + b"tail" + np.arange(5, dtype=np.int64).tobytes()
    response = BufferResponse(parts, 201, ST, {"ETag": '"3"'})
    messages = run_response(response)
    start, *body = messages
    assert start["type"] == "http.response.start" and start["status"] == 201
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    assert headers["content-length"] == str(len(expected))
    assert headers["content-type"] == ST
    assert headers["etag"] == '"3"'
    assert [m["type"] for m in body] == ["http.response.body"] * len(parts)
    assert [m["more_body"] for m in body] == [True] * (len(parts) - 1) + [False]
    assert [m["body"] for m in body] == [bytes(memoryview(p).cast("B")) for p in parts]  # type: ignore[arg-type]
    assert b"".join(m["body"] for m in body) == expected


def test_buffer_response_without_parts_sends_an_empty_body() -> None:
    messages = run_response(BufferResponse([], 200, ST, {}))
    headers = {k.decode(): v.decode() for k, v in messages[0]["headers"]}
    assert headers["content-length"] == "0"
    assert messages[1:] == [{"type": "http.response.body", "body": b"", "more_body": False}]


def test_buffer_response_sends_the_parts_themselves() -> None:
    """No copy: the body messages are views of the parts' own memory."""
    buf = np.zeros(4 * U, dtype=np.uint8)
    seen: list[memoryview] = []
    run_response(BufferResponse([b"h", buf.view(np.float32)], 200, ST, {}), lambda m: seen.append(m.get("body")))
    part = seen[2]
    assert isinstance(part, memoryview) and part.nbytes == buf.nbytes
    buf[:] = 9
    assert bytes(part[:4]) == b"\x09" * 4


def test_buffer_response_part_is_not_reused_while_the_transport_holds_it() -> None:
    """A transport that has not written a part yet keeps a view of it (uvloop keeps ``memoryview(data).cast('b')``):
    the part's pooled buffer must not be reused until that view is gone, even once the response is done."""
    pool, made = counting_pool()
    buf = pool.take(8 * U)
    buf[:] = 5
    buf_ref = weakref.ref(buf)
    response = BufferResponse([b"h", buf.view(np.float32)], 200, ST, {})
    del buf
    assert pool.take(8 * U) is not buf_ref()  # the response's parts hold it
    held: list[memoryview] = []

    def hold(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            held.append(memoryview(message["body"]).cast("b"))

    run_response(response, hold)
    del response
    others = [pool.take(8 * U) for _ in range(2)]
    assert all(o is not buf_ref() for o in others), "the buffer of a part still held by the transport was reused"
    fill(others, 0)
    assert bytes(held[0]) == b"h" and (all_bytes(held[1]) == 5).all()
    held.clear()
    del others
    again = [pool.take(8 * U) for _ in range(3)]
    assert any(o is buf_ref() for o in again) and len(made) == 3


def test_shared_memory_is_offered_to_a_unix_socket_peer_of_the_servers_user_by_the_memory_store_only(
    server: EmbeddedServer, http: httpx.Client, store_kind: str
) -> None:
    """No step answer over TCP offers shared memory, on either store, and a step naming a buffer there is refused
    with nothing applied. Of a Unix socket's peer (``optserve.peer`` in the scope's extensions, as OptserveProtocol
    reads it from the kernel), the memory store takes buffers when it runs as the server's user; a Ray front never
    (its answers come from the session hosts, as bytes)."""
    sid = create_st(http, {"w": np.zeros(8, np.float32)})
    body = wire.encode({"w": np.ones(8, np.float32)})
    r = http.post(f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": ST})
    assert r.status_code == 200 and "optserve-shm" not in r.headers
    name = f"optserve-{os.getpid()}-{'0' * 16}-1 0 {len(body)}"
    refused = http.post(f"/v1/sessions/{sid}/step", headers={"Content-Type": ST, "Optserve-Shm-Body": name})
    assert refused.status_code == 400 and refused.json()["type"].endswith(":shared-memory-unavailable")
    assert session_step(http, sid) == 1
    route = server.app.state.step_route
    peer = {"pid": os.getpid(), "uid": os.geteuid()}
    assert route.shared_memory_peer({"extensions": {"optserve.peer": peer}}) == (
        os.getpid() if store_kind == "memory" else None
    )
    assert route.shared_memory_peer({"extensions": {"optserve.peer": {**peer, "uid": os.geteuid() + 1}}}) is None
    assert route.shared_memory_peer({"server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}) is None
