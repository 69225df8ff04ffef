"""``Client`` and ``AsyncClient``: the session operations of the optserve API over httpx.

The two are drivers of one implementation: every method is an operation of :mod:`optserve.client.core` (written
once, I/O-free: it builds its requests, retries and reads its answers with :mod:`optserve.client.protocol`), which
``Client`` runs with blocking sends and ``AsyncClient`` with awaited ones. So both have the same methods, signatures
and docstrings, raise the same typed errors of :mod:`optserve.client.errors` and retry steps safely (same
``Idempotency-Key`` on every attempt); only the sending differs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import string
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx
import numpy as np

from . import core
from .buffers import BufferPool
from .core import Operation
from .errors import APIError, SharedMemoryUnavailable, TransportError
from .inflight import Worker
from .protocol import Call, Reply, Retry, StepResult, check
from .shm import SHARED_ANSWER, SHARED_BODY, SHARED_OFFER, SHM_MIN, Segments
from .transport import REUSE_MAX_BYTES, SocketTransport, request_head

P = ParamSpec("P")
R = TypeVar("R")


def default_url() -> str:
    """Where the server is when no URL is given: ``OPTSERVE_URL``, else the address ``optserve serve`` binds from
    ``OPTSERVE_HOST`` and ``OPTSERVE_PORT`` (a wildcard host meaning this machine), else http://127.0.0.1:8000.
    One setting points every tool (the CLI, ``Client``, the optimizers) at the server."""
    url = os.environ.get("OPTSERVE_URL", "").strip()
    if url:
        return url
    host = os.environ.get("OPTSERVE_HOST", "").strip() or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = os.environ.get("OPTSERVE_PORT", "").strip() or "8000"
    return f"http://{host}:{port}"


UNIX_SCHEME = "unix://"
UNIX_BASE_URL = "http://localhost"  # what httpx sees of a unix:// URL (the Host header says localhost)


def split_url(url: str) -> tuple[str, str | None]:
    """A server's URL as (the base URL of its requests, the Unix socket to send them to, or None for TCP).

    ``unix:///run/optserve.sock`` (``unix://`` and the path of the socket ``optserve serve --uds`` listens on)
    names a server on this machine; anything else is an ``http://`` or ``https://`` URL."""
    if not url.startswith("unix:"):
        return url, None
    path = url[len(UNIX_SCHEME) :] if url.startswith(UNIX_SCHEME) else ""
    if not path:
        raise ValueError(f"{url!r} names no socket: write unix:// and the socket's path, e.g. unix:///tmp/o.sock")
    return UNIX_BASE_URL, path


def _http_kwargs(url: str, timeout: float | httpx.Timeout, headers: Mapping[str, str] | None) -> dict[str, Any]:
    return {"base_url": split_url(url)[0], "timeout": timeout, "headers": dict(headers or {})}


def _content(content: bytes | list[bytes | memoryview] | None) -> Any:
    """A list of buffers becomes a stream of them (sent one by one with the Content-Length already set)."""
    return iter(content) if isinstance(content, list) else content


async def _parts(content: list[bytes | memoryview]) -> AsyncIterator[bytes]:
    """A step's buffers streamed as they are (as bytes-like views: no join, no copy)."""
    for part in content:
        yield memoryview(part).cast("B")  # type: ignore[misc]  # httpx takes any bytes-like part


def _blocking(operation: Callable[Concatenate[core.Core, P], Operation[R]]) -> Callable[Concatenate[Client, P], R]:
    """``operation`` as a method of :class:`Client`: the same signature and docstring, run to its result."""

    @functools.wraps(operation)
    def method(self: Client, *args: P.args, **kwargs: P.kwargs) -> R:
        return core.drive(operation(self, *args, **kwargs), self._send_once, time.sleep)

    return method


def _awaited(
    operation: Callable[Concatenate[core.Core, P], Operation[R]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]]:
    """``operation`` as a coroutine method of :class:`AsyncClient`: the same signature and docstring, awaited."""

    @functools.wraps(operation)
    async def method(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> R:
        return await core.drive_async(operation(self, *args, **kwargs), self._send_once, asyncio.sleep)

    return method


class _Base(core.Core):
    """What both clients hold: the server's URL, the retry policy and the bearer tokens."""

    def __init__(self, url: str | None, retry: Retry | None, token: str | None) -> None:
        super().__init__(retry, token)
        url = url or default_url()
        self.url = url if url.startswith("unix:") else url.rstrip("/")

    def use_token(self, session_id: str, token: str) -> None:
        """Use ``token`` for everything on ``session_id`` (a session created elsewhere, when auth is on)."""
        self.credentials.sessions[session_id] = token

    def _failed(self, call: Call, e: httpx.TransportError) -> TransportError:
        return TransportError(f"{call.method} {self.url}{call.path}: {e!r}")


_PLAIN_PATH = frozenset(string.ascii_letters + string.digits + "/-._~?=&%")


class _Direct:
    """Steps sent on :class:`SocketTransport` without httpx's request and response objects (building them and
    the answer's took about 0.5 ms a step here, as much as a small step's whole round trip on the server). The
    request is the one httpx would send: the client's default headers, then the call's, the same Host."""

    def __init__(self, transport: SocketTransport, http: httpx.Client, shared_memory: bool = True) -> None:
        self.transport = transport
        base = http.base_url
        self.key = (base.host, base.port or 80)
        self.prefix = base.raw_path.rstrip(b"/")
        skip = ("accept-encoding", "connection")  # request_head sends its own
        self.defaults = {k.lower(): v for k, v in http.headers.items() if k.lower() not in skip}  # User-Agent...
        self.host = base.netloc
        self.timeout = http.timeout
        self.shared = _Shared() if transport.uds is not None and shared_memory and Segments.available() else None

    def head(self, call: Call) -> bytes | None:
        """The request's line and headers; None when the path or a header needs httpx's encoding."""
        if not _PLAIN_PATH.issuperset(call.path):
            return None
        merged = dict(self.defaults)
        for name, value in call.headers.items():
            merged[name.lower()] = value
        try:
            fields = [(b"host", self.host)] + [(k.encode("ascii"), v.encode("ascii")) for k, v in merged.items()]
        except UnicodeEncodeError:
            return None
        return request_head(call.method, self.prefix + call.path.encode("ascii"), fields)

    def send(self, call: Call, head: bytes) -> Reply:
        parts = [memoryview(p).cast("B") for p in call.content] if isinstance(call.content, list) else []
        shared = self.shared
        if shared is not None and shared.offered and (size := sum(len(p) for p in parts)) >= SHM_MIN:
            reply = shared.send(self, call, parts, size)
            if reply is not None:
                return reply
        status, reason, headers, body = self.transport.exchange(
            self.key, call.method, head, parts, False, self.timeout.connect, self.timeout.read
        )
        reply = Reply(status, httpx.Headers(headers), body, reason)
        if shared is not None:
            shared.learn(call, reply)
        return reply


class _Shared:
    """Steps over the server's Unix socket with their bodies and answers in shared memory
    (:mod:`optserve.client.shm`): the client puts the step's body into a buffer of its own and names it
    (``Optserve-Shm-Body``, with no body on the socket), the server reads the gradients where they lie and writes
    the parameters into a second buffer the client named (``Optserve-Shm-Answer``); the socket carries the heads and
    the answer's safetensors header. Two copies of the model's size (the gradients in, the parameters out of the
    buffers) in place of four through the socket.

    Used for bodies of at least ``SHM_MIN`` bytes once the server has offered it (``Optserve-Shm: available`` on a
    step's answer: its Unix socket, the single-process store), with an answer buffer of the size the session's last
    answer had. A refusal (``shared-memory-unavailable``: the server cannot open the buffer, as when it runs in
    another container with a ``/dev/shm`` of its own) turns it off for this client, and the step is sent again as
    bytes (nothing was applied). Buffers of an exchange that failed are never used again: the server may still be
    writing the answer of that attempt.
    """

    swept = False  # this process removed the buffers that processes which died left in /dev/shm (once)

    def __init__(self) -> None:
        if not _Shared.swept:
            _Shared.swept = True
            Segments.sweep()
        self.segments = Segments()
        # a step's body and its answer, each kept for reuse up to the transport's own limit
        self.pool: BufferPool[np.ndarray] = BufferPool(self.segments.make, 2 * REUSE_MAX_BYTES, SHM_MIN)
        self.offered = False
        self.refused = False  # by the server, once: bytes from then on
        self.answers: dict[str, int] = {}  # a session's step path: the data bytes of its last float32 answer

    def _refuse(self) -> None:
        self.offered, self.refused = False, True

    @staticmethod
    def _answer_key(call: Call) -> str | None:
        """The session's step path, for an answer in float32 (one in float16/bfloat16 comes as bytes); else None."""
        path, _, query = call.path.partition("?")
        return None if "dtype=" in query else path

    def learn(self, call: Call, reply: Reply) -> None:
        """What an answer over the socket tells: that the server takes shared memory, and its answers' size."""
        if reply.headers.get(SHARED_OFFER) != "available" or self.refused:
            return
        self.offered = True
        key = self._answer_key(call)
        if key is not None and reply.status == 200 and len(reply.body) >= 8:  # the size it is written with
            header = int.from_bytes(bytes(reply.body[:8]), "little")
            self.answers[key] = len(reply.body) - 8 - header

    def send(self, direct: _Direct, call: Call, parts: list[memoryview], size: int) -> Reply | None:
        """The step (``parts``, ``size`` bytes in all) through shared memory; None when it cannot go that way (sent
        as bytes then)."""
        if os.getpid() != self.segments.pid:  # a forked child shares these buffers with its parent
            self._refuse()
            return None
        body = self.pool.take(size)
        body_ref = self.segments.find(body)
        if body_ref is None:  # no room in /dev/shm: ordinary memory
            self._refuse()
            return None
        at = 0
        for part in parts:
            body[at : at + len(part)] = np.frombuffer(part, np.uint8)
            at += len(part)
        headers = {**call.headers, "content-length": "0", SHARED_BODY: _ref(body_ref)}
        answer = None
        key = self._answer_key(call)
        if key is not None and (answer_size := self.answers.get(key)):
            answer = self.pool.take(answer_size)
            if (answer_ref := self.segments.find(answer)) is not None:
                headers[SHARED_ANSWER] = _ref(answer_ref)
        head = direct.head(Call(call.method, call.path, headers))
        if head is None:  # not reached: the call's own head was plain, and so are these headers
            return None
        try:
            status, reason, fields, received = direct.transport.exchange(
                direct.key, call.method, head, [], False, direct.timeout.connect, direct.timeout.read
            )
        except BaseException:
            for buffer in (body, answer):
                if buffer is not None:
                    self.pool.discard(buffer)
            raise
        reply = Reply(status, httpx.Headers(fields), received, reason)
        if status == 400:
            try:
                check(reply)
            except SharedMemoryUnavailable:  # nothing was applied
                self._refuse()
                return None
            except APIError:
                pass  # another refusal: read_step raises it
        written = reply.headers.get(SHARED_ANSWER)
        if written is not None:
            if answer is None or not written.isdigit() or int(written) != len(answer):
                raise TransportError(
                    f"{call.path}: the server wrote {written!r} bytes into an answer buffer it was not given"
                )
            reply.data = answer.data
        else:
            self.learn(call, reply)
        return reply


def _ref(ref: dict[str, Any]) -> str:
    return f"{ref['name']} {ref['offset']} {ref['size']}"


class Client(_Base):
    """A synchronous client of one optserve server.

    ``transport`` is httpx's seam (a fault-injecting transport in tests, for example). ``token`` is sent as a bearer
    token (the admin key, or a session's token); the token a create answer carries is used for that session from
    then on. With a ``unix://`` URL, steps of 1 MiB and more go through shared memory once the server offers it
    (see :class:`_Shared`); ``shared_memory=False`` sends their bytes over the socket. Use it as a context manager
    or call :meth:`close` to release its connections.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
        shared_memory: bool = True,
    ) -> None:
        super().__init__(url, retry, token)
        base, uds = split_url(self.url)
        own = None  # a transport given is httpx's seam: every request goes through it, steps too
        if transport is None and base.startswith("http://"):
            own = SocketTransport(timeout=timeout if isinstance(timeout, (int, float)) else None, uds=uds)
        self._http = httpx.Client(transport=own or transport, **_http_kwargs(self.url, timeout, headers))
        self._direct = _Direct(own, self._http, shared_memory) if own is not None else None
        self._worker = Worker()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._worker.close()
        self._http.close()
        if self._direct is not None and self._direct.shared is not None:
            self._direct.shared.segments.close()  # the buffers' files (results still held keep their memory)

    def _send_once(self, call: Call) -> Reply:
        """One request sent as it is (the core set its token and decides on retries)."""
        if self._direct is not None and isinstance(call.content, list):  # a step, straight to the socket
            head = self._direct.head(call)
            if head is not None:
                try:
                    return self._direct.send(call, head)
                except httpx.TransportError as e:
                    raise self._failed(call, e) from e
        request = self._http.build_request(
            call.method, call.path, headers=call.headers, content=_content(call.content), json=call.json
        )
        try:
            response = self._http.send(request, stream=True)
            try:
                return Reply.of(response)
            finally:
                response.close()
        except httpx.TransportError as e:
            raise self._failed(call, e) from e

    create_session = _blocking(core.create_session)
    list_sessions = _blocking(core.list_sessions)
    session = _blocking(core.session)
    update_hyperparams = _blocking(core.update_hyperparams)
    delete_session = _blocking(core.delete_session)
    step = _blocking(core.step)
    params = _blocking(core.params)
    checkpoint = _blocking(core.checkpoint)
    restore = _blocking(core.restore)

    def step_async(self, session_id: str, grads: Mapping[str, Any], **options: Any) -> Future[StepResult]:
        """:meth:`step` on this client's background thread: returns at once with a future of its result, so the
        caller computes while the step travels. Steps sent this way run one after the other, in order; the arrays
        of ``grads`` are sent as they are when the request goes out, so leave them alone until the future is
        done. The options are :meth:`step`'s (pass ``if_match`` and ``idempotency_key`` for exactly once)."""
        return self._worker.submit(functools.partial(self.step, session_id, grads, **options))


class AsyncClient(_Base):
    """The asyncio driver of the same operations as :class:`Client` (same methods, awaited; same errors and
    retries; a step's buffers are streamed as they are, not joined)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(url, retry, token)
        uds = split_url(self.url)[1]
        if transport is None and uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=uds)
        self._http = httpx.AsyncClient(transport=transport, **_http_kwargs(self.url, timeout, headers))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send_once(self, call: Call) -> Reply:
        """One request sent as it is (the core set its token and decides on retries)."""
        content = _parts(call.content) if isinstance(call.content, list) else call.content
        request = self._http.build_request(
            call.method, call.path, headers=call.headers, content=content, json=call.json
        )
        try:
            response = await self._http.send(request, stream=True)
            try:
                await response.aread()
                return Reply.of(response)
            finally:
                await response.aclose()
        except httpx.TransportError as e:
            raise self._failed(call, e) from e

    create_session = _awaited(core.create_session)
    list_sessions = _awaited(core.list_sessions)
    session = _awaited(core.session)
    update_hyperparams = _awaited(core.update_hyperparams)
    delete_session = _awaited(core.delete_session)
    step = _awaited(core.step)
    params = _awaited(core.params)
    checkpoint = _awaited(core.checkpoint)
    restore = _awaited(core.restore)

    def step_async(self, session_id: str, grads: Mapping[str, Any], **options: Any) -> asyncio.Task[StepResult]:
        """:meth:`step` scheduled as a task of the running event loop: returns at once, the caller awaits the task
        when it needs the answer (and computes meanwhile). The options are :meth:`step`'s."""
        return asyncio.ensure_future(self.step(session_id, grads, **options))
