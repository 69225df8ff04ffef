"""``SocketTransport``: HTTP/1.1 over a plain socket, for the bodies of large steps.

httpx's default transport parses responses through h11 in 64 KiB reads and joins them: about 100-150 ms for a
40 MB answer on loopback, where the socket itself takes about 25 ms. This transport sends the request head and the
body's buffers with ``sendall`` (no join, no copy of numpy data) and receives a body of known length with
``recv_into`` straight into one preallocated buffer. It is an ``httpx.BaseTransport``, so ``Client`` keeps httpx's
API, errors and timeouts; ``Client`` uses it for ``http://`` URLs.

The buffer travels in ``response.extensions["optserve.body"]`` (a :class:`Body`: ``.take()`` it once); reading
the response the httpx way (``response.read()``) also works and makes one copy. Large receive buffers come from a
:class:`~optserve.client.buffers.BufferPool`: once the reader holds no reference to a body any more, its buffer
serves a later answer of the same size (fresh memory costs a page fault per page, the largest cost of a large
receive on these VMs).

Scope, on purpose: ``http://`` only (``https://`` goes through httpx's own transport), over TCP or a Unix socket
(``uds``: a server on this machine, ``optserve serve --uds``), ``Content-Length`` or chunked bodies, keep-alive
connections pooled per host and port (a connection that the server has closed while idle is detected before reuse
and replaced), no proxies, no compression (``Accept-Encoding: identity`` is sent).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterable, Iterator

import httpx

from .buffers import BufferPool

BODY_EXTENSION = "optserve.body"
REUSE_MAX_BYTES = 512 << 20
HEAD_LIMIT = 64 * 1024
RECV = 256 * 1024
IOV_MAX = 512  # buffers per sendmsg call (Linux takes up to 1024)
# A Unix socket's send and receive buffers: Linux's default (208 KiB) makes a 4 MB body take about 20 rounds of
# wake-ups between the two processes; 4 MiB (Linux caps the request at net.core.wmem_max/rmem_max) halves the time
# of a 4 MB exchange each way. TCP over loopback gained nothing from it here, and autotunes its own.
UNIX_BUFFER_BYTES = 4 << 20


def widen_buffers(sock: socket.socket) -> None:
    """Ask for :data:`UNIX_BUFFER_BYTES` of send and receive buffer on a Unix socket (the kernel may give less)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UNIX_BUFFER_BYTES)


class Body:
    """A received body handed over once: :meth:`take` gives the buffer and forgets it.

    httpx keeps a response and its stream in a reference cycle, freed only by the garbage collector; holding the
    buffer through this one-shot box lets it be dropped (and reused by the pool) as soon as the reader is done.
    """

    def __init__(self, buffer: bytearray) -> None:
        self._buffer: bytearray | None = buffer

    def take(self) -> bytearray:
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            raise RuntimeError("the body was already taken")
        return buffer


class _BufferStream(httpx.SyncByteStream):
    def __init__(self, body: Body) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield bytes(self.body.take())


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pending = bytearray()  # bytes received past the end of the previous response (none for HTTP/1.1)

    def stale(self) -> bool:
        """An idle keep-alive connection that is readable has been closed by the server (or is out of sync)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable) or bool(self.pending)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _send_buffers(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """``sendall`` of several buffers with scatter-gather ``sendmsg``: no join (no copy), and no small packet per
    part (with TCP_NODELAY, each ``sendall`` of a small part would go out as a packet of its own)."""
    views = [view for b in buffers if len(view := memoryview(b).cast("B"))]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + IOV_MAX])
        while sent:
            if sent >= len(views[first]):
                sent -= len(views[first])
                first += 1
            else:
                views[first], sent = views[first][sent:], 0


def request_head(method: str, target: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A request's line and headers; ``Accept-Encoding: identity`` and ``Connection: keep-alive`` are added (pass
    ``headers`` without them)."""
    lines = b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
    return b"%s %s HTTP/1.1\r\n%sAccept-Encoding: identity\r\nConnection: keep-alive\r\n\r\n" % (
        method.encode(),
        target,
        lines,
    )


class SocketTransport(httpx.BaseTransport):
    """HTTP/1.1 for ``http://`` URLs with zero-copy sends and single-buffer receives; with ``uds``, every request
    goes to the server listening on that Unix socket, whatever the URL's host."""

    def __init__(
        self, timeout: float | None = 60.0, max_idle: int = 8, max_body_bytes: int = 1 << 36, uds: str | None = None
    ) -> None:
        self.timeout = timeout
        self.uds = uds
        self.max_idle = max_idle
        self.max_body_bytes = max_body_bytes  # an answer announcing more is refused before anything is allocated
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._lock = threading.Lock()
        self._buffers: BufferPool[bytearray] = BufferPool(bytearray, REUSE_MAX_BYTES)

    # --- connections --------------------------------------------------------------------------------------------

    def _checkout(self, host: str, port: int, timeout: float | None) -> _Connection:
        with self._lock:
            pool = self._idle.get((host, port), [])
            while pool:
                conn = pool.pop()
                if not conn.stale():
                    conn.sock.settimeout(timeout)
                    return conn
                conn.close()
        try:
            if self.uds is None:
                sock = socket.create_connection((host, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = self._connect_unix(self.uds, timeout)
        except TimeoutError as e:
            raise httpx.ConnectTimeout(str(e)) from e
        except OSError as e:
            raise httpx.ConnectError(str(e)) from e
        return _Connection(sock)

    @staticmethod
    def _connect_unix(path: str, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            widen_buffers(sock)
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _checkin(self, key: tuple[str, int], conn: _Connection) -> None:
        with self._lock:
            pool = self._idle.setdefault(key, [])
            if len(pool) < self.max_idle:
                pool.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            for pool in self._idle.values():
                for conn in pool:
                    conn.close()
            self._idle.clear()

    # --- one exchange -------------------------------------------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"SocketTransport speaks http:// only, not {url.scheme}://")
        timeouts = request.extensions.get("timeout", {})
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in (b"accept-encoding", b"connection")]
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        head = request_head(request.method, request.url.raw_path, headers)
        status, reason, answer_headers, body = self.exchange(
            (url.host, url.port or 80),
            request.method,
            head,
            request.stream,  # type: ignore[arg-type]
            chunked,
            timeouts.get("connect", self.timeout),
            timeouts.get("read", self.timeout),
        )
        box = Body(body)
        extensions: dict[str, object] = {
            "http_version": b"HTTP/1.1",
            "reason_phrase": reason.encode("latin-1"),
            BODY_EXTENSION: box,
        }
        return httpx.Response(
            status, headers=answer_headers, stream=_BufferStream(box), request=request, extensions=extensions
        )

    def exchange(
        self,
        key: tuple[str, int],
        method: str,
        head: bytes,
        parts: Iterable[bytes | memoryview],
        chunked: bool,
        connect_timeout: float | None,
        read_timeout: float | None,
    ) -> tuple[int, str, list[tuple[bytes, bytes]], bytearray]:
        """One request (``head`` from :func:`request_head`, then ``parts``, chunked or not) on a pooled
        connection to ``key``, and its answer: status, reason, headers and the body in one buffer. What
        :meth:`handle_request` does under httpx, and :class:`~optserve.client.http.Client` calls for a step
        without building httpx's request and response objects (about 0.5 ms a step here)."""
        conn = self._checkout(*key, connect_timeout)
        try:
            self._send(conn, head, parts, chunked)
            status, reason, headers, body, keep = self._receive(conn, method, read_timeout)
        except BaseException:
            conn.close()
            raise
        if keep:
            self._checkin(key, conn)
        else:
            conn.close()
        return status, reason, headers, body

    def _send(self, conn: _Connection, head: bytes, parts: Iterable[bytes | memoryview], chunked: bool) -> None:
        try:
            if chunked:
                conn.sock.sendall(head)
                for part in parts:
                    if part:
                        _send_buffers(conn.sock, [b"%x\r\n" % len(part), part, b"\r\n"])
                conn.sock.sendall(b"0\r\n\r\n")
            else:  # the head and every part in as few system calls as the kernel takes them (one, for a small step)
                _send_buffers(conn.sock, [head, *parts])
        except TimeoutError as e:
            raise httpx.WriteTimeout(str(e)) from e
        except OSError as e:
            raise httpx.WriteError(str(e)) from e

    def _recv(self, conn: _Connection) -> bytes:
        """Whatever the socket has (up to 256 KiB); b"" at the end of the connection."""
        try:
            return conn.sock.recv(RECV)
        except TimeoutError as e:
            raise httpx.ReadTimeout(str(e)) from e
        except OSError as e:
            raise httpx.ReadError(str(e)) from e

    def _recv_into(self, conn: _Connection, view: memoryview) -> int:
        try:
            n = conn.sock.recv_into(view)
        except TimeoutError as e:
            raise httpx.ReadTimeout(str(e)) from e
        except OSError as e:
            raise httpx.ReadError(str(e)) from e
        if n == 0:
            raise httpx.RemoteProtocolError("the server closed the connection in the middle of the body")
        return n

    def _receive(
        self, conn: _Connection, method: str, timeout: float | None
    ) -> tuple[int, str, list[tuple[bytes, bytes]], bytearray, bool]:
        conn.sock.settimeout(timeout)
        data = conn.pending
        conn.pending = bytearray()
        while True:  # skip interim 1xx answers
            while (end := data.find(b"\r\n\r\n")) < 0:
                if len(data) > HEAD_LIMIT:
                    raise httpx.RemoteProtocolError("response head too large")
                chunk = self._recv(conn)
                if not chunk:
                    raise httpx.RemoteProtocolError("the server closed the connection without answering")
                data += chunk
            lines = bytes(data[:end]).split(b"\r\n")
            del data[: end + 4]
            try:
                version, code, *rest = lines[0].split(b" ", 2)
                status = int(code)
            except ValueError:
                raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:100]!r}") from None
            if not 100 <= status < 200:
                break
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        fields = {k.lower(): v for k, v in headers}
        keep = version == b"HTTP/1.1" and fields.get(b"connection", b"").lower() != b"close"
        body: bytearray
        if method == "HEAD" or status in (204, 304):
            body = bytearray()
        elif b"content-length" in fields:
            length = fields[b"content-length"]
            if not length.isdigit() or int(length) > self.max_body_bytes:
                raise httpx.RemoteProtocolError(
                    f"Content-Length {length[:40]!r} is malformed or above the limit of {self.max_body_bytes} bytes"
                )
            body = self._read_exactly(conn, data, int(length))
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = self._read_chunked(conn, data)
        else:  # delimited by the end of the connection
            body = data
            while chunk := self._recv(conn):
                body += chunk
            keep = False
        return status, (rest[0] if rest else b"").decode("latin-1"), headers, body, keep

    def _read_exactly(self, conn: _Connection, data: bytearray, size: int) -> bytearray:
        body = self._buffers.take(size)
        view = memoryview(body)
        got = min(len(data), size)
        view[:got] = data[:got]
        conn.pending = data[got:]
        while got < size:
            got += self._recv_into(conn, view[got:])
        view.release()
        return body

    def _more(self, conn: _Connection, data: bytearray, where: str) -> None:
        chunk = self._recv(conn)
        if not chunk:
            raise httpx.RemoteProtocolError(f"the server closed the connection in {where}")
        data += chunk

    def _read_chunked(self, conn: _Connection, data: bytearray) -> bytearray:
        body = bytearray()
        while True:
            while (end := data.find(b"\r\n")) < 0:
                self._more(conn, data, "a chunk size line")
            try:
                size = int(bytes(data[:end]).split(b";")[0], 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"malformed chunk size {bytes(data[:end])[:40]!r}") from None
            if size < 0 or len(body) + size > self.max_body_bytes:
                raise httpx.RemoteProtocolError("negative chunk size, or the body grows beyond the limit")
            del data[: end + 2]
            if size == 0:
                while (end := data.find(b"\r\n")) != 0:  # trailers, then the empty line
                    if end < 0:
                        self._more(conn, data, "the trailers")
                    else:
                        del data[: end + 2]
                conn.pending = data[2:]
                return body
            while len(data) < size + 2:
                self._more(conn, data, "a chunk")
            if data[size : size + 2] != b"\r\n":
                raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
            body += data[:size]
            del data[: size + 2]
