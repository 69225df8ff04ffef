"""``POST /v1/sessions/{id}/step``, the service's hot path, as a bare ASGI application.

A step of a small model is mostly framework: routing over every route, dependency solving, Starlette's request,
response and exception middleware cost several times the fused step itself. The app dispatches step requests
straight here (see :class:`optserve.service.app.OptserveApp`); the FastAPI route of the same path, which documents
it in the OpenAPI schema, delegates here as well, so both ways run this one implementation. Answers are the same as
any route's: problem+json for errors (with the metrics of refused steps), safetensors or JSON tensors otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from optserve.client import wire
from optserve.client.shm import SHARED_ANSWER, SHARED_BODY, SHARED_OFFER, maker_pid

from .bodies import PEER_EXTENSION, receive_body
from .direct import Mappings, NoSharedMemory, ProtocolError
from .errors import (
    BadRequest,
    ErrorAnswer,
    InvalidInput,
    PayloadTooLarge,
    SharedMemoryUnavailable,
    error_answer,
    forget_frames,
    internal_error,
    problem_json,
)
from .headers import RawHeaders
from .observability import Metrics
from .routes import (
    SMALL_ANSWER,
    Service,
    answer_dtype,
    answer_header,
    decode_json_body,
    etag,
    idempotency_key,
    negotiate,
    parse_if_match,
    parse_safetensors,
    prefers_minimal,
    tensor_media_type,
    tensor_parts,
)
from .store import MemoryStore, StepRequest

log = logging.getLogger("optserve")

PREFIX, SUFFIX = "/v1/sessions/", "/step"
Answer = tuple[int, list[tuple[bytes, bytes]], list[Any]]  # status, headers, body parts
OFFER = (SHARED_OFFER.encode(), b"available")  # on step answers over the Unix socket, to a peer that may use it


def step_session_id(scope: Scope) -> str | None:
    """The session id when the request is a step (POST to /v1/sessions/{id}/step), else None."""
    path: str = scope["path"]
    if scope["method"] != "POST" or not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    session_id = path[len(PREFIX) : -len(SUFFIX)]
    return session_id if session_id and "/" not in session_id else None


class StepRoute:
    """The step route: reads the request from the ASGI scope and messages, answers with ASGI messages."""

    def __init__(self, svc: Service, metrics: Metrics) -> None:
        self.svc = svc
        self.metrics = metrics
        # clients' shared-memory buffers (Optserve-Shm-Body), kept mapped while their files exist (a map costs only
        # address space then: the client holds the memory); the app's maintenance loop drops those removed
        self.maps = Mappings(keep_bytes=1 << 40)
        self.answers_into = isinstance(svc.store, MemoryStore)  # the single-process store writes into the client's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            status, headers, parts = await self.step(scope, receive, scope["path_params"]["session_id"])
        except ClientDisconnect as e:  # gone before its body arrived: nothing was applied; the 400 is for the log
            forget_frames(e)  # and the metrics (uvicorn drops it)
            status, headers, parts = 400, [(b"content-length", b"0")], []
        except Exception as e:
            status, headers, parts = self.refusal(e)
            forget_frames(e)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        last = len(parts) - 1
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
        if not parts:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def refusal(self, exc: Exception) -> Answer:
        """The problem+json answer to an error (counted as a refused step), or a 500 for an unexpected one."""
        answer = error_answer(exc)
        if answer is None:
            log.exception("unhandled error on a step", exc_info=exc)
            answer = ErrorAnswer(500, "internal-error", internal_error(), {})
        else:
            self.metrics.hot.refused(answer.slug)
        response = problem_json(answer.document, answer.status, answer.headers)
        return answer.status, response.raw_headers, [response.body]

    async def step(self, scope: Scope, receive: Receive, session_id: str) -> Answer:
        """Apply one optimizer step from the gradients in the body; answer with the updated parameters.

        Headers: ``If-Match: "<step>"`` (412 unless the session is at that step), ``Idempotency-Key`` (a retry is
        never applied twice), ``Prefer: return=minimal`` (204, no parameters back). The answer carries
        ``ETag: "<step>"`` and ``Optserve-Grad-Norm`` (the global gradient norm before clipping).
        ``?missing=skip`` accepts a subset of the tensors: the others are left alone for this step. A body
        ``__metadata__["hyperparams"]`` (JSON: one object for every group, or a list with one object or null per
        group) changes hyperparameters together with the step. In a session with ``accumulate`` = k,
        contributions before the k-th answer ``202`` with how many are still awaited.
        """
        svc = self.svc
        headers = RawHeaders(scope["headers"])
        who = svc.guard.access(headers)
        await svc.store.check(who, session_id)  # 404/403 before the body is read
        query = scope.get("query_string", b"")
        query_args = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True)) if query else {}
        missing = query_args.get("missing", "error")
        if missing not in ("error", "skip"):
            raise InvalidInput(f"missing must be error or skip, got {missing!r}")
        dtype = answer_dtype(query_args.get("dtype"))
        ctype = tensor_media_type(headers)
        encoding = negotiate(headers, default=ctype)
        key, if_match, minimal = idempotency_key(headers), parse_if_match(headers), prefers_minimal(headers)
        started = time.perf_counter()
        peer = self.shared_memory_peer(scope)
        into = None
        body: bytes | bytearray | memoryview
        if (ref := headers.get(SHARED_BODY)) is not None:
            body, into = self.shared_body(peer, headers, ref, ctype)
        elif headers.get(SHARED_ANSWER) is not None:
            raise BadRequest(f"{SHARED_ANSWER} comes with {SHARED_BODY}")
        else:
            body = await receive_body(receive, headers.get("content-length"), svc.body_limit(ctype))
        received = time.perf_counter()
        if ctype == wire.SAFETENSORS:
            grads: Any = parse_safetensors(body, svc.settings.max_header_bytes)
            metadata = grads.metadata
        else:
            grads, metadata = await decode_json_body(svc, body, wire.decode_json)
        if into is not None and not (encoding == wire.SAFETENSORS and dtype == "float32"):
            into = None  # an answer in another encoding or dtype is made from the parameters, then sent as bytes
        request = StepRequest(if_match, key, not minimal, missing == "skip", hyperparam_changes(metadata), out=into)
        result = await svc.store.step(who, session_id, grads, request)
        stepped = time.perf_counter()
        self.metrics.hot.step(result.status, stepped - received)
        timing = b"recv;dur=%.3f, step;dur=%.3f" % ((received - started) * 1e3, (stepped - received) * 1e3)
        out = [(b"etag", etag(result.step).encode()), (b"server-timing", timing)]
        if peer is not None:
            out.append(OFFER)
        if result.status == "replayed":
            out.append((b"idempotent-replayed", b"true"))
        if result.status == "accepted":
            out.append((b"optserve-awaiting", str(result.awaiting).encode()))
            answer = json.dumps({"step": result.step, "status": "accepted", "awaiting": result.awaiting}).encode()
            return 202, content(wire.JSON, len(answer), out), [answer]
        meta = {}
        if result.skipped:  # a skipped step with a gradient norm was skipped for what it would have done
            meta["skipped"] = "non-finite-gradient" if result.grad_norm is None else "non-finite-result"
            out.append((b"optserve-step-skipped", meta["skipped"].encode()))
        if result.grad_norm is not None:
            meta["grad_norm"] = repr(result.grad_norm)
            out.append((b"optserve-grad-norm", meta["grad_norm"].encode()))
        if result.params is None:
            return 204, out, []
        assert result.layout is not None
        if into is not None and result.params is into:  # written into the client's buffer: only the header is sent
            out.append((SHARED_ANSWER.encode(), b"%d" % into.nbytes))
            header = answer_header(result.layout.specs, result.step, meta)
            return 200, content(encoding, len(header), out), [header]
        args = (result.layout, result.params, result.step, encoding, meta, dtype)
        # float32 safetensors: a header and the buffer, nothing to offload; JSON, or a conversion of a large answer
        # to float16/bfloat16, takes time: off the event loop
        inline = encoding == wire.SAFETENSORS and (dtype == "float32" or result.params.nbytes < SMALL_ANSWER)
        parts = tensor_parts(*args) if inline else await run_in_threadpool(tensor_parts, *args)
        return 200, content(encoding, sum(len(p) for p in parts), out), parts

    def shared_memory_peer(self, scope: Scope) -> int | None:
        """The process whose buffers in shared memory this request may name: the one at the other end of the
        server's Unix socket when it runs as the server's user (``SO_PEERCRED``, read by
        :class:`~optserve.service.bodies.OptserveProtocol`), with the single-process store, which writes answers
        straight into the client's buffer; None otherwise (TCP, another user, the Ray store)."""
        peer = scope.get("extensions", {}).get(PEER_EXTENSION)
        if peer is None or peer["uid"] != os.geteuid() or not self.answers_into:
            return None
        return int(peer["pid"])

    def shared_body(
        self, peer: int | None, headers: RawHeaders, ref: str, ctype: str
    ) -> tuple[memoryview, np.ndarray | None]:
        """The body a client left in shared memory (``Optserve-Shm-Body: <name> <offset> <size>``, a buffer of
        :mod:`optserve.client.shm`), read where it lies, and the client's buffer for the answer's parameters
        (``Optserve-Shm-Answer``, same form), as float32. Both must be buffers of the peer process."""
        if peer is None:
            raise SharedMemoryUnavailable(
                "this server takes step bodies in shared memory over its Unix socket only, from a process of its "
                "own user, with the single-process store; send the bytes"
            )
        if headers.get("content-length") not in (None, "0") or headers.get("transfer-encoding") is not None:
            raise BadRequest(f"a step whose body is in shared memory ({SHARED_BODY}) carries no body of its own")
        if ctype != wire.SAFETENSORS:
            raise BadRequest("a step body in shared memory is safetensors")
        body = self.shared_view(SHARED_BODY, ref, peer)
        limit = self.svc.body_limit(ctype)
        if body.nbytes > limit:
            raise PayloadTooLarge(f"the body of {body.nbytes} bytes exceeds the limit of {limit}", limit=limit)
        into = None
        if (answer := headers.get(SHARED_ANSWER)) is not None:
            buffer = self.shared_view(SHARED_ANSWER, answer, peer)
            if np.shares_memory(buffer, body):
                raise BadRequest(f"{SHARED_ANSWER} overlaps {SHARED_BODY}")
            if buffer.ctypes.data % 4 == 0 and buffer.nbytes % 4 == 0:
                into = buffer.view(np.float32)
        return body.data, into

    def shared_view(self, header: str, ref: str, peer: int) -> np.ndarray:
        """The bytes ``<name> <offset> <size>`` names, in a buffer of the peer (Mappings checks the name, the numbers
        and the range)."""
        fields = ref.split(" ")
        if len(fields) != 3:
            raise BadRequest(f"{header} must be '<name> <offset> <size>', got {ref[:200]!r}")
        pid = maker_pid(fields[0])
        if pid is not None and pid != peer:
            raise SharedMemoryUnavailable(f"{header}: {fields[0]} is not a buffer of the process that sent it")
        try:
            return self.maps.view(dict(zip(("name", "offset", "size"), fields)))
        except ProtocolError as e:
            raise BadRequest(f"{header}: {e}") from None
        except NoSharedMemory as e:
            raise SharedMemoryUnavailable(f"{header}: {e}; send the bytes") from None


def content(media_type: str, length: int, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An answer's headers: its body's type and length, then ``headers``."""
    return [(b"content-type", media_type.encode()), (b"content-length", b"%d" % length), *headers]


def hyperparam_changes(metadata: dict[str, str]) -> Any:
    """The in-band hyperparameter changes of a step body, if any (validated by the session)."""
    text = metadata.get("hyperparams")
    if text is None:
        return None
    try:
        changes = wire.loads(text, '__metadata__["hyperparams"]')
    except wire.WireError as e:
        raise BadRequest(str(e)) from None
    if not isinstance(changes, (dict, list)):
        raise InvalidInput('__metadata__["hyperparams"] must be an object, or a list with one entry per group')
    return changes
