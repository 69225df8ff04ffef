"""The FastAPI application: routes that translate HTTP into calls on sessions, and problem+json errors.

The routes know nothing of the math. Tensor bodies travel as ``application/x-safetensors`` or ``application/json``
(chosen by ``Content-Type``; responses by ``Accept``, defaulting to the request's type). Every error, raised by the
domain or by the framework, leaves as ``application/problem+json``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from optserve.client.wire import WireError

from . import fused
from .errors import ServiceError
from .routes import plain_errors, router
from .settings import Settings
from .store import MemoryStore, SessionStore

log = logging.getLogger("optserve")

PROBLEM = "application/problem+json"

try:
    __version__ = version("optserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"


def problem_response(
    status: int, title: str, detail: str, slug: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {
        "type": f"urn:optserve:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def create_app(settings: Settings | None = None, store: SessionStore | None = None) -> FastAPI:
    """Build the application around a session store (in memory by default)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await run_in_threadpool(fused.warm_up)  # the first step should not pay for compiling the kernels
        yield

    app = FastAPI(
        title="optserve",
        version=__version__,
        summary="Remote optimizer stepping: Adam, AdamW, SGD and RMSprop state held per session.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.store = store if store is not None else MemoryStore()
    app.router.routes.extend(router.routes)  # directly: include_router adds a matching layer to every request

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"ETag": f'"{exc.extra["current_step"]}"'} if "current_step" in exc.extra else None
        return JSONResponse(exc.problem(), status_code=exc.status, media_type=PROBLEM, headers=headers)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError) -> JSONResponse:
        return problem_response(400, "Malformed tensor body", str(exc), "malformed-body")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = plain_errors(exc.errors())
        return problem_response(
            422, "Invalid request", "the request does not match the API", "invalid-request", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        return problem_response(exc.status_code, title, str(exc.detail), slug, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client closed the connection before its body arrived: nothing was applied, nobody to answer.
        log.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500, "Internal server error", "an unexpected error occurred; see the server log", "internal-error"
        )

    return app
