"""HTTP routes of API v1: each translates a request into one call on the session store or a session.

Content negotiation, precondition headers and tensor responses live here; the step semantics live in
:mod:`optserve.service.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from optserve.client import wire

from .auth import Access, Guard, new_token
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
from .layout import FlatLayout
from .session import SessionConfig
from .settings import Settings
from .store import SessionStore, check_session_id, new_session_id

router = APIRouter()
T = TypeVar("T")

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
    """What the routes work with: settings, the session store and the auth guard."""

    settings: Settings
    store: SessionStore
    guard: Guard
    json_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(JSON_DECODES))

    def body_limit(self, ctype: str) -> int:
        """The largest body accepted: JSON costs many times its size to decode, so it has its own, smaller limit."""
        limit = self.settings.max_body_bytes
        return min(limit, self.settings.max_json_body_bytes) if ctype == wire.JSON else limit


def service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


def access(request: Request) -> Access:
    return service(request).guard.access(request.headers)


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
        if tag.isascii() and tag.isdigit():  # "\xb2" is a digit to isdigit, not to int
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
    if encoding != wire.SAFETENSORS:
        return [wire.encode_json(layout.views(flat), {"step": str(step), **(metadata or {})}, dtype=dtype)]
    specs = layout.specs
    if dtype != "float32":
        code, flat = wire.as_wire_array(flat, dtype)
        specs = tuple((name, code, shape) for name, _, shape in specs)
    header = answer_header(specs, step, metadata)
    if flat.nbytes < SMALL_ANSWER:  # one send of one bytes: fewer trips through the ASGI stack
        return [b"".join((header, memoryview(flat).cast("B")))]  # type: ignore[arg-type]  # one copy
    return [header, memoryview(flat).cast("B")]  # type: ignore[arg-type]


def answer_header(specs: Any, step: int, metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header of an answer at ``step`` (its metadata: the step, then ``metadata``)."""
    return wire.header(specs, {"step": str(step), **(metadata or {})})


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


JSON_DECODES = 2  # large JSON bodies decoded at once (each costs up to ~12x its size while decoded; the GIL is held)
JSON_SLACK = 4096  # commas a JSON body may hold beyond one per parameter (between tensors and config members)


def json_text(body: bytes | bytearray | memoryview, max_numbers: int) -> str:
    """A JSON body as text (one copy), refused with 413 before it is decoded when it holds more numbers than a
    session may have parameters (decoding costs many times the body's size)."""
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"body is not UTF-8: {e}") from None
    if text.count(",") > max_numbers + JSON_SLACK:
        raise PayloadTooLarge(
            f"the body holds more numbers than the limit of {max_numbers} parameters per session", limit=max_numbers
        )
    return text


async def decode_json_body(svc: Service, body: bytes | bytearray | memoryview, decode: Callable[[str], T]) -> T:
    """``decode`` of a JSON body's text (see :func:`json_text`); a large one off the event loop, at most
    ``JSON_DECODES`` at a time, so that concurrent large JSON bodies cannot multiply the memory they cost."""
    text = json_text(body, svc.settings.max_params_per_session)
    if len(text) <= INLINE_BODY_BYTES:
        return decode(text)
    async with svc.json_slots:
        return await run_in_threadpool(decode, text)


def json_object(body: str | bytes, what: str = "body") -> dict[str, Any]:
    try:
        obj = wire.loads(body, what)
    except wire.WireError as e:
        raise BadRequest(str(e)) from None
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
    body: bytes | bytearray | memoryview | str, max_header_bytes: int
) -> tuple[str | None, SessionConfig, dict[str, np.ndarray]]:
    """(id, config, params) of a create body: safetensors (bytes) or the text of a JSON body."""
    if not isinstance(body, str):
        st = parse_safetensors(body, max_header_bytes)
        config = st.metadata.get("config")
        config_obj = json_object(config, '__metadata__["config"]') if config is not None else {}
        params = st.tensors()
    else:
        config_obj = json_object(body)
        if "params" not in config_obj:
            raise InvalidInput('the body needs "params": the initial tensors {name: {dtype, shape, data}}')
        params, _ = wire.decode_json(config_obj.pop("params"))
    session_id = config_obj.pop("id", None)
    if session_id is not None and not isinstance(session_id, str):
        raise InvalidInput(f"id must be a string, got {session_id!r}")
    if "shard" in config_obj:
        raise InvalidInput("'shard' is set by the server for the shards of a session; ask for them with 'shards'")
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
    body = await read_body(request, svc.body_limit(ctype))
    limit = svc.settings.max_header_bytes
    if ctype == wire.JSON:
        session_id, config, params = await decode_json_body(svc, body, lambda text: _create(text, limit))
    else:
        session_id, config, params = _create(body, limit)
    session_id = check_session_id(session_id) if session_id is not None else new_session_id()
    token, digest = new_token() if svc.guard.enabled else (None, None)
    info = await svc.store.create(session_id, config, params, digest)
    if token is not None:
        info["token"] = token
    return JSONResponse(
        info, status_code=201, headers={"Location": f"/v1/sessions/{session_id}", "ETag": etag(info["step"])}
    )


@router.get("/v1/sessions", tags=["sessions"], responses=answers(s200={wire.JSON: OBJECT}))
async def list_sessions(request: Request) -> dict[str, Any]:
    """Every session: id, optimizer, step and size (never tokens)."""
    svc = service(request)
    svc.guard.admin(request.headers)
    return {"sessions": await svc.store.list_sessions()}


@router.get("/v1/sessions/{session_id}", tags=["sessions"], responses=answers(s200={wire.JSON: OBJECT}))
async def session_info(session_id: str, request: Request) -> JSONResponse:
    """Config, parameter groups, step, tensors and counters of one session."""
    info = await service(request).store.info(access(request), session_id)
    return JSONResponse(info, headers={"ETag": etag(info["step"])})


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
    svc, who = service(request), access(request)
    await svc.store.check(who, session_id)
    if media_type(request.headers) != wire.JSON:
        raise UnsupportedMediaType(f"send the changes as {wire.JSON}")
    text = json_text(await read_body(request, svc.body_limit(wire.JSON)), svc.settings.max_params_per_session)
    patch = validated(PatchSession, json_object(text))
    info = await svc.store.patch(who, session_id, patch.hyperparams, patch.group)
    return JSONResponse(info, headers={"ETag": etag(info["step"])})


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"], responses=answers(s204={}))
async def delete_session(session_id: str, request: Request) -> Response:
    """Delete a session, its state and its snapshot."""
    await service(request).store.delete(access(request), session_id)
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
    svc, who = service(request), access(request)
    await svc.store.check(who, session_id)
    encoding = negotiate(request.headers, default=wire.JSON)
    tensors = await svc.store.params(who, session_id, min_step, timeout)
    if tensors.flat.nbytes <= SMALL_ANSWER and encoding == wire.SAFETENSORS and dtype == "float32":
        return tensor_response(tensors.layout, tensors.flat, tensors.step, encoding, dtype)
    return await run_in_threadpool(tensor_response, tensors.layout, tensors.flat, tensors.step, encoding, dtype)


@router.get(
    "/v1/sessions/{session_id}/checkpoint", tags=["checkpoints"], responses=answers(s200={wire.SAFETENSORS: BINARY})
)
async def get_checkpoint(session_id: str, request: Request) -> Response:
    """Everything needed to resume the session, as one safetensors file."""
    parts, step = await service(request).store.export(access(request), session_id)
    return BufferResponse(
        parts,
        200,
        wire.SAFETENSORS,
        {"ETag": etag(step), "Content-Disposition": f'attachment; filename="{session_id}.safetensors"'},
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
    who = access(request)
    # replacing needs the session's token or the admin key; creating, the admin key (only the admin learns that
    # there is no such session)
    with contextlib.suppress(SessionNotFound):
        await svc.store.check(who, session_id)
    if media_type(request.headers) != wire.SAFETENSORS:
        raise UnsupportedMediaType(f"send the checkpoint as {wire.SAFETENSORS}")
    body = await read_body(request, svc.settings.max_body_bytes)
    parse_safetensors(body, svc.settings.max_header_bytes)
    info, replaced = await svc.store.restore(who, session_id, body)
    return JSONResponse(
        info,
        status_code=200 if replaced else 201,
        headers={"ETag": etag(info["step"]), "Location": f"/v1/sessions/{session_id}"},
    )


@router.get("/v1/cluster", tags=["cluster"], responses=answers(s200={wire.JSON: OBJECT}))
async def cluster(request: Request) -> dict[str, Any]:
    """The nodes holding sessions: ``{"nodes": [{"node_id", "alive", "sessions", "memory_bytes"}, ...]}`` (one node,
    ``local``, for a single-process server; a sharded session's shards as ``<id>#<k>``). Needs the admin key when
    auth is on."""
    svc = service(request)
    svc.guard.admin(request.headers)
    return await svc.store.cluster()


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
    """Ready to serve: the snapshots are loaded and the last snapshot written succeeded (503 otherwise, with what
    is wrong)."""
    health = service(request).store.health()
    return JSONResponse(health.detail, status_code=200 if health.ready else 503)
