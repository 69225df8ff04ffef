"""Domain errors of the service, each knowing its HTTP status and problem type.

The HTTP layer turns every :class:`ServiceError` into an ``application/problem+json`` answer (RFC 9457) with
``type``, ``title``, ``status``, ``detail`` and the error's extra members; the domain raises them without knowing
about HTTP beyond the status number.

    ServiceError
    +-- BadRequest               400  malformed body or header (bad safetensors, not JSON, bad If-Match)
    +-- Unauthorized / Forbidden 401 / 403  (reserved for auth)
    +-- SessionNotFound          404
    +-- NotAcceptable            406
    +-- Conflict                 409  session id taken; StepConflict: idempotency key applied at an older step
    +-- PreconditionFailed       412  If-Match names another step
    +-- PayloadTooLarge          413  body, safetensors header, tensors or parameters per session above the limit
    +-- UnsupportedMediaType     415
    +-- InvalidInput             422  wrong tensor names/shapes/dtypes, invalid hyperparameters, non-finite values
    |   +-- NonFiniteGradient    422  NaN or infinity in the gradients
    |   +-- NonFiniteResult      422  a step that would make the parameters or the state NaN or infinite
    +-- TooManySessions          429  the server's session limit
    +-- StorageUnavailable       503  a snapshot that must be on disk before the answer could not be written
    +-- LimitExceeded            507  the memory budget for all sessions
"""

from __future__ import annotations

import traceback
from typing import Any, NamedTuple

from starlette.responses import JSONResponse

from optserve.client.wire import WireError

PROBLEM_TYPE = "urn:optserve:problem:"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class ServiceError(Exception):
    """Base of the domain errors; ``extra`` members are added to the problem document."""

    status = 500
    slug = "internal-error"
    title = "Internal server error"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        return problem(self.status, self.slug, self.title, self.detail, **self.extra)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its extra members (an error raised on a cluster's session host reaches the front whole)
        return (_rebuild, (type(self), self.detail, self.extra))


def _rebuild(cls: type[ServiceError], detail: str, extra: dict[str, Any]) -> ServiceError:
    return cls(detail, **extra)


def problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    """A problem details document (RFC 9457): the one shape of every error answer."""
    return {"type": PROBLEM_TYPE + slug, "title": title, "status": status, "detail": detail, **extra}


def internal_error() -> dict[str, Any]:
    """The problem document of an unexpected error (whose details go to the server log, not to the client)."""
    return problem(500, "internal-error", "Internal server error", "an unexpected error occurred; see the server log")


def problem_json(document: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """A problem document as an ``application/problem+json`` response."""
    return JSONResponse(document, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


class ErrorAnswer(NamedTuple):
    status: int
    slug: str
    document: dict[str, Any]
    headers: dict[str, str]


def forget_frames(exc: BaseException) -> None:
    """Clear the variables of the finished frames that a handled error's traceback holds (and those of its cause and
    context). asyncio futures and anyio keep exceptions in reference cycles, which only the cyclic garbage
    collector frees: until then a refused request's frames, and the body they hold, stay in memory."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        pending += [e.__cause__, e.__context__]


def error_answer(exc: Exception) -> ErrorAnswer | None:
    """The answer to a domain error or a malformed tensor body; None for any other exception (an unexpected one:
    500)."""
    if isinstance(exc, ServiceError):
        headers = {"ETag": f'"{exc.extra["current_step"]}"'} if "current_step" in exc.extra else {}
        return ErrorAnswer(exc.status, exc.slug, exc.problem(), headers)
    if isinstance(exc, WireError):
        return ErrorAnswer(400, "malformed-body", problem(400, "malformed-body", "Malformed tensor body", str(exc)), {})
    return None


class BadRequest(ServiceError):
    status, slug, title = 400, "malformed-request", "Malformed request"


class SharedMemoryUnavailable(BadRequest):
    """A step body named in shared memory that this server cannot take that way (not its Unix socket, a store that
    does not answer into it, a buffer it cannot open): nothing was done, and the client sends the bytes instead."""

    slug, title = "shared-memory-unavailable", "Shared memory not available"


class Unauthorized(ServiceError):
    status, slug, title = 401, "unauthorized", "Authentication required"


class Forbidden(ServiceError):
    status, slug, title = 403, "forbidden", "Not allowed"


class SessionNotFound(ServiceError):
    status, slug, title = 404, "session-not-found", "Session not found"


class NotAcceptable(ServiceError):
    status, slug, title = 406, "not-acceptable", "No acceptable representation"


class Conflict(ServiceError):
    status, slug, title = 409, "conflict", "Conflict"


class StepConflict(Conflict):
    slug, title = "idempotency-key-reused", "Idempotency key already applied at an earlier step"


class PreconditionFailed(ServiceError):
    status, slug, title = 412, "step-precondition-failed", "Session is not at the step named by If-Match"


class PayloadTooLarge(ServiceError):
    status, slug, title = 413, "payload-too-large", "Request body too large"


class UnsupportedMediaType(ServiceError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class TooManySessions(ServiceError):
    status, slug, title = 429, "too-many-sessions", "Session limit reached"


class LimitExceeded(ServiceError):
    status, slug, title = 507, "memory-budget-exceeded", "Memory budget exceeded"


class InvalidInput(ServiceError):
    status, slug, title = 422, "invalid-input", "Invalid input"


class NonFiniteGradient(InvalidInput):
    slug, title = "non-finite-gradient", "Gradient contains NaN or infinity"


class NonFiniteResult(InvalidInput):
    slug, title = "non-finite-result", "The step would make the parameters or the optimizer state non-finite"


class StorageUnavailable(ServiceError):
    """The data folder could not be written (read-only, full, failing): what needed a snapshot before its answer
    was not done, or is not yet durable. Retryable: a retried step with the same Idempotency-Key is applied once."""

    status, slug, title = 503, "storage-unavailable", "Snapshot could not be written"
