"""``SocketTransport``: HTTP/1.1 framing, connection reuse, errors and receive buffers.

Against small raw-socket servers started by each test on a free loopback port, which read requests as they come off
the wire and write canned answers byte for byte, so that framing is tested precisely. Every server thread is
joined with a timeout, and the transport's reads of a closed connection are bounded (a loop on a closed socket
fails the test instead of hanging it). Large bodies are received into buffers of the transport's ``BufferPool``
and handed over in a one-shot ``Body`` box; the buffer serves a later answer of the same size once the reader holds
no reference to it any more (the tests of that run with the cyclic garbage collector off, so that reference counts
alone must free it).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest

from optserve.client import Client, NotFound, Retry, TransportError, wire
from optserve.client.transport import BODY_EXTENSION, REUSE_MAX_BYTES, Body, SocketTransport
from optserve.service.embedded import EmbeddedServer, free_port

REUSE_MIN = SocketTransport()._buffers.min_bytes  # bodies from this size on are received into pooled buffers

# --- a raw HTTP/1.1 server -----------------------------------------------------------------------------------------


@dataclass
class RawRequest:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes
    connection: int  # which accepted connection (0, 1, ...) carried it

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        assert len(found) <= 1, (name, found)
        return found[0] if found else None


class Reader:
    """Reads requests off one connection (Content-Length or chunked bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _more(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if not self._more():
                raise EOFError
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise EOFError
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def request(self, connection: int) -> RawRequest | None:
        """The next request, or None when the client closed the connection between requests."""
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if not self._more():
                if self.buf:
                    raise EOFError
                return None
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        fields = {k.lower(): v for k, v in headers}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int(self._line().split(b";")[0], 16):
                body += self._exactly(size)
                assert self._exactly(2) == b"\r\n"
            while self._line():  # trailers
                pass
        else:
            body = bytearray(self._exactly(int(fields.get("content-length", "0"))))
        return RawRequest(method, target, version, headers, bytes(body), head, connection)


Handler = Callable[[socket.socket, RawRequest, int], bool]  # (socket, request, index of the request) -> keep open


class RawServer:
    """Accepts connections on 127.0.0.1; for each request read, calls ``handler``, which writes whatever it likes
    and says whether to go on reading requests from that connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[RawRequest] = []
        self.client_closed = 0  # connections the client closed between requests
        self.server_closed = threading.Semaphore(0)  # released each time the server closes a connection
        self.threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                index = self.connections
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(10)
        reader = Reader(sock)
        try:
            while not self.stop.is_set():
                try:
                    request = reader.request(index)
                except (OSError, EOFError):
                    return
                if request is None:
                    with self.lock:
                        self.client_closed += 1
                    return
                with self.lock:
                    n = len(self.requests)
                    self.requests.append(request)
                if not self.handler(sock, request, n):
                    return
        finally:
            sock.close()
            self.server_closed.release()

    def wait_closed(self, count: int = 1, timeout: float = 5.0) -> None:
        for _ in range(count):
            assert self.server_closed.acquire(timeout=timeout), "the server did not close the connection"

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self._accept_thread.join(timeout=5)
        for thread in self.threads:
            thread.join(timeout=5)
        assert not self._accept_thread.is_alive()
        assert not any(t.is_alive() for t in self.threads), "a server thread did not finish"


def answer(body: bytes = b"", status: str = "200 OK", headers: tuple[str, ...] = (), length: bool = True) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def replies(*items: bytes | Callable[[socket.socket, RawRequest], bool]) -> Handler:
    """A handler answering the n-th request with the n-th item (bytes: written, keep the connection open;
    a callable: called, and its result says whether to keep the connection open)."""

    def handle(sock: socket.socket, request: RawRequest, n: int) -> bool:
        item = items[min(n, len(items) - 1)]
        if callable(item):
            return item(sock, request)
        sock.sendall(item)
        return True

    return handle


def then_close(data: bytes, pieces: int = 1, pause: float = 0.0) -> Callable[[socket.socket, RawRequest], bool]:
    """Write ``data`` (in ``pieces`` separate writes with a pause between them), then close the connection."""

    def act(sock: socket.socket, request: RawRequest) -> bool:
        send_in_pieces(sock, data, pieces, pause)
        return False

    return act


def send_in_pieces(sock: socket.socket, data: bytes, pieces: int, pause: float) -> None:
    step = max(1, -(-len(data) // pieces))
    for i in range(0, len(data), step):
        sock.sendall(data[i : i + step])
        if pause:
            time.sleep(pause)


def pieces_of(data: bytes, pause: float = 0.01) -> Callable[[socket.socket, RawRequest], bool]:
    """Write ``data`` a few bytes at a time (every framing element split across reads); keep the connection."""

    def act(sock: socket.socket, request: RawRequest) -> bool:
        send_in_pieces(sock, data, max(1, len(data) // 3), pause)
        return True

    return act


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], RawServer]]:
    servers: list[RawServer] = []

    def start(handler: Handler) -> RawServer:
        server = RawServer(handler)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def bounded_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (instead of spinning forever) when the transport keeps reading a connection that has ended."""
    original = SocketTransport._recv
    empty: dict[int, int] = {}

    def recv(self: SocketTransport, conn: object) -> bytes:
        data = original(self, conn)  # type: ignore[arg-type]
        if not data:
            empty[id(conn)] = empty.get(id(conn), 0) + 1
            if empty[id(conn)] > 100:
                raise AssertionError("the transport read b'' 100 times: it loops on a connection the server closed")
        return data

    monkeypatch.setattr(SocketTransport, "_recv", recv)


def client(server: RawServer, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(base_url=server.url, transport=SocketTransport(timeout=timeout), timeout=timeout)


# --- 1. response framing -------------------------------------------------------------------------------------------


def test_content_length_body(serve) -> None:
    server = serve(replies(answer(b"hello", headers=("Content-Type: text/plain", "X-Thing: a b")), answer(b"")))
    with client(server) as http:
        r = http.get("/one")
        assert r.status_code == 200 and r.reason_phrase == "OK"
        assert r.content == b"hello"
        assert r.headers["content-type"] == "text/plain" and r.headers["x-thing"] == "a b"
        assert r.http_version == "HTTP/1.1"
        with pytest.raises(RuntimeError):  # reading the httpx way took the body out of its box
            r.extensions[BODY_EXTENSION].take()
        with http.stream("GET", "/two") as r:
            assert r.status_code == 200 and r.extensions[BODY_EXTENSION].take() == bytearray()
    assert server.connections == 1


def test_content_length_body_split_across_reads(serve) -> None:
    server = serve(replies(pieces_of(answer(b"0123456789" * 3, "201 Created"))))
    with client(server) as http:
        r = http.post("/x", content=b"q")
        assert r.status_code == 201 and r.reason_phrase == "Created"
        assert r.content == b"0123456789" * 3


def test_large_content_length_body(serve) -> None:
    payload = np.random.default_rng(0).integers(0, 256, 3 * REUSE_MIN + 5, dtype=np.uint8).tobytes()
    server = serve(replies(answer(payload), answer(b"after")))
    with client(server) as http:
        r = http.get("/big")
        assert r.content == payload
        assert http.get("/next").content == b"after"
    assert server.connections == 1


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    b"5;name=value\r\nhello\r\n"
    b"1;ext\r\n \r\n"
    b"A\r\n0123456789\r\n"
    b"0;last=1\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True], ids=["one write", "split across reads"])
def test_chunked_body_with_extensions_and_trailers(serve, split: bool) -> None:
    server = serve(replies(pieces_of(CHUNKED) if split else CHUNKED, answer(b"next")))
    with client(server) as http:
        r = http.get("/chunked")
        assert r.status_code == 200
        assert r.content == b"hello 0123456789"
        assert http.get("/again").content == b"next"  # the connection was left exactly at the next answer
    assert server.connections == 1


def test_chunked_body_without_trailers(serve) -> None:
    server = serve(replies(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", answer(b"z")))
    with client(server) as http:
        assert http.get("/").content == b"abc"
        assert http.get("/").content == b"z"
    assert server.connections == 1


def test_body_delimited_by_connection_close(serve) -> None:
    server = serve(replies(then_close(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello world", 3, 0.02)))
    with client(server) as http:
        r = http.get("/")
        assert r.status_code == 200 and r.content == b"hello world"
        r = http.get("/")  # that connection is over: a new one
        assert r.content == b"hello world"
    assert server.connections == 2


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        # a 304 may carry the Content-Length of the representation it stands for: there is still no body
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
    ],
    ids=["204", "304"],
)
def test_answers_without_body(serve, head: bytes) -> None:
    server = serve(replies(head, answer(b"next")))
    with client(server) as http:
        r = http.get("/")
        assert r.status_code == int(head[9:12]) and r.content == b""
        assert http.get("/").content == b"next"
    assert server.connections == 1


def test_head_answer_has_no_body(serve) -> None:
    server = serve(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", answer(b"next")))
    with client(server) as http:
        r = http.head("/")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "1234"
        assert http.get("/").content == b"next"
    assert server.connections == 1
    assert server.requests[0].method == "HEAD"


def test_interim_100_continue_before_the_answer(serve) -> None:
    def act(sock: socket.socket, request: RawRequest) -> bool:
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + answer(b"done", "202 Accepted")
        )
        return True

    server = serve(replies(act, answer(b"next")))
    with client(server) as http:
        r = http.post("/", content=b"body")
        assert r.status_code == 202 and r.content == b"done" and "link" not in r.headers
        assert http.get("/").content == b"next"
    assert server.connections == 1


@pytest.mark.parametrize("close", ["Connection: close", "Connection: Close", "HTTP/1.0"])
def test_connection_close_answer_closes_the_socket(serve, close: str) -> None:
    first = (
        answer(b"one", headers=(close,)) if close != "HTTP/1.0" else b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\none"
    )
    server = serve(replies(first, answer(b"two")))
    with client(server) as http:
        assert http.get("/").content == b"one"
        server_saw_eof = time.monotonic() + 5
        while server.client_closed < 1 and time.monotonic() < server_saw_eof:
            time.sleep(0.01)
        assert server.client_closed == 1  # the client closed its socket
        assert http.get("/").content == b"two"
    assert server.connections == 2


# --- 2. keep-alive -------------------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(serve) -> None:
    server = serve(replies(answer(b"a"), answer(b"b"), answer(b"c")))
    with client(server) as http:
        assert [http.get(f"/{i}").content for i in range(3)] == [b"a", b"b", b"c"]
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [0, 0, 0]


def test_idle_connection_closed_by_the_server_is_replaced(serve) -> None:
    def answer_then_close(sock: socket.socket, request: RawRequest) -> bool:
        sock.sendall(answer(b"first"))  # no "Connection: close": the client keeps the connection for later
        return False

    server = serve(replies(answer_then_close, answer(b"second")))
    with client(server) as http:
        assert http.get("/").content == b"first"
        server.wait_closed()
        time.sleep(0.05)
        r = http.get("/")  # the stale connection is noticed before use: no error
        assert r.status_code == 200 and r.content == b"second"
    assert server.connections == 2
    assert [r.connection for r in server.requests] == [0, 1]


def test_concurrent_requests_use_separate_connections(serve) -> None:
    gate = threading.Barrier(2, timeout=5)

    def slow(sock: socket.socket, request: RawRequest) -> bool:
        gate.wait()  # both requests are in flight at once
        sock.sendall(answer(request.target.encode()))
        return True

    server = serve(replies(slow))
    results: dict[str, bytes] = {}
    with client(server) as http:

        def get(path: str) -> None:
            results[path] = http.get(path).content

        threads = [threading.Thread(target=get, args=(p,)) for p in ("/a", "/b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert not any(t.is_alive() for t in threads)
    assert results == {"/a": b"/a", "/b": b"/b"}
    assert server.connections == 2


# --- 3. errors -----------------------------------------------------------------------------------------------------


def test_connection_refused() -> None:
    port = free_port()  # nothing listens there
    with httpx.Client(transport=SocketTransport(timeout=2.0), timeout=2.0) as http, pytest.raises(httpx.ConnectError):
        http.get(f"http://127.0.0.1:{port}/")
    with Client(f"http://127.0.0.1:{port}", timeout=2.0, retry=Retry(attempts=1)) as c, pytest.raises(TransportError):
        c.list_sessions()


def test_server_closes_in_the_middle_of_the_body(serve) -> None:
    server = serve(replies(then_close(answer(b"x" * 1000)[:-500])))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


def test_server_closes_in_the_middle_of_a_large_body(serve) -> None:
    server = serve(replies(then_close(answer(b"x" * (2 * REUSE_MIN))[:REUSE_MIN])))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


def test_server_closes_without_answering(serve) -> None:
    server = serve(replies(then_close(b"")))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


@pytest.mark.parametrize(
    "cut",
    [
        b"5\r\nhel",  # in a chunk's data
        b"5\r\nhello\r\n",  # before the next chunk-size line
        b"5\r\nhello\r\n1",  # in a chunk-size line
        b"5\r\nhello\r\n0\r\n",  # before the end of the (empty) trailers
        b"5\r\nhello\r\n0\r\nX-Trailer: 1",  # in a trailer
    ],
)
def test_server_closes_in_the_middle_of_a_chunked_body(serve, cut: bytes) -> None:
    server = serve(replies(then_close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + cut)))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


def test_server_never_answers(serve) -> None:
    stop = threading.Event()

    def never(sock: socket.socket, request: RawRequest) -> bool:
        stop.wait(5)
        return False

    server = serve(replies(never))
    try:
        with client(server, timeout=0.5) as http:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                http.get("/")
            assert 0.4 <= time.monotonic() - started < 2.0
    finally:
        stop.set()


def test_server_stops_in_the_middle_of_the_body(serve) -> None:
    stop = threading.Event()

    def stall(sock: socket.socket, request: RawRequest) -> bool:
        sock.sendall(answer(b"x" * 100)[:-50])
        stop.wait(5)
        return False

    server = serve(replies(stall))
    try:
        with client(server, timeout=0.5) as http:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                http.get("/")
            assert time.monotonic() - started < 2.0
    finally:
        stop.set()


@pytest.mark.parametrize(
    "status_line", [b"garbage", b"HTTP/1.1", b"HTTP/1.1 OK", b"HTTP/1.1 2x0 OK", b"HTTP/1.1  200 OK"]
)
def test_malformed_status_line(serve, status_line: bytes) -> None:
    server = serve(replies(status_line + b"\r\nContent-Length: 0\r\n\r\n"))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: abc\r\n\r\n",
        b"Content-Length: -5\r\n\r\n",
        b"Content-Length: 1e3\r\n\r\n",
        b"Content-Length: +5\r\n\r\nhello",
        b"Content-Length: \r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 30 + b"\r\nhello",
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n",
    ],
    ids=[
        "non-numeric length",
        "negative length",
        "exponent length",
        "signed length",
        "empty length",
        "bad chunk size",
        "negative chunk size",
        "empty chunk size",
        "chunk size beyond the data",
        "chunk data without its CRLF",
    ],
)
def test_malformed_framing_is_a_protocol_error(serve, framing: bytes) -> None:
    server = serve(replies(then_close(b"HTTP/1.1 200 OK\r\n" + framing)))
    with client(server) as http, pytest.raises(httpx.RemoteProtocolError):
        http.get("/")


@pytest.mark.parametrize("length", [b"9" * 40, b"%d" % (1 << 62)], ids=["beyond any index", "too large to allocate"])
def test_absurd_content_length_is_a_transport_error(serve, length: bytes) -> None:
    """Well-formed digits, but no buffer can hold them: an httpx error (which ``Client`` reports as its
    ``TransportError``), not an OverflowError or MemoryError escaping from the buffer's allocation."""
    server = serve(replies(then_close(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nxyz")))
    with client(server) as http, pytest.raises(httpx.TransportError):
        http.get("/")


def test_https_is_not_spoken() -> None:
    with httpx.Client(transport=SocketTransport(timeout=1.0)) as http, pytest.raises(httpx.UnsupportedProtocol):
        http.get("https://127.0.0.1:1/")


def test_client_errors_keep_their_types(serve) -> None:
    problem = b'{"type":"about:blank","title":"Not Found","status":404,"detail":"no such session"}'
    server = serve(replies(answer(problem, "404 Not Found", ("Content-Type: application/problem+json",))))
    with Client(server.url, timeout=5.0) as c, pytest.raises(NotFound, match="no such session"):
        c.session("missing")


# --- 4. request bytes on the wire ----------------------------------------------------------------------------------


def test_request_head(serve) -> None:
    server = serve(replies(answer(b"ok")))
    with client(server) as http:
        http.get("/v1/things/a%20b", params={"x": "1", "y": "two words"}, headers={"X-Custom": "v"})
    (request,) = server.requests
    assert request.method == "GET"
    assert request.target == "/v1/things/a%20b?x=1&y=two+words"
    assert request.version == "HTTP/1.1"
    assert request.header("Host") == f"127.0.0.1:{server.port}"
    assert request.values("Accept-Encoding") == ["identity"]
    assert request.header("Connection") == "keep-alive"
    assert request.header("X-Custom") == "v"
    assert request.header("Transfer-Encoding") is None and request.body == b""
    assert request.head.endswith(b"\r\n\r\n") and request.head.count(b"\r\n\r\n") == 1


def test_list_of_memoryviews_body_with_length(serve) -> None:
    floats = np.arange(300_000, dtype=np.float32)  # 1.2 MB, sent from the array's memory
    parts = [memoryview(b"header"), memoryview(b""), memoryview(floats).cast("B"), memoryview(bytearray(b"tail"))]
    expected = b"header" + floats.tobytes() + b"tail"
    server = serve(replies(answer(b"ok")))
    with client(server) as http:
        r = http.post("/up", content=iter(parts), headers={"Content-Length": str(len(expected))})
        assert r.content == b"ok"
        r = http.put("/up2", content=b"plain bytes")
    first, second = server.requests
    assert first.method == "POST" and first.target == "/up"
    assert first.header("Content-Length") == str(len(expected))
    assert first.header("Transfer-Encoding") is None
    assert first.body == expected
    assert second.method == "PUT" and second.body == b"plain bytes" and second.header("Content-Length") == "11"
    assert server.connections == 1


def test_generator_body_without_length_goes_chunked(serve) -> None:
    pieces = [b"abc", b"", b"d" * 70_000, bytes(range(256))]

    def gen() -> Iterator[bytes]:
        yield from pieces  # the empty piece must not end the body early

    server = serve(replies(answer(b"ok"), answer(b"next")))
    with client(server) as http:
        assert http.post("/stream", content=gen()).content == b"ok"
        assert http.get("/").content == b"next"
    first = server.requests[0]
    assert first.header("Transfer-Encoding") == "chunked" and first.header("Content-Length") is None
    assert first.body == b"".join(pieces)
    assert server.connections == 1


# --- 5. receive buffers --------------------------------------------------------------------------------------------


def pooled_client(server: RawServer) -> tuple[httpx.Client, SocketTransport, list[int]]:
    """A client, its transport and the sizes of the receive buffers that transport's pool has made so far."""
    transport = SocketTransport(timeout=5.0)
    made: list[int] = []
    make = transport._buffers.make

    def counted(n: int) -> Any:
        made.append(n)
        return make(n)

    transport._buffers.make = counted
    return httpx.Client(base_url=server.url, transport=transport, timeout=5.0), transport, made


def fetch(http: httpx.Client, path: str) -> bytearray:
    """The body of a GET, taken out of its box (the response itself is dropped)."""
    with http.stream("GET", path) as r:
        assert r.status_code == 200
        box = r.extensions[BODY_EXTENSION]
        assert isinstance(box, Body)
        return box.take()


def big_answers(size: int) -> Handler:
    """Answer the n-th request with bytes of value n + 1: ``size`` of them, or 4 more for a path ending in "+4"."""

    def handle(sock: socket.socket, request: RawRequest, n: int) -> bool:
        sock.sendall(answer(bytes([n + 1]) * (size + 4 * request.target.endswith("+4"))))
        return True

    return handle


def test_transport_pool_settings() -> None:
    pool = SocketTransport()._buffers
    assert pool.max_bytes == REUSE_MAX_BYTES and REUSE_MIN == 1 << 20
    assert isinstance(pool.make(10), bytearray)


def test_body_box_hands_the_buffer_over_once() -> None:
    buf = bytearray(b"abc")
    box = Body(buf)
    assert box.take() is buf
    with pytest.raises(RuntimeError, match="already taken"):
        box.take()


def test_large_body_is_received_into_a_pooled_buffer(serve, no_gc: None) -> None:
    size = 2 * REUSE_MIN
    server = serve(big_answers(size))
    http, transport, made = pooled_client(server)
    with http:
        body = fetch(http, "/1")
        assert type(body) is bytearray and len(body) == size and body == b"\x01" * size
        assert made == [size] and transport._buffers.kept_bytes == size
        with http.stream("GET", "/2") as r:
            assert r.read() == b"\x02" * size  # read the httpx way: one copy, and the box is emptied
            with pytest.raises(RuntimeError):
                r.extensions[BODY_EXTENSION].take()
        assert made == [size, size]  # the first body is still held
        del body
        assert http.get("/3").content == b"\x03" * size  # a plain get copies out: its buffer is free at once
        assert http.get("/4").content == b"\x04" * size
        assert made == [size, size]


def test_small_and_chunked_bodies_are_not_pooled(serve, no_gc: None) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    server = serve(replies(answer(b"small"), chunked, answer(b"s" * (REUSE_MIN - 1))))
    http, transport, made = pooled_client(server)
    with http:
        small = fetch(http, "/")
        assert type(small) is bytearray and small == b"small"
        assert fetch(http, "/") == b"abc"
        assert fetch(http, "/") == b"s" * (REUSE_MIN - 1)
    assert made == [5, REUSE_MIN - 1] and transport._buffers.kept_bytes == 0  # made, never tracked


def test_dropped_receive_buffer_is_reused(serve, no_gc: None) -> None:
    size = 2 * REUSE_MIN
    server = serve(big_answers(size))
    http, _, made = pooled_client(server)
    with http:
        first = fetch(http, "/1")
        first_id = id(first)  # compared by id later: a lent buffer stays alive in the pool (bytearrays have no weakref)
        second = fetch(http, "/2")
        assert second is not first, "a body still held was reused"
        assert first == b"\x01" * size and second == b"\x02" * size
        second_id = id(second)
        del first
        third = fetch(http, "/3")
        assert id(third) == first_id and made == [size, size]  # the dropped buffer serves the same-size answer
        assert third == b"\x03" * size and second == b"\x02" * size  # the one still held is intact
        del second, third
        other = fetch(http, "/4+4")  # another size: not served from the kept buffers
        assert len(other) == size + 4 and other == b"\x04" * (size + 4) and len(made) == 3
        fifth, sixth = fetch(http, "/5"), fetch(http, "/6")
        assert {id(fifth), id(sixth)} == {first_id, second_id} and len(made) == 3
        assert fifth == b"\x05" * size and sixth == b"\x06" * size


# Each builds, from a received body, something a reader keeps: the body's buffer must not be reused meanwhile.
VIEWS: dict[str, Callable[[bytearray], object]] = {
    "numpy array": lambda b: np.frombuffer(b, dtype=np.uint8),
    "numpy view of a numpy array": lambda b: np.frombuffer(b, dtype=np.uint8)[8:].view(np.float32),
    "memoryview slice": lambda b: memoryview(b)[100:],
    "np.frombuffer of a cast memoryview": lambda b: np.frombuffer(memoryview(b).cast("B")[8:], dtype=np.float32),
}


@pytest.mark.parametrize("kind", list(VIEWS))
def test_body_still_viewed_is_not_reused(serve, no_gc: None, kind: str) -> None:
    size = 2 * REUSE_MIN
    server = serve(big_answers(size))
    http, _, made = pooled_client(server)
    with http:
        body = fetch(http, "/1")
        body_id = id(body)
        kept = VIEWS[kind](body)
        del body  # only the view keeps it now
        later = [fetch(http, f"/{k}") for k in (2, 3)]
        assert all(id(b) != body_id for b in later), f"a body still viewed by a {kind} was reused"
        assert [bytes(b[:1]) for b in later] == [b"\x02", b"\x03"]
        assert (np.frombuffer(memoryview(kept).cast("B"), np.uint8) == 1).all(), "a live view's data was overwritten"
        assert len(made) == 3
        ids = {body_id, *(id(b) for b in later)}
        del kept, later
        again = [fetch(http, f"/{k}") for k in (4, 5, 6)]
        assert {id(b) for b in again} == ids and len(made) == 3  # the viewed one is free again too
        assert [bytes(b[-1:]) for b in again] == [b"\x04", b"\x05", b"\x06"]


def test_decoded_tensors_keep_their_body(serve, no_gc: None) -> None:
    """What a client holds after ``wire.decode``: arrays over slices of the body."""
    values = np.arange(600_000, dtype=np.float32)
    first_body = wire.encode({"w": values})

    def handle(sock: socket.socket, request: RawRequest, n: int) -> bool:
        sock.sendall(answer(first_body if n == 0 else wire.encode({"w": -values - n})))
        return True

    server = serve(handle)
    http, _, made = pooled_client(server)
    with http:
        tensors = wire.decode(fetch(http, "/1"))[0]
        for k in (2, 3):
            assert np.array_equal(wire.decode(fetch(http, f"/{k}"))[0]["w"], -values - (k - 1))
        assert np.array_equal(tensors["w"], values), "decoded tensors were overwritten by the next answer"
        assert len(made) == 2  # answers 2 and 3 share a buffer; the first stays with its tensors
        del tensors
        fetch(http, "/4")
        fetch(http, "/5")
        assert len(made) == 2


def test_client_steps_reuse_the_receive_buffer_once_results_are_released(server: EmbeddedServer, no_gc: None) -> None:
    """Through ``Client``: a released (or dropped) step result frees its answer's buffer for the next step; a kept
    one keeps its buffer, and its parameters, intact."""
    transport = SocketTransport(timeout=30.0)
    made: list[int] = []
    make = transport._buffers.make
    transport._buffers.make = lambda n: (made.append(n), make(n))[1]
    w = np.random.default_rng(0).standard_normal(600_000).astype(np.float32)
    with Client(server.url, timeout=30.0, transport=transport) as c:
        sid = c.create_session({"w": w}, "adamw", hyperparams={"lr": 1e-2})["id"]
        grads = {"w": np.ones_like(w)}
        result = c.step(sid, grads)
        assert result.params is not None
        answer_size = made[-1]
        assert answer_size > w.nbytes
        for _ in range(4):
            result.release()
            assert result.params is None
            result = c.step(sid, grads)
        assert made.count(answer_size) == 1, f"released answers were not reused: {made}"
        kept = result  # not released
        kept_w = kept.params["w"].copy()  # type: ignore[index]
        for _ in range(3):
            step = c.step(sid, grads)
            assert step.step > kept.step
            del step  # dropped without release: also frees its buffer
        assert made.count(answer_size) == 2  # the kept result has its own buffer, the others shared one
        assert np.array_equal(kept.params["w"], kept_w), "a kept result's parameters were overwritten"  # type: ignore[index]
        kept.release()
        del result, kept
        c.step(sid, grads)
        assert made.count(answer_size) == 2
        c.delete_session(sid)
