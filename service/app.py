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

from . import diskio, fused
from .auth import Guard
from .errors import ServiceError, error_answer, internal_error, problem, problem_json
from .observability import Metrics, RequestObserver
from .persistence import Saver, Snapshots
from .routes import Service, plain_errors, router
from .settings import Settings
from .step_route import StepRoute, step_session_id
from .store import Limits, MemoryStore, SessionStore

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


def create_app(settings: Settings | None = None, store: SessionStore | None = None) -> FastAPI:
    """Build the application: the session store (in memory, with snapshots in the data folder unless a store is
    given), auth, limits and the snapshot policy of ``settings``."""
    settings = settings or Settings()
    snapshots = Snapshots(settings.data_dir) if store is None else None
    limits = Limits(
        max_sessions=settings.max_sessions,
        max_tensors_per_session=settings.max_tensors_per_session,
        max_params_per_session=settings.max_params_per_session,
        memory_budget_bytes=settings.memory_budget_bytes,
    )
    store = store if store is not None else MemoryStore(limits, snapshots)
    saver = (
        Saver(
            snapshots,
            settings.snapshot_every_steps,
            settings.snapshot_every_seconds,
            settings.fsync_every_step,
            settings.session_ttl_seconds,
        )
        if snapshots is not None
        else None
    )
    api_key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    svc = Service(settings, store, Guard(api_key), saver)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await run_in_threadpool(fused.warm_up)  # the first step should not pay for compiling the kernels
        if snapshots is not None and isinstance(store, MemoryStore):
            report = await run_in_threadpool(snapshots.load_all)
            for session in report.loaded:
                store.replace(session)
            log.info("loaded %d session(s) from %s; %d set aside", len(report.loaded), snapshots.dir,
                     len(report.corrupt))  # fmt: skip
        if snapshots is not None:
            await run_in_threadpool(diskio.warm_up, snapshots.dir)  # nor the first snapshot
        app.state.ready = True
        loop_task = asyncio.create_task(_background(svc)) if saver is not None else None
        try:
            yield {"max_body_bytes": settings.max_body_bytes}  # read by LargeBodyProtocol before a body arrives
        finally:
            app.state.ready = False
            if loop_task is not None:
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
            if saver is not None:  # graceful shutdown: everything answered is on disk before the process ends
                await run_in_threadpool(saver.close)
                failed = await run_in_threadpool(saver.flush, store.list())
                log.info("shutdown: snapshots flushed (%d failed)", failed)

    app = OptserveApp(
        title="optserve",
        version=__version__,
        summary="Remote optimizer stepping: Adam, AdamW, SGD and RMSprop state held per session.",
        lifespan=lifespan,
    )
    metrics = Metrics(store, saver)
    json_logs = settings.log_format == "json"
    app.add_middleware(RequestObserver, metrics=metrics, json_logs=json_logs)
    app.state.service = svc
    app.state.metrics = metrics
    app.state.step_route = StepRoute(svc, metrics)
    app.step_app = RequestObserver(app.state.step_route, metrics, json_logs)
    app.state.ready = False
    app.router.routes.extend(router.routes)  # directly: include_router adds a matching layer to every request

    @app.exception_handler(ServiceError)
    @app.exception_handler(WireError)
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        answer = error_answer(exc)
        assert answer is not None  # registered for ServiceError and WireError, which it answers
        return problem_json(answer.document, answer.status, answer.headers)

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
        log.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_json(internal_error(), 500)

    return app


async def _background(svc: Service) -> None:
    """Time-based snapshots and idle-session eviction, checked every half second."""
    saver, store = svc.saver, svc.store
    assert saver is not None
    while True:
        await asyncio.sleep(0.5)
        now = time.time()
        for session in store.list():
            if bool(saver.ttl_seconds) and now - session.updated_at > saver.ttl_seconds:  # idle: save, then evict
                saved = await run_in_threadpool(saver.save, session, False)
                if saved and session.saved_version == session.version and isinstance(store, MemoryStore):
                    store.evict(session.id)  # its snapshot is complete; the next request loads it back
                    log.info("session %s evicted after %.0f s idle", session.id, now - session.updated_at)
            elif saver.due(session, now):
                saver.request(session)  # time-based: the same writer as the step-based snapshots
