"""``FaultProxy``: a TCP relay on 127.0.0.1 that breaks HTTP/1.1 exchanges on purpose, for fault tests.

    with FaultProxy(server.url, seed=7, drop_response=0.05, cut_response=0.05, cut_request=0.05, delay=0.05) as proxy:
        client = Client(proxy.url)
        ...
    print(proxy.counts)

The relay runs its own asyncio loop on its own thread. Each client connection gets an upstream connection to the
server, and the relay moves one exchange at a time: the request (head, then ``Content-Length`` bytes of body), then
the answer (head, then ``Content-Length`` bytes). That little framing is all the HTTP it knows; it is what "the
middle of a body" needs. For each exchange whose request line ``match`` accepts, one draw of a seeded random
generator picks at most one fault:

- ``drop_response``: the server's whole answer is read, nothing of it is forwarded, the client socket is closed;
- ``cut_response``: the answer's head and part of its body are forwarded, then the client socket is closed;
- ``cut_request``: the request's head and part of its body reach the server, then both sides are closed (a request
  without a body is cut inside its head);
- ``delay``: request and answer are forwarded in pieces (4 KiB at least, 8 at most per body) with a sleep of a few
  ms before each.

``counts`` says how many exchanges each fault hit, and how many answers had each status (``status_200``, ...);
``lost_bytes`` how many bytes each fault withheld. Everything is bounded: at most ``max_connections`` at once (more
are refused and counted), heads of at most 64 KiB, every read, write and connect under ``io_timeout``; :meth:`stop`
closes every socket and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from urllib.parse import urlsplit

FAULTS = ("drop_response", "cut_response", "cut_request", "delay")
HEAD_LIMIT = 64 * 1024
CHUNK = 4096  # smallest forwarding piece while delaying, so that a delayed body takes several sleeps
MAX_PAUSES = 8  # most sleeps per delayed body


class FramingError(Exception):
    """A message this relay cannot frame (no Content-Length, chunked, malformed): the connection is closed."""


def _content_length(head: bytes, *, response_to: bytes | None = None) -> int:
    """Body length of a message from its head; a response to HEAD and 1xx/204/304 answers have none."""
    lines = head.split(b"\r\n")
    if response_to is not None:
        parts = lines[0].split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if response_to == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return 0
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            raise FramingError("chunked bodies are not relayed")
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit():
                raise FramingError(f"malformed Content-Length {value[:40]!r}")
            length = int(value)
    return length or 0


def _closes(head: bytes) -> bool:
    return any(
        line.partition(b":")[0].strip().lower() == b"connection" and b"close" in line.lower()
        for line in head.split(b"\r\n")[1:]
    )


class FaultProxy:
    """A fault-injecting relay in front of ``upstream`` (an ``http://host:port`` URL); see the module docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        drop_response: float = 0.0,
        cut_response: float = 0.0,
        cut_request: float = 0.0,
        delay: float = 0.0,
        delay_ms: tuple[float, float] = (1.0, 5.0),
        match: Callable[[bytes], bool] | None = None,
        max_connections: int = 64,
        io_timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rates = {"drop_response": drop_response, "cut_response": cut_response, "cut_request": cut_request}
        self.rates["delay"] = delay
        if sum(self.rates.values()) > 1.0:
            raise ValueError("the fault rates add up to more than 1")
        self.delay_ms = delay_ms
        self.match = match
        self.max_connections = max_connections
        self.io_timeout = io_timeout
        self.enabled = True  # set False to relay faithfully (read by the relay thread at each exchange)
        self.counts: Counter[str] = Counter()  # per fault kind, plus "exchanges", "connections", "refused", ...
        self.lost_bytes: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def faults(self) -> dict[str, int]:
        """How many exchanges each fault kind hit."""
        return {kind: self.counts[kind] for kind in FAULTS}

    # --- life cycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", 0, limit=HEAD_LIMIT)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # handed to start()
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the fault proxy did not start")
        if failure:
            self._thread.join(timeout)
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may be closing already
                future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                with contextlib.suppress(Exception):
                    future.result(timeout)
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the fault proxy thread did not stop")
        self._thread = self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        self._stopping = True  # a handler between two exchanges must not open a new upstream connection
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # --- relaying -----------------------------------------------------------------------------------------------

    def _draw(self, request_line: bytes) -> tuple[str | None, float, float]:
        """(fault or None, cut fraction, delay in seconds): three draws per exchange whatever happens, so that the
        schedule depends only on the seed and the sequence of exchanges."""
        r, fraction = self._rng.random(), self._rng.random()
        pause = self._rng.uniform(*self.delay_ms) / 1000
        if not self.enabled or (self.match is not None and not self.match(request_line)):
            return None, fraction, pause
        for kind in FAULTS:
            if r < self.rates[kind]:
                return kind, fraction, pause
            r -= self.rates[kind]
        return None, fraction, pause

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._tasks) >= self.max_connections:
            self.counts["refused"] += 1
            writer.close()
            return
        self._tasks.add(task)
        self._writers.add(writer)
        self.counts["connections"] += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not self._stopping:
                if upstream is None or upstream[0].at_eof() or upstream[1].is_closing():
                    if upstream is not None:  # the server closed an idle connection: open another one
                        self._forget(upstream[1])
                        self.counts["upstream_reconnects"] += 1
                    upstream = await asyncio.wait_for(
                        asyncio.open_connection(*self.upstream, limit=HEAD_LIMIT), self.io_timeout
                    )
                    self._writers.add(upstream[1])
                if not await self._exchange(reader, writer, *upstream):
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, FramingError) as e:
            self.counts[f"closed:{type(e).__name__}"] += 1
        except ValueError:  # StreamReader.readuntil: a head above the limit
            self.counts["closed:head_too_large"] += 1
        finally:
            self._forget(writer)
            if upstream is not None:
                self._forget(upstream[1])
            self._tasks.discard(task)

    def _forget(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        self._writers.discard(writer)

    async def _head(self, reader: asyncio.StreamReader) -> bytes | None:
        """A message head up to and with its blank line; None at a clean end of the connection."""
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.io_timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            return None

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, pause: float | None
    ) -> None:
        """Move exactly ``size`` bytes from reader to writer; when pausing, in pieces of at least 4 KiB (at most
        ``MAX_PAUSES`` of them) after a pause each."""
        step = max(CHUNK, -(-size // MAX_PAUSES)) if pause else 1 << 16
        left = size
        while left:
            piece = await asyncio.wait_for(reader.read(min(left, step)), self.io_timeout)
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)
            if pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await asyncio.wait_for(writer.drain(), self.io_timeout)

    async def _discard(self, reader: asyncio.StreamReader, size: int) -> None:
        left = size
        while left:
            piece = await asyncio.wait_for(reader.read(min(left, 1 << 16)), self.io_timeout)
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            left -= len(piece)

    @staticmethod
    def _cut_point(head: bytes, body: int, fraction: float) -> tuple[int, int]:
        """(bytes of the head, bytes of the body) to forward: a cut strictly inside the body, or inside the head
        when the body has fewer than two bytes."""
        if body >= 2:
            return len(head), 1 + int(fraction * (body - 1))
        return 1 + int(fraction * (len(head) - 2)), 0

    async def _exchange(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        server_r: asyncio.StreamReader,
        server_w: asyncio.StreamWriter,
    ) -> bool:
        """One request and its answer; False when the connection is over."""
        head = await self._head(client_r)
        if head is None:
            return False
        request_line = head.split(b"\r\n", 1)[0]
        method = request_line.split(b" ", 1)[0]
        length = _content_length(head)
        fault, fraction, pause = self._draw(request_line)
        self.counts["exchanges"] += 1
        if fault is not None:
            self.counts[fault] += 1
        delay = pause if fault == "delay" else None

        if fault == "cut_request":
            head_part, body_part = self._cut_point(head, length, fraction)
            if delay:
                await asyncio.sleep(delay)
            server_w.write(head[:head_part])
            await asyncio.wait_for(server_w.drain(), self.io_timeout)
            await self._relay(client_r, server_w, body_part, None)
            self.lost_bytes[fault] += len(head) - head_part + length - body_part
            return False  # both sides closed by the caller
        if delay:
            await asyncio.sleep(delay)
        server_w.write(head)
        await asyncio.wait_for(server_w.drain(), self.io_timeout)
        await self._relay(client_r, server_w, length, delay)

        answer = await self._head(server_r)
        if answer is None:
            self.counts["upstream_closed_without_answer"] += 1
            return False
        size = _content_length(answer, response_to=method)
        status = answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else b"?"
        self.counts[f"status_{status.decode('latin-1')}"] += 1
        if fault == "drop_response":
            await self._discard(server_r, size)
            self.lost_bytes[fault] += len(answer) + size
            return False
        if fault == "cut_response":
            head_part, body_part = self._cut_point(answer, size, fraction)
            client_w.write(answer[:head_part])
            await self._relay(server_r, client_w, body_part, None)
            await self._discard(server_r, size - body_part)  # keep the upstream side in step until it closes
            self.lost_bytes[fault] += len(answer) - head_part + size - body_part
            return False
        if delay:
            await asyncio.sleep(delay)
        client_w.write(answer)
        await asyncio.wait_for(client_w.drain(), self.io_timeout)
        await self._relay(server_r, client_w, size, delay)
        return not (_closes(head) or _closes(answer))
