"""The two drivers of the client core, behind one blocking interface, so that a client test is written once and runs
on both ``Client`` and ``AsyncClient``; and a fault-injecting httpx transport that serves both.

``Driver("async").open(url)`` gives an :class:`AsyncClient` whose coroutine methods are run to completion on an
event loop of the driver's own (each call blocks until its coroutine is done): the test's code is the same for
both, while every request goes through the driver under test (its send, its sleep, its transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from optserve.client import AsyncClient, Client


class Blocking:
    """An AsyncClient used through blocking calls (its coroutine methods run on ``loop``)."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self.loop.run_until_complete(attr(*args, **kwargs))
        return attr


class Driver:
    """``sync`` (a :class:`Client`) or ``async`` (an :class:`AsyncClient` through :class:`Blocking`)."""

    def __init__(self, name: str) -> None:
        assert name in ("sync", "async")
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @contextlib.contextmanager
    def open(self, url: str, **kwargs: Any) -> Iterator[Any]:
        if self.name == "sync":
            with Client(url, **kwargs) as client:
                yield client
            return
        loop = asyncio.new_event_loop()
        client = AsyncClient(url, **kwargs)
        try:
            yield Blocking(client, loop)
        finally:
            loop.run_until_complete(client.aclose())
            loop.close()

    def concurrently(self, client: Any, calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """The results of ``calls`` (method name, args, kwargs) made at once: on threads sharing the sync client,
        as tasks of one event loop for the async one."""
        if self.name == "sync":
            with ThreadPoolExecutor(len(calls)) as pool:
                futures = [pool.submit(getattr(client, m), *a, **k) for m, a, k in calls]
                return [f.result() for f in futures]
        inner: AsyncClient = client.client

        async def gather() -> list[Any]:
            return list(await asyncio.gather(*(getattr(inner, m)(*a, **k) for m, a, k in calls)))

        return client.loop.run_until_complete(gather())  # type: ignore[no-any-return]


DRIVERS = [Driver("sync"), Driver("async")]


def is_step(request: httpx.Request) -> bool:
    return request.method == "POST" and request.url.path.endswith("/step")


class FaultyTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Forwards to the real server (sync or async, whichever client it serves), but injects faults on the requests
    ``on`` selects (steps, by default).

    ``faults`` is consumed in order, one per selected request: ``"refuse"`` fails before sending (the server never
    sees it), ``"lose"`` sends it and then drops the answer (the server applied it), ``"503"`` answers 503 without
    sending, ``None`` passes through. ``requests`` counts the selected requests and ``keys`` their Idempotency-Keys.
    """

    def __init__(self, faults: Sequence[str | None], on: Callable[[httpx.Request], bool] = is_step) -> None:
        self.inner = httpx.HTTPTransport()
        self.async_inner = httpx.AsyncHTTPTransport()
        self.faults = list(faults)
        self.on = on
        self.requests = 0
        self.keys: list[str | None] = []

    def _fault(self, request: httpx.Request) -> str | None:
        if not self.on(request):
            return None
        self.requests += 1
        self.keys.append(request.headers.get("idempotency-key"))
        fault = self.faults.pop(0) if self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("injected: connection refused", request=request)
        return fault

    @staticmethod
    def _unavailable(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"title": "Service Unavailable", "detail": "injected"}, request=request)

    @staticmethod
    def _lost(request: httpx.Request) -> httpx.ReadError:
        return httpx.ReadError("injected: connection reset before the answer arrived", request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._fault(request)
        if fault == "503":
            return self._unavailable(request)
        response = self.inner.handle_request(request)
        if fault == "lose":
            response.read()
            response.close()
            raise self._lost(request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._fault(request)
        if fault == "503":
            return self._unavailable(request)
        response = await self.async_inner.handle_async_request(request)
        if fault == "lose":
            await response.aread()
            await response.aclose()
            raise self._lost(request)
        return response

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.async_inner.aclose()
