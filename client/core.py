"""The sans-I/O core of ``Client`` and ``AsyncClient``: every session operation written once, as a generator.

An operation yields what it needs done and is resumed with the outcome:

- a :class:`~optserve.client.protocol.Call` (with its bearer token already set): the driver sends it and resumes
  the operation with the :class:`~optserve.client.protocol.Reply`, or throws the driver's
  :class:`~optserve.client.errors.TransportError` into it when the request failed in transit;
- a ``float``: seconds to wait before the next attempt (a retry's backoff); resumed with None.

Its return value is the method's result. The retry policy, the credentials, the request building and the reading
of answers therefore live here (and in :mod:`optserve.client.protocol`) once; ``Client`` drives an operation with a
blocking send and ``time.sleep``, ``AsyncClient`` with an awaited send and ``asyncio.sleep`` (see :func:`drive`
and :func:`drive_async`). A third driver (another transport, a test's scripted replies) needs nothing else.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from . import protocol
from .errors import TransportError
from .protocol import Call, Credentials, HyperparamChanges, Reply, Retry, StepResult

T = TypeVar("T")

Operation = Generator["Call | float", "Reply | None", T]
"""An operation of the API: yields calls to send and delays to wait, returns its result."""


class Core:
    """What an operation needs of the client it runs in: the retry policy and the bearer tokens."""

    def __init__(self, retry: Retry | None, token: str | None) -> None:
        self.retry = retry or Retry()
        self.credentials = Credentials(token)


def exchange(core: Core, call: Call, retry: Retry | None = None) -> Operation[Reply]:
    """One request, with its bearer token; sent again after a transport error or a 5xx when that is safe
    (``Call.retry_safe``: reads, and steps, which carry an Idempotency-Key), with the backoff of ``retry`` (default:
    the client's). Returns the final reply (an error status included: the readers raise its typed error)."""
    policy = retry or core.retry
    auth = core.credentials.headers(call.path)
    if auth:
        call = Call(call.method, call.path, {**auth, **call.headers}, call.content, call.json)
    attempt = 0
    while True:
        try:
            reply = yield call
        except TransportError:
            if (delay := protocol.retry_delay(call, attempt, policy)) is None:
                raise
        else:
            assert reply is not None
            if (delay := protocol.retry_delay(call, attempt, policy, reply)) is None:
                return reply
        yield delay
        attempt += 1


def drive(operation: Operation[T], send: Callable[[Call], Reply], sleep: Callable[[float], object]) -> T:
    """Run ``operation`` to its result with a blocking ``send`` (raising TransportError) and ``sleep``."""
    try:
        need = next(operation)
        while True:
            if isinstance(need, Call):
                try:
                    reply = send(need)
                except TransportError as e:
                    need = operation.throw(e)
                else:
                    need = operation.send(reply)
            else:
                sleep(need)
                need = operation.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def drive_async(
    operation: Operation[T], send: Callable[[Call], Awaitable[Reply]], sleep: Callable[[float], Awaitable[object]]
) -> T:
    """:func:`drive` with an awaited ``send`` and ``sleep``."""
    try:
        need = next(operation)
        while True:
            if isinstance(need, Call):
                try:
                    reply = await send(need)
                except TransportError as e:
                    need = operation.throw(e)
                else:
                    need = operation.send(reply)
            else:
                await sleep(need)
                need = operation.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


# --- the operations (each one is a method of both clients, with this signature and docstring) -------------------------


def create_session(
    core: Core,
    params: Mapping[str, Any],
    optimizer: str = "adamw",
    *,
    hyperparams: Mapping[str, Any] | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    session_id: str | None = None,
    **options: Any,
) -> Operation[dict[str, Any]]:
    """Create a session holding ``params`` (sent as float32); returns its info (``id``, ``step``, ...).

    ``options``: ``nonfinite`` ("error" or "skip"), ``max_grad_norm``, ``schedule`` (a dict such as
    ``{"name": "cosine", "total_steps": 1000, "warmup_steps": 100}``), ``accumulate``.
    """
    call = protocol.create(params, optimizer, hyperparams, param_groups, session_id, **options)
    info: dict[str, Any] = protocol.read_json((yield from exchange(core, call)))
    core.credentials.learn(info)
    return info


def list_sessions(core: Core) -> Operation[list[dict[str, Any]]]:
    """Every session of the server (with auth on: those the token may see), as short infos."""
    listed = protocol.read_json((yield from exchange(core, Call("GET", "/v1/sessions"))))
    return listed["sessions"]  # type: ignore[no-any-return]


def session(core: Core, session_id: str) -> Operation[dict[str, Any]]:
    """Config, parameter groups, step, tensors and counters of a session."""
    return protocol.read_json((yield from exchange(core, Call("GET", f"/v1/sessions/{session_id}"))))  # type: ignore[no-any-return]


def update_hyperparams(
    core: Core, session_id: str, group: int | None = None, **hyperparams: Any
) -> Operation[dict[str, Any]]:
    """Change hyperparameters (e.g. ``lr=1e-4``) of every parameter group, or of ``group``."""
    call = protocol.update(group, hyperparams, session_id)
    return protocol.read_json((yield from exchange(core, call)))  # type: ignore[no-any-return]


def delete_session(core: Core, session_id: str) -> Operation[None]:
    """Delete a session (its state is gone; NotFound if there is none)."""
    protocol.read_json((yield from exchange(core, Call("DELETE", f"/v1/sessions/{session_id}"))))


def step(
    core: Core,
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
) -> Operation[StepResult]:
    """Apply one step (or one contribution, in an accumulating session).

    Transport errors and 5xx answers are retried with the same ``Idempotency-Key`` (one is generated when none
    is given), so the step is applied at most once. See :func:`optserve.client.protocol.step` for the options.
    """
    call = protocol.step(
        session_id,
        grads,
        if_match=if_match,
        idempotency_key=idempotency_key or secrets.token_hex(16),
        minimal=minimal,
        partial=partial,
        changes=changes,
        dtype=dtype,
        answer_dtype=answer_dtype,
    )
    return protocol.read_step((yield from exchange(core, call, retry)))


def params(
    core: Core,
    session_id: str,
    *,
    min_step: int | None = None,
    timeout: float | None = None,
    dtype: str | None = None,
) -> Operation[tuple[int, dict[str, np.ndarray]]]:
    """(step, current parameters) of a session; with ``min_step``, once the session has reached that step
    (the server waits up to ``timeout`` seconds, then answers with what it has); ``dtype`` float16 or bfloat16
    rounds them on the wire."""
    call = protocol.params(session_id, min_step, timeout, dtype)
    return protocol.read_tensors((yield from exchange(core, call)))


def checkpoint(core: Core, session_id: str) -> Operation[bytes]:
    """Everything needed to resume the session, as one safetensors file's bytes."""
    call = Call("GET", f"/v1/sessions/{session_id}/checkpoint")
    return protocol.read_bytes((yield from exchange(core, call)))


def restore(core: Core, session_id: str, checkpoint: bytes) -> Operation[dict[str, Any]]:
    """Bring a session back from checkpoint bytes under ``session_id`` (created or replaced)."""
    call = protocol.restore(session_id, checkpoint)
    return protocol.read_json((yield from exchange(core, call)))  # type: ignore[no-any-return]
