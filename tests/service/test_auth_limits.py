"""Auth (admin key, per-session tokens) and the server's limits, over real HTTP against uvicorn servers started in
threads of this process, each with the settings its test needs.

Auth: off by default; with an admin key, creating/listing/importing needs the key, everything on a session needs
its token (or the key); 401 without a token, 403 with a wrong one; tokens are never listed, logged or stored (only
their SHA-256 travels, in snapshots and checkpoints).

Limits: the request body (from Content-Length before anything is read, and while a chunked body streams), the
safetensors header, tensors and parameters per session, the session count and the memory budget, for creates and
for checkpoint imports; a refused request leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from stores import ray_settings

from optserve.client import Client, wire
from optserve.client.errors import AuthenticationError, PermissionDenied
from optserve.service.embedded import serve_in_thread
from optserve.service.settings import Settings

ST = wire.SAFETENSORS
PROBLEM = "application/problem+json"
ADMIN = "admin-" + secrets.token_urlsafe(24)
TIMEOUT = 5.0  # every answer must come within this: a refused body is never waited for
# except a creation, which is a test's setup: on the Ray store the first one of a deployment waits for its new host
# process, and that took over 5 s under a parallel test run (two such tests failed on it with three workers)
SETUP_TIMEOUT = 60.0


# --- servers -------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    data_dir: Path


@contextmanager
def running(
    data_dir: Path, *, verbose_logs: bool = False, ray: pytest.FixtureRequest | None = None, **settings: Any
) -> Iterator[Server]:
    """A uvicorn server in a thread with ``Settings(data_dir=data_dir, **settings)``; stopped and joined on exit.
    With ``ray`` (the test's request), its sessions live on the test process's Ray cluster.

    ``verbose_logs``: uvicorn leaves logging alone (``log_config=None``) and logs at debug level with access lines,
    so that every record reaches the test's handlers."""
    options: dict[str, Any] = (
        {"log_config": None, "log_level": "debug", "access_log": True}
        if verbose_logs
        else {"log_level": "critical", "access_log": False}
    )
    if ray is None:
        full = Settings(data_dir=data_dir, snapshot_every_seconds=0, **settings)
    else:
        full = ray_settings(ray, data_dir, snapshot_every_seconds=0, **settings)
    with serve_in_thread(settings=full, start_timeout=300, **options) as embedded:
        try:
            yield Server(embedded.url, int(embedded.url.rsplit(":", 1)[1]), data_dir)
        finally:
            if ray is not None:
                embedded.store.destroy()  # type: ignore[attr-defined]


@pytest.fixture
def serve(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    """``serve(**settings)``: a server with those settings, for the rest of the test (on each store)."""
    stack: list[Any] = []

    def start(**settings: Any) -> Server:
        cm = running(tmp_path / f"data{len(stack)}", ray=request if store_kind == "ray" else None, **settings)
        server = cm.__enter__()
        stack.append(cm)
        return server

    yield start
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture(scope="module")
def auth_server(
    tmp_path_factory: pytest.TempPathFactory, store_kind: str, request: pytest.FixtureRequest
) -> Iterator[Server]:
    ray = request if store_kind == "ray" else None
    with running(tmp_path_factory.mktemp("auth"), api_key=ADMIN, ray=ray) as server:
        yield server


@pytest.fixture
def http(auth_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=auth_server.url, timeout=TIMEOUT) as client:
        yield client


# --- bodies and checks ---------------------------------------------------------------------------------------------


def tensors(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def json_tensors(ts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {n: {"dtype": "float32", "shape": list(a.shape), "data": a.reshape(-1).tolist()} for n, a in ts.items()}


SHAPES = {"w": (3, 4), "b": (4,)}


def create_body(
    shapes: Mapping[str, tuple[int, ...]] = SHAPES,
    optimizer: str = "sgd",
    hyperparams: Mapping[str, Any] | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "optimizer": optimizer,
        "hyperparams": dict(hyperparams or {"lr": 0.1}),
        "params": json_tensors(tensors(shapes)),
    }
    if session_id is not None:
        body["id"] = session_id
    return body


def grads_body(shapes: Mapping[str, tuple[int, ...]] = SHAPES, seed: int = 1, metadata: Any = None) -> bytes:
    return wire.encode(tensors(shapes, seed), metadata)


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token is not None else {}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def assert_problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].split(";")[0] == PROBLEM, r.headers
    problem = r.json()
    assert problem["status"] == status and problem["title"] and problem["detail"], problem
    if slug is not None:
        assert problem["type"] == f"urn:optserve:problem:{slug}", problem
    return problem  # type: ignore[no-any-return]


def create(http: httpx.Client, token: str | None = ADMIN, **kwargs: Any) -> tuple[str, str | None]:
    """(session id, its token) of a new session."""
    r = http.post("/v1/sessions", json=create_body(**kwargs), headers=bearer(token), timeout=SETUP_TIMEOUT)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json().get("token")


def ids(http: httpx.Client, token: str | None = None) -> list[str]:
    r = http.get("/v1/sessions", headers=bearer(token))
    assert r.status_code == 200, r.text
    return sorted(s["id"] for s in r.json()["sessions"])


def state_of(http: httpx.Client, sid: str, token: str | None = None) -> bytes:
    """Everything a session holds (its checkpoint: params, state, step, counters, keys)."""
    r = http.get(f"/v1/sessions/{sid}/checkpoint", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.content


def snapshot_files(server: Server) -> list[str]:
    return sorted(p.name for p in server.data_dir.rglob("*") if p.is_file())


# --- auth ----------------------------------------------------------------------------------------------------------


def test_auth_is_off_by_default(serve: Callable[..., Server]) -> None:
    server = serve()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        r = http.post("/v1/sessions", json=create_body())
        assert r.status_code == 201, r.text
        assert "token" not in r.json()
        sid = r.json()["id"]
        assert sid in ids(http)
        assert http.get(f"/v1/sessions/{sid}").status_code == 200
        r = http.post(f"/v1/sessions/{sid}/step", content=grads_body(), headers={"content-type": ST})
        assert r.status_code == 200, r.text
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204


def test_create_and_list_need_the_admin_key(http: httpx.Client) -> None:
    for method, path, kwargs in [
        ("POST", "/v1/sessions", {"json": create_body()}),
        ("GET", "/v1/sessions", {}),
        ("PUT", "/v1/sessions/fresh-import/checkpoint", {"content": b"x", "headers": {"content-type": ST}}),
    ]:
        extra = kwargs.pop("headers", {})
        assert_problem(http.request(method, path, headers=extra, **kwargs), 401, "unauthorized")
        r = http.request(method, path, headers={**extra, **bearer("not-the-key")}, **kwargs)
        assert_problem(r, 403, "forbidden")
        assert "not-the-key" not in r.text
        r = http.request(method, path, headers={**extra, "authorization": f"Basic {ADMIN}"}, **kwargs)
        assert_problem(r, 401, "unauthorized")
        assert_problem(http.request(method, path, headers={**extra, "authorization": "Bearer"}, **kwargs), 401)
    sid, token = create(http)
    assert token
    # a session token is not the admin key
    assert_problem(http.post("/v1/sessions", json=create_body(), headers=bearer(token)), 403)
    assert_problem(http.get("/v1/sessions", headers=bearer(token)), 403)
    assert sid in ids(http, ADMIN)


def test_create_answers_a_token_once_and_nothing_lists_it(http: httpx.Client, auth_server: Server) -> None:
    r = http.post("/v1/sessions", json=create_body(), headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    sid, token = r.json()["id"], r.json()["token"]
    assert isinstance(token, str) and len(token) >= 32 and token != ADMIN
    other_sid, other_token = create(http)
    assert other_token != token
    secrets_ = [token, sha256(token), other_token, sha256(str(other_token)), ADMIN, sha256(ADMIN)]
    r = http.get("/v1/sessions", headers=bearer(ADMIN))
    assert r.status_code == 200 and sid in r.text
    for s in secrets_:
        assert s not in r.text, "the listing shows a token or its digest"
    for session in r.json()["sessions"]:
        assert not {"token", "token_sha256", "token_digest"} & set(session)
    for answer in [
        http.get(f"/v1/sessions/{sid}", headers=bearer(token)),
        http.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.05}}, headers=bearer(token)),
        http.get(f"/v1/sessions/{sid}/params", headers=bearer(token)),
        http.post(f"/v1/sessions/{sid}/step", content=grads_body(), headers={"content-type": ST, **bearer(token)}),
        http.get("/metrics"),
    ]:
        assert answer.status_code == 200, answer.text
        for s in secrets_:
            assert s not in answer.text
    # snapshots on disk keep the digest at most, never the token or the admin key
    for path in auth_server.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for s in (token, other_token, ADMIN):
                assert str(s).encode() not in data, f"{path} holds a token"


def _operations(sid: str, checkpoint: bytes) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Every operation on a session, as (method, path, httpx kwargs)."""
    return {
        "info": ("GET", f"/v1/sessions/{sid}", {}),
        "step": ("POST", f"/v1/sessions/{sid}/step", {"content": grads_body(), "headers": {"content-type": ST}}),
        "params": ("GET", f"/v1/sessions/{sid}/params", {}),
        "patch": ("PATCH", f"/v1/sessions/{sid}", {"json": {"hyperparams": {"lr": 0.01}}}),
        "checkpoint-get": ("GET", f"/v1/sessions/{sid}/checkpoint", {}),
        "checkpoint-put": (
            "PUT",
            f"/v1/sessions/{sid}/checkpoint",
            {"content": checkpoint, "headers": {"content-type": ST}},
        ),
        "delete": ("DELETE", f"/v1/sessions/{sid}", {}),
    }


OPERATIONS = ["info", "step", "params", "patch", "checkpoint-get", "checkpoint-put", "delete"]


def _send(http: httpx.Client, op: tuple[str, str, dict[str, Any]], token: str | None) -> httpx.Response:
    method, path, kwargs = op
    kwargs = dict(kwargs)
    headers = {**kwargs.pop("headers", {}), **bearer(token)}
    return http.request(method, path, headers=headers, **kwargs)


@pytest.mark.parametrize("name", OPERATIONS)
def test_session_operations_need_the_session_token_or_the_admin_key(http: httpx.Client, name: str) -> None:
    sid, token = create(http)
    other_sid, other_token = create(http)
    assert token and other_token
    checkpoint = state_of(http, sid, ADMIN)
    op = _operations(sid, checkpoint)[name]
    before = state_of(http, sid, ADMIN)

    assert_problem(_send(http, op, None), 401, "unauthorized")
    r = _send(http, op, other_token)
    assert_problem(r, 403, "forbidden")
    assert other_token not in r.text
    assert_problem(_send(http, op, "made-up-token"), 403, "forbidden")
    method, path, kwargs = op
    r = http.request(
        method,
        path,
        **{k: v for k, v in kwargs.items() if k != "headers"},
        headers={**kwargs.get("headers", {}), "authorization": f"Basic {token}"},
    )
    assert_problem(r, 401, "unauthorized")
    assert state_of(http, sid, ADMIN) == before, "a refused request changed the session"

    r = _send(http, op, token)
    assert r.status_code in (200, 204), r.text
    assert token not in r.text
    if name != "checkpoint-get":  # a checkpoint carries the digest (token_sha256), by design; nothing else does
        assert sha256(token) not in r.text
    if name == "delete":
        assert_problem(http.get(f"/v1/sessions/{sid}", headers=bearer(ADMIN)), 404)
        r = _send(http, _operations(other_sid, b"")["delete"], ADMIN)
        assert r.status_code == 204
        return
    r = _send(http, op, ADMIN)
    assert r.status_code in (200, 204), r.text
    # the other session's token still opens the other session only
    assert http.get(f"/v1/sessions/{other_sid}", headers=bearer(other_token)).status_code == 200


def test_a_deleted_sessions_token_no_longer_works(http: httpx.Client) -> None:
    sid, token = create(http, session_id=f"gone-{secrets.token_hex(4)}")
    assert http.get(f"/v1/sessions/{sid}", headers=bearer(token)).status_code == 200
    assert http.delete(f"/v1/sessions/{sid}", headers=bearer(token)).status_code == 204
    for op in ("info", "step", "params", "patch", "checkpoint-get", "delete"):
        # no such session, and no probing for it without a valid token: 403, not 404
        assert_problem(_send(http, _operations(sid, b"")[op], token), 403)
    # nor does it open a new session under the same id
    sid2, token2 = create(http, session_id=sid)
    assert sid2 == sid and token2 != token
    assert_problem(http.get(f"/v1/sessions/{sid}", headers=bearer(token)), 403)
    assert http.get(f"/v1/sessions/{sid}", headers=bearer(token2)).status_code == 200
    # nor can it create a session by importing a checkpoint under a new id
    r = http.put(
        f"/v1/sessions/new-{sid}/checkpoint",
        content=state_of(http, sid, ADMIN),
        headers={"content-type": ST, **bearer(token2)},
    )
    assert_problem(r, 403)
    assert f"new-{sid}" not in ids(http, ADMIN)


def test_the_token_survives_a_checkpoint_export_and_import(http: httpx.Client) -> None:
    sid, token = create(http, session_id=f"cp-{secrets.token_hex(4)}")
    _, other_token = create(http)
    assert token and other_token
    r = http.post(f"/v1/sessions/{sid}/step", content=grads_body(), headers={"content-type": ST, **bearer(token)})
    assert r.status_code == 200
    body = state_of(http, sid, token)
    assert token.encode() not in body, "the checkpoint holds the token"
    assert ADMIN.encode() not in body
    assert wire.parse(body).metadata["token_sha256"] == sha256(token)

    assert http.delete(f"/v1/sessions/{sid}", headers=bearer(ADMIN)).status_code == 204
    assert_problem(http.get(f"/v1/sessions/{sid}", headers=bearer(token)), 403)
    # importing needs the admin key when the session does not exist
    assert_problem(http.put(f"/v1/sessions/{sid}/checkpoint", content=body, headers={"content-type": ST}), 401)
    r = http.put(f"/v1/sessions/{sid}/checkpoint", content=body, headers={"content-type": ST, **bearer(token)})
    assert_problem(r, 403)
    r = http.put(f"/v1/sessions/{sid}/checkpoint", content=body, headers={"content-type": ST, **bearer(ADMIN)})
    assert r.status_code == 201, r.text
    assert "token" not in r.json() and token not in r.text
    # the imported session opens with the token it had
    info = http.get(f"/v1/sessions/{sid}", headers=bearer(token))
    assert info.status_code == 200 and info.json()["step"] == 1
    r = http.post(f"/v1/sessions/{sid}/step", content=grads_body(), headers={"content-type": ST, **bearer(token)})
    assert r.status_code == 200 and r.headers["etag"] == '"2"'
    assert_problem(http.get(f"/v1/sessions/{sid}", headers=bearer(other_token)), 403)
    assert_problem(http.get(f"/v1/sessions/{sid}"), 401)
    # and so does a copy imported under another id (the digest travels with the file)
    r = http.put(f"/v1/sessions/{sid}-copy/checkpoint", content=body, headers={"content-type": ST, **bearer(ADMIN)})
    assert r.status_code == 201, r.text
    assert http.get(f"/v1/sessions/{sid}-copy", headers=bearer(token)).status_code == 200
    assert_problem(http.get(f"/v1/sessions/{sid}-copy", headers=bearer(other_token)), 403)
    # a re-export still carries the digest only
    again = state_of(http, sid, token)
    assert token.encode() not in again and wire.parse(again).metadata["token_sha256"] == sha256(token)


class SpyTransport(httpx.BaseTransport):
    """Records the Authorization header of every request the client sends."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path, request.headers.get("authorization")))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_the_client_creates_with_the_admin_key_and_steps_with_the_session_token(auth_server: Server) -> None:
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    grads = {"w": np.full((2, 3), 0.5, np.float32), "b": np.ones(3, np.float32)}
    spy = SpyTransport()
    with Client(auth_server.url, token=ADMIN, transport=spy, timeout=TIMEOUT) as client:
        info = client.create_session(params, "sgd", hyperparams={"lr": 0.1})
        sid, token = info["id"], info["token"]
        assert client.step(sid, grads).step == 1
        assert client.session(sid)["step"] == 1
    by_path = {(method, path): auth for method, path, auth in spy.seen}
    assert by_path[("POST", "/v1/sessions")] == f"Bearer {ADMIN}"
    assert by_path[("POST", f"/v1/sessions/{sid}/step")] == f"Bearer {token}"
    assert by_path[("GET", f"/v1/sessions/{sid}")] == f"Bearer {token}"

    # without the admin key: the session token alone is enough for the session, and only for it
    with Client(auth_server.url, timeout=TIMEOUT) as client:
        with pytest.raises(AuthenticationError):
            client.step(sid, grads)
        client.use_token(sid, token)
        result = client.step(sid, grads)
        assert result.step == 2 and result.params is not None
        np.testing.assert_allclose(result.params["b"], -0.2, rtol=1e-6)
        assert client.params(sid)[0] == 2
        with pytest.raises(AuthenticationError):
            client.list_sessions()
    with Client(auth_server.url, token=token, timeout=TIMEOUT) as client:
        with pytest.raises(PermissionDenied):
            client.list_sessions()
        with pytest.raises(PermissionDenied):
            client.create_session(params, "sgd")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.name} {record.levelname} {text} {record.args!r}")


LOGGERS = ["", "optserve", "optserve.access", "optserve.store", "uvicorn", "uvicorn.error", "uvicorn.access"]


def test_the_server_log_never_shows_a_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    collect = Collect()
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate) for name in LOGGERS}
    for name in LOGGERS:
        logging.getLogger(name).addHandler(collect)
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        with (
            caplog.at_level(logging.DEBUG),
            running(tmp_path / "data", verbose_logs=True, api_key=ADMIN) as server,
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
        ):
            sid, token = create(http)
            _, other = create(http)
            assert token and other
            body = state_of(http, sid, token)
            for op in OPERATIONS[:-1]:
                for presented in (None, token, other, ADMIN, "wrong-" + token):
                    _send(http, _operations(sid, body)[op], presented)
            http.get("/v1/sessions", headers=bearer(token))
            http.get("/v1/sessions", headers={"authorization": f"Basic {token}"})
            http.post(f"/v1/sessions/{sid}/step", content=b"junk", headers={"content-type": ST, **bearer(token)})
            http.put(f"/v1/sessions/{sid}-2/checkpoint", content=body, headers={"content-type": ST, **bearer(ADMIN)})
            http.delete(f"/v1/sessions/{sid}", headers=bearer(token))
    finally:
        for name, (level, propagate) in saved.items():
            logging.getLogger(name).removeHandler(collect)
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).propagate = propagate
    text = "\n".join(collect.lines) + "\n" + caplog.text
    assert collect.lines, "nothing was logged: the capture is not working"
    assert sid in text or "/v1/sessions" in text, "no request was logged: the capture is not working"
    for secret in (token, other, ADMIN):
        assert secret not in text, "a token or the admin key reached the server log"


# --- limits: the request body --------------------------------------------------------------------------------------


def raw_exchange(port: int, head: bytes, body_parts: list[bytes] = ()) -> tuple[int, dict[str, str], bytes, float]:  # type: ignore[assignment]
    """Send a request head and some body bytes over a plain socket; (status, headers, body, seconds to answer).

    The socket times out after TIMEOUT seconds: a server that waits for the rest of the body fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        started = time.monotonic()
        s.sendall(head)
        for part in body_parts:
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest, elapsed


def _head(method: str, path: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _raw_problem(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers.get("content-type", "").split(";")[0] == PROBLEM, headers
    problem = json.loads(body)
    assert problem["status"] == status
    return problem  # type: ignore[no-any-return]


LIMIT = 64 * 1024


@pytest.mark.parametrize("declared", [LIMIT + 1, 10**12, 2**63 - 1])
def test_a_body_above_the_limit_is_refused_from_its_content_length(serve: Callable[..., Server], declared: int) -> None:
    server = serve(max_body_bytes=LIMIT)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sid, _ = create(http, token=None)
        before = state_of(http, sid)
        n_before = ids(http)
        for method, path, ctype in [
            ("POST", f"/v1/sessions/{sid}/step", ST),
            ("POST", "/v1/sessions", wire.JSON),
            ("PUT", f"/v1/sessions/{sid}/checkpoint", ST),
            ("PUT", "/v1/sessions/imported/checkpoint", ST),
            ("PATCH", f"/v1/sessions/{sid}", wire.JSON),
        ]:
            head = _head(method, path, {"Content-Type": ctype, "Content-Length": str(declared)})
            status, headers, body, elapsed = raw_exchange(server.port, head, [b"\x00" * 100])
            assert status == 413, (method, path, status, body[:300])
            assert elapsed < TIMEOUT
            problem = _raw_problem(413, headers, body)
            assert problem["type"] == "urn:optserve:problem:payload-too-large" and problem["limit"] == LIMIT
        assert state_of(http, sid) == before and ids(http) == n_before
        # a body within the limit is fine
        r = http.post(f"/v1/sessions/{sid}/step", content=grads_body(), headers={"content-type": ST})
        assert r.status_code == 200, r.text


def test_a_chunked_body_above_the_limit_is_refused_while_it_streams(serve: Callable[..., Server]) -> None:
    server = serve(max_body_bytes=LIMIT)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sid, _ = create(http, token=None)
        before = state_of(http, sid)
        chunk = 16 * 1024
        pieces = [f"{chunk:x}\r\n".encode() + b"\x01" * chunk + b"\r\n" for _ in range(2 * LIMIT // chunk)] + [
            b"0\r\n\r\n"
        ]
        for method, path in [
            ("POST", f"/v1/sessions/{sid}/step"),
            ("POST", "/v1/sessions"),
            ("PUT", f"/v1/sessions/{sid}/checkpoint"),
        ]:
            head = _head(method, path, {"Content-Type": ST, "Transfer-Encoding": "chunked"})
            status, headers, body, elapsed = raw_exchange(server.port, head, pieces)
            assert status == 413, (method, path, status, body[:300])
            _raw_problem(413, headers, body)

        # the same through httpx, which sends a generator's body chunked
        def stream() -> Iterator[bytes]:
            for _ in range(2 * LIMIT // chunk):
                yield b"\x02" * chunk

        r = http.post(f"/v1/sessions/{sid}/step", content=stream(), headers={"content-type": ST})
        assert "content-length" not in r.request.headers
        assert_problem(r, 413, "payload-too-large")
        assert state_of(http, sid) == before
        # a chunked body within the limit goes through
        good = grads_body()
        r = http.post(f"/v1/sessions/{sid}/step", content=iter([good[:10], good[10:]]), headers={"content-type": ST})
        assert r.status_code == 200, r.text


def test_a_large_declared_body_without_credentials_is_refused_at_once(auth_server: Server, http: httpx.Client) -> None:
    """Within max_body_bytes (the default, 4 GiB), a request without a token is answered before its body comes."""
    sid, _ = create(http)
    for method, path in [("POST", f"/v1/sessions/{sid}/step"), ("POST", "/v1/sessions")]:
        head = _head(method, path, {"Content-Type": ST, "Content-Length": str(1 << 30)})
        status, headers, body, elapsed = raw_exchange(auth_server.port, head, [b"\x00" * 64])
        assert status == 401, (status, body[:200])
        assert elapsed < TIMEOUT


# --- limits: the safetensors header --------------------------------------------------------------------------------


def test_the_safetensors_header_limit(serve: Callable[..., Server]) -> None:
    server = serve(max_header_bytes=1024)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sid, _ = create(http, token=None)
        before = state_of(http, sid)
        big = grads_body(metadata={"padding": "x" * 2000})
        assert int.from_bytes(big[:8], "little") > 1024
        r = http.post(f"/v1/sessions/{sid}/step", content=big, headers={"content-type": ST})
        assert_problem(r, 413, "payload-too-large")
        assert r.json()["limit"] == 1024
        # a length that points past the end of the body is malformed (400), above the limit or not
        good = grads_body()
        for n in (10**6, len(good), 2**64 - 1):
            bad = n.to_bytes(8, "little") + good[8:]
            r = http.post(f"/v1/sessions/{sid}/step", content=bad, headers={"content-type": ST})
            assert_problem(r, 400)
        assert state_of(http, sid) == before
        # creates: the config travels in the header
        listing = ids(http)
        config = json.dumps({"optimizer": "sgd", "hyperparams": {"lr": 0.1}, "padding_is_not_a_field": "y" * 2000})
        body = wire.encode(tensors(SHAPES), {"config": config})
        assert_problem(http.post("/v1/sessions", content=body, headers={"content-type": ST}), 413)
        assert ids(http) == listing
        small = wire.encode(tensors(SHAPES), {"config": json.dumps({"optimizer": "sgd"})})
        assert http.post("/v1/sessions", content=small, headers={"content-type": ST}).status_code == 201


# --- limits: sessions ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server with default limits: the source of checkpoints that other servers' limits refuse."""
    with running(tmp_path_factory.mktemp("roomy")) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def checkpoint_of(
    roomy: httpx.Client, shapes: Mapping[str, tuple[int, ...]], optimizer: str = "sgd", **hyperparams: Any
) -> bytes:
    sid, _ = create(roomy, token=None, shapes=shapes, optimizer=optimizer, hyperparams=hyperparams or {"lr": 0.1})
    r = roomy.post(f"/v1/sessions/{sid}/step", content=grads_body(shapes), headers={"content-type": ST})
    assert r.status_code == 200, r.text
    return state_of(roomy, sid)


def put_checkpoint(http: httpx.Client, sid: str, body: bytes) -> httpx.Response:
    return http.put(f"/v1/sessions/{sid}/checkpoint", content=body, headers={"content-type": ST})


def assert_nothing_created(
    http: httpx.Client, server: Server, listing: list[str], files: list[str], *sids: str
) -> None:
    assert ids(http) == listing, "a refused request left a session behind"
    assert snapshot_files(server) == files, "a refused request left a snapshot behind"
    for sid in sids:
        assert_problem(http.get(f"/v1/sessions/{sid}"), 404)


def test_max_tensors_per_session(serve: Callable[..., Server], roomy: httpx.Client) -> None:
    server = serve(max_tensors_per_session=3)
    four = {"a": (2,), "b": (2,), "c": (2,), "d": (2,)}
    three = {"a": (2,), "b": (2,), "c": (2,)}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sid, _ = create(http, token=None, shapes=three)
        listing, files, before = ids(http), snapshot_files(server), state_of(http, sid)
        r = http.post("/v1/sessions", json=create_body(four, session_id="four"))
        assert "4 tensors" in assert_problem(r, 413, "payload-too-large")["detail"]
        body = wire.encode(tensors(four), {"config": json.dumps({"optimizer": "sgd", "id": "four-st"})})
        assert_problem(http.post("/v1/sessions", content=body, headers={"content-type": ST}), 413)
        cp = checkpoint_of(roomy, four)
        assert_problem(put_checkpoint(http, "four-cp", cp), 413)
        assert_problem(put_checkpoint(http, sid, cp), 413)  # replacing obeys it too
        assert_nothing_created(http, server, listing, files, "four", "four-st", "four-cp")
        assert state_of(http, sid) == before
        assert put_checkpoint(http, "three-cp", checkpoint_of(roomy, three)).status_code == 201


def test_max_params_per_session(serve: Callable[..., Server], roomy: httpx.Client) -> None:
    server = serve(max_params_per_session=100)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sid, _ = create(http, token=None, shapes={"w": (10, 10)})
        listing, files, before = ids(http), snapshot_files(server), state_of(http, sid)
        r = http.post("/v1/sessions", json=create_body({"w": (10, 10), "b": (1,)}, session_id="p101"))
        assert "101 parameters" in assert_problem(r, 413, "payload-too-large")["detail"]
        cp = checkpoint_of(roomy, {"w": (101,)})
        assert_problem(put_checkpoint(http, "p101-cp", cp), 413)
        assert_problem(put_checkpoint(http, sid, cp), 413)
        assert_nothing_created(http, server, listing, files, "p101", "p101-cp")
        assert state_of(http, sid) == before
        assert put_checkpoint(http, "p100-cp", checkpoint_of(roomy, {"w": (100,)})).status_code == 201


def test_max_sessions(serve: Callable[..., Server], roomy: httpx.Client) -> None:
    server = serve(max_sessions=3)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        sids = [create(http, token=None)[0] for _ in range(3)]
        listing, files = ids(http), snapshot_files(server)
        problem = assert_problem(http.post("/v1/sessions", json=create_body(session_id="fourth")), 429)
        assert problem["type"] == "urn:optserve:problem:too-many-sessions" and problem["limit"] == 3
        cp = checkpoint_of(roomy, SHAPES)
        assert_problem(put_checkpoint(http, "fourth-cp", cp), 429)
        assert_nothing_created(http, server, listing, files, "fourth", "fourth-cp")
        # replacing a session at the limit is not a new session
        assert put_checkpoint(http, sids[0], cp).status_code == 200
        assert http.delete(f"/v1/sessions/{sids[1]}").status_code == 204
        r = http.post("/v1/sessions", json=create_body(session_id="fourth"))
        assert r.status_code == 201, r.text
        assert_problem(http.post("/v1/sessions", json=create_body()), 429)
        assert http.delete("/v1/sessions/fourth").status_code == 204
        assert put_checkpoint(http, "fourth-cp", cp).status_code == 201
        assert len(ids(http)) == 3


def test_memory_budget(serve: Callable[..., Server], roomy: httpx.Client) -> None:
    # adam keeps params + exp_avg + exp_avg_sq: 12 bytes per parameter (16 with amsgrad)
    server = serve(memory_budget_bytes=4096)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        first, _ = create(http, token=None, shapes={"w": (200,)}, optimizer="adam", hyperparams={"lr": 0.01})
        listing, files, before = ids(http), snapshot_files(server), state_of(http, first)
        r = http.post("/v1/sessions", json=create_body({"w": (200,)}, "adam", {"lr": 0.01}, session_id="second"))
        problem = assert_problem(r, 507, "memory-budget-exceeded")
        assert problem["needed_bytes"] == 2400 and problem["used_bytes"] == 2400 and problem["budget_bytes"] == 4096
        assert "2400 bytes" in problem["detail"] and "4096" in problem["detail"]
        # the state buffers of the config count before anything is allocated: amsgrad needs one more
        r = http.post("/v1/sessions", json=create_body({"w": (120,)}, "adam", {"amsgrad": True}, session_id="ams"))
        assert assert_problem(r, 507)["needed_bytes"] == 1920
        cp = checkpoint_of(roomy, {"w": (200,)}, "adam", lr=0.01)
        assert_problem(put_checkpoint(http, "second-cp", cp), 507)
        assert_nothing_created(http, server, listing, files, "second", "ams", "second-cp")
        assert state_of(http, first) == before
        # a smaller session still fits, and replacing a session frees its own share
        assert http.post("/v1/sessions", json=create_body({"w": (120,)}, "adam", {"lr": 0.01})).status_code == 201
        assert put_checkpoint(http, first, cp).status_code == 200
        assert http.delete(f"/v1/sessions/{first}").status_code == 204
        assert put_checkpoint(http, "second-cp", cp).status_code == 201


def test_put_checkpoint_obeys_the_body_and_header_limits(serve: Callable[..., Server], roomy: httpx.Client) -> None:
    cp = checkpoint_of(roomy, {"w": (3, 4), "b": (4,), "c": (2,)}, "adam", lr=0.01)
    header = int.from_bytes(cp[:8], "little")
    assert 1024 < header < len(cp) < LIMIT
    server = serve(max_header_bytes=1024)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert_problem(put_checkpoint(http, "cp-header", cp), 413, "payload-too-large")
        assert_nothing_created(http, server, [], snapshot_files(server), "cp-header")
    server = serve(max_body_bytes=len(cp) - 1)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert_problem(put_checkpoint(http, "cp-body", cp), 413, "payload-too-large")
        assert_nothing_created(http, server, [], snapshot_files(server), "cp-body")
    server = serve(max_body_bytes=len(cp))
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        assert put_checkpoint(http, "cp-fits", cp).status_code == 201
