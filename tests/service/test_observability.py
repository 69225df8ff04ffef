"""Metrics, request ids and request logs of a real server."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from optserve.client import Client, wire
from optserve.service.app import create_app
from optserve.service.embedded import free_port, wait_healthy
from optserve.service.observability import ROUTES, JsonFormatter, new_request_id, route_of
from optserve.service.settings import Settings
from optserve.service.store import MemoryStore


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? ([0-9.e+-]+)$" if labels else rf"^{name} ([0-9.e+-]+)$"
    for line in text.splitlines():
        m = re.match(pattern, line)
        if m:
            return float(m.group(1))
    return 0.0


def test_metrics_count_steps_refusals_bytes_and_sessions(server) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    with Client(server.url) as client:
        sid = client.create_session({"w": np.zeros(1000, np.float32)}, "adamw")["id"]
        for _ in range(3):
            client.step(sid, {"w": np.ones(1000, np.float32)})
        r = httpx.post(
            f"{server.url}/v1/sessions/{sid}/step",
            content=wire.encode({"nope": np.ones(2, np.float32)}),
            headers={"content-type": wire.SAFETENSORS},
        )
        assert r.status_code == 422
    after = httpx.get(f"{server.url}/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    for name in ("optserve_step_seconds_count", "optserve_snapshot_seconds_count", "optserve_snapshot_failures_total",
                 "optserve_http_received_bytes_total", "optserve_http_sent_bytes_total"):  # fmt: skip
        assert re.search(rf"^{name} ", text, re.M), name
    assert (
        metric(text, "optserve_steps_total", outcome="applied")
        - metric(before, "optserve_steps_total", outcome="applied")
        == 3
    )
    assert metric(text, "optserve_steps_rejected_total", reason="invalid-input") >= 1
    route = "/v1/sessions/{id}/step"
    assert metric(text, "optserve_http_requests_total", method="POST", route=route, status="200") >= 3
    assert metric(text, "optserve_http_requests_total", method="POST", route=route, status="422") >= 1
    assert (
        metric(text, "optserve_http_received_bytes_total") - metric(before, "optserve_http_received_bytes_total")
        > 3 * 4000
    )
    listed = httpx.get(f"{server.url}/v1/sessions").json()["sessions"]  # the test server never evicts

    def gauges_agree() -> bool:  # a cluster's front refreshes them every 2 s
        text = httpx.get(f"{server.url}/metrics").text
        held = metric(text, "optserve_parameters") == sum(s["num_params"] for s in listed)
        return held and metric(text, "optserve_sessions") == len(listed)

    deadline = time.monotonic() + 10
    while not gauges_agree() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gauges_agree()
    if isinstance(server.store, MemoryStore):
        held = sum(server.store.get(s["id"]).nbytes for s in listed)
        assert metric(httpx.get(f"{server.url}/metrics").text, "optserve_state_bytes") == held


def test_request_id_is_echoed_or_made(server) -> None:
    given = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    made = httpx.get(f"{server.url}/healthz")
    assert re.fullmatch(r"[0-9a-f]{16}", made.headers["x-request-id"])
    odd = httpx.get(f"{server.url}/healthz", headers={"x-request-id": "bad id with spaces"})
    assert odd.headers["x-request-id"] != "bad id with spaces"
    problem = httpx.get(f"{server.url}/v1/sessions/none", headers={"x-request-id": "t-404"})
    assert problem.status_code == 404 and problem.headers["x-request-id"] == "t-404"


def test_one_json_log_line_per_request_without_tokens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import threading

    import uvicorn

    from optserve.service.app import create_app
    from optserve.service.bodies import HTTP_PROTOCOL
    from optserve.service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, api_key="admin-secret", log_format="json"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", http=HTTP_PROTOCOL, access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        caplog.set_level(logging.INFO, logger="optserve.access")
        caplog.clear()
        with Client(url, token="admin-secret") as client:
            info = client.create_session({"w": np.zeros(3, np.float32)})
            token = info["token"]
            client.step(info["id"], {"w": np.ones(3, np.float32)})
        # a request's line is written after its answer is sent: wait_healthy's GET /healthz can land after the
        # clear() and the step's after the client has its answer, so the two lines are waited for (bounded) and
        # only the /v1 ones counted
        deadline = time.monotonic() + 10
        while True:
            lines = [r for r in caplog.records if r.name == "optserve.access" and '"/healthz"' not in r.getMessage()]
            if len(lines) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(lines) == 2
        entries = [json.loads(JsonFormatter().format(r)) for r in lines]
        assert [e["method"] for e in entries] == ["POST", "POST"]
        assert entries[1]["path"] == f"/v1/sessions/{info['id']}/step" and entries[1]["status"] == 200
        assert all(e["request_id"] and e["ms"] >= 0 and e["bytes_in"] > 0 for e in entries)
        everything = caplog.text + json.dumps(entries)
        assert token not in everything and "admin-secret" not in everything
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_route_labels_fold_session_ids() -> None:
    assert route_of("/v1/sessions/abc123/step") == "/v1/sessions/{id}/step"
    assert route_of("/v1/sessions") == "/v1/sessions"
    assert route_of("/metrics") == "/metrics"
    assert route_of("/v1/sessions/abc123/nothing") == "other"
    assert route_of("/wp-admin/" + "x" * 50) == "other"


def test_route_labels_name_every_route_of_the_app(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    assert {route.path.replace("{session_id}", "{id}") for route in app.routes} == ROUTES  # type: ignore[attr-defined]


def test_made_request_ids_are_unique_and_well_formed() -> None:
    ids = [new_request_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_hot_metrics_expose_what_prometheus_client_would() -> None:
    """The lock-free step histogram and counters against prometheus-client's own Histogram and Counter (the oracle),
    fed the same values, bucket bounds included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from optserve.service.observability import LATENCY_BUCKETS, HotMetrics

    reference = CollectorRegistry()
    hist = Histogram("optserve_step_seconds", "h", buckets=LATENCY_BUCKETS, registry=reference)
    steps = Counter("optserve_steps", "s", ["outcome"], registry=reference)
    hot = HotMetrics()
    mine = CollectorRegistry()
    mine.register(hot)
    values = [0.0, *LATENCY_BUCKETS, *(b * 1.0001 for b in LATENCY_BUCKETS), 1e-9, 0.003, 99.0]
    for i, v in enumerate(values):
        outcome = HotMetrics.OUTCOMES[i % 4]
        hist.observe(v)
        steps.labels(outcome).inc()
        hot.step(outcome, v)

    def samples(registry: CollectorRegistry) -> dict[str, float]:
        out = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith(("optserve_step_seconds_", "optserve_steps_total")) and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    expected = samples(reference)
    got = samples(mine)
    assert set(got) >= set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name
