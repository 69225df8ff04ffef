"""Reliability under an attacker's faults, against real ``optserve serve`` processes (issue 10).

Each test reproduces one defect an independent attack found (the docstrings say which) and holds the promise the
README's "Reliability" section makes: no answered step or accepted session is lost to idle eviction, a concurrent
DELETE or a failing disk; a server always starts on its own data folder; hostile requests get a 4xx, never a 500;
and what one request may cost the server is bounded, in memory (peak and retained RSS of the server process, from
``/proc``) and in time (the event loop's stall, measured by the latency of ``/healthz`` while the attack runs).

Every wait has a deadline, every server is stopped by its pid, and every mount a test makes is undone.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from procs import Server, poll

from optserve.client import wire

pytestmark = pytest.mark.server

ST = {"content-type": wire.SAFETENSORS}
MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------------------------------


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def memory(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) << 10, int(fields["VmHWM"].split()[0]) << 10


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS


def settled(pid: int) -> int:
    """The resident size once it stops moving (frees are not instant)."""
    last = memory(pid)[0]
    for _ in range(20):
        time.sleep(0.1)
        now = memory(pid)[0]
        if abs(now - last) < MiB:
            return now
        last = now
    return last


class LoopWatch:
    """Asks ``/healthz`` every 20 ms on a thread while the block runs: ``worst`` is the longest answer, i.e. how long
    the server's event loop was stalled."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                started = time.perf_counter()
                http.get(f"{self.url}/healthz")
                self.worst = max(self.worst, time.perf_counter() - started)
                time.sleep(0.02)

    def __enter__(self) -> LoopWatch:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match[1])


def safetensors_body(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return wire.encode(tensors, metadata)


def create(http: httpx.Client, n: int = 12, session_id: str | None = None, **config: Any) -> str:
    body = {"optimizer": "adamw", "params": {"w": {"shape": [n], "data": [0.1] * n}}, **config}
    if session_id:
        body["id"] = session_id
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def create_large(http: httpx.Client, n: int, session_id: str | None = None) -> str:
    config: dict[str, Any] = {"optimizer": "adamw"}
    if session_id:
        config["id"] = session_id
    r = http.post("/v1/sessions", content=wire.encode({"w": np.zeros(n, np.float32)}, {"config": json.dumps(config)}),
                  headers=ST)  # fmt: skip
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def step(http: httpx.Client, sid: str, n: int, at: int | None = None, key: str | None = None) -> httpx.Response:
    headers = {**ST, "idempotency-key": key or uuid.uuid4().hex}
    if at is not None:
        headers["if-match"] = f'"{at}"'
    grads = {"w": np.random.default_rng(at).standard_normal(n).astype(np.float32)}
    return http.post(f"/v1/sessions/{sid}/step", content=wire.encode(grads), headers=headers)


def restart(launch: Callable[..., Server], server: Server, env: dict[str, str] | None = None) -> Server:
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    return launch(server.data_dir, env)


# --- 1. accepted inputs never make a session unloadable -------------------------------------------------------------


def test_no_input_the_server_accepts_makes_a_session_it_cannot_load(tmp_path: Path, launch) -> None:
    """Defect 1: a gradient of 1e22 (AdamW), eps=0 with a zero gradient, SGD lr=1e30, RMSprop alpha=5 made the state
    non-finite, and a float64 param of 3.5e38 was accepted as inf: snapshotted, set aside in corrupt/ at the next
    start, refused when their own checkpoint was PUT back."""
    server = launch(tmp_path / "data")
    http = httpx.Client(base_url=server.url, timeout=30)
    cases = [
        ("adamw", {}, 1e22),
        ("adamw", {"eps": 0.0}, 0.0),
        ("sgd", {"lr": 1e30}, 1e10),
        ("rmsprop", {"alpha": 5.0}, 1.0),
    ]
    sids = []
    for optimizer, hp, scale in cases:
        sid = create(http, 4, optimizer=optimizer, hyperparams=hp)
        r = http.post(f"/v1/sessions/{sid}/step", json={"w": {"shape": [4], "data": [scale, scale, 0.0, scale]}})
        assert r.status_code == 422 and r.json()["type"].endswith("non-finite-result"), (optimizer, r.text)
        sids.append(sid)
    big = {"optimizer": "adamw", "params": {"w": {"dtype": "float64", "shape": [2], "data": [3.5e38, 1.0]}}}
    assert http.post("/v1/sessions", json=big).status_code == 422
    server = restart(launch, server)
    http = httpx.Client(base_url=server.url, timeout=30)
    assert not (tmp_path / "data" / "corrupt").exists()
    for sid in sids:
        checkpoint = http.get(f"/v1/sessions/{sid}/checkpoint")
        assert checkpoint.status_code == 200
        r = http.put(f"/v1/sessions/{sid}-again/checkpoint", content=checkpoint.content, headers=ST)
        assert r.status_code == 201, r.text


# --- 2. idle eviction racing steps --------------------------------------------------------------------------------


def slow_step(server: Server, sid: str, n: int, at: int, seconds: float) -> tuple[int, dict[str, str]]:
    """A step whose body arrives in pieces over ``seconds``; (status, headers) of its answer."""
    body = wire.encode({"w": np.ones(n, np.float32)})
    head = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\nContent-Type: {wire.SAFETENSORS}\r\n"
            f'Content-Length: {len(body)}\r\nIf-Match: "{at}"\r\nIdempotency-Key: {uuid.uuid4().hex}\r\n'
            "Prefer: return=minimal\r\n\r\n").encode()  # fmt: skip
    pieces = 10
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as s:
        s.sendall(head)
        for i in range(pieces):
            s.sendall(body[i * len(body) // pieces : (i + 1) * len(body) // pieces])
            time.sleep(seconds / pieces)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    lines = answer.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def test_idle_eviction_racing_steps_loses_no_answered_step(tmp_path: Path, launch) -> None:
    """Defect 2: eviction (OPTSERVE_SESSION_TTL_SECONDS) racing a step lost answered steps (30 answered, the server
    at 24, later steps reusing the lost ETags), and a step whose body was still arriving got a 404."""
    server = launch(tmp_path / "data", {"OPTSERVE_SESSION_TTL_SECONDS": "0.3", "OPTSERVE_SNAPSHOT_EVERY_STEPS": "0"})
    http = httpx.Client(base_url=server.url, timeout=30)
    n = 100_000  # large enough that steps run on worker threads, beside the eviction on the event loop
    sid = create_large(http, n)
    rng = random.Random(5)
    etags = []
    for t in range(30):
        time.sleep(rng.uniform(0.2, 0.6))  # around the TTL and the half-second eviction round
        r = step(http, sid, n, at=t)
        assert r.status_code == 200, r.text
        etags.append(int(r.headers["etag"].strip('"')))
    assert etags == list(range(1, 31)), "an ETag was reused: an answered step was lost"
    evicted = metric(server, "optserve_session_evictions_total")
    assert evicted >= 3, "the test did not make eviction race the steps"
    before = metric(server, "optserve_session_evictions_total")
    status, headers = slow_step(server, sid, n, at=30, seconds=2.0)  # evicted while its body arrives
    assert metric(server, "optserve_session_evictions_total") > before
    assert status == 204 and headers["etag"] == '"31"'
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 31
    server = restart(launch, server)
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 31


# --- 3. DELETE while others step ----------------------------------------------------------------------------------


def test_a_session_deleted_while_others_step_stays_deleted(tmp_path: Path, launch) -> None:
    """Defect 3: DELETE answered 204 while others stepped, and the session came back (a concurrent step reloaded it
    from its snapshot before the file was removed), listed, and it survived a restart."""
    server = launch(tmp_path / "data")
    http = httpx.Client(base_url=server.url, timeout=30)
    n = 1_000_000  # a step holds the session's lock for a while: the DELETE waits for it, the others knock meanwhile
    deleted = []
    for round_ in range(4):
        sid = create_large(http, n, session_id=f"doomed-{round_}")
        stop = threading.Event()

        def keep_stepping(sid: str = sid, stop: threading.Event = stop) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as own:
                while not stop.is_set():
                    step(own, sid, n)  # 200 until the delete, 404 after

        threads = [threading.Thread(target=keep_stepping) for _ in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.3)
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        time.sleep(0.3)  # the steppers go on knocking
        stop.set()
        for th in threads:
            th.join(timeout=30)
        assert http.get(f"/v1/sessions/{sid}").status_code == 404
        assert sid not in [s["id"] for s in http.get("/v1/sessions").json()["sessions"]]
        assert not (server.data_dir / "sessions" / f"{sid}.safetensors").exists()
        deleted.append(sid)
    server = restart(launch, server)
    listed = [s["id"] for s in httpx.get(f"{server.url}/v1/sessions").json()["sessions"]]
    assert not set(deleted) & set(listed)


# --- 4. a failing disk ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64m") -> Iterator[Callable[[bool], None]]:
    """A tmpfs of ``size`` mounted at ``path`` (yields a function making it read-only or writable); unmounted at the
    end whatever happens. Skips where this process may not mount (CI here runs as root)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")

    def read_only(on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(path)], check=True)

    try:
        yield read_only
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_with_fsync_every_step_a_step_whose_snapshot_fails_is_never_answered_as_applied(tmp_path: Path, launch) -> None:
    """Defect 4 (fsync every step): with a read-only data folder steps answered 204 and were gone after a restart.
    Now: 503, retryable with the same Idempotency-Key, applied once when the disk is back; unanswered if the server
    dies first, and applied by the retry after the restart."""
    with small_disk(tmp_path / "disk") as read_only:
        data = tmp_path / "disk" / "data"
        server = launch(data, {"OPTSERVE_FSYNC_EVERY_STEP": "true"})
        http = httpx.Client(base_url=server.url, timeout=30)
        sid = create(http)
        assert step(http, sid, 12, at=0).status_code == 200
        read_only(True)
        r = http.post("/v1/sessions", json={"id": "new", "params": {"w": {"shape": [2], "data": [1, 2]}}})
        assert r.status_code == 503 and r.json()["type"].endswith("storage-unavailable")
        assert "new" not in [s["id"] for s in http.get("/v1/sessions").json()["sessions"]]
        for _ in range(2):  # the retries of one step
            assert step(http, sid, 12, at=1, key="k1").status_code == 503
        assert http.get("/readyz").status_code == 503
        assert metric(server, "optserve_snapshots_failing") == 1
        assert http.get(f"/v1/sessions/{sid}/params").status_code == 503  # the unsaved step is not shown either
        read_only(False)
        r = step(http, sid, 12, at=1, key="k1")
        assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true" and r.headers["etag"] == '"2"'
        assert http.get("/readyz").status_code == 200
        read_only(True)
        assert step(http, sid, 12, at=2, key="k2").status_code == 503
        server.proc.kill()  # dies with the unanswered step in memory only
        server.proc.wait(timeout=10)
        read_only(False)
        server = launch(data, {"OPTSERVE_FSYNC_EVERY_STEP": "true"})
        http = httpx.Client(base_url=server.url, timeout=30)
        assert http.get(f"/v1/sessions/{sid}").json()["step"] == 2
        r = step(http, sid, 12, at=2, key="k2")  # the client's retry, after the restart
        assert r.status_code == 200 and "idempotent-replayed" not in r.headers and r.headers["etag"] == '"3"'
        server.proc.kill()
        server.proc.wait(timeout=10)


def test_without_fsync_a_failing_disk_shows_in_readyz_metrics_and_log_and_changes_refuse(
    tmp_path: Path, launch
) -> None:
    """Defect 4 (periodic snapshots): create answered 201 and /readyz stayed 200 with a read-only data folder or a
    full disk; after a restart the session or its steps were gone."""
    with small_disk(tmp_path / "disk", size="2m") as read_only:
        data = tmp_path / "disk" / "data"
        server = launch(data, {"OPTSERVE_SNAPSHOT_EVERY_STEPS": "1"})
        http = httpx.Client(base_url=server.url, timeout=30)
        r = http.post("/v1/sessions", content=wire.encode({"w": np.zeros(400_000, np.float32)}), headers=ST)
        assert r.status_code == 503, "a session whose snapshot does not fit the disk must not be created"
        assert http.get("/v1/sessions").json()["sessions"] == []
        assert list((data / "sessions").iterdir()) == []
        assert http.get("/readyz").status_code == 503  # until a snapshot succeeds
        sid = create(http)
        assert http.get("/readyz").status_code == 200
        read_only(True)
        assert step(http, sid, 12, at=0).status_code == 200  # answered; its background snapshot fails
        assert poll(lambda: http.get("/readyz").status_code == 503, timeout=10)
        assert http.get("/readyz").json()["status"] == "degraded"
        assert metric(server, "optserve_snapshots_failing") == 1
        assert metric(server, "optserve_snapshot_failures_total") >= 1
        assert f"snapshot of session {sid} failed" in server.log_text()
        r = http.patch(f"/v1/sessions/{sid}", json={"hyperparams": {"lr": 0.5}})
        assert r.status_code == 503  # a change whose snapshot fails is undone
        assert http.get(f"/v1/sessions/{sid}").json()["hyperparams"]["lr"] == 1e-3
        assert http.delete(f"/v1/sessions/{sid}").status_code == 503  # its snapshot stays: so does the session
        assert http.get(f"/v1/sessions/{sid}").status_code == 200
        read_only(False)
        assert step(http, sid, 12, at=1).status_code == 200
        assert poll(lambda: http.get("/readyz").status_code == 200, timeout=10)
        server = restart(launch, server)
        assert httpx.get(f"{server.url}/v1/sessions/{sid}").json()["step"] == 2
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)


# --- 5. limits and reloads ------------------------------------------------------------------------------------------


def test_limits_count_evicted_sessions_and_never_stop_a_start(tmp_path: Path, launch) -> None:
    """Defect 5: reloads of evicted sessions ignored OPTSERVE_MAX_SESSIONS (6 held with a limit of 3), and the next
    start exited with "Application startup failed"."""
    data = tmp_path / "data"
    n = 50_000  # 600 KB of AdamW state per session
    server = launch(data, {"OPTSERVE_MAX_SESSIONS": "3", "OPTSERVE_SESSION_TTL_SECONDS": "0.3"})
    http = httpx.Client(base_url=server.url, timeout=30)
    sids = [create_large(http, n, f"s{i}") for i in range(3)]
    assert poll(lambda: metric(server, "optserve_sessions") == 0, timeout=10), "not evicted"
    r = http.post("/v1/sessions", json={"params": {"w": {"shape": [2], "data": [1, 2]}}})
    assert r.status_code == 429, "evicted sessions count: the limit is on sessions, not on memory"
    for sid in sids:
        assert step(http, sid, n, at=0).status_code == 200  # reloaded
    assert http.get("/readyz").json()["sessions"] == 3
    server = restart(launch, server, {"OPTSERVE_MAX_SESSIONS": "2"})  # fewer than the folder holds
    http = httpx.Client(base_url=server.url, timeout=30)
    assert http.get("/readyz").status_code == 200
    assert all(http.get(f"/v1/sessions/{sid}").json()["step"] == 1 for sid in sids)
    assert http.post("/v1/sessions", json={"params": {"w": {"shape": [2], "data": [1, 2]}}}).status_code == 429
    budget = str(int(1.5 * n * 12))  # room for one session's state in memory
    server = restart(launch, server, {"OPTSERVE_MEMORY_BUDGET_BYTES": budget})
    http = httpx.Client(base_url=server.url, timeout=30)
    assert http.get("/readyz").status_code == 200
    assert metric(server, "optserve_sessions") == 1 and metric(server, "optserve_sessions_evicted") == 2
    for sid in sids:  # each one loaded in turn, the least recently used evicted to make room
        assert step(http, sid, n, at=1).status_code == 200
    assert metric(server, "optserve_sessions") == 1


# --- 6, 7. hostile requests get a 4xx ------------------------------------------------------------------------------


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_past_the_recursion_limit_and_odd_if_match_digits_are_400s_not_500s(server) -> None:
    """Defect 6: 500s for JSON nested past Python's recursion limit (step and create bodies, safetensors headers,
    __metadata__ config and hyperparams), and for If-Match: "\\xb2" (isdigit() true, int() fails)."""
    http = httpx.Client(base_url=server.url, timeout=30)
    sid = create(http, 4)
    nested = deep(100_000)
    cases = [
        ("POST", "/v1/sessions", {"content-type": wire.JSON}, nested.encode()),
        ("POST", "/v1/sessions", {"content-type": wire.JSON}, ('{"params": ' + nested + "}").encode()),
        ("POST", f"/v1/sessions/{sid}/step", {"content-type": wire.JSON}, ('{"w": ' + nested + "}").encode()),
        ("PATCH", f"/v1/sessions/{sid}", {"content-type": wire.JSON}, ('{"hyperparams": ' + nested + "}").encode()),
    ]
    header = ('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "x": ' + nested + "}").encode()
    cases.append(("POST", f"/v1/sessions/{sid}/step", ST, struct.pack("<Q", len(header)) + header + bytes(16)))
    for key in ("config", "hyperparams"):
        body = safetensors_body({"w": np.zeros(4, np.float32)}, {key: nested})
        path = "/v1/sessions" if key == "config" else f"/v1/sessions/{sid}/step"
        cases.append(("POST", path, ST, body))
    for method, path, headers, body in cases:
        r = http.request(method, path, content=body, headers=headers)
        assert r.status_code == 400, (method, path, r.status_code, r.text[:200])
        assert r.headers["content-type"] == "application/problem+json"
    r = http.post(f"/v1/sessions/{sid}/step", content=safetensors_body({"w": np.zeros(4, np.float32)}),
                  headers={**ST, "if-match": b'"\xb2"'})  # fmt: skip
    assert r.status_code == 412  # names no step the session is at
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_a_session_id_with_a_newline_is_refused_and_paths_cannot_forge_log_lines(tmp_path: Path, launch) -> None:
    """Defect 7: "a\\n" was accepted as an id (the pattern's $ matched before a final newline): created and
    snapshotted, then its invalid Location header dropped the connection without an answer; %0A in a path forged
    lines in the text access log."""
    server = launch(tmp_path / "data", log_level="info")
    http = httpx.Client(base_url=server.url, timeout=30)
    r = http.post("/v1/sessions", json={"id": "a\n", "params": {"w": {"shape": [1], "data": [1]}}})
    assert r.status_code == 422
    assert list((tmp_path / "data" / "sessions").iterdir()) == []
    assert http.get("/v1/sessions/x%0Aforged%20line").status_code in (403, 404)
    time.sleep(0.3)
    lines = server.log_text().splitlines()
    assert not any(line.startswith("forged") for line in lines)
    assert any("x\\nforged line" in line for line in lines)


# --- 8-13. what one request may cost ---------------------------------------------------------------------------------

BOUNDED = {"OPTSERVE_IO_POOL_BYTES": "0"}  # no buffers kept for reuse: what stays in memory is what leaked


def test_refused_steps_with_large_headers_are_not_kept(tmp_path: Path, launch) -> None:
    """Defect 8: the parsed-header cache kept up to 256 headers of up to 16 MiB, refused steps' included: 64 refused
    steps with 8 MiB headers kept +1.16 GiB."""
    server = launch(tmp_path / "data", BOUNDED)
    http = httpx.Client(base_url=server.url, timeout=60)
    sid = create(http, 4)
    base = settled(server.proc.pid)
    for i in range(64):
        header = json.dumps({"__metadata__": {"x": "a" * (8 * MiB) + str(i)},
                             "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()  # fmt: skip
        r = http.post(f"/v1/sessions/{sid}/step", content=struct.pack("<Q", len(header)) + header + bytes(4),
                      headers=ST)  # fmt: skip
        assert r.status_code == 422
    retained = settled(server.proc.pid) - base
    assert retained < 48 * MiB, f"{retained / MiB:.0f} MiB kept after 64 refused steps"


def test_a_client_announcing_gigabytes_and_hanging_up_costs_nothing(tmp_path: Path, launch) -> None:
    """Defect 9: Content-Length 4 GiB, 100 bytes sent, hang up: the server zeroed a 4 GiB buffer on the event loop
    (three such clients: peak RSS 4.2 GiB, /healthz blocked for 10 s)."""
    server = launch(tmp_path / "data", BOUNDED)
    sid = create(httpx.Client(base_url=server.url, timeout=30), 4)
    base = settled(server.proc.pid)
    reset_peak(server.proc.pid)
    with LoopWatch(server.url) as watch:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
                s.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\nContent-Type: {wire.SAFETENSORS}\r\n"
                          f"Content-Length: {4 << 30}\r\n\r\n".encode() + b"x" * 100)  # fmt: skip
                time.sleep(0.2)
        time.sleep(1.0)
    peak = memory(server.proc.pid)[1] - base
    assert peak < 64 * MiB, f"peak +{peak / MiB:.0f} MiB"
    assert watch.worst < 0.5, f"/healthz took {watch.worst:.2f} s"


def test_refused_large_bodies_are_freed_at_once(tmp_path: Path, launch) -> None:
    """Defect 10: refused large bodies stayed in memory until the cyclic garbage collector ran (+512 MiB of RSS per
    refused body, 3.77 GiB after seven)."""
    server = launch(tmp_path / "data", BOUNDED)
    http = httpx.Client(base_url=server.url, timeout=60)
    sid = create(http, 4)
    size = 128 * MiB
    body = safetensors_body({"not-w": np.zeros(size // 4, np.float32)})
    base = settled(server.proc.pid)
    reset_peak(server.proc.pid)
    for _ in range(5):
        assert http.post(f"/v1/sessions/{sid}/step", content=body, headers=ST).status_code == 422
    retained = settled(server.proc.pid) - base
    peak = memory(server.proc.pid)[1] - base
    assert retained < 48 * MiB, f"{retained / MiB:.0f} MiB kept after 5 refused 128 MiB bodies"
    assert peak < 1.3 * size + 32 * MiB, f"peak +{peak / MiB:.0f} MiB for a 128 MiB body"


def read_answer(s: socket.socket) -> tuple[bytes, float]:
    started = time.monotonic()
    data = b""
    with contextlib.suppress(OSError):
        while chunk := s.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def test_a_slow_or_silent_request_head_is_cut_off(tmp_path: Path, launch) -> None:
    """Defect 11: no timeout for reading request headers: slowloris connections were held forever."""
    server = launch(tmp_path / "data", {"OPTSERVE_HEADER_TIMEOUT_SECONDS": "1"})
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as silent:
        answer, waited = read_answer(silent)
    assert answer.startswith(b"HTTP/1.1 408") and 0.8 < waited < 3
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as slow:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: 1234567890\r\n":
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        answer, _ = read_answer(slow)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4
    assert httpx.get(f"{server.url}/healthz").status_code == 200  # the server itself is fine


def test_a_huge_request_head_is_refused_before_it_is_parsed(tmp_path: Path, launch) -> None:
    """Defect 12: no limit on header size, with parsing cost growing faster than linearly: one unauthenticated
    128 MiB header stalled every other client for up to 3.3 s (15 s to parse)."""
    server = launch(tmp_path / "data")
    base = settled(server.proc.pid)
    reset_peak(server.proc.pid)
    with LoopWatch(server.url) as watch, socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as s:
        with contextlib.suppress(OSError):  # the server closes while this is still sending
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (32 * MiB) + b"\r\n\r\n")
        answer, _ = read_answer(s)
    assert answer.startswith(b"HTTP/1.1 431")
    assert watch.worst < 0.5, f"/healthz took {watch.worst:.2f} s"
    assert memory(server.proc.pid)[1] - base < 16 * MiB


def json_create(n: int) -> bytes:
    """A create body of ``n`` zeros: 2 bytes of JSON per parameter, the costliest to decode per byte."""
    return ('{"params": {"w": {"shape": [' + str(n) + '], "data": [' + ",".join(["0"] * n) + "]}}}").encode()


def test_json_bodies_are_bounded_before_they_are_decoded(tmp_path: Path, launch) -> None:
    """Defect 13: JSON bodies cost about 14x their size before the parameter limit refused them (38 MiB: +537 MiB)."""
    env = {**BOUNDED, "OPTSERVE_MAX_PARAMS_PER_SESSION": "100000", "OPTSERVE_MAX_JSON_BODY_BYTES": str(64 * MiB)}
    server = launch(tmp_path / "data", env)
    http = httpx.Client(base_url=server.url, timeout=120)
    n = 8_000_000
    body = json_create(n)  # 16 MB
    base = settled(server.proc.pid)
    reset_peak(server.proc.pid)
    assert http.post("/v1/sessions", content=body, headers={"content-type": wire.JSON}).status_code == 413
    peak = memory(server.proc.pid)[1] - base
    assert peak < 3 * len(body), f"peak +{peak / MiB:.0f} MiB for a {len(body) / MiB:.0f} MiB body over the limit"
    server = restart(launch, server, {**BOUNDED, "OPTSERVE_MAX_JSON_BODY_BYTES": str(8 * MiB)})
    http = httpx.Client(base_url=server.url, timeout=120)
    base = settled(server.proc.pid)
    reset_peak(server.proc.pid)
    r = http.post("/v1/sessions", content=body, headers={"content-type": wire.JSON})
    assert r.status_code == 413  # from its Content-Length: never read
    assert memory(server.proc.pid)[1] - base < 8 * MiB
    n = 1_000_000  # within the limits: decoding costs at most ~12x the body
    small = json_create(n)
    reset_peak(server.proc.pid)
    assert http.post("/v1/sessions", content=small, headers={"content-type": wire.JSON}).status_code == 201
    transient = memory(server.proc.pid)[1] - settled(server.proc.pid)  # beyond what the new session holds
    assert transient < 15 * len(small), f"+{transient / MiB:.0f} MiB to decode a {len(small) / MiB:.1f} MiB body"
