"""``Client`` and ``AsyncClient``: the session operations of the optserve API over httpx.

The two are twins: every method builds its request and reads its answer with the I/O-free functions of
:mod:`optserve.client.protocol`, and only the sending differs. Both raise the typed errors of
:mod:`optserve.client.errors` and retry steps safely (same ``Idempotency-Key`` on every attempt).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import httpx
import numpy as np

from . import protocol
from .errors import TransportError
from .inflight import Worker
from .protocol import Call, Credentials, HyperparamChanges, Reply, Retry, StepResult
from .transport import SocketTransport


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


def _http_kwargs(url: str, timeout: float | httpx.Timeout, headers: Mapping[str, str] | None) -> dict[str, Any]:
    return {"base_url": url.rstrip("/"), "timeout": timeout, "headers": dict(headers or {})}


def _content(content: bytes | list[bytes | memoryview] | None) -> Any:
    """A list of buffers becomes a stream of them (sent one by one with the Content-Length already set)."""
    return iter(content) if isinstance(content, list) else content


def _step_call(session_id: str, grads: Mapping[str, Any], key: str | None, **kwargs: Any) -> Call:
    return protocol.step(session_id, grads, idempotency_key=key or uuid.uuid4().hex, **kwargs)


class _Base:
    """What both clients hold: the server's URL, the retry policy and the bearer tokens."""

    def __init__(self, url: str | None, retry: Retry | None, token: str | None) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.retry = retry or Retry()
        self.credentials = Credentials(token)

    def use_token(self, session_id: str, token: str) -> None:
        """Use ``token`` for everything on ``session_id`` (a session created elsewhere, when auth is on)."""
        self.credentials.sessions[session_id] = token


class Client(_Base):
    """A synchronous client of one optserve server.

    ``transport`` is httpx's seam (a fault-injecting transport in tests, for example). ``token`` is sent as a bearer
    token (the admin key, or a session's token); the token a create answer carries is used for that session from
    then on. Use it as a context manager or call :meth:`close` to release its connections.
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
    ) -> None:
        super().__init__(url, retry, token)
        if transport is None and self.url.startswith("http://"):
            transport = SocketTransport(timeout=timeout if isinstance(timeout, (int, float)) else None)
        self._http = httpx.Client(transport=transport, **_http_kwargs(self.url, timeout, headers))
        self._worker = Worker()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._worker.close()
        self._http.close()

    def _send(self, call: Call, retry: Retry | None = None) -> Reply:
        """One request; sent again after a transport error or a 5xx when that is safe (``Call.retry_safe``: reads,
        and steps, which carry an Idempotency-Key), with the backoff of ``retry`` (default: the client's)."""
        attempt = 0
        while True:
            try:
                reply = self._send_once(call)
            except TransportError:
                if (delay := protocol.retry_delay(call, attempt, retry or self.retry)) is None:
                    raise
            else:
                if (delay := protocol.retry_delay(call, attempt, retry or self.retry, reply)) is None:
                    return reply
            time.sleep(delay)
            attempt += 1

    def _send_once(self, call: Call) -> Reply:
        headers = {**self.credentials.headers(call.path), **call.headers}
        request = self._http.build_request(
            call.method, call.path, headers=headers, content=_content(call.content), json=call.json
        )
        try:
            response = self._http.send(request, stream=True)
            try:
                return Reply.of(response)
            finally:
                response.close()
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {self.url}{call.path}: {e!r}") from e

    # --- sessions ---------------------------------------------------------------------------------------------

    def create_session(
        self,
        params: Mapping[str, Any],
        optimizer: str = "adamw",
        *,
        hyperparams: Mapping[str, Any] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        session_id: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Create a session holding ``params`` (sent as float32); returns its info (``id``, ``step``, ...).

        ``options``: ``nonfinite`` ("error" or "skip"), ``max_grad_norm``, ``schedule`` (a dict such as
        ``{"name": "cosine", "total_steps": 1000, "warmup_steps": 100}``), ``accumulate``.
        """
        call = protocol.create(params, optimizer, hyperparams, param_groups, session_id, **options)
        info: dict[str, Any] = protocol.read_json(self._send(call))
        self.credentials.learn(info)
        return info

    def list_sessions(self) -> list[dict[str, Any]]:
        return protocol.read_json(self._send(Call("GET", "/v1/sessions")))["sessions"]  # type: ignore[no-any-return]

    def session(self, session_id: str) -> dict[str, Any]:
        """Config, parameter groups, step, tensors and counters of a session."""
        return protocol.read_json(self._send(Call("GET", f"/v1/sessions/{session_id}")))  # type: ignore[no-any-return]

    def update_hyperparams(self, session_id: str, group: int | None = None, **hyperparams: Any) -> dict[str, Any]:
        """Change hyperparameters (e.g. ``lr=1e-4``) of every parameter group, or of ``group``."""
        return protocol.read_json(self._send(protocol.update(group, hyperparams, session_id)))  # type: ignore[no-any-return]

    def delete_session(self, session_id: str) -> None:
        protocol.read_json(self._send(Call("DELETE", f"/v1/sessions/{session_id}")))

    # --- tensors ----------------------------------------------------------------------------------------------

    def step(
        self,
        session_id: str,
        grads: Mapping[str, Any],
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
        minimal: bool = False,
        partial: bool = False,
        changes: HyperparamChanges | None = None,
        dtype: str | Mapping[str, str] | None = None,
        answer_dtype: str | None = None,
        retry: Retry | None = None,
    ) -> StepResult:
        """Apply one step (or one contribution, in an accumulating session).

        Transport errors and 5xx answers are retried with the same ``Idempotency-Key`` (one is generated when none
        is given), so the step is applied at most once. See :func:`optserve.client.protocol.step` for the options.
        """
        call = _step_call(
            session_id,
            grads,
            idempotency_key,
            if_match=if_match,
            minimal=minimal,
            partial=partial,
            changes=changes,
            dtype=dtype,
            answer_dtype=answer_dtype,
        )
        return protocol.read_step(self._send(call, retry))

    def step_async(self, session_id: str, grads: Mapping[str, Any], **options: Any) -> Future[StepResult]:
        """:meth:`step` on this client's background thread: returns at once with a future of its result, so the
        caller computes while the step travels. Steps sent this way run one after the other, in order; the arrays
        of ``grads`` are sent as they are when the request goes out, so leave them alone until the future is
        done. The options are :meth:`step`'s (pass ``if_match`` and ``idempotency_key`` for exactly once)."""
        return self._worker.submit(functools.partial(self.step, session_id, grads, **options))

    def params(
        self, session_id: str, *, min_step: int | None = None, timeout: float | None = None, dtype: str | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        """(step, current parameters) of a session; with ``min_step``, once the session has reached that step
        (the server waits up to ``timeout`` seconds, then answers with what it has); ``dtype`` float16 or bfloat16
        rounds them on the wire."""
        return protocol.read_tensors(self._send(protocol.params(session_id, min_step, timeout, dtype)))

    def checkpoint(self, session_id: str) -> bytes:
        """Everything needed to resume the session, as one safetensors file's bytes."""
        return protocol.read_bytes(self._send(Call("GET", f"/v1/sessions/{session_id}/checkpoint")))

    def restore(self, session_id: str, checkpoint: bytes) -> dict[str, Any]:
        """Bring a session back from checkpoint bytes under ``session_id`` (created or replaced)."""
        return protocol.read_json(self._send(protocol.restore(session_id, checkpoint)))  # type: ignore[no-any-return]


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same methods, awaited; same errors and retries)."""

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
        self._http = httpx.AsyncClient(transport=transport, **_http_kwargs(self.url, timeout, headers))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call, retry: Retry | None = None) -> Reply:
        attempt = 0
        while True:
            try:
                reply = await self._send_once(call)
            except TransportError:
                if (delay := protocol.retry_delay(call, attempt, retry or self.retry)) is None:
                    raise
            else:
                if (delay := protocol.retry_delay(call, attempt, retry or self.retry, reply)) is None:
                    return reply
            await asyncio.sleep(delay)
            attempt += 1

    async def _send_once(self, call: Call) -> Reply:
        content = b"".join(call.content) if isinstance(call.content, list) else call.content
        headers = {**self.credentials.headers(call.path), **call.headers}
        try:
            response = await self._http.request(
                call.method, call.path, headers=headers, content=content, json=call.json
            )
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {self.url}{call.path}: {e!r}") from e
        return Reply(response.status_code, response.headers, response.content, response.reason_phrase)

    async def create_session(
        self,
        params: Mapping[str, Any],
        optimizer: str = "adamw",
        *,
        hyperparams: Mapping[str, Any] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        session_id: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        call = protocol.create(params, optimizer, hyperparams, param_groups, session_id, **options)
        info: dict[str, Any] = protocol.read_json(await self._send(call))
        self.credentials.learn(info)
        return info

    async def list_sessions(self) -> list[dict[str, Any]]:
        return protocol.read_json(await self._send(Call("GET", "/v1/sessions")))["sessions"]  # type: ignore[no-any-return]

    async def session(self, session_id: str) -> dict[str, Any]:
        return protocol.read_json(await self._send(Call("GET", f"/v1/sessions/{session_id}")))  # type: ignore[no-any-return]

    async def update_hyperparams(self, session_id: str, group: int | None = None, **hyperparams: Any) -> dict[str, Any]:
        return protocol.read_json(await self._send(protocol.update(group, hyperparams, session_id)))  # type: ignore[no-any-return]

    async def delete_session(self, session_id: str) -> None:
        protocol.read_json(await self._send(Call("DELETE", f"/v1/sessions/{session_id}")))

    async def step(
        self,
        session_id: str,
        grads: Mapping[str, Any],
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
        minimal: bool = False,
        partial: bool = False,
        changes: HyperparamChanges | None = None,
        dtype: str | Mapping[str, str] | None = None,
        answer_dtype: str | None = None,
        retry: Retry | None = None,
    ) -> StepResult:
        call = _step_call(
            session_id,
            grads,
            idempotency_key,
            if_match=if_match,
            minimal=minimal,
            partial=partial,
            changes=changes,
            dtype=dtype,
            answer_dtype=answer_dtype,
        )
        return protocol.read_step(await self._send(call, retry))

    def step_async(self, session_id: str, grads: Mapping[str, Any], **options: Any) -> asyncio.Task[StepResult]:
        """:meth:`step` scheduled as a task of the running event loop: returns at once, the caller awaits the task
        when it needs the answer (and computes meanwhile). The options are :meth:`step`'s."""
        return asyncio.ensure_future(self.step(session_id, grads, **options))

    async def params(
        self, session_id: str, *, min_step: int | None = None, timeout: float | None = None, dtype: str | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        return protocol.read_tensors(await self._send(protocol.params(session_id, min_step, timeout, dtype)))

    async def checkpoint(self, session_id: str) -> bytes:
        return protocol.read_bytes(await self._send(Call("GET", f"/v1/sessions/{session_id}/checkpoint")))

    async def restore(self, session_id: str, checkpoint: bytes) -> dict[str, Any]:
        return protocol.read_json(await self._send(protocol.restore(session_id, checkpoint)))  # type: ignore[no-any-return]
