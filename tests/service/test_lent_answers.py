"""A step's answer is sent from the session's own parameter buffer, without a copy (copy on write): the session
steps in place when nothing holds its last answer any more, and writes into a copy of its own while something
does, so that every answer shows the step it was made at. A real uvicorn server in a thread of this process."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from optserve.client import Client, wire
from optserve.service.embedded import EmbeddedServer, serve_in_thread
from optserve.service.session import Session, SessionConfig

N = 2_000_000  # 8 MB of float32: more than a socket's buffers hold, so a reader that stops leaves it half sent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with serve_in_thread(tmp_path_factory.mktemp("data")) as embedded:
        yield embedded


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


def test_http_steps_are_taken_in_place(server: EmbeddedServer) -> None:
    """A client stepping one session over HTTP, answer after answer, never makes the session copy its
    parameters: each answer has left before the next step arrives."""
    rng = np.random.default_rng(2)
    with Client(server.url) as client:
        sid = client.create_session({"w": np.zeros(N, np.float32)}, "adamw")["id"]
        session = server.store._sessions[sid]
        address = session.params.ctypes.data
        grads = {"w": rng.standard_normal(N).astype(np.float32)}
        for _ in range(5):
            result = client.step(sid, grads)
            assert result.params is not None
            np.testing.assert_array_equal(result.params["w"], session.params)
            result.release()
        assert session.lent_copies == 0 and session.params.ctypes.data == address
        client.delete_session(sid)


def _read_answer(sock: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """The rest of an answer whose first bytes are ``data``: its head and its body."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(1 << 20)
        assert chunk, "the server closed the connection in the middle of the body"
        body += chunk
    return head, body


def test_an_answer_still_being_sent_keeps_its_step(server: EmbeddedServer, tmp_path: Path) -> None:
    """A reader that stops halfway through a large answer while another client steps the same session twice
    still receives the parameters of its own step, bit for bit (the session wrote the later steps into a copy)."""
    rng = np.random.default_rng(3)
    start = rng.standard_normal(N).astype(np.float32)
    grads = [{"w": rng.standard_normal(N).astype(np.float32)} for _ in range(3)]
    expected = Session("twin", SessionConfig(optimizer="adamw"), {"w": start})
    want = expected.step(grads[0]).params
    assert want is not None
    want = want.copy()
    host, port = server.url.removeprefix("http://").split(":")
    with Client(server.url) as client:
        sid = client.create_session({"w": start}, "adamw")["id"]
        body = b"".join(bytes(p) for p in wire.encode_parts(grads[0]))
        head = (
            f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nhost: {host}\r\ncontent-type: {wire.SAFETENSORS}\r\n"
            f"accept: {wire.SAFETENSORS}\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            slow.sendall(head + body)
            first = slow.recv(1 << 16)  # the answer has started: the rest waits in the server's transport
            deadline = time.monotonic() + 30
            while client.session(sid)["step"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for g in grads[1:]:  # meanwhile, two more steps of the same session
                client.step(sid, g, minimal=True)
            assert client.session(sid)["step"] == 3
            slow.settimeout(30)
            rest_head, rest = _read_answer(slow, first)
        assert b" 200 " in rest_head.split(b"\r\n")[0] and b'etag: "1"' in rest_head.lower()
        answer = wire.parse(rest).tensors()["w"]
        np.testing.assert_array_equal(answer, want)
        assert server.store._sessions[sid].lent_copies >= 1
        client.delete_session(sid)
