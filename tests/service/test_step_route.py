"""The step route runs as a bare ASGI application: the app hands step requests straight to it, and the FastAPI
route of the same path (what the OpenAPI schema documents) delegates to it. Both ways must answer alike, also with
errors; and what the bare route reads by hand (headers, query, body) must follow the HTTP rules."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from optserve.client import wire
from optserve.service.app import create_app
from optserve.service.settings import Settings

ST = wire.SAFETENSORS


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return create_app(Settings(data_dir=tmp_path, snapshot_every_steps=0, snapshot_every_seconds=0))


def through_fastapi(app: Any) -> Any:
    """The app without its step dispatch: FastAPI's middleware, routing and the delegating route."""
    stack = app.build_middleware_stack()

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"] = app
        await stack(scope, receive, send)

    return asgi


def grads(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}


async def create_in(c: httpx.AsyncClient, session_id: str, config: dict[str, Any]) -> None:
    params = {n: np.zeros_like(a) for n, a in grads().items()}
    meta = {"config": json.dumps({"id": session_id, "optimizer": "adamw", **config})}
    r = await c.post("/v1/sessions", content=wire.encode(params, meta), headers={"Content-Type": ST})
    assert r.status_code == 201, r.text


def comparable(r: httpx.Response) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in r.headers.items() if k not in ("server-timing", "x-request-id")}
    return r.status_code, headers, r.content


CASES: dict[str, tuple[str, dict[str, str], bytes | None, dict[str, Any]]] = {
    # name: (query, headers, body (None: the gradients as safetensors), session config)
    "applied": ("", {}, None, {}),
    "applied-json-answer": ("", {"Accept": wire.JSON}, None, {}),
    "minimal": ("", {"Prefer": "return=minimal"}, None, {}),
    "accepted": ("", {}, None, {"accumulate": 2}),
    "partial": ("?missing=skip", {}, wire.encode({"w": grads()["w"]}), {}),
    "if-match-stale": ("", {"If-Match": '"7"'}, None, {}),
    "bad-missing": ("?missing=maybe", {}, None, {}),
    "bad-type": ("", {"Content-Type": "text/plain"}, None, {}),
    "not-acceptable": ("", {"Accept": "image/png"}, None, {}),
    "bad-key": ("", {"Idempotency-Key": "x" * 300}, None, {}),
    "malformed": ("", {}, b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}  ", {}),
    "wrong-names": ("", {}, wire.encode({"v": np.zeros(3, np.float32)}), {}),
    "hyperparams-not-json": ("", {}, wire.encode(grads(), {"hyperparams": "{"}), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_both_ways_answer_alike(app: Any, case: str) -> None:
    query, headers, body, config = CASES[case]

    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        answers = []
        for i, asgi in enumerate([app, through_fastapi(app)]):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
                params = {n: np.zeros_like(a) for n, a in grads().items()}
                created = await c.post(
                    "/v1/sessions",
                    content=wire.encode(
                        params, {"config": json.dumps({"id": f"s{i}", "optimizer": "adamw", **config})}
                    ),
                    headers={"Content-Type": ST},
                )
                assert created.status_code == 201, created.text
                r = await c.post(
                    f"/v1/sessions/s{i}/step{query}",
                    content=wire.encode(grads()) if body is None else body,
                    headers={"Content-Type": ST, **headers},
                )
                assert r.headers.get("x-request-id")  # observed either way
                answers.append(comparable(r))
        return answers

    dispatched, routed = asyncio.run(run())
    assert dispatched == routed
    if dispatched[0] >= 400:
        assert dispatched[1]["content-type"] == "application/problem+json"
        assert json.loads(dispatched[2])["status"] == dispatched[0]


def test_unknown_session_is_404_both_ways(app: Any) -> None:
    async def run() -> list[tuple[int, dict[str, str], bytes]]:
        out = []
        for asgi in [app, through_fastapi(app)]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
                r = await c.post("/v1/sessions/nobody/step", content=wire.encode(grads()), headers={"Content-Type": ST})
                out.append(comparable(r))
        return out

    dispatched, routed = asyncio.run(run())
    assert dispatched == routed
    assert dispatched[0] == 404


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]], messages: list[dict[str, Any]]) -> list[Any]:
    """One request through the app's ASGI interface, with the body messages given; the messages it sent back."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    incoming, sent = list(messages), []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def create(app: Any, session_id: str) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            params = {n: np.zeros_like(a) for n, a in grads().items()}
            config = json.dumps({"id": session_id, "optimizer": "adamw"})
            r = await c.post(
                "/v1/sessions", content=wire.encode(params, {"config": config}), headers={"Content-Type": ST}
            )
            assert r.status_code == 201

    asyncio.run(run())


def step_count(app: Any, session_id: str) -> int:
    return int(app.state.service.store.get(session_id).step_count)


@pytest.mark.parametrize("declared", [-1, +1, +5000])
def test_a_body_that_does_not_match_its_content_length_is_400_and_changes_nothing(app: Any, declared: int) -> None:
    create(app, "s")
    body = wire.encode(grads())
    headers = [(b"content-type", ST.encode()), (b"content-length", str(len(body) + declared).encode())]
    sent = asyncio.run(call(app, "/v1/sessions/s/step", headers, [{"type": "http.request", "body": body}]))
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["type"].endswith("malformed-request")
    assert step_count(app, "s") == 0


def test_a_body_in_pieces_is_put_together(app: Any) -> None:
    create(app, "s")
    body = wire.encode(grads())
    headers = [(b"content-type", ST.encode()), (b"content-length", str(len(body)).encode())]
    pieces = [{"type": "http.request", "body": body[i : i + 7], "more_body": True} for i in range(0, len(body), 7)]
    pieces.append({"type": "http.request", "body": b"", "more_body": False})
    sent = asyncio.run(call(app, "/v1/sessions/s/step", headers, pieces))
    assert sent[0]["status"] == 200
    assert step_count(app, "s") == 1


def test_a_client_gone_before_its_body_ended_changes_nothing(app: Any) -> None:
    create(app, "s")
    body = wire.encode(grads())
    headers = [(b"content-type", ST.encode()), (b"content-length", str(len(body)).encode())]
    sent = asyncio.run(
        call(app, "/v1/sessions/s/step", headers, [{"type": "http.request", "body": body[:10], "more_body": True}])
    )
    assert [m.get("status") for m in sent][:1] == [400]  # for the log and the metrics; the server drops it
    assert step_count(app, "s") == 0


def test_the_first_of_repeated_headers_counts(app: Any) -> None:
    """As Starlette reads headers: a second If-Match does not override the first."""
    create(app, "s")
    body = wire.encode(grads())
    headers = [
        (b"content-type", ST.encode()), (b"content-length", str(len(body)).encode()),
        (b"if-match", b'"0"'), (b"if-match", b'"9"'),
    ]  # fmt: skip
    sent = asyncio.run(call(app, "/v1/sessions/s/step", headers, [{"type": "http.request", "body": body}]))
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"etag"] == b'"1"'


@pytest.mark.parametrize("path", ["/v1/sessions//step", "/v1/sessions/a/b/step", "/v1/sessions/s/step/"])
def test_paths_that_are_not_a_step_are_left_to_the_router(app: Any, path: str) -> None:
    create(app, "s")
    sent = asyncio.run(call(app, path, [(b"content-type", ST.encode())], [{"type": "http.request", "body": b""}]))
    assert sent[0]["status"] in (307, 404, 405)  # 307: Starlette redirects a trailing slash away
    assert step_count(app, "s") == 0
