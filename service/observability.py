"""Metrics, request ids and request logs.

- ``/metrics`` in the Prometheus text format (prometheus-client, one registry per app): HTTP requests by route and
  status, steps by outcome, refused requests by reason, step latency, bytes in and out, sessions, parameters and
  bytes held, snapshot durations and failures.
- Every request gets an id (the client's ``X-Request-ID`` when it sends a sane one, else a new one), echoed in the
  answer's ``X-Request-ID`` and in the one log line written per request (text, or JSON with
  ``OPTSERVE_LOG_FORMAT=json``). Log lines carry method, path, status, duration and sizes: never a body, never a
  header value such as a token.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("optserve.access")

_SESSION_PATH = re.compile(r"^/v1/sessions/[^/]+")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Request ids made here: 8 random hex digits per process, then a counter (unique without a random draw per request).
_ID_PREFIX = os.urandom(4).hex()
_id_numbers = itertools.count()


def _new_id_prefix() -> None:
    global _ID_PREFIX, _id_numbers
    _ID_PREFIX, _id_numbers = os.urandom(4).hex(), itertools.count()


os.register_at_fork(after_in_child=_new_id_prefix)  # workers forked after import: each its own prefix
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


DOCS_ASSETS = "/docs/assets/{version}/{name}"  # the files of Swagger UI and ReDoc (docs.py): one route label
ROUTES = frozenset(
    ["/v1/sessions", "/v1/sessions/{id}", "/v1/sessions/{id}/step", "/v1/sessions/{id}/params",
     "/v1/sessions/{id}/checkpoint", "/v1/cluster", "/healthz", "/readyz", "/metrics", "/docs",
     "/docs/oauth2-redirect", "/redoc", "/openapi.json", DOCS_ASSETS]
)  # fmt: skip


def printable(text: str) -> str:
    """``text`` for a log line: control characters (a path's decoded ``%0A``) escaped, so that nobody can forge
    lines in a text log."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_numbers) & 0xFFFFFFFF:08x}"


def route_of(path: str) -> str:
    """The route of a path, session ids and docs assets folded; ``other`` for any path that is not a route, so that
    a client probing random paths cannot grow the set of label values."""
    if path.startswith("/docs/assets/"):
        return DOCS_ASSETS  # one label for every asset, real or not
    route = _SESSION_PATH.sub("/v1/sessions/{id}", path) if path.startswith("/v1/sessions/") else path
    return route if route in ROUTES else "other"


class Durations:
    """A latency histogram as plain numbers (thread-safe): what a store reports of its snapshot writes."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # a bucket counts values <= its bound
            self.total += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        with self._lock:
            cumulative = list(itertools.accumulate(self.buckets))
            total = self.total
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        return HistogramMetricFamily(name, documentation, buckets=list(zip(bounds, cumulative)), sum_value=total)


class Metrics:
    """The app's Prometheus metrics."""

    def __init__(self, store: Any) -> None:
        self.registry = CollectorRegistry()
        self.hot = HotMetrics()  # HTTP requests and bytes, steps by outcome, refusals, step latency
        self.registry.register(self.hot)
        self.registry.register(_StoreCollector(store))


class HotMetrics(Collector):
    """The metrics that every request or step updates, kept as plain numbers and turned into Prometheus families
    when scraped. Only the event loop's thread updates them (the request observer and the step route run there), so
    they need no lock: prometheus-client's locked values, its ``labels()`` lookup and its histogram's loop over the
    buckets cost about a twentieth of a small step's server time."""

    OUTCOMES = ("applied", "skipped", "replayed", "accepted")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.steps = dict.fromkeys(self.OUTCOMES, 0)
        self.rejected: dict[str, int] = {}
        self.step_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.step_sum = 0.0

    def request(self, method: str, route: str, status: int, bytes_in: int, bytes_out: int) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def step(self, outcome: str, seconds: float) -> None:
        self.steps[outcome] += 1
        self.step_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # a bucket counts values <= its bound
        self.step_sum += seconds

    def refused(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily("optserve_http_requests", "HTTP requests", labels=["method", "route", "status"])
        for (method, route, status), n in list(self.requests.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        yield CounterMetricFamily("optserve_http_received_bytes", "Request body bytes received", value=self.bytes_in)
        yield CounterMetricFamily("optserve_http_sent_bytes", "Response body bytes sent", value=self.bytes_out)
        steps = CounterMetricFamily(
            "optserve_steps", "Step requests by outcome (applied, skipped, replayed, accepted)", labels=["outcome"]
        )
        for outcome, n in self.steps.items():
            steps.add_metric([outcome], n)
        yield steps
        rejected = CounterMetricFamily("optserve_steps_rejected", "Refused step requests by reason", labels=["reason"])
        for reason, n in list(self.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        cumulative = list(itertools.accumulate(self.step_buckets))
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        yield HistogramMetricFamily(
            "optserve_step_seconds",
            "Server time of a step (checks, fused step, answer copy)",
            buckets=list(zip(bounds, cumulative)),
            sum_value=self.step_sum,
        )


class _StoreCollector(Collector):
    """Sessions, parameters and bytes held, and the snapshot writes, read from the store at scrape time."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Iterable[Metric]:
        stats = self.store.stats()
        yield GaugeMetricFamily("optserve_sessions", "Sessions held in memory", value=stats.sessions)
        yield GaugeMetricFamily("optserve_sessions_evicted", "Sessions evicted to disk (loaded on use)",
                                value=stats.evicted)  # fmt: skip
        yield CounterMetricFamily("optserve_session_evictions", "Sessions evicted to disk for idleness or room",
                                  value=stats.evictions)  # fmt: skip
        yield CounterMetricFamily("optserve_session_reloads", "Sessions loaded back from disk on use",
                                  value=stats.reloads)  # fmt: skip
        yield CounterMetricFamily("optserve_sessions_expired", "Sessions deleted for idleness (expired)",
                                  value=stats.expired)  # fmt: skip
        yield GaugeMetricFamily("optserve_parameters", "Parameters held by all sessions", value=stats.parameters)
        yield GaugeMetricFamily("optserve_state_bytes", "Bytes of optimizer state held by all sessions",
                                value=stats.state_bytes)  # fmt: skip
        saver = stats.snapshots  # None: the store keeps no snapshots (the same families, empty)
        yield (saver.durations if saver is not None else Durations()).family(
            "optserve_snapshot_seconds", "Time to write a snapshot"
        )
        failures = saver.failures if saver is not None else 0
        yield CounterMetricFamily("optserve_snapshot_failures", "Snapshots that failed", value=failures)
        failing = 1 if saver is not None and saver.failing else 0
        yield GaugeMetricFamily(
            "optserve_snapshots_failing", "1 from a failed snapshot until one succeeds", value=failing
        )


class RequestObserver:
    """ASGI middleware: request id, one log line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, json_logs: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.json_logs = json_logs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        sizes = {"in": 0, "out": 0}
        status = {"code": 500}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
            return message

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, counting_receive, observed_send)
        finally:
            self._record(scope, request_id, status["code"], sizes, time.perf_counter() - started)

    def _record(self, scope: Scope, request_id: str, status: int, sizes: dict[str, int], seconds: float) -> None:
        path = scope.get("path", "")
        method = scope.get("method", "")
        self.metrics.hot.request(method, route_of(path), status, sizes["in"], sizes["out"])
        path = printable(path)
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "ms": round(seconds * 1e3, 3),
            "bytes_in": sizes["in"],
            "bytes_out": sizes["out"],
        }
        if self.json_logs:
            access_log.info(json.dumps({"event": "request", **fields}))
        else:
            access_log.info(
                "%s %s %s %d %.1fms in=%d out=%d",
                request_id,
                method,
                path,
                status,
                fields["ms"],
                sizes["in"],
                sizes["out"],
            )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (request lines are already JSON: merged)."""

    def format(self, record: logging.LogRecord) -> str:
        base = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        try:
            parsed = json.loads(message) if message.startswith("{") else None
        except ValueError:
            parsed = None
        entry = {**base, **parsed} if isinstance(parsed, dict) else {**base, "message": message}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, json_format: bool) -> None:
    """optserve's loggers (and uvicorn's error log) on stderr, as text or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if json_format else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    for name in ("optserve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
