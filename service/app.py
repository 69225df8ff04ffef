"""The FastAPI application: routes that translate HTTP into calls on sessions, and problem+json errors.

The routes know nothing of the math. Tensor bodies travel as ``application/x-safetensors`` or ``application/json``
(chosen by ``Content-Type``; responses by ``Accept``, defaulting to the request's type). Every error, raised by the
domain or by the framework, leaves as ``application/problem+json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
from starlette.types import ASGIApp, Receive, Scope, Send

from optserve.client.wire import WireError

from . import diskio, docs, fused
from .auth import Guard
from .direct import Mappings
from .errors import ServiceError, error_answer, forget_frames, internal_error, problem, problem_json
from .observability import Metrics, RequestObserver, printable
from .persistence import Saver, Snapshots
from .routes import Service, plain_errors, router
from .settings import Settings
from .step_route import StepRoute, step_session_id
from .store import Lifetimes, Limits, MemoryStore, SessionStore

log = logging.getLogger("optserve")

try:
    __version__ = version("optserve")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"


def problem_response(
    status: int, title: str, detail: str, slug: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return problem_json(problem(status, slug, title, detail, **extra), status, headers)


class OptserveApp(FastAPI):
    """The FastAPI application, with step requests handed straight to the bare step route (observed like every
    other request) instead of going through FastAPI's middleware, routing and dependency solving."""

    step_app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.step_app is not None and (session_id := step_session_id(scope)):
            scope["app"] = self
            scope["path_params"] = {"session_id": session_id}
            await self.step_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def make_store(settings: Settings) -> SessionStore:
    """The store the settings ask for: sessions in this process, snapshotted to the data folder, or on the session
    hosts of a Ray cluster (``OPTSERVE_STORE=ray``)."""
    if settings.store == "ray":
        from .cluster import RayStore  # Ray is the [ray] extra: imported only when asked for

        return RayStore(settings)
    snapshots = Snapshots(settings.data_dir)
    limits = Limits(
        max_sessions=settings.max_sessions,
        max_tensors_per_session=settings.max_tensors_per_session,
        max_params_per_session=settings.max_params_per_session,
        memory_budget_bytes=settings.memory_budget_bytes,
    )
    saver = Saver(snapshots, settings.snapshot_every_steps, settings.snapshot_every_seconds, settings.fsync_every_step)
    lifetimes = Lifetimes(settings.session_ttl_seconds, settings.session_expire_seconds)
    return MemoryStore(limits, snapshots, saver, lifetimes)


def create_app(settings: Settings | None = None, store: SessionStore | None = None) -> FastAPI:
    """Build the application: the session store (``make_store`` of the settings unless a store is given), auth,
    limits and the snapshot policy of ``settings``."""
    settings = settings or Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = store if store is not None else make_store(settings)
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    svc = Service(settings, store, Guard(api_key))
    data_dir = settings.data_dir

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        await run_in_threadpool(fused.warm_up)  # the first step should not pay for compiling the kernels
        await store.start()
        await run_in_threadpool(diskio.warm_up, data_dir)  # nor the first snapshot
        loop_task = asyncio.create_task(_background(store, app.state.step_route.maps))
        try:
            # read by OptserveProtocol before a request reaches the app
            yield {"max_body_bytes": settings.max_body_bytes, "max_request_head_bytes": settings.max_request_head_bytes,
                   "header_timeout_seconds": settings.header_timeout_seconds}  # fmt: skip
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await store.stop()  # graceful shutdown: everything answered is on disk before the process ends

    app = OptserveApp(
        title="optserve",
        version=__version__,
        summary="Remote optimizer stepping: Adam, AdamW, SGD and RMSprop state held per session.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their assets from CDNs: ours come from this server (docs.py)
        redoc_url=None,
    )
    metrics = Metrics(store)
    json_logs = settings.log_format == "json"
    app.add_middleware(RequestObserver, metrics=metrics, json_logs=json_logs)
    app.state.service = svc
    app.state.metrics = metrics
    app.state.step_route = StepRoute(svc, metrics)
    app.step_app = RequestObserver(app.state.step_route, metrics, json_logs)
    app.router.routes.extend(router.routes)  # directly: include_router adds a matching layer to every request
    app.router.routes.extend(docs.router.routes)

    @app.exception_handler(ServiceError)
    @app.exception_handler(WireError)
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        forget_frames(exc)
        answer = error_answer(exc)
        assert answer is not None  # registered for ServiceError and WireError, which it answers
        return problem_json(answer.document, answer.status, answer.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        forget_frames(exc)
        errors = plain_errors(exc.errors())
        return problem_response(
            422, "Invalid request", "the request does not match the API", "invalid-request", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        forget_frames(exc)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of every route on this path, not just the first route's
            methods = {
                m for r in request.app.routes if getattr(r, "path_regex", None) and r.path_regex.match(request.url.path)
                for m in (getattr(r, "methods", None) or ()) if m != "HEAD"
            }  # fmt: skip
            headers["Allow"] = ", ".join(sorted(methods))
        return problem_response(exc.status_code, title, str(exc.detail), slug, headers=headers or None)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client closed the connection before its body arrived: nothing was applied, nobody to answer.
        forget_frames(exc)
        log.debug("client disconnected during %s %s", request.method, printable(request.url.path))
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, printable(request.url.path))
        forget_frames(exc)
        return problem_json(internal_error(), 500)

    return app


async def _background(store: SessionStore, maps: Mappings) -> None:
    """Time-based snapshots and idle-session eviction, checked every half second; and the maps of clients'
    shared-memory buffers that were removed dropped (their memory is freed once nobody maps them)."""
    while True:
        await asyncio.sleep(0.5)
        try:
            maps.forget_removed()
            await store.maintain(time.time())
        except Exception:  # noqa: BLE001 - one bad round must not end the maintenance for good
            log.exception("session maintenance failed")
