"""The Ray store's direct data path: a step goes from a front to its session's host over a socket of the host's own.

A Ray actor call costs about 0.8 ms round trip here and 0.35 ms of the front's CPU (serialization, the core
worker), more than a whole small step in a single process; a step of 1e7 parameters also went through Ray's object
store twice (the gradients in, the parameters back). So the step, the one hot operation, takes this path, and Ray
keeps everything else: placement, the directory, recovery, and the other operations.

- Each session host listens on its node's address (:class:`DirectServer`) and publishes the address through its
  actor (``SessionHost.endpoint``). A front keeps idle connections per host (:class:`DirectPool`) and sends each
  step as one frame. A connection starts with the deployment's secret (kept in Ray's GCS): nothing else is
  served. Nothing on this socket is ever unpickled: frames are JSON headers and raw bytes.
- A frame is ``PREFIX`` (the lengths of a JSON header, of a JSON layout and of raw data), then those three. A step's
  request carries the safetensors body as it came (the host parses it again, from its header cache); its answer
  carries the result, the layout of the parameters (the same bytes every step: the front parses it once) and the
  parameters as float32.
- A front on the same node as the host passes large bodies and answers in shared memory (:class:`Segments`: files
  in ``/dev/shm`` that the front's buffer pool is made of): the body the front received is read by the host where
  it lies, and the host's session copies its parameters straight into the front's answer buffer, so a large step
  costs the copies of a single process. A host that cannot open them (another machine, another container) says so
  and the front sends bytes from then on.

The exactly-once rules are the Ray path's: a failure before the frame was sent is retried; after it was sent, the
step may or may not have been applied, which the client's retry with its Idempotency-Key decides (503).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from optserve.client.shm import SegmentError, open_segment, segment_exists

from . import errors

log = logging.getLogger("optserve.direct")

PREFIX = struct.Struct("<IIQ")  # header bytes, layout bytes, data bytes
MAX_HEADER = 1 << 24  # of a frame's JSON header and layout together
INLINE = 64 << 10  # data up to this size travels in the frame's one send; beyond, in a send of its own
HELLO_MAX = 4096  # bytes of a connection's first frame (the secret), before which nothing larger is read

Handler = Callable[[dict[str, Any], memoryview], Awaitable[tuple[dict[str, Any], bytes, Sequence[Any]]]]


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol (the connection is closed)."""


class NotSent(Exception):
    """The host could not be reached: nothing was sent, so the request may be tried again."""


class NoSharedMemory(errors.ServiceError):
    """The host cannot open a front's shared memory (another machine or container): nothing was done, and the
    front sends the bytes instead (never answered to a client)."""

    status = 503
    slug = "storage-unavailable"
    title = "Storage unavailable"


# --- frames --------------------------------------------------------------------------------------------------------

Frame = tuple[dict[str, Any], bytes, memoryview]


class FrameProtocol(asyncio.BufferedProtocol):
    """One connection, frames out and in. Reading goes straight into buffers (asyncio's ``BufferedProtocol``): a
    frame's head and small data into the connection's own buffer, large data into ``take(n)`` (the pool); the socket
    stays registered with the event loop, so a small frame costs one ``recv`` and one ``send``. One frame is
    awaited at a time (a request and its answer), or every frame goes to ``on_frame`` (the host)."""

    def __init__(self, take: Callable[[int], Any], on_frame: Callable[[Frame], None] | None = None) -> None:
        self.take = take
        self.on_frame = on_frame
        self.max_frame: int | None = None  # refuse larger frames (the host, until the secret was shown)
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(64 << 10)
        self._view = memoryview(self._buf)
        self._end = 0  # bytes in _buf
        self._head: tuple[dict[str, Any], bytes] | None = None  # of a frame whose data is arriving into _target
        self._target: memoryview | None = None
        self._have = 0
        self._waiter: asyncio.Future[Frame] | None = None
        self._frames: list[Frame] = []
        self._drained: asyncio.Future[None] | None = None
        self.lost: BaseException | None = None

    # asyncio's callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's transports are not asyncio's classes)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("the connection was closed")
        for future in (self._waiter, self._drained):
            if future is not None and not future.done():
                future.set_exception(self.lost)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None:
            return self._target[self._have :]
        if self._end == len(self._buf):
            self._grow(2 * len(self._buf))
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None:
            self._have += nbytes
            if self._have == len(self._target):
                assert self._head is not None
                header, layout = self._head
                target, self._target, self._head = self._target, None, None
                self._deliver((header, layout, target))
            return
        self._end += nbytes
        try:
            self._parse()
        except ProtocolError as e:
            self._fail(e)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # frames

    def _grow(self, size: int) -> None:
        buf = bytearray(size)
        buf[: self._end] = self._view[: self._end]
        self._buf, self._view = buf, memoryview(buf)

    def _parse(self) -> None:
        while self._target is None and self._end >= PREFIX.size:
            h, n, d = PREFIX.unpack_from(self._buf, 0)
            if h + n > MAX_HEADER:
                raise ProtocolError(f"a frame header of {h + n} bytes")
            start = PREFIX.size + h + n
            if self.max_frame is not None and start + d > self.max_frame:
                raise ProtocolError(f"a frame of {start + d} bytes before the secret")
            small = d < INLINE
            need = start + d if small else start
            if self._end < need:
                if need > len(self._buf):
                    self._grow(need)
                return
            try:
                header = json.loads(self._view[PREFIX.size : PREFIX.size + h].tobytes())
            except ValueError as e:
                raise ProtocolError(f"a frame header that is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise ProtocolError("a frame header that is not an object")
            layout = self._view[PREFIX.size + h : start].tobytes()
            if small:
                data = memoryview(self._view[start:need].tobytes())
                self._consume(need)
                self._deliver((header, layout, data))
                continue
            target = memoryview(self.take(d)).cast("B")
            have = min(d, self._end - start)
            target[:have] = self._view[start : start + have]
            self._consume(start + have)
            if have == d:
                self._deliver((header, layout, target))
            else:
                self._head, self._target, self._have = (header, layout), target, have

    def _consume(self, n: int) -> None:
        left = self._end - n
        if left:
            self._view[:left] = self._view[n : self._end]
        self._end = left

    def _deliver(self, frame: Frame) -> None:
        if self.on_frame is not None:
            self.on_frame(frame)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(frame)
        else:
            self._frames.append(frame)

    def _fail(self, error: Exception) -> None:
        log.warning("direct path: %s; connection closed", error)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    async def receive(self) -> Frame:
        if self._frames:
            return self._frames.pop(0)
        if self.lost is not None:
            raise ConnectionResetError(str(self.lost))
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    async def send(self, header: dict[str, Any], layout: bytes = b"", data: Sequence[Any] = ()) -> None:
        """Write one frame (waiting while the peer is slow to read)."""
        if self.lost is not None or self.transport is None:
            raise ConnectionResetError(str(self.lost))
        head = json.dumps(header, separators=(",", ":")).encode()
        views = [memoryview(d).cast("B") for d in data]
        size = sum(v.nbytes for v in views)
        first = PREFIX.pack(len(head), len(layout), size) + head + layout
        if size < INLINE:
            self.transport.write(b"".join([first, *views]))
        else:
            self.transport.write(first)
            for view in views:
                self.transport.write(view)
        if self._drained is not None and not self._drained.done():
            await self._drained

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def open(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()


# --- errors across the socket ----------------------------------------------------------------------------------------


@functools.cache
def _error_classes() -> dict[str, type[errors.ServiceError]]:
    found: dict[str, type[errors.ServiceError]] = {}
    todo: list[type[errors.ServiceError]] = [errors.ServiceError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def error_header(e: BaseException) -> dict[str, Any]:
    if isinstance(e, errors.ServiceError):
        return {"error": {"class": type(e).__name__, "detail": e.detail, "extra": e.extra}}
    return {"error": {"class": None, "detail": f"{type(e).__name__} on the session host"}}


def raise_error(header: dict[str, Any]) -> None:
    """Raise the error an answer carries, as the host raised it (its class, detail and members)."""
    error = header.get("error")
    if error is None:
        return
    cls = _error_classes().get(str(error.get("class")))
    if cls is None:
        raise RuntimeError(str(error.get("detail")))
    raise cls(str(error.get("detail")), **dict(error.get("extra") or {}))


# --- the host's side -----------------------------------------------------------------------------------------------


class DirectServer:
    """The host's listening socket, TCP on its node's address (a Unix socket was slower here: 105 against 70 us
    per small exchange), served on the event loop that started it."""

    def __init__(self, secret: str, handle: Handler, take: Callable[[int], Any]) -> None:
        self.secret = secret
        self.handle = handle
        self.take = take
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, address: str, port: int = 0) -> tuple[str, int]:
        """Listen on ``address`` and ``port`` (0: a free one); the address and port."""
        server = await asyncio.get_running_loop().create_server(self._protocol, address, port)
        self._servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

    def _protocol(self) -> FrameProtocol:
        protocol = FrameProtocol(self.take)
        protocol.max_frame = HELLO_MAX  # until the secret was shown (the one state of the handshake)

        def on_frame(frame: Frame) -> None:
            if protocol.max_frame is not None:
                shown = str(frame[0].get("secret", "")).encode("utf-8", "replace")
                if not hmac.compare_digest(shown, self.secret.encode()):
                    log.warning("direct path: a connection without the deployment's secret was closed")
                    protocol.close()
                    return
                protocol.max_frame = None
                return
            task = asyncio.ensure_future(self._answer(protocol, frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        protocol.on_frame = on_frame
        return protocol

    async def _answer(self, protocol: FrameProtocol, frame: Frame) -> None:
        header, _, data = frame
        del frame
        try:
            answer, layout, parts = await self.handle(header, data)
            del data
            await protocol.send(answer, layout, parts)
        except ProtocolError as e:
            protocol._fail(e)
        except (ConnectionError, OSError):
            protocol.close()
        except Exception:  # noqa: BLE001 - never leave the front waiting on an answer that will not come (503 there)
            log.exception("direct path: the answer could not be sent")
            protocol.close()

    def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()


class Mappings:
    """The host's maps of fronts' shared-memory buffers, by file name: the most recent kept open up to
    ``keep_bytes`` in all (a front removes a buffer's file when it frees it; a map kept here holds its memory until
    it is dropped, so a buffer larger than that is mapped for its one step only)."""

    def __init__(self, keep_bytes: int = 1 << 30) -> None:
        self.keep_bytes = keep_bytes
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def view(self, ref: Any) -> np.ndarray:
        """The bytes ``ref`` (``{"name", "offset", "size"}``) names; ``NoSharedMemory`` when they cannot be opened."""
        try:
            name, offset, size = str(ref["name"]), int(ref["offset"]), int(ref["size"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("a shared-memory reference without name, offset and size") from None
        whole = self._maps.get(name)
        if whole is not None:
            self._maps.move_to_end(name)
        else:
            try:
                whole = open_segment(name)
            except ValueError as e:
                raise ProtocolError(str(e)) from None
            except SegmentError as e:
                raise NoSharedMemory(str(e)) from None
            self.forget_removed()  # a new buffer: its maker may have removed others (an owner may also call it)
            if len(whole) <= self.keep_bytes:
                self._maps[name] = whole
                self._bytes += len(whole)
                while self._bytes > self.keep_bytes:
                    _, old = self._maps.popitem(last=False)
                    self._bytes -= len(old)
        if offset < 0 or size < 0 or offset + size > len(whole):
            raise ProtocolError(f"shared memory {name}: bytes {offset}..{offset + size} of {len(whole)}")
        return whole[offset : offset + size]

    def forget_removed(self) -> None:
        """Drop the maps of buffers whose files are gone (their maker freed them): a map held here keeps the memory."""
        for name in [n for n in self._maps if not segment_exists(n)]:
            self._bytes -= len(self._maps.pop(name))


# --- the front's side ----------------------------------------------------------------------------------------------


class DirectPool:
    """A front's connections to the hosts, idle ones kept per address."""

    def __init__(self, secret: str, take: Callable[[int], Any]) -> None:
        self.secret = secret
        self.take = take
        self._idle: dict[tuple[str, int], list[FrameProtocol]] = {}

    async def _connect(self, address: tuple[str, int]) -> FrameProtocol:
        loop = asyncio.get_running_loop()
        try:
            connecting = loop.create_connection(lambda: FrameProtocol(self.take), *address)
            _, protocol = await asyncio.wait_for(connecting, 5.0)
            await protocol.send({"secret": self.secret})
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            raise NotSent(f"session host at {address[0]}:{address[1]}: {e}") from None
        return protocol

    async def exchange(self, address: tuple[str, int], header: dict[str, Any], data: Sequence[Any]) -> Frame:
        """Send one frame and read the answer. :class:`NotSent` when the host could not be reached; any other
        ``OSError`` once the frame may have gone (the request may or may not have been carried out)."""
        idle = self._idle.setdefault(address, [])
        protocol = None
        while idle and protocol is None:
            protocol = idle.pop()
            if not protocol.open:  # closed on the other side while idle (its host restarted or went away)
                protocol = None
        if protocol is None:
            protocol = await self._connect(address)
        done = False
        try:
            await protocol.send(header, b"", data)
            answer = await protocol.receive()
            done = True
            return answer
        finally:
            if done:
                idle.append(protocol)
            else:  # cancelled or failed in the middle of a frame: the connection's state is unknown
                protocol.close()

    def forget(self, address: tuple[str, int]) -> None:
        for protocol in self._idle.pop(address, []):
            protocol.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.forget(address)
