"""The I/O-free half of the client: how each operation becomes an HTTP request and how its answer is read.

``Client`` (and any twin built on another transport) only sends what these functions build and hands back what
they parse, so the wire details live in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from . import wire
from .errors import APIError, error_for
from .transport import BODY_EXTENSION

HyperparamChanges = Mapping[str, Any] | Sequence[Mapping[str, Any] | None]


@dataclass
class Call:
    """One HTTP request to make: method, path, headers and body."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | list[bytes | memoryview] | None = None  # a list is sent part by part, never joined
    json: Any = None

    @property
    def retry_safe(self) -> bool:
        """Sending it again cannot apply anything twice: a read, or a request carrying an Idempotency-Key."""
        return self.method == "GET" or "idempotency-key" in self.headers


class Credentials:
    """Which bearer token goes with a request: the session's own token when known, else the client's token (an
    admin key, or a session token given by the user). I/O-free, shared by both clients."""

    def __init__(self, token: str | None = None) -> None:
        self.default = token
        self.sessions: dict[str, str] = {}

    def learn(self, info: Mapping[str, Any]) -> None:
        """Keep the token a create answer carries (it is shown once)."""
        if info.get("token") and info.get("id"):
            self.sessions[str(info["id"])] = str(info["token"])

    def headers(self, path: str) -> dict[str, str]:
        parts = path.split("?")[0].split("/")
        session = parts[3] if len(parts) > 3 and parts[1:3] == ["v1", "sessions"] else None
        token = self.sessions.get(session, self.default) if session else self.default
        return {"authorization": f"Bearer {token}"} if token else {}


@dataclass
class Reply:
    """An answer as the protocol functions read it: status, headers and the body's buffer."""

    status: int
    headers: httpx.Headers
    body: bytes | bytearray | memoryview
    reason: str = ""
    data: memoryview | None = None  # a step answer's data section, when the server wrote it into shared memory

    def json(self) -> Any:
        return json.loads(bytes(self.body))

    @classmethod
    def of(cls, response: httpx.Response) -> Reply:
        """From an httpx response, taking the transport's receive buffer as it is when there is one."""
        box = response.extensions.get(BODY_EXTENSION)
        body = response.read() if box is None else box.take()
        return cls(response.status_code, response.headers, body, response.reason_phrase)


@dataclass
class StepResult:
    """The answer to a step.

    ``step`` is the session's step after it and ``params`` the updated parameters (None with ``minimal=True``, and
    for a contribution that still awaits ``awaiting`` others in an accumulating session). ``grad_norm`` is the
    global gradient norm before clipping. ``body`` is the parsed answer ``params`` are views of (its data section
    is the session's flat parameter buffer, for readers that copy it out at once).
    """

    step: int
    params: dict[str, np.ndarray] | None
    replayed: bool = False
    skipped: bool = False
    grad_norm: float | None = None
    awaiting: int = 0
    body: wire.Safetensors | None = None

    def release(self) -> None:
        """Done with ``params`` (copied out): drops them, so that their receive buffer can serve the next answer
        (buffers are reused only when nothing references them any more)."""
        self.params = self.body = None


@dataclass(frozen=True)
class Retry:
    """How a step is retried after a transport error or a 5xx: attempts in all, exponential backoff with a cap.

    Retrying a step is safe because every attempt carries the same ``Idempotency-Key``.
    """

    attempts: int = 5
    backoff: float = 0.1
    max_backoff: float = 2.0

    def delays(self) -> list[float]:
        return [min(self.max_backoff, self.backoff * 2**i) for i in range(max(0, self.attempts - 1))]


def check(reply: Reply) -> Reply:
    """Raise the typed error for an error status, with the problem details when the server sent them."""
    if reply.status < 400:
        return reply
    try:
        problem = reply.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": reply.reason, "detail": bytes(reply.body[:1000]).decode("utf-8", "replace")}
    raise error_for(reply.status, problem)


def retry_delay(call: Call, attempt: int, retry: Retry, reply: Reply | None = None) -> float | None:
    """Seconds to wait before sending ``call`` again after attempt ``attempt`` failed in transit (``reply`` None) or
    answered ``reply``; None when that answer is final.

    Only failures that may be transient are retried (transport errors and 5xx but 507, the memory budget), and only
    for calls that are safe to send twice (``Call.retry_safe``).
    """
    if not call.retry_safe or (reply is not None and (reply.status < 500 or reply.status == 507)):
        return None
    delays = retry.delays()
    return delays[attempt] if attempt < len(delays) else None


def step_number(reply: Reply) -> int:
    tag = reply.headers.get("etag", "").removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdigit()):
        raise APIError(reply.status, {"detail": f"answer carries no step ETag ({tag!r})"})
    return int(tag)


# --- requests ------------------------------------------------------------------------------------------------------


def create(
    params: Mapping[str, Any],
    optimizer: str,
    hyperparams: Mapping[str, Any] | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    session_id: str | None = None,
    **options: Any,
) -> Call:
    """A session create with the parameters as float32 safetensors and the config in the metadata.

    ``options`` are the other config members: ``nonfinite``, ``max_grad_norm``, ``schedule``, ``accumulate``.
    """
    config: dict[str, Any] = {"optimizer": optimizer, "hyperparams": dict(hyperparams or {})}
    if param_groups:
        config["param_groups"] = [dict(g) for g in param_groups]
    config.update({k: v for k, v in options.items() if v is not None})
    if session_id:
        config["id"] = session_id
    body = wire.encode(params, {"config": json.dumps(config)}, dtype="float32")
    return Call("POST", "/v1/sessions", {"content-type": wire.SAFETENSORS}, body)


def step(
    session_id: str,
    grads: Mapping[str, Any],
    *,
    if_match: int | None,
    idempotency_key: str | None,
    minimal: bool = False,
    partial: bool = False,
    changes: HyperparamChanges | None = None,
    dtype: str | Mapping[str, str] | None = None,
    answer_dtype: str | None = None,
) -> Call:
    """A step with the gradients as safetensors in the order given (send them in the session's order).

    ``partial`` lets ``grads`` name a subset of the tensors; ``changes`` are hyperparameter changes applied with the
    step (one mapping for every group, or one entry or None per group); ``dtype`` converts the gradients on the wire;
    ``answer_dtype`` (float16 or bfloat16) asks for the updated parameters rounded to that precision (half the bytes;
    the session keeps float32).
    """
    headers = {"content-type": wire.SAFETENSORS, "accept": wire.SAFETENSORS}
    if if_match is not None:
        headers["if-match"] = f'"{if_match}"'
    if idempotency_key is not None:
        headers["idempotency-key"] = idempotency_key
    if minimal:
        headers["prefer"] = "return=minimal"
    metadata = {"hyperparams": json.dumps(changes)} if changes else None
    query = [*(["missing=skip"] if partial else []), *([f"dtype={answer_dtype}"] if answer_dtype else [])]
    path = f"/v1/sessions/{session_id}/step" + ("?" + "&".join(query) if query else "")
    parts = wire.encode_parts(grads, metadata, dtype=dtype)
    headers["content-length"] = str(sum(len(memoryview(p).cast("B")) for p in parts))
    return Call("POST", path, headers, parts)


def read_step(reply: Reply) -> StepResult:
    check(reply)
    step_count = step_number(reply)
    norm = reply.headers.get("optserve-grad-norm")
    body = None if reply.status in (202, 204) else wire.parse(reply.body, data=reply.data)
    params = None if body is None else body.tensors()
    return StepResult(
        step=step_count,
        params=params,
        replayed=reply.headers.get("idempotent-replayed") == "true",
        skipped="optserve-step-skipped" in reply.headers,
        grad_norm=None if norm is None else float(norm),
        awaiting=int(reply.headers.get("optserve-awaiting", 0)) if reply.status == 202 else 0,
        body=body,
    )


def params(
    session_id: str, min_step: int | None = None, timeout: float | None = None, dtype: str | None = None
) -> Call:
    """Read the parameters (rounded to ``dtype`` float16 or bfloat16 if given); with ``min_step`` the server waits
    (up to ``timeout`` s) until the session gets there."""
    query = []
    if min_step is not None:
        query.append(f"min_step={min_step}")
        if timeout is not None:
            query.append(f"timeout={timeout}")
    if dtype is not None:
        query.append(f"dtype={dtype}")
    path = f"/v1/sessions/{session_id}/params" + ("?" + "&".join(query) if query else "")
    return Call("GET", path, {"accept": wire.SAFETENSORS})


def read_tensors(reply: Reply) -> tuple[int, dict[str, np.ndarray]]:
    check(reply)
    tensors, metadata = wire.decode(reply.body)
    return int(metadata.get("step", step_number(reply))), tensors


def read_json(reply: Reply) -> Any:
    check(reply)
    return reply.json() if reply.status != 204 else None


def read_bytes(reply: Reply) -> bytes:
    return bytes(check(reply).body)


def update(group: int | None, hyperparams: Mapping[str, Any], session_id: str) -> Call:
    body: dict[str, Any] = {"hyperparams": dict(hyperparams)}
    if group is not None:
        body["group"] = group
    return Call("PATCH", f"/v1/sessions/{session_id}", json=body)


def restore(session_id: str, checkpoint: bytes) -> Call:
    return Call("PUT", f"/v1/sessions/{session_id}/checkpoint", {"content-type": wire.SAFETENSORS}, checkpoint)
