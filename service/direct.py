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
import contextlib
import hmac
import json
import logging
import mmap
import os
import re
import socket
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from . import errors

log = logging.getLogger("optserve.direct")

PREFIX = struct.Struct("<IIQ")  # header bytes, layout bytes, data bytes
MAX_HEADER = 1 << 24  # of a frame's JSON header and layout together
INLINE = 64 << 10  # data up to this size travels in the frame's one send; beyond, in a send of its own
SHM_DIR = "/dev/shm"
SHM_MIN = 1 << 20  # shared memory for buffers of at least this size (the buffer pool's own threshold)
_NAME = re.compile(r"optserve-(\d+)-(\d+)")

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


class Channel:
    """One connected socket: frames out, frames in (read through a buffer: a small frame is one ``recv``)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._buf = bytearray(256 << 10)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0

    def close(self) -> None:
        self.sock.close()

    def closed_by_peer(self) -> bool:
        """Whether an idle connection was closed on the other side (its host restarted or went away)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    async def send(self, header: dict[str, Any], layout: bytes = b"", data: Sequence[Any] = ()) -> None:
        loop = asyncio.get_running_loop()
        head = json.dumps(header, separators=(",", ":")).encode()
        size = sum(memoryview(d).nbytes for d in data)
        first = PREFIX.pack(len(head), len(layout), size) + head + layout
        if size <= INLINE:
            await loop.sock_sendall(self.sock, b"".join([first, *(memoryview(d).cast("B") for d in data)]))
            return
        await loop.sock_sendall(self.sock, first)
        for d in data:
            await loop.sock_sendall(self.sock, memoryview(d).cast("B"))

    async def _fill(self, n: int) -> None:
        """At least ``n`` bytes in the buffer from ``_pos`` on."""
        if self._end - self._pos >= n:
            return
        if self._pos + n > len(self._buf):  # move what is left to the front (and grow for a long header)
            left = self._end - self._pos
            if n > len(self._buf):
                self._buf = bytearray(n)
                self._buf[:left] = self._view[self._pos : self._end]
                self._view = memoryview(self._buf)
            else:
                self._view[:left] = self._view[self._pos : self._end]
            self._pos, self._end = 0, left
        loop = asyncio.get_running_loop()
        while self._end - self._pos < n:
            got = await loop.sock_recv_into(self.sock, self._view[self._end :])
            if not got:
                raise ConnectionResetError("the connection was closed")
            self._end += got

    async def receive(self, take: Callable[[int], Any]) -> tuple[dict[str, Any], bytes, memoryview]:
        """The next frame: its header, its layout and its data (in a buffer from ``take(n)`` when large)."""
        await self._fill(PREFIX.size)
        h, n, d = PREFIX.unpack_from(self._buf, self._pos)
        if h + n > MAX_HEADER:
            raise ProtocolError(f"a frame header of {h + n} bytes")
        self._pos += PREFIX.size
        await self._fill(h + n)
        try:
            header = json.loads(self._view[self._pos : self._pos + h].tobytes())
        except ValueError as e:
            raise ProtocolError(f"a frame header that is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise ProtocolError("a frame header that is not an object")
        layout = self._view[self._pos + h : self._pos + h + n].tobytes()
        self._pos += h + n
        if d == 0:
            return header, layout, memoryview(b"")
        target = memoryview(take(d) if d >= SHM_MIN else bytearray(d)).cast("B")
        have = min(d, self._end - self._pos)
        target[:have] = self._view[self._pos : self._pos + have]
        self._pos += have
        loop = asyncio.get_running_loop()
        while have < d:
            got = await loop.sock_recv_into(self.sock, target[have:])
            if not got:
                raise ConnectionResetError("the connection was closed in a frame")
            have += got
        return header, layout, target


# --- errors across the socket ----------------------------------------------------------------------------------------


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
    """The host's listening socket: every connection is served on the event loop that started it."""

    def __init__(self, secret: str, handle: Handler, take: Callable[[int], Any]) -> None:
        self.secret = secret
        self.handle = handle
        self.take = take
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, address: str) -> tuple[str, int]:
        sock = socket.create_server((address, 0), family=socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept())
        host, port = sock.getsockname()[:2]
        return host, port

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as e:  # out of descriptors, say: the next connection may do
                log.warning("direct path: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(Channel(conn)))

    async def _serve(self, channel: Channel) -> None:
        try:
            hello, _, _ = await channel.receive(lambda n: bytearray(n))
            if not hmac.compare_digest(str(hello.get("secret", "")), self.secret):
                log.warning("direct path: a connection without the deployment's secret was closed")
                return
            while True:
                header, _, data = await channel.receive(self.take)
                answer, layout, parts = await self.handle(header, data)
                del data
                await channel.send(answer, layout, parts)
        except (ConnectionError, ProtocolError, OSError) as e:
            if not isinstance(e, ConnectionResetError):
                log.info("direct path: connection closed: %s", e)
        finally:
            channel.close()

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        for task in list(self._tasks):
            task.cancel()


class Mappings:
    """The host's maps of fronts' shared-memory buffers, by file name (the most recent few kept open)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def view(self, ref: Any) -> np.ndarray:
        """The bytes ``ref`` (``{"name", "offset", "size"}``) names; ``NoSharedMemory`` when they cannot be opened."""
        try:
            name, offset, size = str(ref["name"]), int(ref["offset"]), int(ref["size"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("a shared-memory reference without name, offset and size") from None
        if not _NAME.fullmatch(name):
            raise ProtocolError(f"not a shared-memory buffer of optserve: {name!r}")
        whole = self._maps.get(name)
        if whole is None:
            try:
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
            except OSError as e:
                raise NoSharedMemory(f"shared memory {name} cannot be opened here: {e}") from None
            try:
                length = os.fstat(fd).st_size
                whole = np.frombuffer(mmap.mmap(fd, length), dtype=np.uint8)
            finally:
                os.close(fd)
            self._maps[name] = whole
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)
        self._maps.move_to_end(name)
        if offset < 0 or size < 0 or offset + size > len(whole):
            raise ProtocolError(f"shared memory {name}: bytes {offset}..{offset + size} of {len(whole)}")
        return whole[offset : offset + size]


# --- the front's side ----------------------------------------------------------------------------------------------


class Segments:
    """Buffers in shared memory for the front's pool: each one a file ``optserve-<pid>-<k>`` in ``/dev/shm``,
    removed when the buffer is freed (and, for a front that died, by the next front started on the machine)."""

    def __init__(self) -> None:
        self._by_address: dict[int, tuple[str, int]] = {}
        self._count = 0
        self._lock = threading.Lock()

    @staticmethod
    def available() -> bool:
        return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)

    def make(self, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes``: in shared memory when it is large and there is room, else ordinary memory."""
        if nbytes < SHM_MIN:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self._count += 1
            name = f"optserve-{os.getpid()}-{self._count}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return np.empty(nbytes, dtype=np.uint8)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # the room taken now: a full /dev/shm refuses here, not with SIGBUS
            array = np.frombuffer(mmap.mmap(fd, nbytes), dtype=np.uint8)
        except OSError:
            os.unlink(path)
            return np.empty(nbytes, dtype=np.uint8)
        finally:
            os.close(fd)
        address = array.ctypes.data
        with self._lock:
            self._by_address[address] = (name, nbytes)
        weakref.finalize(array, self._free, address, path)
        return array

    def _free(self, address: int, path: str) -> None:
        with self._lock:
            self._by_address.pop(address, None)
        with contextlib.suppress(OSError):
            os.unlink(path)

    def find(self, buffer: Any) -> dict[str, Any] | None:
        """The shared-memory reference of ``buffer`` when it lies in one of these buffers, else None."""
        view = memoryview(buffer).cast("B")
        if view.nbytes < SHM_MIN:
            return None
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        with self._lock:
            for start, (name, size) in self._by_address.items():
                if start <= address and address + view.nbytes <= start + size:
                    return {"name": name, "offset": address - start, "size": view.nbytes}
        return None

    def close(self) -> None:
        with self._lock:
            names = [name for name, _ in self._by_address.values()]
            self._by_address.clear()
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))

    @staticmethod
    def sweep() -> int:
        """Remove the buffers of fronts that are no longer running on this machine; how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(SHM_DIR):
                m = _NAME.fullmatch(name)
                if m is None or _alive(int(m.group(1))):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectPool:
    """A front's connections to the hosts, idle ones kept per address."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._idle: dict[tuple[str, int], list[Channel]] = {}

    async def _connect(self, address: tuple[str, int]) -> Channel:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), 5.0)
            channel = Channel(sock)
            await channel.send({"secret": self.secret})
        except (OSError, asyncio.TimeoutError) as e:
            sock.close()
            raise NotSent(f"session host at {address[0]}:{address[1]}: {e}") from None
        return channel

    async def exchange(
        self, address: tuple[str, int], header: dict[str, Any], data: Sequence[Any], take: Callable[[int], Any]
    ) -> tuple[dict[str, Any], bytes, memoryview]:
        """Send one frame and read the answer. :class:`NotSent` when the host could not be reached; any other
        ``OSError`` once the frame may have gone (the request may or may not have been carried out)."""
        idle = self._idle.setdefault(address, [])
        channel = None
        while idle and channel is None:
            channel = idle.pop()
            if channel.closed_by_peer():
                channel.close()
                channel = None
        if channel is None:
            channel = await self._connect(address)
        done = False
        try:
            await channel.send(header, b"", data)
            answer = await channel.receive(take)
            done = True
            return answer
        finally:
            if done:
                idle.append(channel)
            else:  # cancelled or failed in the middle of a frame: the connection's state is unknown
                channel.close()

    def forget(self, address: tuple[str, int]) -> None:
        for channel in self._idle.pop(address, []):
            channel.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.forget(address)
