"""optserve client: the wire codec, an HTTP client of the API and a numpy optimizer whose state is remote.

from optserve.client import RemoteOptimizer
opt = RemoteOptimizer(params, url="http://127.0.0.1:8000", optimizer="adamw", lr=1e-3)
opt.step(grads)   # params updated in place
"""

from .errors import (
    APIError,
    AuthenticationError,
    BadRequest,
    Conflict,
    InvalidInput,
    LimitExceeded,
    NonFiniteGradient,
    NotAcceptable,
    NotFound,
    OptserveError,
    PayloadTooLarge,
    PermissionDenied,
    PreconditionFailed,
    ServerError,
    StepConflict,
    TransportError,
    UnsupportedMediaType,
)
from .http import AsyncClient, Client
from .optimizer import RemoteOptimizer
from .protocol import Retry, StepResult

__all__ = [
    "Client",
    "AsyncClient",
    "RemoteOptimizer",
    "Retry",
    "StepResult",
    "OptserveError",
    "TransportError",
    "APIError",
    "BadRequest",
    "AuthenticationError",
    "PermissionDenied",
    "NotFound",
    "NotAcceptable",
    "Conflict",
    "StepConflict",
    "PreconditionFailed",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "InvalidInput",
    "NonFiniteGradient",
    "LimitExceeded",
    "ServerError",
]
