"""Request and response bodies without extra copies: the difference between a 40 MB step that takes the time of
the socket and one that takes several times that.

- :func:`receive_body` fills one preallocated buffer from the request stream (Starlette's ``body()`` collects the
  chunks and joins them: a second full copy).
- :class:`BufferResponse` sends the safetensors header and the flat parameter buffer as they are (a ``Response``
  needs one joined ``bytes``).
- :class:`OptserveProtocol` is uvicorn's httptools protocol receiving a large body straight into one buffer (taken
  when the application first reads the body, after its auth and limit checks): the socket reads into it directly,
  no 64 KiB pause/resume rounds, no joining (uvicorn's own path copies every piece three times: into its bytearray,
  into a ``bytes`` per message, and Starlette's join). It also bounds what uvicorn leaves open: the size of a
  request's head and the time it may take to arrive.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from optserve.client.buffers import BufferPool
from optserve.client.transport import widen_buffers

from .errors import BadRequest, PayloadTooLarge

# Request bodies (and a Ray front's answers): reused by exact size once nothing references them (see BufferPool).
POOL: BufferPool[np.ndarray] = BufferPool(
    lambda n: np.empty(n, dtype=np.uint8), int(os.environ.get("OPTSERVE_IO_POOL_BYTES", 512 << 20))
)


async def read_body(request: Request, max_bytes: int | None = None) -> bytes | bytearray | memoryview:
    """The whole body of a Starlette request (see :func:`receive_body`)."""
    return await receive_body(request.receive, request.headers.get("content-length"), max_bytes)


async def receive_body(
    receive: Receive, content_length: str | None, max_bytes: int | None = None
) -> bytes | bytearray | memoryview:
    """The whole request body from ASGI ``receive``, read into one buffer sized by ``Content-Length`` when there is
    one (and taken as it is when :class:`OptserveProtocol` already delivered it in one piece).

    A body above ``max_bytes`` is refused with 413: from its ``Content-Length`` before anything is read, or as soon
    as a body without one grows past the limit. A client that disconnects first raises ``ClientDisconnect``.
    """
    length = content_length or ""
    if not (length.isascii() and length.isdigit()):
        return await _read_unsized(receive, max_bytes)
    size = int(length)
    if max_bytes is not None and size > max_bytes:
        raise PayloadTooLarge(f"the body of {size} bytes exceeds the limit of {max_bytes}", limit=max_bytes)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    if message["type"] == "http.request" and not message.get("more_body", False):  # the whole body in one message
        whole: bytes | memoryview = message.get("body", b"")  # (small bodies nearly always, large ones from
        if len(whole) != size:  # OptserveProtocol)
            raise BadRequest(f"the body of {len(whole)} bytes does not match its Content-Length of {size}")
        return whole
    # In pieces: a small body into a buffer of its size; a large one into a buffer that grows with what arrives, so
    # that a client announcing gigabytes and sending bytes never makes the server allocate, let alone zero, them.
    buf = bytearray(size) if size <= DIRECT_MIN else bytearray()
    view = memoryview(buf) if size <= DIRECT_MIN else None
    pos = 0
    async for chunk in _stream(receive, message):
        end = pos + len(chunk)
        if end > size:
            raise BadRequest(f"the body is longer than its Content-Length of {size} bytes")
        if view is not None:
            view[pos:end] = chunk
        else:
            buf += chunk
        pos = end
    if pos != size:
        raise BadRequest(f"the body ended after {pos} of its {size} bytes")
    return buf


async def _stream(receive: Receive, message: Message | None = None) -> AsyncIterator[bytes | memoryview]:
    """The pieces of a body (starting with ``message`` if one was received already), as Starlette's
    ``Request.stream``: a disconnect before the end raises ``ClientDisconnect``."""
    while True:
        if message is None:
            message = await receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            if body:
                yield body
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
        message = None


async def _read_unsized(receive: Receive, max_bytes: int | None) -> bytes:
    """A body without Content-Length (chunked): collected, and refused as soon as it passes the limit."""
    chunks: list[bytes | memoryview] = []
    size = 0
    async for chunk in _stream(receive):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise PayloadTooLarge(f"the body exceeds the limit of {max_bytes} bytes", limit=max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


class BufferResponse(Response):
    """A response whose body is a sequence of buffers (bytes or memoryviews), sent without joining them."""

    def __init__(
        self,
        parts: Sequence[bytes | memoryview | np.ndarray],
        status_code: int,
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(b"", status_code=status_code, media_type=media_type, headers=headers)
        self.parts = [memoryview(p).cast("B") for p in parts]  # type: ignore[arg-type]
        self.headers["content-length"] = str(sum(len(p) for p in self.parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.parts) - 1
        for i, part in enumerate(self.parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})  # type: ignore[typeddict-item]
        if not self.parts:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


DIRECT_MIN = 1 << 20  # bodies from this size on are received straight into one buffer
PEER_EXTENSION = "optserve.peer"  # a Unix socket request's scope["extensions"]: the peer's {"pid", "uid"}


def peer_credentials(sock: socket.socket) -> dict[str, int] | None:
    """The process and user at the other end of a Unix socket, as the kernel saw them when it connected
    (``SO_PEERCRED``); None where the kernel does not tell."""
    try:
        pid, uid, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return None
    return {"pid": pid, "uid": uid} if pid > 0 else None  # 0: a peer in a pid namespace the server cannot see


MAX_REQUEST_HEAD_BYTES = 64 << 10  # defaults of the settings of the same names (read from the app's state)
HEADER_TIMEOUT_SECONDS = 10.0
MAX_DIRECT = 1 << 34  # never preallocate more than this on a client's word (a larger body takes the normal path)

try:
    import httptools
    import numpy as np
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    class OptserveProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with a bounded request head and large bodies received in one buffer.

        - The request line and headers may take ``max_request_head_bytes`` (431 beyond, before the parser sees
          more) and ``header_timeout_seconds`` from their first byte, or from the connection's start (408 after):
          a slow or endless head holds neither memory nor a connection for long (uvicorn bounds neither).
        - For a request with a ``Content-Length`` of 1 MiB or more, the body goes into a buffer of that size
          (allocated without zeroing, when the application first reads the body, after its checks): what uvicorn
          buffered so far is copied over, the rest is received straight into it (:class:`_BodySink`), and the
          application receives the whole body as one ``http.request`` message holding a memoryview of that
          buffer. Smaller bodies take uvicorn's own path.
        """

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            self._peer: dict[str, int] | None = None
            if sock is not None and sock.family == socket.AF_UNIX:  # `optserve serve --uds`: see widen_buffers
                widen_buffers(sock)
                self._peer = peer_credentials(sock)
            self._in_head = True  # reading a request line and headers (or waiting for the next request's)
            self._head_begun = False  # the parser has seen the first byte of a request whose head is incomplete
            self._head_bytes = 0
            self._heads_done = 0  # request heads and bodies completed on this connection
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                seconds = float(self.app_state.get("header_timeout_seconds", HEADER_TIMEOUT_SECONDS))
                self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._head_begun or self.cycle is None:  # a head under way, or nothing at all since connecting
                self._refuse(408, "Request Timeout", "the request line and headers did not arrive in time")

        def _refuse(self, status: int, title: str, detail: str) -> None:
            if self.transport.is_closing():
                return
            slug = title.lower().replace(" ", "-")
            body = json.dumps({"type": f"urn:optserve:problem:{slug}", "title": title, "status": status,
                               "detail": detail}).encode()  # fmt: skip
            head = (f"HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()  # fmt: skip
            self.transport.write(head + body)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            heads = self._heads_done
            super().data_received(data)
            if self._heads_done != heads:  # a head or a body ended in this piece: it was not all head
                self._head_bytes = 0
            elif self._in_head and not self.transport.is_closing():  # all of this piece is head
                self._head_bytes += len(data)
                limit = int(self.app_state.get("max_request_head_bytes", MAX_REQUEST_HEAD_BYTES))
                if self._head_bytes > limit:  # at most one piece (256 KiB) beyond the limit was parsed
                    self._refuse(431, "Request Header Fields Too Large",
                                 f"the request line and headers exceed the limit of {limit} bytes")  # fmt: skip

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._peer is not None:  # who is at the other end of the Unix socket (shared-memory steps)
                self.scope.setdefault("extensions", {})[PEER_EXTENSION] = dict(self._peer)  # type: ignore[typeddict-item,assignment]
            self._head_begun = True
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._in_head = self._head_begun = False
            self._heads_done += 1
            self._disarm_head_timer()
            super().on_headers_complete()
            length = dict(self.headers).get(b"content-length", b"")
            limit = min(MAX_DIRECT, self.app_state.get("max_body_bytes", MAX_DIRECT))
            if length.isdigit() and DIRECT_MIN <= int(length) <= limit:  # above the limit, the app answers 413
                _DirectBody.attach(self, self.cycle, int(length))

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._heads_done += 1

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def on_body(self, body: bytes) -> None:
            direct = getattr(self.cycle, "direct_body", None)
            # Not asked for yet: uvicorn's own path (paused at 64 KiB). Once taken, the rest arrives through the
            # sink (_BodySink), never here.
            if direct is None or direct.buffer is None:
                super().on_body(body)

        def body_received(self) -> None:
            """The last byte of a body the sink received: the parser, which saw only the body's first pieces, is
            replaced by a fresh one for the connection's next request, and the message ends as the parser would
            end it."""
            self.parser = httptools.HttpRequestParser(self)
            self.on_message_complete()

    class _BodySink(asyncio.BufferedProtocol):
        """The connection's protocol while the rest of a large body arrives: the transport receives it straight
        into the body's buffer (``recv_into``: one copy, no ``bytes`` per piece, no parser), never past its end,
        then hands the connection back to ``protocol``. Here 4 MB arrived 0.2-0.3 ms sooner than through
        ``data_received`` and the parser."""

        def __init__(self, protocol: OptserveProtocol, body: _DirectBody) -> None:
            self.protocol = protocol
            self.body = body

        def get_buffer(self, sizehint: int) -> memoryview:
            body = self.body
            assert body.buffer is not None
            return memoryview(body.buffer)[body.pos : body.size]  # type: ignore[arg-type]

        def buffer_updated(self, nbytes: int) -> None:
            body = self.body
            body.pos += nbytes
            if body.pos >= body.size:
                protocol = self.protocol
                protocol.transport.set_protocol(protocol)
                protocol.body_received()

        def eof_received(self) -> None:  # the body cut short: as the protocol would take it (it keeps nothing)
            self.protocol.eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            self.protocol.connection_lost(exc)

        def pause_writing(self) -> None:
            self.protocol.pause_writing()

        def resume_writing(self) -> None:
            self.protocol.resume_writing()

    _EMPTY = np.empty(0, dtype=np.uint8)

    class _DirectBody:
        def __init__(self, protocol: OptserveProtocol, cycle: RequestResponseCycle, size: int) -> None:
            self.protocol = protocol
            self.cycle = cycle
            self.size = size
            # Allocated when the application first asks for the body, that is once it has checked auth and limits:
            # a client that is refused never makes the server reserve the size it announced.
            self.buffer: np.ndarray | None = None
            self.pos = 0
            self.delivered = False

        def _start(self) -> None:
            """Take the buffer, move over what uvicorn has buffered so far, and let the socket flow again: from
            here on straight into the buffer (see :class:`_BodySink`)."""
            cycle = self.cycle
            self.buffer = POOL.take(self.size)
            early = bytes(cycle.body)
            cycle.body = bytearray()
            self.buffer[: len(early)] = np.frombuffer(early, dtype=np.uint8)
            self.pos = len(early)
            if self.pos < self.size and not cycle.transport.is_closing():
                cycle.transport.set_protocol(_BodySink(self.protocol, self))
            cycle.flow.resume_reading()

        @classmethod
        def attach(cls, protocol: OptserveProtocol, cycle: RequestResponseCycle, size: int) -> None:
            direct = cls(protocol, cycle, size)
            cycle.direct_body = direct  # type: ignore[attr-defined]
            cycle.receive = direct.receive  # type: ignore[method-assign,assignment]  # its ASGI task has not started

        async def _wait(self) -> None:
            cycle = self.cycle
            await cycle.message_event.wait()
            cycle.message_event.clear()

        async def receive(self) -> dict[str, object]:
            cycle = self.cycle
            if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
                cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
            if not self.delivered:
                if self.buffer is None:
                    self._start()
                while cycle.more_body and not cycle.disconnected and not cycle.response_complete:
                    await self._wait()
                if cycle.disconnected or cycle.response_complete:
                    self.buffer = _EMPTY  # nobody will read it: not kept until the garbage collector finds the cycle
                else:
                    self.delivered = True
                    body = memoryview(self.buffer)  # type: ignore[arg-type]
                    # From here the application's views alone keep the buffer: when they are gone, the pool can
                    # reuse it (this object sits in a reference cycle with the uvicorn cycle, freed only by the GC).
                    self.buffer = _EMPTY
                    return {"type": "http.request", "body": body, "more_body": False}
            while not (cycle.disconnected or cycle.response_complete):  # afterwards: only a disconnect comes
                await self._wait()
            return {"type": "http.disconnect"}

    HTTP_PROTOCOL: type | str = OptserveProtocol
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]; fall back to uvicorn's choice
    HTTP_PROTOCOL = "auto"
