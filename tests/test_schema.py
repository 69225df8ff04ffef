"""The API against its own OpenAPI document, with schemathesis: generated requests (valid and invalid) for every
operation, against a real uvicorn server in a thread of this process.

Checked for every answer: no 5xx (``not_a_server_error``) and, where the document declares a response for the
status code, that the body conforms to it (``response_schema_conformance``). Bounded: at most ``MAX_EXAMPLES``
cases per operation, no deadline.

The tensor routes declare their bodies (safetensors as a binary string, JSON as an object), so schemathesis sends
arbitrary bytes and objects to them; a live session is put in the path half of the time, so the session routes are
exercised beyond 404. ``response_schema_conformance``
skips an answer whose media type the document does not declare for its status; so
:func:`test_the_document_declares_what_is_served` checks statuses and media types of concrete answers directly.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from optserve.client import wire
from optserve.service.app import create_app
from optserve.service.bodies import HTTP_PROTOCOL
from optserve.service.embedded import free_port, wait_healthy
from optserve.service.settings import Settings
from optserve.service.store import MemoryStore

MAX_EXAMPLES = 30
LIVE_ID = "schema-live"


@schemathesis.serializer(wire.SAFETENSORS)
def safetensors_bytes(ctx: Any, value: Any) -> bytes:
    """Generated safetensors bodies are arbitrary bytes (the document declares a binary string): sent as they are."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


LIVE_BODY = {"id": LIVE_ID, "optimizer": "sgd", "params": {"w": {"dtype": "float32", "shape": [2], "data": [1, 2]}}}


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings_ = Settings(data_dir=Path(tmp_path_factory.mktemp("schema")), snapshot_every_seconds=0)
    app = create_app(settings_)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", http=HTTP_PROTOCOL))
    thread = threading.Thread(target=server.run, name="optserve-schema", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, alive=thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive()


# The document, from an app that touches no disk (schemathesis' lazy ``from_fixture`` loader fails under pytest 9:
# it sets ``request.node._nodeid``, which pytest 9 no longer has). The cases are sent to the live server.
schema = schemathesis.openapi.from_dict(create_app(Settings(), store=MemoryStore()).openapi())
schema.config.generation.update(max_examples=MAX_EXAMPLES)
_turn = itertools.count()


def ensure_live_session(url: str) -> None:
    """The session some cases are pointed at (a generated DELETE may have removed it)."""
    with httpx.Client(base_url=url, timeout=5.0) as http:
        if http.get(f"/v1/sessions/{LIVE_ID}").status_code == 404:
            assert http.post("/v1/sessions", json=LIVE_BODY).status_code in (201, 409)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case, live_url: str) -> None:
    if "session_id" in (case.path_parameters or {}) and next(_turn) % 2:  # (hypothesis pins `random` per example)
        ensure_live_session(live_url)
        case.path_parameters["session_id"] = LIVE_ID
    if case.query and ("min_step" in case.query or "timeout" in case.query):
        case.query["timeout"] = 0  # a min_step answer waits up to timeout (default 30 s) by design; keep cases quick
    case.call_and_validate(base_url=live_url, checks=[not_a_server_error, response_schema_conformance], timeout=10)


def _declared(document: dict[str, Any], method: str, template: str) -> dict[str, Any]:
    return document["paths"][template][method.lower()]  # type: ignore[no-any-return]


def test_the_document_declares_what_is_served(live_url: str) -> None:
    """Every status and media type the server answers with is declared for its operation, and every operation that
    reads a body declares it."""
    st_body = wire.encode({"w": np.ones(2, np.float32)})
    created = {"optimizer": "sgd", "params": {"w": {"dtype": "float32", "shape": [2], "data": [1, 2]}}}
    with httpx.Client(base_url=live_url, timeout=10.0) as http:
        document = http.get("/openapi.json").json()
        sid = http.post("/v1/sessions", json=created).json()["id"]
        acc = http.post("/v1/sessions", json={**created, "accumulate": 2}).json()["id"]
        checkpoint = http.get(f"/v1/sessions/{sid}/checkpoint").content
        exchanges: list[tuple[str, str, httpx.Response]] = [
            ("POST", "/v1/sessions", http.post("/v1/sessions", json=created)),
            ("POST", "/v1/sessions", http.post("/v1/sessions", content=b"{", headers={"content-type": wire.JSON})),
            ("POST", "/v1/sessions", http.post("/v1/sessions", content=b"x", headers={"content-type": "text/plain"})),
            ("POST", "/v1/sessions", http.post("/v1/sessions", json={**created, "id": sid})),
            ("GET", "/v1/sessions/{session_id}", http.get("/v1/sessions/no-such-session")),
            ("GET", "/v1/sessions/{session_id}/params", http.get(f"/v1/sessions/{sid}/params?min_step=-1")),
            (
                "GET",
                "/v1/sessions/{session_id}/params",
                http.get(f"/v1/sessions/{sid}/params", headers={"accept": "text/html"}),
            ),
            ("GET", "/v1/sessions/{session_id}/checkpoint", http.get(f"/v1/sessions/{sid}/checkpoint")),
            (
                "POST",
                "/v1/sessions/{session_id}/step",
                http.post(f"/v1/sessions/{sid}/step", content=st_body, headers={"content-type": wire.SAFETENSORS}),
            ),
            (
                "POST",
                "/v1/sessions/{session_id}/step",
                http.post(
                    f"/v1/sessions/{sid}/step",
                    content=st_body,
                    headers={"content-type": wire.SAFETENSORS, "prefer": "return=minimal"},
                ),
            ),
            (
                "POST",
                "/v1/sessions/{session_id}/step",
                http.post(f"/v1/sessions/{acc}/step", content=st_body, headers={"content-type": wire.SAFETENSORS}),
            ),
            (
                "POST",
                "/v1/sessions/{session_id}/step",
                http.post(
                    f"/v1/sessions/{sid}/step",
                    content=st_body,
                    headers={"content-type": wire.SAFETENSORS, "if-match": '"999"'},
                ),
            ),
            (
                "POST",
                "/v1/sessions/{session_id}/step",
                http.post(f"/v1/sessions/{sid}/step", content=b"\x00", headers={"content-type": wire.SAFETENSORS}),
            ),
            (
                "PUT",
                "/v1/sessions/{session_id}/checkpoint",
                http.put(
                    "/v1/sessions/schema-import/checkpoint",
                    content=checkpoint,
                    headers={"content-type": wire.SAFETENSORS},
                ),
            ),
            (
                "PUT",
                "/v1/sessions/{session_id}/checkpoint",
                http.put(
                    "/v1/sessions/bad!id/checkpoint", content=checkpoint, headers={"content-type": wire.SAFETENSORS}
                ),
            ),
        ]
        allow = http.request("OPTIONS", "/v1/sessions")
    mismatches = []
    for method, template, r in exchanges:
        responses = _declared(document, method, template)["responses"]
        declared = responses.get(str(r.status_code)) or responses.get("default")
        label = f"{method} {template} -> {r.status_code}"
        if declared is None:
            mismatches.append(f"{label}: status not declared (declared: {sorted(responses)})")
            continue
        ctype = r.headers.get("content-type", "").split(";")[0]
        if r.content and ctype not in declared.get("content", {}):
            mismatches.append(f"{label}: served as {ctype}, declared {sorted(declared.get('content', {}))}")
    for method, template in [
        ("POST", "/v1/sessions"),
        ("POST", "/v1/sessions/{session_id}/step"),
        ("PATCH", "/v1/sessions/{session_id}"),
        ("PUT", "/v1/sessions/{session_id}/checkpoint"),
    ]:
        if "requestBody" not in _declared(document, method, template):
            mismatches.append(f"{method} {template}: reads a body, declares no requestBody")
    if set(allow.headers.get("allow", "").replace(" ", "").split(",")) != {"GET", "POST"}:
        mismatches.append(
            f"OPTIONS /v1/sessions -> {allow.status_code}: Allow is {allow.headers.get('allow')!r}, "
            "the resource supports GET and POST"
        )
    assert not mismatches, "\n".join(mismatches)
