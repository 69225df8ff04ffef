"""The client's exceptions: one tree, each API error carrying the server's problem details.

OptserveError
+-- TransportError            the request may not have reached the server, or its answer was lost
|                             (connection refused or reset, timeout); steps retry these safely
+-- APIError                  the server answered with an error status; .status, .problem, .detail
    +-- BadRequest            400  malformed body or header
    +-- AuthenticationError   401
    +-- PermissionDenied      403
    +-- NotFound              404  unknown session
    +-- NotAcceptable         406
    +-- Conflict              409  session id taken
    |   +-- StepConflict      409  the idempotency key was applied at an earlier step (.applied_at_step)
    +-- PreconditionFailed    412  the session is not at the step sent in If-Match (.current_step)
    +-- PayloadTooLarge       413
    +-- UnsupportedMediaType  415
    +-- InvalidInput          422  wrong tensors, invalid hyperparameters (also a ValueError)
    |   +-- NonFiniteGradient 422  NaN or infinity in the gradients
    +-- LimitExceeded         429 / 507  too many sessions, memory budget (not retried)
    +-- ServerError           other 5xx  steps retry these safely
"""

from __future__ import annotations

from typing import Any


class OptserveError(Exception):
    """Base of every error raised by the client library."""


class TransportError(OptserveError):
    """The request failed in transit (connection refused or reset, timeout)."""


class APIError(OptserveError):
    """An error status from the server, with its problem details (RFC 9457)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.detail: str = str(problem.get("detail", ""))
        self.type: str = str(problem.get("type", ""))
        super().__init__(f"{status} {problem.get('title', '')}: {self.detail}".strip())


class BadRequest(APIError):
    pass


class SharedMemoryUnavailable(BadRequest):
    """The server cannot take this step's body in shared memory (nothing was applied): send its bytes."""


class AuthenticationError(APIError):
    pass


class PermissionDenied(APIError):
    pass


class NotFound(APIError):
    pass


class NotAcceptable(APIError):
    pass


class Conflict(APIError):
    pass


class StepConflict(Conflict):
    @property
    def applied_at_step(self) -> int | None:
        return self.problem.get("applied_at_step")


class PreconditionFailed(APIError):
    @property
    def current_step(self) -> int | None:
        return self.problem.get("current_step")

    def server_behind(self, step: int) -> bool:
        """The server is at an older step than ``step``: it restarted from a snapshot taken before it."""
        return self.current_step is not None and self.current_step < step


class PayloadTooLarge(APIError):
    pass


class UnsupportedMediaType(APIError):
    pass


class InvalidInput(APIError, ValueError):
    """Invalid values: a ``ValueError`` too, as code written for ``torch.optim`` expects of them."""


class NonFiniteGradient(InvalidInput):
    pass


class LimitExceeded(APIError):
    pass


class ServerError(APIError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest, 401: AuthenticationError, 403: PermissionDenied, 404: NotFound, 406: NotAcceptable,
    409: Conflict, 412: PreconditionFailed, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidInput,
    429: LimitExceeded, 507: LimitExceeded,
}  # fmt: skip
_BY_TYPE: dict[str, type[APIError]] = {
    "urn:optserve:problem:idempotency-key-reused": StepConflict,
    "urn:optserve:problem:non-finite-gradient": NonFiniteGradient,
    "urn:optserve:problem:shared-memory-unavailable": SharedMemoryUnavailable,
}


def error_for(status: int, problem: dict[str, Any]) -> APIError:
    """The most specific exception for a status and problem document."""
    cls = _BY_TYPE.get(str(problem.get("type")))
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    return cls(status, problem)
