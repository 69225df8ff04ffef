"""``Client``: the session operations of the optserve API over httpx, raising the typed errors of
:mod:`optserve.client.errors`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from . import protocol, wire
from .errors import TransportError
from .protocol import Call, Retry, StepResult

DEFAULT_URL = "http://127.0.0.1:8000"


class Client:
    """A synchronous client of one optserve server.

    ``transport`` is httpx's seam (for example ``httpx.MockTransport`` or an ASGI transport in tests). The client
    is a context manager; close it (or leave the ``with`` block) to release its connections.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float | httpx.Timeout = 60.0,
        retry: Retry | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.retry = retry or Retry()
        self._http = httpx.Client(base_url=self.url, timeout=timeout, headers=dict(headers or {}), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.request(
                call.method, call.path, headers=call.headers, content=call.content, json=call.json
            )
        except httpx.TransportError as e:
            raise TransportError(f"{call.method} {self.url}{call.path}: {e!r}") from e

    def _json(self, call: Call) -> Any:
        response = protocol.check(self._send(call))
        return response.json() if response.status_code != 204 else None

    # --- sessions ---------------------------------------------------------------------------------------------

    def create_session(
        self,
        params: Mapping[str, Any],
        optimizer: str = "adamw",
        *,
        hyperparams: Mapping[str, Any] | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        nonfinite: str | None = None,
        session_id: str | None = None,
    ) -> dict[str, Any]:
        """Create a session holding ``params`` (sent as float32); returns its info (``id``, ``step``, ...)."""
        call = protocol.create(params, optimizer, hyperparams or {}, param_groups, nonfinite, session_id)
        return self._json(call)  # type: ignore[no-any-return]

    def list_sessions(self) -> list[dict[str, Any]]:
        return self._json(Call("GET", "/v1/sessions"))["sessions"]  # type: ignore[no-any-return]

    def session(self, session_id: str) -> dict[str, Any]:
        """Config, parameter groups, step, tensors and counters of a session."""
        return self._json(Call("GET", f"/v1/sessions/{session_id}"))  # type: ignore[no-any-return]

    def update_hyperparams(self, session_id: str, group: int | None = None, **hyperparams: Any) -> dict[str, Any]:
        """Change hyperparameters (e.g. ``lr=1e-4``) of every parameter group, or of ``group``."""
        body: dict[str, Any] = {"hyperparams": hyperparams}
        if group is not None:
            body["group"] = group
        return self._json(Call("PATCH", f"/v1/sessions/{session_id}", json=body))  # type: ignore[no-any-return]

    def delete_session(self, session_id: str) -> None:
        self._json(Call("DELETE", f"/v1/sessions/{session_id}"))

    # --- tensors ----------------------------------------------------------------------------------------------

    def step(
        self,
        session_id: str,
        grads: Mapping[str, Any],
        *,
        if_match: int | None = None,
        idempotency_key: str | None = None,
        minimal: bool = False,
        retry: Retry | None = None,
    ) -> StepResult:
        """Apply one step. Transport errors and 5xx answers are retried with the same ``Idempotency-Key``
        (one is generated when none is given), so the step is applied at most once."""
        key = idempotency_key or uuid.uuid4().hex
        call = protocol.step(session_id, grads, if_match=if_match, idempotency_key=key, minimal=minimal)
        delays = (retry or self.retry).delays()
        for attempt in range(len(delays) + 1):
            try:
                return protocol.read_step(self._send(call))
            except Exception as exc:
                if attempt == len(delays) or not (isinstance(exc, TransportError) or protocol.retryable(exc)):
                    raise
                protocol.sleep_for(delays[attempt])
        raise AssertionError("unreachable")

    def params(self, session_id: str) -> tuple[int, dict[str, Any]]:
        """(step, current parameters) of a session."""
        call = Call("GET", f"/v1/sessions/{session_id}/params", {"accept": wire.SAFETENSORS})
        return protocol.read_tensors(self._send(call))

    def checkpoint(self, session_id: str) -> bytes:
        """Everything needed to resume the session, as one safetensors file's bytes."""
        return protocol.check(self._send(Call("GET", f"/v1/sessions/{session_id}/checkpoint"))).content

    def restore(self, session_id: str, checkpoint: bytes) -> dict[str, Any]:
        """Bring a session back from checkpoint bytes under ``session_id`` (created or replaced)."""
        call = Call("PUT", f"/v1/sessions/{session_id}/checkpoint", {"content-type": wire.SAFETENSORS}, checkpoint)
        return self._json(call)  # type: ignore[no-any-return]
