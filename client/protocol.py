"""The I/O-free half of the client: how each operation becomes an HTTP request and how its answer is read.

``Client`` (and any twin built on another transport) only sends what these functions build and hands back what
they parse, so the wire details live in one place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from . import wire
from .errors import APIError, error_for


@dataclass
class Call:
    """One HTTP request to make: method, path, headers and body."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    json: Any = None


@dataclass
class StepResult:
    """The answer to a step: the session's step after it and the updated parameters (None with minimal=True)."""

    step: int
    params: dict[str, np.ndarray] | None
    replayed: bool = False
    skipped: bool = False


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


NO_RETRY = Retry(attempts=1)


def check(response: httpx.Response) -> httpx.Response:
    """Raise the typed error for an error status, with the problem details when the server sent them."""
    if response.status_code < 400:
        return response
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:1000]}
    raise error_for(response.status_code, problem)


def retryable(exc: Exception) -> bool:
    return isinstance(exc, APIError) and exc.status >= 500


def sleep_for(delay: float) -> None:
    time.sleep(delay)


def step_number(response: httpx.Response) -> int:
    tag = response.headers.get("etag", "").removeprefix("W/").strip('"')
    if not tag.isdigit():
        raise APIError(response.status_code, {"detail": f"answer carries no step ETag ({tag!r})"})
    return int(tag)


# --- requests ------------------------------------------------------------------------------------------------------


def create(
    params: Mapping[str, Any],
    optimizer: str,
    hyperparams: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]] | None,
    nonfinite: str | None,
    session_id: str | None,
) -> Call:
    """A session create with the parameters as safetensors (float32) and the config in the metadata."""
    config: dict[str, Any] = {"optimizer": optimizer, "hyperparams": dict(hyperparams)}
    if param_groups:
        config["param_groups"] = [dict(g) for g in param_groups]
    if nonfinite:
        config["nonfinite"] = nonfinite
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
    minimal: bool,
    dtype: str = "float32",
) -> Call:
    """A step with the gradients as safetensors in the order given (send them in the session's order)."""
    headers = {"content-type": wire.SAFETENSORS, "accept": wire.SAFETENSORS}
    if if_match is not None:
        headers["if-match"] = f'"{if_match}"'
    if idempotency_key is not None:
        headers["idempotency-key"] = idempotency_key
    if minimal:
        headers["prefer"] = "return=minimal"
    return Call("POST", f"/v1/sessions/{session_id}/step", headers, wire.encode(grads, dtype=dtype))


def read_step(response: httpx.Response) -> StepResult:
    check(response)
    step_count = step_number(response)
    params = None if response.status_code == 204 else wire.decode(response.content)[0]
    return StepResult(
        step=step_count,
        params=params,
        replayed=response.headers.get("idempotent-replayed") == "true",
        skipped="optserve-step-skipped" in response.headers,
    )


def read_tensors(response: httpx.Response) -> tuple[int, dict[str, np.ndarray]]:
    check(response)
    tensors, metadata = wire.decode(response.content)
    return int(metadata.get("step", step_number(response))), tensors
