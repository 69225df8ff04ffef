"""HTTP routes of API v1: each translates a request into one call on the session store or a session.

Content negotiation, precondition headers and tensor responses live here; the step semantics live in
:mod:`optserve.service.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from optserve.client import wire

from . import checkpoint
from .bodies import BufferResponse, read_body
from .errors import BadRequest, InvalidInput, NotAcceptable, UnsupportedMediaType
from .layout import FlatLayout
from .session import Session, SessionBusy, SessionConfig, StepResult
from .store import SessionStore, check_session_id, new_session_id

router = APIRouter()

TENSOR_TYPES = (wire.SAFETENSORS, wire.JSON)
MAX_KEY_LENGTH = 255
MAX_WAIT_SECONDS = 300.0
INLINE_BODY_BYTES = 256 * 1024
SMALL_ANSWER = 256 * 1024  # steps up to ~64K float32 parameters run on the event loop


def get_store(request: Request) -> SessionStore:
    return request.app.state.store  # type: ignore[no-any-return]


StoreDep = Annotated[SessionStore, Depends(get_store)]


# --- negotiation helpers -------------------------------------------------------------------------------------------


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def tensor_media_type(request: Request) -> str:
    """The request body's tensor encoding, or 415."""
    ctype = media_type(request)
    if ctype not in TENSOR_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'!r} is not supported; send {wire.SAFETENSORS} or {wire.JSON}",
            supported=list(TENSOR_TYPES),
        )
    return ctype


def negotiate(request: Request, default: str) -> str:
    """The response encoding from ``Accept`` (q-values honoured), falling back to ``default``; or 406."""
    accept = request.headers.get("accept", "").strip()
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


def parse_if_match(request: Request) -> frozenset[int] | None:
    """The step numbers named by ``If-Match`` (``"7"`` or ``W/"7"``); None when absent or ``*``."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    steps = set()
    for tag in value.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag.isdigit():
            steps.add(int(tag))
    return frozenset(steps)  # tags that are not step numbers can never match: 412


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= MAX_KEY_LENGTH and key.isprintable() and key.isascii()):
        raise BadRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters")
    return key


def prefers_minimal(request: Request) -> bool:
    return any(p.strip().lower() == "return=minimal" for p in request.headers.get("prefer", "").split(","))


def etag(step: int) -> str:
    return f'"{step}"'


def decode_tensors(
    body: bytes | bytearray | memoryview, ctype: str
) -> wire.Safetensors | tuple[dict[str, np.ndarray], dict[str, str]]:
    return wire.parse(body) if ctype == wire.SAFETENSORS else wire.decode_json(bytes(body))


def tensor_response(
    layout: FlatLayout,
    flat: np.ndarray,
    step: int,
    encoding: str,
    headers: dict[str, str],
    status: int = 200,
    metadata: dict[str, str] | None = None,
) -> Response:
    """The parameters in the negotiated encoding. As safetensors, the body is the header followed by the flat
    buffer itself: the layout keeps the tensors contiguous and in order, so no per-tensor copy or join is needed."""
    meta = {"step": str(step), **(metadata or {})}
    headers = {"ETag": etag(step), **headers}
    if encoding == wire.SAFETENSORS:
        header = wire.header(layout.specs, meta)
        if flat.nbytes < SMALL_ANSWER:  # one send of one bytes: fewer trips through the ASGI stack
            return Response(header + flat.tobytes(), status_code=status, media_type=encoding, headers=headers)
        return BufferResponse([header, memoryview(flat)], status, encoding, headers)  # type: ignore[arg-type]
    return Response(
        wire.encode_json(layout.views(flat), meta), status_code=status, media_type=encoding, headers=headers
    )


def json_object(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    body: bytes | bytearray | memoryview, ctype: str
) -> tuple[str | None, SessionConfig, dict[str, np.ndarray]]:
    if ctype == wire.SAFETENSORS:
        st = wire.parse(body)
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


@router.post("/v1/sessions", status_code=201, tags=["sessions"])
async def create_session(request: Request, store: StoreDep) -> JSONResponse:
    """Create a session from a config and initial parameters (JSON body, or safetensors with the config in
    ``__metadata__["config"]``). Optional ``"id"`` picks the session id."""
    ctype = tensor_media_type(request)
    body = await read_body(request)
    session_id, config, params = _create(body, ctype)
    session_id = check_session_id(session_id) if session_id is not None else new_session_id()
    session = await run_in_threadpool(Session, session_id, config, params)
    store.add(session)
    return JSONResponse(
        session.info(),
        status_code=201,
        headers={"Location": f"/v1/sessions/{session.id}", "ETag": etag(session.step_count)},
    )


@router.get("/v1/sessions", tags=["sessions"])
async def list_sessions(store: StoreDep) -> dict[str, Any]:
    """Every session: id, optimizer, step and size."""
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
            for s in store.list()
        ]
    }


@router.get("/v1/sessions/{session_id}", tags=["sessions"])
async def session_info(session_id: str, store: StoreDep) -> JSONResponse:
    """Config, parameter groups, step, tensors and counters of one session."""
    session = store.get(session_id)
    return JSONResponse(session.info(), headers={"ETag": etag(session.step_count)})


class PatchSession(BaseModel):
    """New hyperparameter values, for every parameter group or for the one at index ``group``."""

    model_config = ConfigDict(extra="forbid")
    hyperparams: dict[str, Any]
    group: int | None = None


@router.patch("/v1/sessions/{session_id}", tags=["sessions"])
async def patch_session(session_id: str, request: Request, store: StoreDep) -> JSONResponse:
    """Change hyperparameters (e.g. ``{"hyperparams": {"lr": 1e-4}}``), of all groups or of ``"group": i``."""
    session = store.get(session_id)
    if media_type(request) != wire.JSON:
        raise UnsupportedMediaType(f"send the changes as {wire.JSON}")
    patch = validated(PatchSession, json_object(await request.body()))
    session.update_hyperparams(patch.hyperparams, patch.group)
    return JSONResponse(session.info(), headers={"ETag": etag(session.step_count)})


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(session_id: str, store: StoreDep) -> Response:
    """Delete a session and its state."""
    store.remove(session_id)
    return Response(status_code=204)


SESSION_ID_PARAMETER = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
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
    openapi_extra={"parameters": [SESSION_ID_PARAMETER, MISSING_PARAMETER]},
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
    # The hot path of the service: no dependency injection, the query read by hand (FastAPI's dependency solving
    # measured about a tenth of a small step's server time).
    session = get_store(request).get(request.path_params["session_id"])
    missing = request.query_params.get("missing", "error")
    if missing not in ("error", "skip"):
        raise InvalidInput(f"missing must be error or skip, got {missing!r}")
    ctype = tensor_media_type(request)
    encoding = negotiate(request, default=ctype)
    key, if_match, minimal = idempotency_key(request), parse_if_match(request), prefers_minimal(request)
    started = time.perf_counter()
    body = await read_body(request)
    received = time.perf_counter()

    def run(blocking: bool = True) -> StepResult:
        decoded = decode_tensors(body, ctype)
        tensors, metadata = (decoded, decoded.metadata) if isinstance(decoded, wire.Safetensors) else decoded
        return session.step(
            tensors,
            if_match=if_match,
            key=key,
            want_params=not minimal,
            partial=missing == "skip",
            changes=hyperparam_changes(metadata),
            blocking=blocking,
        )

    result: StepResult | None = None
    if len(body) <= INLINE_BODY_BYTES:  # small: a thread hop costs more than the step; never wait for the lock here
        with contextlib.suppress(SessionBusy):
            result = run(blocking=False)
    if result is None:
        result = await run_in_threadpool(run)
    stepped = time.perf_counter()
    headers = {
        "ETag": etag(result.step),
        "Server-Timing": f"recv;dur={(received - started) * 1e3:.3f}, step;dur={(stepped - received) * 1e3:.3f}",
    }
    if result.status == "replayed":
        headers["Idempotent-Replayed"] = "true"
    if result.status == "accepted":
        headers["Optserve-Awaiting"] = str(result.awaiting)
        return JSONResponse(
            {"step": result.step, "status": "accepted", "awaiting": result.awaiting}, status_code=202, headers=headers
        )
    meta = {}
    if result.skipped:
        headers["Optserve-Step-Skipped"] = meta["skipped"] = "non-finite-gradient"
    if result.grad_norm is not None:
        headers["Optserve-Grad-Norm"] = meta["grad_norm"] = repr(result.grad_norm)
    if result.params is None:
        return Response(status_code=204, headers=headers)
    if encoding == wire.SAFETENSORS:  # a header and the buffer: nothing to offload
        return tensor_response(session.layout, result.params, result.step, encoding, headers, 200, meta)
    return await run_in_threadpool(
        tensor_response, session.layout, result.params, result.step, encoding, headers, 200, meta
    )


def hyperparam_changes(metadata: dict[str, str]) -> Any:
    """The in-band hyperparameter changes of a step body, if any (validated by the session)."""
    text = metadata.get("hyperparams")
    if text is None:
        return None
    try:
        changes = json.loads(text)
    except ValueError as e:
        raise BadRequest(f'__metadata__["hyperparams"] is not valid JSON: {e}') from None
    if not isinstance(changes, (dict, list)):
        raise InvalidInput('__metadata__["hyperparams"] must be an object, or a list with one entry per group')
    return changes


@router.get("/v1/sessions/{session_id}/params", tags=["steps"])
async def get_params(
    session_id: str,
    request: Request,
    store: StoreDep,
    min_step: Annotated[int | None, Query(ge=0, description="wait until the session reaches this step")] = None,
    timeout: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="longest wait, seconds")] = 30.0,
) -> Response:
    """The current parameters (JSON unless ``Accept: application/x-safetensors``).

    With ``min_step`` the answer waits until the session has reached that step (a worker of an accumulating
    session waits for the others this way), or until ``timeout``; the ``ETag`` says which step the answer holds.
    """
    session = store.get(session_id)
    encoding = negotiate(request, default=wire.JSON)
    if min_step is not None:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while session.step_count < min_step and not session.closed and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.02)
    step_count, flat = session.snapshot_params()
    return await run_in_threadpool(tensor_response, session.layout, flat, step_count, encoding, {})


@router.get("/v1/sessions/{session_id}/checkpoint", tags=["checkpoints"])
async def get_checkpoint(session_id: str, store: StoreDep) -> Response:
    """Everything needed to resume the session, as one safetensors file."""
    session = store.get(session_id)
    body = await run_in_threadpool(checkpoint.dump, session)
    return Response(
        body,
        media_type=wire.SAFETENSORS,
        headers={
            "ETag": etag(session.step_count),
            "Content-Disposition": f'attachment; filename="{session.id}.safetensors"',
        },
    )


@router.put("/v1/sessions/{session_id}/checkpoint", tags=["checkpoints"])
async def put_checkpoint(session_id: str, request: Request, store: StoreDep) -> JSONResponse:
    """Bring a session back from a checkpoint file, under this id: created (201) or replaced (200)."""
    check_session_id(session_id)
    if media_type(request) != wire.SAFETENSORS:
        raise UnsupportedMediaType(f"send the checkpoint as {wire.SAFETENSORS}")
    body = await read_body(request)
    session = await run_in_threadpool(checkpoint.load, body, session_id)
    replaced = store.replace(session)
    return JSONResponse(
        session.info(),
        status_code=200 if replaced else 201,
        headers={"ETag": etag(session.step_count), "Location": f"/v1/sessions/{session.id}"},
    )


# --- health --------------------------------------------------------------------------------------------------------


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["health"])
async def readyz(store: StoreDep) -> dict[str, Any]:
    """The server is ready to serve sessions."""
    return {"status": "ready", "sessions": len(store.list())}
