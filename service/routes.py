"""HTTP routes of API v1: each translates a request into one call on the session store or a session.

Content negotiation, precondition headers and tensor responses live here; the step semantics live in
:mod:`optserve.service.session`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from optserve.client import wire

from . import checkpoint
from .auth import Guard, new_token
from .bodies import BufferResponse, read_body
from .errors import (
    BadRequest,
    InvalidInput,
    NotAcceptable,
    PayloadTooLarge,
    SessionNotFound,
    UnsupportedMediaType,
)
from .headers import HeaderMap
from .hyperparams import HyperparamError, make_hyperparams
from .layout import FlatLayout
from .persistence import Saver
from .session import Session, SessionConfig
from .settings import Settings
from .store import SessionStore, check_session_id, new_session_id

router = APIRouter()

# --- OpenAPI: what the routes read and answer (the routes read raw bodies, so FastAPI cannot infer these) -------

PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "additionalProperties": True,
}
BINARY = {"type": "string", "format": "binary"}
TENSORS_JSON = {"type": "object", "additionalProperties": True, "description": "{name: {dtype, shape, data}}"}
OBJECT = {"type": "object", "additionalProperties": True}
# Every error is problem+json; "default" also keeps FastAPI from declaring its own 422 shape.
ERRORS: dict[int | str, dict[str, Any]] = {
    "default": {
        "description": "Problem details (RFC 9457)",
        "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}},
    }
}


def answers(**statuses: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses: ``s200={"application/json": OBJECT}`` and so on, plus problem+json for the rest."""
    out: dict[int | str, dict[str, Any]] = dict(ERRORS)
    for key, content in statuses.items():
        out[int(key[1:])] = {
            "description": key[1:],
            **({"content": {ctype: {"schema": schema} for ctype, schema in content.items()}} if content else {}),
        }
    return out


def body(content: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI requestBody: media type -> schema."""
    return {
        "requestBody": {"required": True, "content": {ctype: {"schema": schema} for ctype, schema in content.items()}}
    }


SAFETENSORS_OR_JSON = {wire.SAFETENSORS: BINARY, wire.JSON: TENSORS_JSON}

TENSOR_TYPES = (wire.SAFETENSORS, wire.JSON)
MAX_KEY_LENGTH = 255
MAX_WAIT_SECONDS = 300.0
INLINE_BODY_BYTES = 256 * 1024
SMALL_ANSWER = 256 * 1024  # steps up to ~64K float32 parameters run on the event loop


@dataclass
class Service:
    """What the routes work with: settings, the session store, the auth guard and the snapshot policy."""

    settings: Settings
    store: SessionStore
    guard: Guard
    saver: Saver | None

    def open(self, headers: HeaderMap, session_id: str) -> Session:
        """The session, once the request shows its token (or the admin key) when auth is on."""
        try:
            session = self.store.get(session_id)
        except SessionNotFound:
            self.guard.session(headers, None)  # a session's absence is told only after auth: no probing without a key
            raise
        self.guard.session(headers, session.token_digest)
        return session


def service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def open_session(request: Request, session_id: str) -> Session:
    return service(request).open(request.headers, session_id)


async def snapshot_now(svc: Service, session: Session) -> None:
    if svc.saver is not None:
        await run_in_threadpool(svc.saver.save, session)


async def after_change(svc: Service, session: Session) -> None:
    """Apply the snapshot policy after an answered change: before answering with fsync_every_step, else in the
    background when the session is due (every N steps)."""
    saver = svc.saver
    if saver is None:
        return
    if saver.fsync_every_step:
        await run_in_threadpool(saver.save, session)
    elif saver.due(session, time.time()):
        saver.request(session)


# --- negotiation helpers -------------------------------------------------------------------------------------------


def media_type(headers: HeaderMap) -> str:
    return (headers.get("content-type") or "").split(";")[0].strip().lower()


def tensor_media_type(headers: HeaderMap) -> str:
    """The request body's tensor encoding, or 415."""
    ctype = media_type(headers)
    if ctype not in TENSOR_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'!r} is not supported; send {wire.SAFETENSORS} or {wire.JSON}",
            supported=list(TENSOR_TYPES),
        )
    return ctype


def negotiate(headers: HeaderMap, default: str) -> str:
    """The response encoding from ``Accept`` (q-values honoured), falling back to ``default``; or 406."""
    accept = (headers.get("accept") or "").strip()
    if not accept:
        return default
    ranges = []
    for i, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        ranges.append((-q, i, fields[0].lower()))
    for neg_q, _, rng in sorted(ranges):
        if neg_q >= 0:
            break
        if rng in ("*/*", "application/*"):
            return default
        if rng in TENSOR_TYPES:
            return rng
    raise NotAcceptable(
        f"cannot answer with {accept!r}; available: {', '.join(TENSOR_TYPES)}", available=list(TENSOR_TYPES)
    )


def parse_if_match(headers: HeaderMap) -> frozenset[int] | None:
    """The step numbers named by ``If-Match`` (``"7"`` or ``W/"7"``); None when absent or ``*``."""
    value = headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    steps = set()
    for tag in value.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag.isdigit():
            steps.add(int(tag))
    return frozenset(steps)  # tags that are not step numbers can never match: 412


def idempotency_key(headers: HeaderMap) -> str | None:
    key = headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_KEY_LENGTH and key.isprintable() and key.isascii()):
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters")
    return key


def prefers_minimal(headers: HeaderMap) -> bool:
    prefer = headers.get("prefer")
    return prefer is not None and any(p.strip().lower() == "return=minimal" for p in prefer.split(","))


def etag(step: int) -> str:
    return f'"{step}"'


def parse_safetensors(body: bytes | bytearray | memoryview, max_header_bytes: int) -> wire.Safetensors:
    """Parse a safetensors body; a header over the limit is 413, anything else malformed 400."""
    header_bytes = int.from_bytes(bytes(memoryview(body)[:8]), "little") if len(body) >= 8 else 0
    if max_header_bytes < header_bytes <= len(body) - 8:  # a real header over the limit (a length past the end is 400)
        raise PayloadTooLarge(f"safetensors header above the limit of {max_header_bytes} bytes", limit=max_header_bytes)
    return wire.parse(body, max_header_bytes)


def decode_tensors(
    body: bytes | bytearray | memoryview, ctype: str, max_header_bytes: int
) -> wire.Safetensors | tuple[dict[str, np.ndarray], dict[str, str]]:
    if ctype == wire.SAFETENSORS:
        return parse_safetensors(body, max_header_bytes)
    return wire.decode_json(bytes(body))


def tensor_parts(
    layout: FlatLayout,
    flat: np.ndarray,
    step: int,
    encoding: str,
    metadata: dict[str, str] | None = None,
    dtype: str = "float32",
) -> list[bytes | memoryview]:
    """The parameters in the negotiated encoding, as the parts of the answer's body. As safetensors, the header
    followed by the flat buffer itself: the layout keeps the tensors contiguous and in order, so no per-tensor copy
    or join is needed. ``dtype`` float16 or bfloat16 rounds the float32 parameters for the answer (half the bytes)."""
    meta = {"step": str(step), **(metadata or {})}
    if encoding != wire.SAFETENSORS:
        return [wire.encode_json(layout.views(flat), meta, dtype=dtype)]
    specs = layout.specs
    if dtype != "float32":
        code, flat = wire.as_wire_array(flat, dtype)
        specs = tuple((name, code, shape) for name, _, shape in specs)
    header = wire.header(specs, meta)
    if flat.nbytes < SMALL_ANSWER:  # one send of one bytes: fewer trips through the ASGI stack
        return [b"".join((header, memoryview(flat).cast("B")))]  # type: ignore[arg-type]  # one copy
    return [header, memoryview(flat).cast("B")]  # type: ignore[arg-type]


def tensor_response(layout: FlatLayout, flat: np.ndarray, step: int, encoding: str, dtype: str) -> Response:
    return BufferResponse(tensor_parts(layout, flat, step, encoding, dtype=dtype), 200, encoding, {"ETag": etag(step)})


ANSWER_DTYPES = wire.WIRE_DTYPES
AnswerDtype = Literal["float32", "float16", "bfloat16"]  # ANSWER_DTYPES, spelled out for FastAPI and mypy


def answer_dtype(value: str | None) -> str:
    """The ``dtype`` query parameter of a route answering with parameters: float32 (the default), float16 or
    bfloat16; anything else is 422."""
    if value is None:
        return "float32"
    if value not in ANSWER_DTYPES:
        raise InvalidInput(f"dtype must be one of {', '.join(ANSWER_DTYPES)}, got {value!r}")
    return value


def json_object(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and integers with too many digits
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    return obj


def validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = plain_errors(e.errors(include_url=False))
        raise InvalidInput(
            "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors), errors=errors
        ) from None


def plain_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors as JSON can carry them: location, message and type, without echoing the input back
    (it may be a tensor, or a NaN that JSON cannot hold)."""
    return [{"loc": [str(p) for p in err["loc"]], "msg": str(err["msg"]), "type": str(err["type"])} for err in errors]


# --- sessions ------------------------------------------------------------------------------------------------------


def _create(
    body: bytes | bytearray | memoryview, ctype: str, max_header_bytes: int
) -> tuple[str | None, SessionConfig, dict[str, np.ndarray]]:
    if ctype == wire.SAFETENSORS:
        st = parse_safetensors(body, max_header_bytes)
        config_obj = json_object(st.metadata["config"].encode()) if "config" in st.metadata else {}
        params = st.tensors()
    else:
        config_obj = json_object(body)
        if "params" not in config_obj:
            raise InvalidInput('the body needs "params": the initial tensors {name: {dtype, shape, data}}')
        params, _ = wire.decode_json(config_obj.pop("params"))
    session_id = config_obj.pop("id", None)
    if session_id is not None and not isinstance(session_id, str):
        raise InvalidInput(f"id must be a string, got {session_id!r}")
    return session_id, validated(SessionConfig, config_obj), params


@router.post(
    "/v1/sessions",
    status_code=201,
    tags=["sessions"],
    responses=answers(s201={wire.JSON: OBJECT}),
    openapi_extra=body({wire.JSON: OBJECT, wire.SAFETENSORS: BINARY}),
)
async def create_session(request: Request) -> JSONResponse:
    """Create a session from a config and initial parameters (JSON body, or safetensors with the config in
    ``__metadata__["config"]``). Optional ``"id"`` picks the session id. With auth on, the answer carries the
    session's ``token``, once."""
    svc = service(request)
    svc.guard.admin(request.headers)
    ctype = tensor_media_type(request.headers)
    body = await read_body(request, svc.settings.max_body_bytes)
    session_id, config, params = _create(body, ctype, svc.settings.max_header_bytes)
    session_id = check_session_id(session_id) if session_id is not None else new_session_id()
    svc.store.admit(len(params), sum(int(a.size) for a in params.values()), _state_buffers(config))
    session = await run_in_threadpool(Session, session_id, config, params)
    token = None
    if svc.guard.enabled:
        token, session.token_digest = new_token()
    info = session.info()  # before the store changes: an answer that cannot be built leaves nothing behind
    svc.store.add(session)
    await snapshot_now(svc, session)  # from now on the session survives a restart
    if token is not None:
        info["token"] = token
    return JSONResponse(
        info, status_code=201, headers={"Location": f"/v1/sessions/{session.id}", "ETag": etag(session.step_count)}
    )


def _state_buffers(config: SessionConfig) -> int:
    """How many state buffers a config keeps (for the memory budget, before anything is allocated)."""
    try:
        base = make_hyperparams(config.optimizer, config.hyperparams)
        names = set(base.state_names())
        for group in config.param_groups:
            names |= set(make_hyperparams(config.optimizer, dict(group.model_extra or {}), base=base).state_names())
    except HyperparamError as e:
        raise InvalidInput(str(e)) from None
    return len(names) + (1 if config.accumulate > 1 else 0)


@router.get("/v1/sessions", tags=["sessions"], responses=answers(s200={wire.JSON: OBJECT}))
async def list_sessions(request: Request) -> dict[str, Any]:
    """Every session: id, optimizer, step and size (never tokens)."""
    svc = service(request)
    svc.guard.admin(request.headers)
    return {
        "sessions": [
            {
                "id": s.id,
                "optimizer": s.optimizer,
                "step": s.step_count,
                "num_params": s.layout.size,
                "created_at": s.created_at,
                "updated_at": s.updated_at,
            }
            for s in svc.store.list()
        ]
    }


@router.get("/v1/sessions/{session_id}", tags=["sessions"], responses=answers(s200={wire.JSON: OBJECT}))
async def session_info(session_id: str, request: Request) -> JSONResponse:
    """Config, parameter groups, step, tensors and counters of one session."""
    session = open_session(request, session_id)
    return JSONResponse(session.info(), headers={"ETag": etag(session.step_count)})


class PatchSession(BaseModel):
    """New hyperparameter values, for every parameter group or for the one at index ``group``."""

    model_config = ConfigDict(extra="forbid")
    hyperparams: dict[str, Any]
    group: int | None = None


@router.patch(
    "/v1/sessions/{session_id}",
    tags=["sessions"],
    responses=answers(s200={wire.JSON: OBJECT}),
    openapi_extra=body({wire.JSON: PatchSession.model_json_schema()}),
)
async def patch_session(session_id: str, request: Request) -> JSONResponse:
    """Change hyperparameters (e.g. ``{"hyperparams": {"lr": 1e-4}}``), of all groups or of ``"group": i``."""
    session = open_session(request, session_id)
    if media_type(request.headers) != wire.JSON:
        raise UnsupportedMediaType(f"send the changes as {wire.JSON}")
    patch = validated(PatchSession, json_object(await read_body(request, service(request).settings.max_body_bytes)))
    session.update_hyperparams(patch.hyperparams, patch.group)
    await snapshot_now(service(request), session)
    return JSONResponse(session.info(), headers={"ETag": etag(session.step_count)})


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"], responses=answers(s204={}))
async def delete_session(session_id: str, request: Request) -> Response:
    """Delete a session, its state and its snapshot."""
    open_session(request, session_id)
    await run_in_threadpool(service(request).store.remove, session_id)
    return Response(status_code=204)


SESSION_ID_PARAMETER = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
DTYPE_PARAMETER = {
    "name": "dtype",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": list(ANSWER_DTYPES), "default": "float32"},
    "description": "precision of the parameters in the answer (the session keeps float32 master weights)",
}
MISSING_PARAMETER = {
    "name": "missing",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["error", "skip"], "default": "error"},
    "description": "skip: the body may carry a subset of the tensors; the others are left alone for this step",
}


@router.post(
    "/v1/sessions/{session_id}/step",
    tags=["steps"],
    responses=answers(s200=SAFETENSORS_OR_JSON, s202={wire.JSON: OBJECT}, s204={}),
    openapi_extra={
        "parameters": [SESSION_ID_PARAMETER, MISSING_PARAMETER, DTYPE_PARAMETER],
        **body(SAFETENSORS_OR_JSON),
    },
)
async def step(request: Request) -> Response:
    """Apply one optimizer step from the gradients in the body; answer with the updated parameters.

    Headers: ``If-Match: "<step>"`` (412 unless the session is at that step), ``Idempotency-Key`` (a retry is
    never applied twice), ``Prefer: return=minimal`` (204, no parameters back). The answer carries ``ETag: "<step>"``
    and ``Optserve-Grad-Norm`` (the global gradient norm before clipping). ``?missing=skip`` accepts a subset of the
    tensors: the others are left alone for this step. A body ``__metadata__["hyperparams"]`` (JSON: one object for
    every group, or a list with one object or null per group) changes hyperparameters together with the step. In a
    session with ``accumulate`` = k, contributions before the k-th answer ``202`` with how many are still awaited.
    """
    return ASGIResponse(request.app.state.step_route)  # see optserve.service.step_route


class ASGIResponse(Response):
    """Hands the request over to a bare ASGI application, which answers it."""

    def __init__(self, app: ASGIApp) -> None:
        super().__init__()
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


@router.get("/v1/sessions/{session_id}/params", tags=["steps"], responses=answers(s200=SAFETENSORS_OR_JSON))
async def get_params(
    session_id: str,
    request: Request,
    min_step: Annotated[int | None, Query(ge=0, description="wait until the session reaches this step")] = None,
    timeout: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="longest wait, seconds")] = 30.0,
    dtype: Annotated[AnswerDtype, Query(description="precision of the answer (the session keeps float32)")] = "float32",
) -> Response:
    """The current parameters (JSON unless ``Accept: application/x-safetensors``).

    With ``min_step`` the answer waits until the session has reached that step (a worker of an accumulating
    session waits for the others this way), or until ``timeout``; the ``ETag`` says which step the answer holds.
    """
    session = open_session(request, session_id)
    encoding = negotiate(request.headers, default=wire.JSON)
    if min_step is not None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while session.step_count < min_step and not session.closed and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.02)
    step_count, flat = session.snapshot_params()
    return await run_in_threadpool(tensor_response, session.layout, flat, step_count, encoding, dtype)


@router.get(
    "/v1/sessions/{session_id}/checkpoint", tags=["checkpoints"], responses=answers(s200={wire.SAFETENSORS: BINARY})
)
async def get_checkpoint(session_id: str, request: Request) -> Response:
    """Everything needed to resume the session, as one safetensors file."""
    session = open_session(request, session_id)
    body = await run_in_threadpool(checkpoint.dump, session)
    return Response(
        body,
        media_type=wire.SAFETENSORS,
        headers={
            "ETag": etag(session.step_count),
            "Content-Disposition": f'attachment; filename="{session.id}.safetensors"',
        },
    )


@router.put(
    "/v1/sessions/{session_id}/checkpoint",
    tags=["checkpoints"],
    responses=answers(s200={wire.JSON: OBJECT}, s201={wire.JSON: OBJECT}),
    openapi_extra=body({wire.SAFETENSORS: BINARY}),
)
async def put_checkpoint(session_id: str, request: Request) -> JSONResponse:
    """Bring a session back from a checkpoint file, under this id: created (201) or replaced (200). Creating needs
    the admin key when auth is on; replacing, the session's token or the admin key."""
    svc = service(request)
    check_session_id(session_id)
    try:
        open_session(request, session_id)  # replacing: the session's token (or the admin key)
    except SessionNotFound:
        svc.guard.admin(request.headers)  # creating: the admin key
    if media_type(request.headers) != wire.SAFETENSORS:
        raise UnsupportedMediaType(f"send the checkpoint as {wire.SAFETENSORS}")
    body = await read_body(request, svc.settings.max_body_bytes)
    parse_safetensors(body, svc.settings.max_header_bytes)
    session = await run_in_threadpool(checkpoint.load, body, session_id)
    svc.store.admit(len(session.layout.slots), session.layout.size, len(session.state), replacing=session_id)
    info = session.info()  # before the store changes
    replaced = svc.store.replace(session)
    await snapshot_now(svc, session)
    return JSONResponse(
        info,
        status_code=200 if replaced else 201,
        headers={"ETag": etag(session.step_count), "Location": f"/v1/sessions/{session.id}"},
    )


# --- health --------------------------------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: the snapshots are loaded (503 until then)."""
    if not getattr(request.app.state, "ready", False):
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready", "sessions": len(service(request).store.list())})
